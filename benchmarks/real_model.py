"""The embedded real model (SmolLM2-135M-Instruct, Q4_1 GGUF) through `kvserve serve`, beside Hugging
Face `generate` on the same GGUF weights, in one run: W1 and W2 per dtype, and model load times.

    python benchmarks/real_model.py [--dtype bfloat16 float32] [--workload w1 w2] [--num-prompts-w2 64]

kvserve: `kvserve serve` with no MODEL (the embedded default), driven by benchmarks/serving.py's
load generator; load time = process start to /health answering. HF: `from_pretrained(gguf_file=...)`
(load time = that call) and `generate` as in benchmarks/offline.py (W2 in static batches of 16).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import offline  # noqa: E402
import serving  # noqa: E402


def serve_and_measure(dtype: str, workloads: dict[str, dict], port: int) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(["kvserve", "serve", "--dtype", dtype, "--port", str(port), "--disable-uvicorn-access-log"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise SystemExit("kvserve serve exited during startup")
            time.sleep(0.2)
        row = {"load_s": time.perf_counter() - start}
        for name, work in workloads.items():
            args = serving.build_parser().parse_args(["--base-url", f"http://127.0.0.1:{port}"])
            for key, value in work.items():
                setattr(args, key, value)
            report = asyncio.run(serving.run(args))
            row[name] = {k: report[k] for k in ("output_token_throughput", "ttft_ms", "tpot_ms", "errors")}
        return row
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def hf_measure(gguf: Path, dtype: str, workloads: dict[str, dict], vocab: int) -> dict:
    start = time.perf_counter()
    model = offline.load_hf(gguf, dtype)
    row = {"load_s": time.perf_counter() - start}
    for name, work in workloads.items():
        rng = random.Random(0)
        prompts = [[rng.randrange(100, vocab) for _ in range(work["input_len"])] for _ in range(work["num_prompts"])]
        size = work["concurrency"]
        batches = [prompts[i:i + size] for i in range(0, len(prompts), size)]
        row[name] = {"output_token_throughput": offline.run_hf(model, work, batches)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--workload", nargs="+", default=["w1", "w2"], choices=list(serving.WORKLOADS))
    parser.add_argument("--num-prompts-w2", type=int, default=64, help="fewer keeps HF's slow W2 short")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--out", default="benchmarks/results/real_model.json")
    args = parser.parse_args()

    from server.cli import embedded_model

    gguf = Path(embedded_model())
    workloads = {name: dict(serving.WORKLOADS[name]) for name in args.workload}
    if "w2" in workloads:
        workloads["w2"]["num_prompts"] = args.num_prompts_w2
    report = {"model": gguf.name, "workloads": workloads, "results": {}}
    for dtype in args.dtype:
        report["results"][dtype] = {"kvserve": serve_and_measure(dtype, workloads, args.port),
                                    "hf": hf_measure(gguf, dtype, workloads, vocab=49152)}
        print(dtype, json.dumps(report["results"][dtype]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
