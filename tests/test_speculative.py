"""Speculative decoding: exact outputs (greedy token for token, sampled by chi-square), KV bookkeeping
under preemption and aborts, draft = target, the adaptive policy, seeds, logprobs, bad drafts."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

import engine.speculative as speculative
from bench_model import damp_layers
from conftest import build_tiny_model
from engine import LLM, EngineConfig, LLMEngine, SamplingParams
from engine.config import SpeculativeConfig
from engine.spec_policy import AdaptivePolicy, _Bucket
from engine.outputs import ScheduledRequest
from engine.request import Request
from engine.sampler import Sampler
from engine.speculative import NgramProposer, Speculator, residual
from server_process import running_server

# Prompts of mixed lengths that repeat themselves, so n-gram lookup finds matches.
PROMPTS = [[1] + list(range(10, 10 + n)) * 2 for n in (3, 9, 20, 40, 70)]
GREEDY = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    """A 12-layer tiny Llama whose layers after the first barely touch the residual stream, so a draft
    made of its first layer is cheap (1/12 of the layers) and usually right, like a real small draft."""
    path = build_tiny_model("llama", tmp_path_factory.mktemp("spec-target"), num_hidden_layers=12,
                            hidden_size=128, intermediate_size=256, head_dim=32)
    return damp_layers(path, first=1, factor=0.002)


@pytest.fixture(scope="module")
def drafts(target, draft_of, tmp_path_factory) -> dict[str, Path]:
    return {
        "truncated": draft_of(target, num_layers=1),  # ~97% of greedy drafts accepted
        "noisy": draft_of(target, num_layers=1, noise=0.02),  # ~50%
        "noisier": draft_of(target, num_layers=1, noise=0.05),  # ~25%
        "random": build_tiny_model("llama", tmp_path_factory.mktemp("spec-random"), seed=5, num_hidden_layers=1),  # ~0%
    }


def spec_llm(target: Path, method: str = "draft", draft: Path | None = None, adaptive: bool = False, k: int = 4,
             **kwargs) -> LLM:
    return LLM(str(target), speculative_config=dict(method=method, draft_model=draft, adaptive=adaptive,
                                                    num_speculative_tokens=k), **kwargs)


def assert_no_blocks_held(llm: LLM) -> None:
    kv = llm.engine.kv
    assert kv.num_free_blocks == kv.num_blocks and not any(kv.ref_counts)


@pytest.mark.parametrize("method,quantization", [("draft", None), ("ngram", None), ("draft", "int8")])
def test_greedy_outputs_equal_without_speculation_under_preemption(target, drafts, method, quantization):
    budget = dict(kv_cache_memory=2 * 12 * 16 * 2 * 32 * 4 * 20, max_num_batched_tokens=64,  # 20 blocks: preempts
                  quantization=quantization)
    plain = LLM(str(target), **budget)
    expected = plain.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    llm = spec_llm(target, method, drafts["noisy"] if method == "draft" else None, **budget)
    got = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    stats = llm.engine.stats()
    assert plain.engine.stats().num_preemptions > 0 and stats.num_preemptions > 0
    assert 0 < stats.spec.accepted_tokens < stats.spec.draft_tokens, "both accepted and rejected drafts must occur"
    assert_no_blocks_held(llm)


def test_draft_equal_to_target_accepts_everything_and_adds_k_plus_1_tokens_per_step(target):
    k = 3
    llm = spec_llm(target, draft=target, k=k)
    params = SamplingParams(max_tokens=1 + 4 * (k + 1), temperature=0, ignore_eos=True)
    engine = llm.engine
    engine.add_request("r", PROMPTS[1], params)
    sizes = []
    while engine.has_unfinished_requests():
        sizes += [len(out.new_token_ids) for out in engine.step()]
    assert sizes == [k + 1] * 4 + [1]  # the prefill step drafts too; the last token has no room for drafts
    spec = engine.stats().spec
    assert spec.accepted_tokens == spec.draft_tokens == 4 * k and spec.mean_accepted_length == k + 1
    assert spec.accepted_per_position == spec.drafted_per_position == [4] * k


def test_draft_equal_to_target_accepts_almost_every_sampled_draft(target):
    llm = spec_llm(target, draft=target)
    llm.generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(max_tokens=40, temperature=1.0, ignore_eos=True))
    spec = llm.engine.stats().spec
    assert spec.accepted_tokens >= 0.99 * spec.draft_tokens  # p and q differ only by float rounding


def joint_first_two(target: Path, prompt: list[int], temperature: float, top_k: int) -> dict[tuple[int, int], float]:
    """The exact distribution of the first two sampled tokens, from Hugging Face's forward passes."""
    model = AutoModelForCausalLM.from_pretrained(target)

    def dist(ids: list[int]) -> dict[int, float]:
        with torch.no_grad():
            top = (model(torch.tensor([ids])).logits[0, -1] / temperature).topk(top_k)
        return dict(zip(top.indices.tolist(), top.values.softmax(-1).tolist()))

    return {(a, b): pa * pb for a, pa in dist(prompt).items() for b, pb in dist(prompt + [a]).items()}


