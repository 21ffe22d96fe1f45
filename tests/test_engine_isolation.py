"""A step that fails because of one request's parameters ends that request alone: its batch-mates
finish with the tokens they would have had without it (engine/llm_engine.py ``_run_isolated``)."""

from __future__ import annotations

import pytest

from conftest import STORIES
from engine import EngineConfig, LLMEngine, SamplingParams
from engine.config import SpeculativeConfig

MATES = {
    "greedy": SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
    "seeded": SamplingParams(max_tokens=40, temperature=1.0, seed=7, ignore_eos=True),
    "logprobs": SamplingParams(max_tokens=40, temperature=0, logprobs=2, ignore_eos=True),
}
PROMPTS = {"greedy": [1, 400, 401, 402], "seeded": [1, 300, 301], "logprobs": [1, 200] * 30}


def culprit(vocab_size: int) -> SamplingParams:
    """Sampling whose logprobs ask for more alternatives than the vocabulary has: the batched top-k
    in the sampler raises for the whole batch. SamplingParams refuses this (logprobs <= 20), so it is
    set after construction, as a library caller could."""
    params = SamplingParams(max_tokens=40, logprobs=1, ignore_eos=True)
    params.logprobs = vocab_size + 1
    return params


def run(engine: LLMEngine, bad_after: int | None) -> dict[str, list]:
    """The mates from step 0, the culprit added after ``bad_after`` steps (None: never); every
    request's outputs by id."""
    for name, params in MATES.items():
        engine.add_request(name, PROMPTS[name], params)
    outputs: dict[str, list] = {name: [] for name in [*MATES, "bad"]}
    steps = 0
    while engine.has_unfinished_requests():
        if steps == bad_after:
            engine.add_request("bad", [1, 500, 501], culprit(engine.vocab_size))
        for out in engine.step():
            outputs[out.request_id].append(out)
        steps += 1
    return outputs


def logprobs(outputs: list) -> list[float]:
    return [v for o in outputs for lp in o.new_logprobs or [] for v in (lp.logprob, *lp.top.values())]


@pytest.mark.parametrize("speculative", [None, "ngram", "draft"])
@pytest.mark.parametrize("bad_after", [0, 5], ids=["same_first_step", "mid_decode"])
def test_a_request_whose_sampling_fails_ends_alone(speculative, bad_after):
    spec = speculative and SpeculativeConfig(method=speculative, draft_model=str(STORIES) if speculative == "draft" else None,
                                             num_speculative_tokens=2, adaptive=False)
    make = lambda: LLMEngine(EngineConfig(model=str(STORIES), dtype="float32", kv_cache_memory="32MiB",  # noqa: E731
                                          speculative=spec))
    reference, engine = make(), make()
    expected = run(reference, bad_after=None)
    got = run(engine, bad_after)
    bad = got["bad"]
    assert [o.finished for o in bad] == [True] and bad[0].finish_reason == "error"
    assert "engine step failed" in bad[0].error and "out of range" in bad[0].error
    for name in MATES:
        assert got[name][-1].finish_reason == "length"
        assert sum(len(o.new_token_ids) for o in got[name]) == 40
        assert [o.new_token_ids for o in got[name]] == [o.new_token_ids for o in expected[name]]
        # Logprobs equal up to rounding: a retried request runs in a smaller batch.
        assert logprobs(got[name]) == pytest.approx(logprobs(expected[name]), abs=1e-4)
    assert engine.kv.num_free_blocks == engine.kv.num_blocks and not any(engine.kv.ref_counts)
    if speculative:  # the failed attempts' drafts are not counted
        assert engine.stats().spec.draft_tokens > 0 and engine.stats().spec == reference.stats().spec
