"""Every body kvserve returns on the OpenAI routes validates against OpenAI's published schema
(tests/fixtures/openai_schemas.py, from openai/openai-openapi): completions and chat, whole and
streamed, with logprobs and tool calls, the model list and one model, and error bodies."""

from __future__ import annotations

import json

import httpx
import pytest

from fixtures.openai_schemas import check
from server_process import running_server

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}]
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


@pytest.fixture(scope="module")
def server(tiny_model):
    with running_server(tiny_model("qwen2"), "--served-model-name", "tiny") as srv:
        yield srv


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def chunks(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("body", [
    {"prompt": "hi", "max_tokens": 8},
    {"prompt": ["hi", "there"], "max_tokens": 4, "n": 2, "logprobs": 2},  # (with echo the first token's
    # logprob is null, from OpenAI too, where the spec allows only numbers)
    {"prompt": "hi", "max_tokens": 4, "stream_options": {"include_usage": True}},
], ids=["plain", "logprobs", "usage"])
def test_completions(server, body):
    response = post(server, "/v1/completions", {"model": "tiny", **body})
    assert response.status_code == 200
    check("CreateCompletionResponse", response.json())
    for chunk in chunks(server, "/v1/completions", {"model": "tiny", **body}):
        check("CreateCompletionResponse", unfinished_as_stop(chunk))


def unfinished_as_stop(chunk: dict) -> dict:
    """The spec gives streamed completions the whole response's shape, whose finish_reason is never
    null; OpenAI's own stream sends null until a choice ends, as kvserve does (and clients expect)."""
    choices = [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]]
    return {**chunk, "choices": choices}


@pytest.mark.parametrize("body", [
    CHAT,
    {**CHAT, "logprobs": True, "top_logprobs": 2, "n": 2},
    {**CHAT, "max_tokens": 40, "tools": TOOLS, "tool_choice": "required"},
    {**CHAT, "response_format": {"type": "json_object"}, "stream_options": {"include_usage": True}},
], ids=["plain", "logprobs", "tools", "json"])
def test_chat_completions(server, body):
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 200
    check("CreateChatCompletionResponse", response.json())
    for chunk in chunks(server, "/v1/chat/completions", body):
        check("CreateChatCompletionStreamResponse", chunk)


def test_models(server):
    listed = httpx.get(f"{server.url}/v1/models").json()
    check("ListModelsResponse", listed)
    one = httpx.get(f"{server.url}/v1/models/tiny")
    assert one.status_code == 200 and one.json() == listed["data"][0]
    check("Model", one.json())
    assert server.client().models.retrieve("tiny").id == "tiny"
    missing = httpx.get(f"{server.url}/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    check("ErrorResponse", missing.json())


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0}),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}),
    ("/v1/chat/completions", {**CHAT, "model": "other"}),
])
def test_errors(server, path, body):
    response = post(server, path, body)
    assert response.status_code in (400, 404)
    check("ErrorResponse", response.json())
