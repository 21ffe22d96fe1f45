"""One request never harms another: each hostile request of issues 16 and 21 sent while 8 normal
streams decode, measuring the streams' inter-token latency (ITL) beside it against the same 8
streams alone. ``tests/test_noisy_neighbour.py`` runs every case for correctness (the hostile one's
answer, the streams' full token counts, no stall); this script measures the ITL ratio:

    python benchmarks/noisy_neighbour.py --rounds 5 --out benchmarks/results/noisy_neighbour.json

Rounds alternate alone / beside, so drift on a noisy machine hits both; the report is the median
over rounds of each run's ITL p99 (one stalled step holds all 8 streams, so p99 is the worst step).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

STREAMS = 8
TOKENS = 48
COMPILE_TIMEOUT_S = 1  # the server's --structured-output-compile-timeout in these runs
SERVER_FLAGS = ("--served-model-name", "m", "--max-num-seqs", "16", "--structured-output-compile-timeout",
                str(COMPILE_TIMEOUT_S))
RECURSIVE = {"$defs": {"n": {"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}, "b": {"$ref": "#/$defs/n"}},
                             "required": ["a", "b"]}}, "$ref": "#/$defs/n"}
# A thousand patterned properties: seconds of compile work, stopped at the compile timeout.
COMPILE_BOMB = {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": f"[a-z]{{{i % 7 + 1}}}x+"}
                                                 for i in range(1000)}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CHAT = [{"role": "user", "content": "hi"}]


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def json_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


@dataclass(frozen=True)
class Hostile:
    name: str
    route: str  # "completions" or "chat"
    body: dict | bytes  # raw bytes are sent as they are
    status: int  # the answer it must get
    message: str = ""  # text its error message must hold


HOSTILE = [
    Hostile("top_k 1e31", "completions", {"prompt": "hi", "max_tokens": 4, "top_k": 10**31}, 200),
    Hostile("tiny temperature under a grammar", "completions",
            {"prompt": "hi", "max_tokens": 8, "temperature": 1e-40, "response_format": {"type": "json_object"}}, 200),
    Hostile("huge temperature under a grammar", "completions",
            {"prompt": "hi", "max_tokens": 8, "temperature": 9.49e307, "min_p": 0.25,
             "response_format": {"type": "json_object"}},
            200),
    Hostile("endless grammar", "completions", {"prompt": "hi", "max_tokens": 4, "guided_grammar": 'root ::= "a" root'},
            400, "can never end"),
    Hostile("self-recursive grammar", "completions", {"prompt": "hi", "max_tokens": 4, "guided_grammar": "root ::= root"},
            400, "can never end"),
    Hostile("required recursion", "chat", {"messages": CHAT, "max_tokens": 4, "response_format": json_format(RECURSIVE)},
            400, "can never end"),
    Hostile("200-deep schema", "completions", {"prompt": "hi", "max_tokens": 4, "guided_json": nested(200)}, 400,
            "nests deeper"),
    Hostile("60,000-value enum", "completions",
            {"prompt": "hi", "max_tokens": 4, "guided_json": {"enum": [f"value {i}" for i in range(60000)]}}, 400,
            "over the limit"),
    Hostile("compile bomb", "chat", {"messages": CHAT, "max_tokens": 4, "response_format": json_format(COMPILE_BOMB)},
            400, f"longer than the {COMPILE_TIMEOUT_S} s limit"),
    Hostile("5000 tools", "chat", {"messages": CHAT, "max_tokens": 4, "tools": [TOOL] * 5000}, 400, "128"),
    Hostile("5 MB body", "completions", {"prompt": "word " * 1_000_000, "max_tokens": 4}, 413),
    Hostile("3 MB prompt", "completions", {"prompt": "word " * 600_000, "max_tokens": 4}, 400),
    Hostile("lone surrogate", "completions", b'{"prompt": "abc\\ud800", "max_tokens": 4}', 400, "surrogate"),
]


@dataclass
class Run:
    counts: list[int]  # completion tokens of each normal stream
    gaps: list[float]  # every inter-token gap of every normal stream, seconds
    response: httpx.Response | None = None  # the hostile request's answer
    answer_s: float = 0.0  # from sending the hostile request to its answer

    @property
    def itl_p99(self) -> float:
        return statistics.quantiles(self.gaps, n=100)[98]


async def normal_stream(client: httpx.AsyncClient, started: asyncio.Event, gaps: list[float]) -> int:
    """One streamed completion of TOKENS tokens; appends its inter-token gaps, returns its token count."""
    body = {"model": "m", "prompt": "Once upon a time", "max_tokens": TOKENS, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    tokens, last = 0, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
                started.set()
    return tokens


async def run(url: str, hostile: Hostile | None) -> Run:
    """8 normal streams; once all are decoding, ``hostile`` (if any) is sent beside them."""
    gaps: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        started = [asyncio.Event() for _ in range(STREAMS)]
        streams = [asyncio.create_task(normal_stream(client, started[i], gaps)) for i in range(STREAMS)]
        response, answer_s = None, 0.0
        if hostile is not None:
            await asyncio.gather(*(event.wait() for event in started))
            path = "/v1/completions" if hostile.route == "completions" else "/v1/chat/completions"
            sent = time.perf_counter()
            if isinstance(hostile.body, bytes):
                response = await client.post(path, content=hostile.body, headers={"content-type": "application/json"})
            else:
                response = await client.post(path, json={"model": "m", **hostile.body})
            answer_s = time.perf_counter() - sent
        counts = await asyncio.gather(*streams)
    return Run(list(counts), gaps, response, answer_s)


def measure(url: str, hostile: Hostile, rounds: int) -> dict:
    alone, beside, answers = [], [], []
    for _ in range(rounds):
        alone.append(asyncio.run(run(url, None)).itl_p99)
        result = asyncio.run(run(url, hostile))
        assert result.response is not None and result.response.status_code == hostile.status, result.response
        beside.append(result.itl_p99)
        answers.append(result.answer_s)
    return {"case": hostile.name, "rounds": rounds, "itl_p99_alone_ms": round(statistics.median(alone) * 1000, 1),
            "itl_p99_beside_ms": round(statistics.median(beside) * 1000, 1),
            "ratio": round(statistics.median(beside) / statistics.median(alone), 2),
            "answer_s_median": round(statistics.median(answers), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", nargs="*", default=["compile bomb"], help="case names, or 'all'")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from server_process import running_server  # the tests' way to run a real `kvserve serve`

    cases = HOSTILE if args.cases == ["all"] else [h for h in HOSTILE if h.name in args.cases]
    with running_server(None, *SERVER_FLAGS) as server:
        for _ in range(2):  # warm-up: a fresh server's first steps are slower
            asyncio.run(run(server.url, None))
        time.sleep(5)  # the compile worker starts on idle CPU
        results = [measure(server.url, hostile, args.rounds) for hostile in cases]
    for result in results:
        print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
