"""One request never harms another: each hostile request of issues 16 and 21 runs beside 8 normal
streams, which all finish with their full token counts and an inter-token latency p99 within 3x of
the same 8 streams run alone, while the hostile one gets its answer (a 4xx naming the problem, or a
normal completion where the value is only extreme)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx
import pytest

from server_process import running_server

STREAMS = 8
TOKENS = 48
RECURSIVE = {"$defs": {"n": {"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}, "b": {"$ref": "#/$defs/n"}},
                             "required": ["a", "b"]}}, "$ref": "#/$defs/n"}


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def json_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


SLOW_SCHEMA = {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": f"[a-z]{{{i % 7 + 1}}}x+"}
                                                for i in range(1000)}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CHAT = [{"role": "user", "content": "hi"}]

# (name, route, body (dict, or raw bytes), expected status, text the error message must hold)
HOSTILE = [
    ("top_k 1e31", "completions", {"prompt": "hi", "max_tokens": 4, "top_k": 10**31}, 200, ""),
    ("tiny temperature under a grammar", "completions",
     {"prompt": "hi", "max_tokens": 8, "temperature": 1e-40, "response_format": {"type": "json_object"}}, 200, ""),
    ("endless grammar", "completions", {"prompt": "hi", "max_tokens": 4, "guided_grammar": 'root ::= "a" root'}, 400,
     "can never end"),
    ("self-recursive grammar", "completions", {"prompt": "hi", "max_tokens": 4, "guided_grammar": "root ::= root"}, 400,
     "can never end"),
    ("required recursion", "chat", {"messages": CHAT, "max_tokens": 4, "response_format": json_format(RECURSIVE)}, 400,
     "can never end"),
    ("200-deep schema", "completions", {"prompt": "hi", "max_tokens": 4, "guided_json": nested(200)}, 400,
     "nests deeper"),
    ("60,000-value enum", "completions",
     {"prompt": "hi", "max_tokens": 4, "guided_json": {"enum": [f"value {i}" for i in range(60000)]}}, 400, "over the limit"),
    pytest.param(("compile bomb", "chat", {"messages": CHAT, "max_tokens": 4, "response_format": json_format(SLOW_SCHEMA)},
                  400, "longer than the 1 s limit"), id="compile bomb", marks=pytest.mark.xfail(strict=True, reason=(
                     "open bug: the bomb gets its 400 and the streams their tokens, but one ~1 s gap appears in "
                     "them when the killed worker is replaced (ITL p99 1028 ms vs 119 ms alone, measured)"))),
    ("5000 tools", "chat", {"messages": CHAT, "max_tokens": 4, "tools": [TOOL] * 5000}, 400, "128"),
    ("5 MB body", "completions", {"prompt": "word " * 1_000_000, "max_tokens": 4}, 413, ""),
    ("3 MB prompt", "completions", {"prompt": "word " * 600_000, "max_tokens": 4}, 400, ""),
    ("lone surrogate", "completions", b'{"prompt": "abc\\ud800", "max_tokens": 4}', 400, "surrogate"),
]


@pytest.fixture(scope="module")
def server():
    with running_server(None, "--served-model-name", "m", "--max-num-seqs", "16",
                        "--structured-output-compile-timeout", "1") as srv:
        yield srv


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


async def run(url: str, hostile: tuple | None) -> tuple[list[int], list[float], httpx.Response | None]:
    gaps: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        started = [asyncio.Event() for _ in range(STREAMS)]
        streams = [asyncio.create_task(normal_stream(client, started[i], gaps)) for i in range(STREAMS)]
        response = None
        if hostile is not None:
            await asyncio.gather(*(event.wait() for event in started))  # all 8 are decoding
            _, route, body, _, _ = hostile
            path = "/v1/completions" if route == "completions" else "/v1/chat/completions"
            if isinstance(body, bytes):
                response = await client.post(path, content=body, headers={"content-type": "application/json"})
            else:
                response = await client.post(path, json={"model": "m", **body})
        counts = await asyncio.gather(*streams)
    return counts, gaps, response


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


@pytest.fixture(scope="module")
def alone(server) -> float:
    asyncio.run(run(server.url, None))  # warm-up: the first steps of a fresh server are slower
    counts, gaps, _ = asyncio.run(run(server.url, None))
    assert counts == [TOKENS] * STREAMS
    return p99(gaps)


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda hostile: hostile[0])
def test_hostile_request_beside_eight_streams(server, alone, hostile):
    counts, gaps, response = asyncio.run(run(server.url, hostile))
    _, _, _, status, message = hostile
    assert response.status_code == status, response.text
    if status >= 400:
        error = response.json()["error"]
        assert message in error["message"] and ".cc:" not in error["message"]
    assert counts == [TOKENS] * STREAMS
    assert p99(gaps) <= 3 * alone, f"ITL p99 {p99(gaps) * 1000:.1f} ms beside it, {alone * 1000:.1f} ms alone"
    assert server.stats()["num_unfinished"] == 0
