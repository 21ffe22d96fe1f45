"""Speculative decoding: tokens/s with and without it, at controlled acceptance.

    python benchmarks/speculative.py [--max-tokens 64] [--out benchmarks/results/speculative.json]

Real draft/target pairs cannot be downloaded here, so the target is bench-135m with seeded random
weights (written once under ~/.cache/kvserve) and the drafts are made from it:
  (a) the target itself: every draft is accepted; the upper bound of what drafting costs;
  (b) its first 2 layers with the shared embeddings and head, perturbed: a cheap draft (which random
      weights make nearly useless: the 28 layers it lacks each move the output as much as its own);
  (c) a bench-135m whose layers 2-29 are damped (output projections scaled down), with its first 2
      layers as the draft: cheap and mostly right, the shape of a real draft/target pair.
Each runs at concurrency 1 and 16, with the adaptive policy off (always draft k) and on. n-gram
lookup runs on a copy-editing workload with the real SmolLM2-135M-Instruct (the embedded GGUF),
whose answers repeat the text they are given. Greedy decoding throughout, so every configuration
must produce the plain run's tokens; the script checks that too.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import statistics
import time
from pathlib import Path

from bench_model import damp_layers, make_bench_model, make_draft_model

from engine import LLM, SamplingParams
from engine.models.loader import load_tokenizer

CACHE = Path.home() / ".cache" / "kvserve"
PASSAGE = ("The commitee met on tuesday to discuss the new budjet. Several members argued that the city should "
           "spend more on public transport, while others wanted lower taxes. In the end they agreed to meet again "
           "next month, after the finance office has published it's report on last years spending.")


def timed_generate(llm: LLM, prompts, params: SamplingParams, repeats: int) -> tuple[list, float]:
    """Outputs and the median wall time over ``repeats`` runs (after one untimed warm-up run)."""
    kwargs = dict(prompt_token_ids=prompts) if isinstance(prompts[0], list) else dict(prompts=prompts)
    llm.generate(sampling_params=params, **kwargs)
    times, outputs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = llm.generate(sampling_params=params, **kwargs)
        times.append(time.perf_counter() - start)
    return outputs, statistics.median(times)


def run(llm: LLM, prompts, params: SamplingParams, repeats: int, reference: list | None) -> dict:
    before = llm.engine.stats().spec
    outputs, seconds = timed_generate(llm, prompts, params, repeats)
    spec = llm.engine.stats().spec
    drafted, accepted = spec.draft_tokens - before.draft_tokens, spec.accepted_tokens - before.accepted_tokens
    drafts = spec.num_drafts - before.num_drafts
    tokens = sum(len(o.token_ids) for o in outputs)
    policy = llm.engine.speculator.policy
    measured = {} if policy is None else {  # the adaptive policy's cost estimates per batch-size bucket
        f"batch<{2 ** bits}": {"plain": b.plain_step and 1000 * b.plain_step,
                               "draft_forward": b.draft_forward and 1000 * b.draft_forward,
                               "verify": {k: 1000 * v for k, v in b.verify_step.items()}}
        for bits, b in policy.buckets.items()}
    return {"tokens_per_s": round(tokens / seconds, 1), "seconds": round(seconds, 2), "tokens": tokens,
            "acceptance": round(accepted / drafted, 3) if drafted else None,
            "mean_accepted_length": round(1 + accepted / drafts, 2) if drafts else None,
            "switches": spec.switches, "measured_ms": measured,
            "same_tokens_as_plain": None if reference is None else [o.token_ids for o in outputs] == [r.token_ids for r in reference]}


def compare(model: str, llm_kwargs: dict, spec_configs: dict[str, dict], prompts, params: SamplingParams,
            repeats: int, labels: dict) -> list[dict]:
    """Plain decoding, then each speculative configuration, on the same prompts: one row each
    (``labels`` plus the measurements), with the speed-up over plain and whether the tokens match."""
    rows = []
    for name, spec in {None: None, **spec_configs}.items():
        llm = LLM(model, **llm_kwargs, speculative_config=spec)
        if spec is None:
            reference, seconds = timed_generate(llm, prompts, params, repeats)
            base = sum(len(o.token_ids) for o in reference) / seconds
            row = {**labels, "speculation": None, "tokens_per_s": round(base, 1)}
        else:
            row = {**labels, "speculation": name, **run(llm, prompts, params, repeats, reference)}
            row["speedup"] = round(row["tokens_per_s"] / base, 2)
        rows.append(row)
        print(row, flush=True)
        del llm
        gc.collect()  # the engine holds reference cycles; free its KV cache before the next one
    return rows


def bench_drafts(args) -> list[dict]:
    random_target = make_bench_model(CACHE / "bench-135m-weights", weights=True)
    damped = CACHE / "bench-135m-damped"
    if not damped.exists():
        shutil.copytree(random_target, damped)
        damp_layers(damped, first=2, factor=args.damping)
    setups = {  # (name, target) -> drafts
        ("bench-135m", random_target): {
            "target itself": random_target,
            "2-layer perturbed": make_draft_model(random_target, CACHE / "bench-135m-draft-2l", 2, args.noise, seed=1)},
        ("bench-135m, layers 2-29 damped", damped): {
            "2-layer": make_draft_model(damped, CACHE / "bench-135m-damped-draft-2l", 2)},
    }
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    rows = []
    for concurrency in args.concurrency:
        prompts = [[rng.randrange(3, 49152) for _ in range(128)] for _ in range(max(concurrency, 4))]
        for (name, target), drafts in setups.items():
            configs = {f"{draft_name}, {'adaptive' if adaptive else 'always k'}": dict(
                method="draft", draft_model=draft, num_speculative_tokens=args.k, adaptive=adaptive)
                for draft_name, draft in drafts.items() for adaptive in (False, True)}
            rows += compare(str(target), dict(dtype=args.dtype, max_num_seqs=concurrency, kv_cache_memory="1GiB"),
                            configs, prompts, params, args.repeats, {"concurrency": concurrency, "target": name})
    return rows


def bench_ngram(args) -> list[dict]:
    from server.cli import embedded_model

    model = embedded_model()
    tokenizer = load_tokenizer(model)
    asks = ["Fix the spelling mistakes in this text and return the corrected text only:\n\n",
            "Repeat this text word for word:\n\n"]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": ask + PASSAGE}], tokenize=False,
                                             add_generation_prompt=True) for ask in asks]
    configs = {f"ngram, {'adaptive' if adaptive else 'always k'}": dict(
        method="ngram", num_speculative_tokens=args.k, adaptive=adaptive) for adaptive in (False, True)}
    return compare(model, dict(dtype=args.dtype, kv_cache_memory="2GiB"), configs, prompts,
                   SamplingParams(max_tokens=args.max_tokens * 2, temperature=0), args.repeats,
                   {"model": "SmolLM2-135M-Instruct (GGUF)"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 16], help="none: n-gram only")
    parser.add_argument("-k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--noise", type=float, default=0.02, help="perturbation of the 2-layer draft")
    parser.add_argument("--damping", type=float, default=0.01, help="output scale of the damped target's layers 2-29")
    parser.add_argument("--dtype", default="float32",
                        help="float32: on CPUs without bf16 arithmetic a 5-row bf16 matmul costs ~2.5x a 1-row one")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-ngram", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/speculative.json")
    args = parser.parse_args()
    result = {"settings": vars(args), "drafts": bench_drafts(args), "ngram": [] if args.skip_ngram else bench_ngram(args)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