def chi_square_p_value(samples: list[tuple[int, int]], expected: dict[tuple[int, int], float]) -> float:
    counts, n = Counter(samples), len(samples)
    assert set(counts) <= set(expected), "a token outside top-k was sampled"
    chi = sum((counts[cell] - n * p) ** 2 / (n * p) for cell, p in expected.items())
    df = torch.tensor((len(expected) - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(df, torch.tensor(chi / 2, dtype=torch.float64)).item()


def sample_first_two(llm: LLM, prompt: list[int], n: int, temperature: float, top_k: int) -> list[tuple[int, int]]:
    params = SamplingParams(max_tokens=3, temperature=temperature, top_k=top_k, ignore_eos=True)
    return [tuple(out.token_ids[:2]) for out in llm.generate(prompt_token_ids=[prompt] * n, sampling_params=params)]


def test_sampled_tokens_follow_the_target_distribution(target, drafts):
    """Both tokens come from the speculative step (the prefill step drafts 2, max_tokens leaves room)."""
    prompt = [1, 5, 9, 13]
    expected = joint_first_two(target, prompt, 1.0, 3)
    llm = spec_llm(target, draft=drafts["noisier"], k=2)
    p = chi_square_p_value(sample_first_two(llm, prompt, 600, 1.0, 3), expected)
    spec = llm.engine.stats().spec
    assert 0.1 < spec.accepted_tokens / spec.draft_tokens < 0.9, "the test needs both acceptances and rejections"
    assert p > 1e-3, f"speculative samples do not follow the target distribution (chi-square p = {p:.2e})"


def verify_one_hot_proposals(p: torch.Tensor, draft: int, n: int) -> list[int]:
    """n requests whose deterministic proposer (q one-hot, as n-gram lookup) drafted ``draft`` under
    target distribution p; the first token each one gets."""
    speculator = Speculator(SpeculativeConfig(method="ngram", adaptive=False), None, Sampler(0), lambda: None)
    items = [ScheduledRequest(Request(f"r{i}", [1, 2], SamplingParams(max_tokens=4), set()), 1, 1, [draft]) for i in range(n)]
    logits = p.log().repeat(2 * n, 1)  # per request: the row that checks the draft, then the bonus row
    return [v.token_ids[0] for v in speculator.verify(logits, items)]


@pytest.mark.parametrize("broken", [False, True])
def test_one_hot_proposals_keep_the_target_distribution(monkeypatch, broken):
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    if broken:  # after a rejection draw from p, not from p without the rejected token
        monkeypatch.setattr(speculative, "residual", lambda p, q: p)
    counts, n = Counter(verify_one_hot_proposals(p, draft=0, n=4000)), 4000
    chi = sum((counts[t] - n * float(pt)) ** 2 / (n * float(pt)) for t, pt in enumerate(p))
    p_value = torch.special.gammaincc(torch.tensor(1.5, dtype=torch.float64), torch.tensor(chi / 2, dtype=torch.float64)).item()
    assert (p_value < 1e-6) if broken else (p_value > 1e-3)


def test_chi_square_catches_sampling_from_p_instead_of_the_residual(target, drafts, monkeypatch):
    """The same test with a classic bug: after a rejection, draw from p instead of normalize(max(0, p - q))."""
    prompt = [1, 5, 9, 13]
    expected = joint_first_two(target, prompt, 1.0, 3)
    monkeypatch.setattr(speculative, "residual", lambda p, q: p)
    llm = spec_llm(target, draft=drafts["noisier"], k=2)
    assert chi_square_p_value(sample_first_two(llm, prompt, 600, 1.0, 3), expected) < 1e-6


def test_no_block_leaks_after_random_aborts_during_speculation(target, drafts):
    for method, draft in (("draft", drafts["noisy"]), ("ngram", None)):
        llm = spec_llm(target, method, draft, kv_cache_memory=2 * 12 * 16 * 2 * 32 * 4 * 14, max_num_batched_tokens=64)
        engine, rng = llm.engine, random.Random(0)
        live: list[str] = []
        for i in range(80):
            params = SamplingParams(max_tokens=rng.randrange(1, 40), temperature=rng.choice([0, 1.0]), ignore_eos=True)
            engine.add_request(f"r{i}", rng.choice(PROMPTS)[: rng.randrange(2, 80)], params)
            live.append(f"r{i}")
            for out in engine.step() if i % 2 else []:
                if out.finished:
                    live.remove(out.request_id)
            if i % 3 == 2 and live:
                victim = live.pop(rng.randrange(len(live)))
                assert engine.abort_request(victim).finish_reason == "abort"
        while engine.has_unfinished_requests():
            engine.step()
        assert engine.stats().spec.draft_tokens > 0 and engine.stats().num_preemptions > 0
        assert_no_blocks_held(llm)


@pytest.mark.parametrize("draft,expect_on", [("random", False), ("truncated", True)])
def test_adaptive_policy_switches_off_a_useless_draft_and_keeps_a_good_one(target, drafts, draft, expect_on):
    expected = LLM(str(target)).generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    llm = spec_llm(target, draft=drafts[draft], adaptive=True)
    got = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    policy = llm.engine.speculator.policy
    assert policy.speculating is expect_on
    assert policy.switches == (0 if expect_on else 1)
    decode_steps = llm.engine.num_steps
    if expect_on:  # 48 tokens in far fewer steps than 48
        assert decode_steps < 48 / 2
    else:  # a few probes, then plain decoding
        assert llm.engine.stats().spec.num_drafts <= 6 * len(PROMPTS)


def test_seeded_requests_reproduce_whatever_the_batch_and_policy(target, drafts):
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=1234, ignore_eos=True)
    alone = spec_llm(target, draft=drafts["noisy"], adaptive=True).generate(prompt_token_ids=[PROMPTS[2]], sampling_params=params)[0]
    crowd = [SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True)] * 3 + [params]
    batch = spec_llm(target, draft=drafts["noisy"], adaptive=True).generate(
        prompt_token_ids=PROMPTS[:3] + [PROMPTS[2]], sampling_params=crowd)
    assert batch[3].token_ids == alone.token_ids


