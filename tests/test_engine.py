"""The engine end to end: a real pretrained model, prefix caching, stops, seeds, leaks, bad input."""

from __future__ import annotations

import ast
import asyncio
import random
import re

import pytest

from conftest import STORIES
from engine import LLM, AsyncEngine, EngineConfig, LLMEngine, SamplingParams


def documented_stories_text() -> str:
    """The greedy output from BOS documented in the fixture's SOURCE.md (llama2.c's run.c output)."""
    source = (STORIES / "SOURCE.md").read_text()
    literal = re.search(r"expected = (\(.*?\))\nout = ", source, re.S).group(1)
    return ast.literal_eval(literal)


@pytest.fixture(scope="module")
def stories():
    return LLM(str(STORIES), dtype="float32", kv_cache_memory="32MiB", max_num_batched_tokens=64)


def test_stories260k_greedy_from_bos_reproduces_documented_text(stories):
    expected = documented_stories_text()
    greedy = SamplingParams(max_tokens=256, temperature=0, ignore_eos=True)
    alone = stories.generate(prompt_token_ids=[[1]], sampling_params=greedy)[0]
    assert alone.text == expected
    # The same request batched with others (different lengths, sampling settings, a chunked prefill).
    others = ["Lily and Tom", "Once upon a time, in a big forest, there lived a bear" * 3, "The cat"]
    params = [greedy, SamplingParams(max_tokens=100, temperature=0.8, seed=3),
              SamplingParams(max_tokens=30, temperature=0), SamplingParams(max_tokens=200, top_p=0.9, seed=1)]
    batch = stories.generate(prompt_token_ids=[[1]] + [stories.tokenizer.encode(p) for p in others], sampling_params=params)
    assert batch[0].text == expected
    assert batch[0].token_ids == alone.token_ids


def test_prefix_cache_hit_reports_cached_tokens_and_same_tokens(stories):
    shared = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. " * 2
    greedy = SamplingParams(max_tokens=24, temperature=0)
    first = stories.generate([shared + "One day"], greedy)[0]
    second = stories.generate([shared + "One night"], greedy)[0]
    shared_len = len(stories.tokenizer.encode(shared))
    assert second.num_cached_tokens >= (shared_len // 16) * 16 > 0
    uncached = LLM(str(STORIES), dtype="float32", kv_cache_memory="32MiB", enable_prefix_caching=False)
    reference = uncached.generate([shared + "One day", shared + "One night"], greedy)
    assert [first.token_ids, second.token_ids] == [r.token_ids for r in reference]
    assert reference[1].num_cached_tokens == 0


def test_samples_of_one_prompt_prefill_it_once():
    """Four requests for one 100-token prompt added together (what n=4 makes), a budget that would
    admit them all in the first step: the first prefills the prompt; the others wait at the head of
    the queue until its six full blocks are cached, then take them from the cache. The tokens equal
    those of an engine without prefix caching, which prefills the prompt four times."""
    prompt = [1] + list(range(300, 399))
    greedy = SamplingParams(max_tokens=12, temperature=0)
    outputs, hits = {}, {}
    for caching in (True, False):
        llm = LLM(str(STORIES), dtype="float32", kv_cache_memory="32MiB", max_num_batched_tokens=512,
                  enable_prefix_caching=caching)
        outputs[caching] = llm.generate(prompt_token_ids=[prompt] * 4 + [[1, 500, 501]], sampling_params=greedy)
        hits[caching] = llm.engine.kv.prefix_hits
    assert hits == {True: 3 * 96, False: 0}
    assert [o.num_cached_tokens for o in outputs[True]] == [0, 96, 96, 96, 0]
    assert [o.token_ids for o in outputs[True]] == [o.token_ids for o in outputs[False]]


def test_stop_strings_are_cut_and_stop_tokens_reported(stories):
    expected = documented_stories_text()
    out = stories.generate(prompt_token_ids=[[1]], sampling_params=SamplingParams(max_tokens=256, temperature=0, stop=["red ball", "zzz"]))[0]
    assert out.text == expected[:expected.index("red ball")]
    assert out.finish_reason == "stop" and out.stop_reason == "red ball"
    kept = stories.generate(prompt_token_ids=[[1]], sampling_params=SamplingParams(
        max_tokens=256, temperature=0, stop="red ball", include_stop_str_in_output=True))[0]
    assert kept.text == expected[:expected.index("red ball") + len("red ball")]
    first_token = stories.generate(prompt_token_ids=[[1]], sampling_params=SamplingParams(max_tokens=5, temperature=0))[0].token_ids[2]
    by_token = stories.generate(prompt_token_ids=[[1]], sampling_params=SamplingParams(max_tokens=50, temperature=0, stop_token_ids=[first_token]))[0]
    assert by_token.token_ids[-1] == first_token and by_token.finish_reason == "stop" and by_token.stop_reason == first_token
    length = stories.generate(prompt_token_ids=[[1]], sampling_params=SamplingParams(max_tokens=7, temperature=0))[0]
    assert length.finish_reason == "length" and len(length.token_ids) == 7


def test_logit_bias_and_penalties_apply_to_real_logits(stories):
    """Through the engine, not on a cloned tensor: the forward's logits are inference tensors."""
    plain, biased, penalised = stories.generate(prompt_token_ids=[[1]] * 3, sampling_params=[
        SamplingParams(max_tokens=8, temperature=0), SamplingParams(max_tokens=8, temperature=0, logit_bias={300: 100.0}),
        SamplingParams(max_tokens=8, temperature=0, frequency_penalty=2.0, repetition_penalty=1.5)])
    assert biased.token_ids == [300] * 8 and plain.token_ids != biased.token_ids
    assert penalised.finish_reason == "length" and len(penalised.token_ids) == 8


def test_seeded_sampling_reproducible_across_batch_compositions(stories):
    seeded = SamplingParams(max_tokens=40, temperature=1.0, top_k=50, seed=42)
    alone = stories.generate(["Once upon a time"], seeded)[0]
    crowd = ["The dog", "Lily", "Once upon a time", "A big red ball"]
    params = [SamplingParams(max_tokens=30, temperature=1.0), SamplingParams(max_tokens=60, temperature=0.5, seed=7), seeded,
              SamplingParams(max_tokens=10, temperature=0)]
    batch = stories.generate(crowd, params)
    assert batch[2].token_ids == alone.token_ids
    different = stories.generate(["Once upon a time"], SamplingParams(max_tokens=40, temperature=1.0, top_k=50, seed=43))[0]
    assert different.token_ids != alone.token_ids


def test_no_leaks_after_random_requests_aborts_and_preemptions():
    engine = LLMEngine(EngineConfig(model=str(STORIES), dtype="float32", kv_cache_memory=2 * 5 * 16 * 4 * 8 * 4 * 24,
                                    max_num_batched_tokens=48, max_num_seqs=32, max_model_len=200))
    rng = random.Random(0)
    finished: dict[str, str] = {}
    submitted: list[str] = []
    aborted: set[str] = set()
    for i in range(200):
        prompt = [1] + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 60))]
        params = SamplingParams(max_tokens=rng.randrange(1, 40), temperature=rng.choice([0, 1.0]), ignore_eos=True)
        engine.add_request(f"r{i}", prompt, params)
        submitted.append(f"r{i}")
        if i % 4 == 3:
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out.finish_reason
            victim = rng.choice(submitted)
            if victim not in finished:
                out = engine.abort_request(victim)
                finished[victim] = out.finish_reason
                aborted.add(victim)
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in finished, "a request finished twice"
            if out.finished:
                finished[out.request_id] = out.finish_reason
    stats = engine.stats()
    assert stats.num_preemptions > 0, "the KV budget was meant to force preemption"
    assert set(finished) == set(submitted), "a request was lost"
    assert {finished[r] for r in aborted} == {"abort"} and len(aborted) > 10
    assert set(finished[r] for r in submitted if r not in aborted) == {"length"}
    assert stats.num_free_blocks == stats.num_blocks and engine.kv.usage == 0
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting


