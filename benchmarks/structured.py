"""Structured-output overhead: W2 with response_format json_object vs unconstrained, in one run.

    python benchmarks/structured.py [--dtype bfloat16] [--num-prompts 64] [--out FILE]

Both runs use bench-135m (random weights, so the JSON is meaningless but the grammar work is real:
a mask per token over the whole vocabulary). Constrained requests end when their JSON closes, so
throughput is output tokens actually produced per second. Also reports grammar compile time (p50)
for new and for cached schemas, and the tokens jump-forward appended without a sampling step on a
schema-heavy workload.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_model import make_bench_model  # noqa: E402
from offline import prompts  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.structured import StructuredOutputParams  # noqa: E402


def throughput(llm: LLM, batch: list[list[int]], params: SamplingParams) -> tuple[float, int]:
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=batch, sampling_params=params)
    produced = sum(len(o.token_ids) for o in outs)
    return produced / (time.perf_counter() - start), produced


def schema(i: int) -> dict:
    """A distinct schema per i (so its compile is not cached), with many forced keys."""
    props = {f"field_{i}_{j}": {"type": ["integer", "string", "boolean"][j % 3]} for j in range(8)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--model-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "kvserve", "bench-135m"))
    parser.add_argument("--out", default="benchmarks/results/structured.json")
    args = parser.parse_args()
    model_dir = make_bench_model(args.model_dir)
    llm = LLM(str(model_dir), dtype=args.dtype, load_format="dummy", max_num_seqs=16)
    batch = prompts(args.num_prompts, 256, 49152)
    free = SamplingParams(max_tokens=128, temperature=1.0, seed=0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=128, temperature=1.0, seed=0,
                                 structured_output=StructuredOutputParams(json_object=True))
    llm.generate(prompt_token_ids=batch[:2], sampling_params=SamplingParams(max_tokens=4))  # warm-up
    free_tps, free_tokens = throughput(llm, batch, free)
    json_tps, json_tokens = throughput(llm, batch, constrained)

    structured = llm.engine.structured
    new, cached = [], []
    for i in range(20):
        spec = StructuredOutputParams(json_schema=schema(1000 + i))
        start = time.perf_counter()
        structured.compile(spec)
        new.append(time.perf_counter() - start)
        start = time.perf_counter()
        structured.compile(spec)
        cached.append(time.perf_counter() - start)

    heavy = [SamplingParams(max_tokens=200, temperature=1.0, seed=i, structured_output=StructuredOutputParams(json_schema=schema(i)))
             for i in range(8)]
    before_jump, before_steps = llm.engine.jump_forward_tokens_total, llm.engine.num_steps
    outs = llm.generate(prompt_token_ids=batch[:8], sampling_params=heavy)
    report = {
        "w2_unconstrained_out_tok_s": free_tps, "w2_unconstrained_tokens": free_tokens,
        "w2_json_object_out_tok_s": json_tps, "w2_json_object_tokens": json_tokens, "ratio": json_tps / free_tps,
        "compile_new_schema_p50_ms": statistics.median(new) * 1000,
        "compile_cached_schema_p50_ms": statistics.median(cached) * 1000,
        "jump_forward_tokens": llm.engine.jump_forward_tokens_total - before_jump,
        "schema_heavy_output_tokens": sum(len(o.token_ids) for o in outs),
        "schema_heavy_steps": llm.engine.num_steps - before_steps,
    }
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