def test_logprobs_with_speculation_match_plain_decoding(target, drafts):
    params = SamplingParams(max_tokens=20, temperature=0, logprobs=3, ignore_eos=True)
    plain = LLM(str(target)).generate(prompt_token_ids=PROMPTS[:2], sampling_params=params)
    spec = spec_llm(target, draft=drafts["noisy"]).generate(prompt_token_ids=PROMPTS[:2], sampling_params=params)
    for a, b in zip(plain, spec):
        assert a.token_ids == b.token_ids and len(b.logprobs) == 20
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert list(x.top) == list(y.top)
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-3)


def test_stop_token_and_max_tokens_inside_accepted_drafts(target):
    """Drafts past a stop or past max_tokens never reach the output."""
    plain = LLM(str(target)).generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    stop_at = plain[2].token_ids[5]
    params = SamplingParams(max_tokens=7, temperature=0, stop_token_ids=[stop_at], ignore_eos=True)
    got = spec_llm(target, draft=target).generate(prompt_token_ids=[PROMPTS[2], PROMPTS[3]], sampling_params=params)
    assert got[0].token_ids == plain[2].token_ids[:6] and got[0].finish_reason == "stop"
    first_stop = next((i for i, t in enumerate(plain[3].token_ids) if t == stop_at), 7)
    assert got[1].token_ids == plain[3].token_ids[:min(7, first_stop + 1)]


def test_draft_with_another_vocabulary_is_a_startup_error(target, tiny_model):
    with pytest.raises(ValueError, match="vocabulary"):
        spec_llm(target, draft=tiny_model("qwen2"))
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig(method="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="draft model"):
        SpeculativeConfig(method="draft")


def test_ngram_lookup_takes_the_latest_longest_match():
    proposer = NgramProposer(ngram_min=1, ngram_max=3)
    assert proposer.lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2) == [7, 8]  # latest match of [1, 2, 3]
    assert proposer.lookup([5, 6, 4, 6], 3) == [4, 6]  # only a 1-gram matches; what follows runs to the end
    assert proposer.lookup([1, 2, 3], 3) == []


def test_residual_is_the_normalised_excess_of_p_over_q():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.25, 0.5, 0.25], [0.2, 0.3, 0.5]])
    assert torch.allclose(residual(p, q), torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]))  # p == q: p itself