@pytest.mark.parametrize("prompt,params,param", [
    ([], SamplingParams(), "prompt"),
    ([1] * 600, SamplingParams(), "prompt"),
    ([1, 2, 3], SamplingParams(max_tokens=600), "max_tokens"),
    ([1, 99999], SamplingParams(), "prompt_token_ids"),
    ([1, -1], SamplingParams(), "prompt_token_ids"),
    ([1, 2], SamplingParams(logit_bias={5000: 1.0}), "logit_bias"),
])
def test_bad_input_raises_value_error_naming_parameter_and_leaves_others_alone(stories, prompt, params, param):
    engine = stories.engine
    greedy = SamplingParams(max_tokens=30, temperature=0)
    engine.add_request("good", [1], greedy)
    outs = engine.step()
    with pytest.raises(ValueError, match=param):
        engine.add_request("bad", prompt, params)
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert all(o.request_id == "good" for o in outs)
    text = "".join(o.new_text for o in outs)
    assert len(text) > 50 and documented_stories_text().startswith(text)


def test_async_engine_streams_and_abort_frees_blocks():
    async def main():
        engine = AsyncEngine(EngineConfig(model=str(STORIES), dtype="float32", kv_cache_memory="8MiB"))
        engine.start()
        try:
            greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
            text = "".join([o.new_text async for o in engine.generate("a", [1], greedy)])
            assert text == documented_stories_text()[:len(text)] and len(text) > 100

            long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
            stream = engine.generate("b", [1], long)
            async for _ in stream:
                if engine.stats().num_free_blocks < engine.stats().num_blocks:
                    break
            await stream.aclose()  # the client went away
            for _ in range(100):
                if engine.stats().num_free_blocks == engine.stats().num_blocks:
                    break
                await asyncio.sleep(0.01)
            assert engine.stats().num_free_blocks == engine.stats().num_blocks
            with pytest.raises(ValueError, match="max_tokens"):
                async for _ in engine.generate("c", [1], SamplingParams(max_tokens=10**6)):
                    pass
            again = "".join([o.new_text async for o in engine.generate("d", [1], greedy)])
            assert again == text
        finally:
            engine.shutdown()

    asyncio.run(main())
