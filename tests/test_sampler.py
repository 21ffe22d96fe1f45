"""Sampling masks on hand-made distributions, seeded reproducibility, and empirical distributions."""

from __future__ import annotations

import math

import pytest
import torch

from engine.request import Request, SamplingParams
from engine.sampler import Sampler, min_p_mask, processed_probs, top_k_mask, top_p_mask


def req(i=0, **kw) -> Request:
    return Request(f"r{i}", [1, 2, 3], SamplingParams(**kw), set())


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [1.0, 5.0, 3.0, 4.0, 2.0]])
    out = top_k_mask(logits, torch.tensor([2, 0]))
    assert torch.isinf(out[0]).tolist() == [True, False, True, False, True]
    assert not torch.isinf(out[1]).any()  # 0 disables


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([[0.05, 0.5, 0.25, 0.2], [0.05, 0.5, 0.25, 0.2], [0.05, 0.5, 0.25, 0.2]])
    out = top_p_mask(probs, torch.tensor([0.5, 0.6, 1.0]))
    assert out[0].tolist() == [0.0, 1.0, 0.0, 0.0]  # 0.5 alone reaches 0.5
    torch.testing.assert_close(out[1], torch.tensor([0.0, 0.5 / 0.75, 0.25 / 0.75, 0.0]))
    torch.testing.assert_close(out[2], probs[2])


def test_min_p_drops_tokens_below_fraction_of_max():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = min_p_mask(probs, torch.tensor([0.25]))  # threshold 0.125
    torch.testing.assert_close(out[0], torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)


def test_temperature_scales_logits():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    probs = processed_probs(logits.clone(), [req(temperature=0.5)])
    torch.testing.assert_close(probs[0], torch.tensor([0.1, 0.9]))  # 1:9 after squaring the odds


def test_greedy_picks_argmax_and_logit_bias_shifts_it():
    logits = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    out = Sampler()(logits.clone(), [req(0, temperature=0), req(1, temperature=0, logit_bias={2: 5.0})])
    assert out.token_ids == [1, 2]


def test_penalties():
    logits = torch.tensor([[2.0, 2.0, -1.0, 1.9]])
    r = req(temperature=0, presence_penalty=0.5)
    r.token_ids += [1]  # token 1 was generated: 2.0 - 0.5 < 1.9 of token 3, but token 0 is untouched
    assert Sampler()(logits.clone(), [r]).token_ids == [0]
    r = req(temperature=0, repetition_penalty=2.0)  # prompt tokens 1, 2, 3 are penalised: 2.0 -> 1.0, 1.9 -> 0.95
    assert Sampler()(torch.tensor([[1.5, 2.0, -1.0, 1.9]]), [r]).token_ids == [0]
    r = req(temperature=0, frequency_penalty=1.0)
    r.token_ids += [0, 0]  # count 2: 2.0 - 2.0 = 0 < 1.9
    assert Sampler()(logits.clone(), [r]).token_ids == [1]


def test_seeded_sampling_is_independent_of_batch_composition():
    torch.manual_seed(0)
    vocab = 50
    logits_rows = torch.randn(6, vocab)
    seeded = [req(i, temperature=1.0, seed=100 + i) for i in range(3)]
    alone = [Sampler(seed=1)(logits_rows[i:i + 1].clone(), [seeded[i]]).token_ids[0] for i in range(3)]
    # Fresh requests with the same seeds, now in a mixed batch with unseeded ones and another global seed.
    seeded_again = [req(i, temperature=1.0, seed=100 + i) for i in range(3)]
    others = [req(10 + i, temperature=0.7) for i in range(3)]
    batch = [others[0], seeded_again[2], others[1], seeded_again[0], seeded_again[1], others[2]]
    rows = torch.stack([logits_rows[3], logits_rows[2], logits_rows[4], logits_rows[0], logits_rows[1], logits_rows[5]])
    mixed = Sampler(seed=7)(rows, batch).token_ids
    assert [mixed[3], mixed[4], mixed[1]] == alone


CHI2_CRITICAL_999 = {1: 10.83, 2: 13.82, 3: 16.27}  # chi-square quantile at p = 0.001 by degrees of freedom


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("params,expected", [
    (dict(temperature=1.0), [0.1, 0.2, 0.3, 0.4]),
    (dict(temperature=2.0), None),
    (dict(temperature=1.0, top_p=0.65), [0.0, 0.0, 0.3 / 0.7, 0.4 / 0.7]),
    (dict(temperature=1.0, top_k=3), [0.0, 0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9]),
])
def test_empirical_distribution_matches(params, expected):
    base = torch.tensor([0.1, 0.2, 0.3, 0.4])
    if expected is None:  # temperature 2: p ~ sqrt(base)
        expected = (base.sqrt() / base.sqrt().sum()).tolist()
    n = 4000
    logits = base.log().expand(n, 4).contiguous()
    sampler = Sampler(seed=1234)
    tokens = torch.tensor(sampler(logits, [req(i, **params) for i in range(n)]).token_ids)
    counts = torch.bincount(tokens, minlength=4).double()
    expected_t = torch.tensor(expected, dtype=torch.double)
    assert counts[expected_t == 0].sum() == 0
    statistic, dof = chi_square(counts, expected_t)
    assert statistic < CHI2_CRITICAL_999[dof], (counts.tolist(), expected)


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(max_tokens=0), dict(min_p=1.5), dict(presence_penalty=3.0),
                                 dict(repetition_penalty=0.0), dict(logprobs=21)])
def test_invalid_params_name_the_parameter(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)