def test_policy_picks_the_k_with_most_tokens_per_second():
    policy = AdaptivePolicy(max_k=4)
    bucket = _Bucket()
    bucket.plain_step, bucket.draft_forward, bucket.verify_step = 10.0, 1.0, {4: 12.0}
    policy.acceptance = [0.9] * 4
    assert max(range(5), key=lambda k: policy.tokens_per_second(bucket, k)) == 4
    policy.acceptance = [0.05] * 4
    assert max(range(5), key=lambda k: policy.tokens_per_second(bucket, k)) == 0
    bucket.draft_forward = 8.0  # a draft as dear as the target pays only at near-certain acceptance
    policy.acceptance = [0.7] * 4
    assert max(range(5), key=lambda k: policy.tokens_per_second(bucket, k)) == 0


def test_policy_turns_speculation_back_on_only_for_a_clear_gain():
    """Off as soon as plain decoding looks faster; back on only when speculation looks SWITCH_MARGIN
    faster: measurements that put it 5% ahead leave it off, 20% ahead turn it on."""
    policy = AdaptivePolicy(max_k=1)
    policy.acceptance = [0.5]
    observe = lambda k, step: policy.observe_step(1, k, 0.1 * k, step)  # noqa: E731
    for _ in range(4):
        observe(0, 1.0)
    speed = lambda ratio: 1.5 / ratio - 0.1  # noqa: E731  (1.5 tokens per draft + verify = ratio x plain)
    for ratio, on in ((0.95, False), (1.05, False), (1.2, True), (0.97, False)):
        for _ in range(30):
            observe(1, speed(ratio))
        assert (policy.choose(1) == 1) is on and policy.speculating is on, ratio
    assert policy.switches == 3  # off (it starts on), on, off


def test_one_stalled_plain_step_does_not_turn_a_useless_draft_back_on():
    """A GC pause or a busy neighbour makes one step 100x dearer; counted in full, it would make plain
    decoding look 20x slower and speculation with nothing accepted look worth it."""
    policy = AdaptivePolicy(max_k=4)
    policy.acceptance = [0.0] * 4
    for _ in range(4):
        policy.observe_step(1, 0, 0.0, 0.01)
        policy.observe_step(1, 4, 0.04, 0.012)
    assert policy.choose(1) == 0
    policy.observe_step(1, 0, 0.0, 1.0)
    assert policy.choose(1) == 0 and policy.switches == 1
    for _ in range(20):  # a lasting change still counts
        policy.observe_step(1, 0, 0.0, 1.0)
    assert policy.choose(1) > 0


def test_engine_config_carries_the_speculative_settings(target):
    engine = LLMEngine(EngineConfig(model=str(target), speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=2)))
    assert engine.speculator.max_k == 2 and engine.speculator.policy is not None


@pytest.mark.parametrize("flags", [["--draft-model", "{draft}", "--no-adaptive-speculation", "--num-speculative-tokens", "3"],
                                   ["--speculative-method", "ngram", "--ngram-max", "3", "--no-adaptive-speculation"]])
def test_served_with_speculation_same_text_and_metrics(target, drafts, flags):
    """Through the CLI flags and the openai client: greedy text as without speculation, streamed and
    not, and the drafted/accepted counters (overall and per position) on /metrics."""
    expected = LLM(str(target)).generate(prompt_token_ids=PROMPTS[:3], sampling_params=GREEDY)
    with running_server(target, "--kv-cache-memory", "16MiB", *[f.format(draft=drafts["noisy"]) for f in flags]) as srv:
        client = srv.client()
        for prompt, want in zip(PROMPTS[:3], expected):
            kwargs = dict(model=str(target), prompt=prompt, max_tokens=48, temperature=0, extra_body={"ignore_eos": True})
            assert client.completions.create(**kwargs).choices[0].text == want.text
            streamed = client.completions.create(**kwargs, stream=True)
            assert "".join(c.choices[0].text for c in streamed if c.choices) == want.text
        samples = {(s.name, s.labels.get("position")): s.value
                   for family in text_string_to_metric_families(httpx.get(f"{srv.url}/metrics").text) for s in family.samples}
        stats = srv.stats()["spec"]
    assert samples[("kvserve:spec_decode_num_draft_tokens_total", None)] == stats["draft_tokens"] > 0
    assert samples[("kvserve:spec_decode_num_accepted_tokens_total", None)] == stats["accepted_tokens"]
    assert samples[("kvserve:spec_decode_num_accepted_tokens_per_pos_total", "0")] == stats["accepted_per_position"][0]
    assert sum(samples[("kvserve:spec_decode_num_draft_tokens_per_pos_total", str(j))]
               for j in range(len(stats["drafted_per_position"]))) == stats["draft_tokens"]
