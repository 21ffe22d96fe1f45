"""Load generator for any OpenAI-compatible server (kvserve, vLLM, llama.cpp): streaming completions.

    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --workload w1 --out FILE
    python benchmarks/serving.py --concurrency 16 --num-prompts 64 --input-len 256 --output-len 128

Prompts are random token ids of exactly --input-len tokens (sent as a token-id prompt, so no
tokenizer is needed and every server sees the same work); every request is forced to --output-len
tokens with ``ignore_eos`` (vLLM's extra, also accepted by kvserve). Reports request and token
throughput, TTFT, TPOT (per request: (e2e - ttft) / (tokens - 1)), ITL (gaps between streamed
chunks) and end-to-end latency percentiles, and errors; writes them as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx

WORKLOADS = {"w1": dict(concurrency=1, num_prompts=8, input_len=128, output_len=128),
             "w2": dict(concurrency=16, num_prompts=64, input_len=256, output_len=128)}


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def one_request(http: httpx.AsyncClient, url: str, body: dict) -> Result:
    start = time.perf_counter()
    last, ttft, itl, tokens, chunks = start, 0.0, [], 0, 0
    try:
        async with http.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                return Result(False, error=f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    return Result(False, error=str(chunk["error"]))
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    chunks += 1
                    now = time.perf_counter()
                    if ttft == 0.0:
                        ttft = now - start
                    else:
                        itl.append(now - last)
                    last = now
    except httpx.HTTPError as exc:
        return Result(False, error=f"{type(exc).__name__}: {exc}")
    # a server that reports no usage in the stream (some llama.cpp builds) streams one token per chunk
    return Result(True, ttft=ttft, e2e=time.perf_counter() - start, output_tokens=tokens or chunks, itl=itl)


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * scale

    return {"mean": statistics.fmean(ordered) * scale, "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


async def run(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=httpx.Timeout(600.0),
                                 limits=limits) as http:
        model = args.model or (await http.get("/v1/models")).json()["data"][0]["id"]
        rng = random.Random(args.seed)
        prompts = [[rng.randrange(args.token_low, args.token_high) for _ in range(args.input_len)]
                   for _ in range(args.num_prompts)]

        def body(prompt: list[int], max_tokens: int) -> dict:
            return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}

        for _ in range(args.warmup):
            await one_request(http, "/v1/completions", body(prompts[0], 4))

        semaphore = asyncio.Semaphore(args.concurrency)

        async def limited(prompt: list[int]) -> Result:
            async with semaphore:
                return await one_request(http, "/v1/completions", body(prompt, args.output_len))

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start

    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("api_key", "out")}
        | {"model": model, "request_rate": None if args.request_rate == float("inf") else args.request_rate},
        "duration_s": duration,
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if not r.ok})[:5],
        "request_throughput": len(ok) / duration,
        "output_token_throughput": output_tokens / duration,
        "total_token_throughput": (output_tokens + len(ok) * args.input_len) / duration,
        "ttft_ms": percentiles([r.ttft for r in ok]),
        "tpot_ms": percentiles([(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]),
        "itl_ms": percentiles([gap for r in ok for gap in r.itl]),
        "e2e_ms": percentiles([r.e2e for r in ok]),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="default: the server's first model")
    parser.add_argument("--api-key")
    parser.add_argument("--workload", choices=list(WORKLOADS), help="preset for the four size flags below")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--token-low", type=int, default=100, help="prompt token ids are drawn from [low, high)")
    parser.add_argument("--token-high", type=int, default=10000)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the JSON report here too")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.workload:
        for key, value in WORKLOADS[args.workload].items():
            setattr(args, key, value)
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
