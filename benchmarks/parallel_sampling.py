"""Parallel sampling (n > 1): n samples of one long prompt, with the prompt prefilled once (the
siblings wait for its blocks and take them from the prefix cache) vs n times (prefix caching off).

    python benchmarks/parallel_sampling.py [--n 4] [--prompt-len 512] [--max-num-batched-tokens 2048]

bench-135m with seeded random weights, float32; each sample 16 tokens (ignore_eos). The budget
defaults to the GPU's 2048 tokens per step, where all n prompts would otherwise fit in one step.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from bench_model import make_bench_model

from engine import LLM, SamplingParams

CACHE = Path.home() / ".cache" / "kvserve"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = make_bench_model(CACHE / "bench-135m-weights", weights=True)
    params = [SamplingParams(max_tokens=16, temperature=1.0, seed=i, ignore_eos=True) for i in range(args.n)]
    for caching in (True, False):
        llm = LLM(str(model), dtype="float32", kv_cache_memory="1GiB", enable_prefix_caching=caching,
                  max_num_batched_tokens=args.max_num_batched_tokens)
        llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=params[0])  # warm-up
        rng, times = random.Random(0), []
        for _ in range(args.repeats):  # a fresh prompt each time: no hits from the previous round
            prompt = [rng.randrange(100, 40000) for _ in range(args.prompt_len)]
            start = time.perf_counter()
            llm.generate(prompt_token_ids=[prompt] * args.n, sampling_params=params)
            times.append(time.perf_counter() - start)
        print(f"prefix caching {'on ' if caching else 'off'}: median {statistics.median(times):.2f} s "
              f"({', '.join(f'{t:.2f}' for t in times)}), prompt tokens from the cache: {llm.engine.kv.prefix_hits}")


if __name__ == "__main__":
    main()
