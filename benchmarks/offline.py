"""Offline throughput: kvserve's LLM.generate beside Hugging Face generate, same weights, same run.

    python benchmarks/offline.py [--dtype bfloat16|float32] [--workload w1 w2] [--skip-hf] [--out FILE]

Workloads (DESIGN.md): W1 = 8 requests one at a time, 128 prompt + 128 output tokens; W2 = 64
requests of 256 prompt + 128 output tokens (kvserve: one continuous batch; HF: static batches of 16).
Every request is forced to its full output length (ignore_eos). Output tokens/s include prefill.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench_model import make_bench_model  # noqa: E402

WORKLOADS = {"w1": dict(num_requests=8, input_len=128, output_len=128, concurrency=1),
             "w2": dict(num_requests=64, input_len=256, output_len=128, concurrency=16)}


def prompts(num: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(num)]


def run_kvserve(model_dir: Path, dtype: str, work: dict, batches: list[list[list[int]]], **engine_args) -> dict:
    """Output tokens/s for the workload, and the median time to the first token of one fresh
    prompt of the workload's length alone (the prefill a served request's TTFT is compared to)."""
    from engine import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype=dtype, **engine_args)
    params = SamplingParams(max_tokens=work["output_len"], temperature=0, ignore_eos=True)
    llm.generate(prompt_token_ids=batches[0][:1], sampling_params=SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    first_token_s = []
    for prompt in prompts(5, work["input_len"], llm.engine.vocab_size, seed=1):  # unseen, so no prefix-cache hits
        start = time.perf_counter()
        llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=1, ignore_eos=True))
        first_token_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    produced = sum(len(o.token_ids) for batch in batches for o in llm.generate(prompt_token_ids=batch, sampling_params=params))
    return {"kvserve_out_tok_s": produced / (time.perf_counter() - start),
            "kvserve_prefill_ms_p50": 1000 * statistics.median(first_token_s)}


def load_hf(path: Path, dtype: str):
    """Hugging Face's model for a folder or a .gguf file (dequantized by transformers)."""
    from transformers import AutoModelForCausalLM

    source = dict(pretrained_model_name_or_path=path.parent, gguf_file=path.name) if path.suffix == ".gguf" else \
        dict(pretrained_model_name_or_path=path)
    return AutoModelForCausalLM.from_pretrained(**source, dtype=getattr(torch, dtype)).eval()


def run_hf(model, work: dict, batches: list[list[list[int]]]) -> float:
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=work["output_len"],
                  min_new_tokens=work["output_len"])
    with torch.inference_mode():
        model.generate(torch.tensor(batches[0][:1]), **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        start = time.perf_counter()
        produced = 0
        for batch in batches:
            out = model.generate(torch.tensor(batch), **kwargs)
            produced += (out.shape[1] - len(batch[0])) * len(batch)
    return produced / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--workload", nargs="+", default=["w1", "w2"], choices=list(WORKLOADS))
    parser.add_argument("--model-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "kvserve", "bench-135m"))
    parser.add_argument("--max-num-batched-tokens", type=int, help="default: the engine's")
    parser.add_argument("--max-num-seqs", type=int, help="default: the workload's concurrency, as a served client sees it")
    parser.add_argument("--compile", action="store_true", help="kvserve with torch.compile'd decode steps")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/offline.json")
    args = parser.parse_args()

    model_dir = make_bench_model(args.model_dir, weights=True)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    report = {"dtype": args.dtype, "compile": args.compile, "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "results": {}}
    for name in args.workload:
        work = WORKLOADS[name]
        all_prompts = prompts(work["num_requests"], work["input_len"], vocab)
        ours_batches = [[p] for p in all_prompts] if work["concurrency"] == 1 else [all_prompts]
        hf_batches = [all_prompts[i:i + work["concurrency"]] for i in range(0, len(all_prompts), work["concurrency"])]
        row = run_kvserve(model_dir, args.dtype, work, ours_batches, kv_cache_memory="2GiB", compile=args.compile,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          max_num_seqs=args.max_num_seqs or work["concurrency"])
        if not args.skip_hf:
            row["hf_out_tok_s"] = run_hf(load_hf(model_dir, args.dtype), work, hf_batches)
            row["speedup"] = row["kvserve_out_tok_s"] / row["hf_out_tok_s"]
        report["results"][name] = {**work, **row}
        print(name, json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
