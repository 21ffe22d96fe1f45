"""Anthropic's Messages API (POST /v1/messages) with the official ``anthropic`` client against a real
server: plain, streamed (the same greedy text), stop sequences, a tool round trip, tool inputs valid
for their input_schema at temperature 1 on a random model (chat's grammar), and errors in Anthropic's
shape, with the key sent as x-api-key or Bearer."""

from __future__ import annotations

import asyncio
import json

import anthropic
import httpx
import jsonschema
import pytest

from server_process import running_server
from test_server_tools import TOOL_SETS

KEY = "test-key"
MAX_BODY = 1 << 16
USER = [{"role": "user", "content": "Hello there"}]
# Current clients take no temperature / top_p / top_k arguments any more: they travel as extra body fields.
GREEDY = {"extra_body": {"temperature": 0}}


def custom_tools(tool_set: str) -> list[dict]:
    """test_server_tools' function tools as Anthropic declares them."""
    return [{"name": t["function"]["name"], "description": t["function"]["description"],
             "input_schema": t["function"]["parameters"]} for t in TOOL_SETS[tool_set]]


@pytest.fixture(scope="module")
def server(tiny_model):
    # Plain sampling (not the Qwen generation config's top_k / top_p): temperature 1 is the whole distribution.
    with running_server(tiny_model("qwen2"), "--kv-cache-memory", "128MiB", "--served-model-name", "tiny",
                        "--generation-config", "vllm", "--api-key", KEY, "--max-request-bytes", str(MAX_BODY)) as srv:
        yield srv


def client(server, key: str = KEY) -> anthropic.Anthropic:
    """The official client as users make it: it sends the key as x-api-key (clients before 2.x) or as
    Bearer (2.x); test_api_key_as_x_api_key_or_bearer sends each header alone."""
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0, timeout=120)


def prompt_tokens(server, messages: list[dict]) -> int:
    """How many tokens chat renders ``messages`` (OpenAI's shape) to: what the translation must match."""
    response = httpx.post(f"{server.url}/tokenize", json={"messages": messages},
                          headers={"Authorization": f"Bearer {KEY}"})
    return response.json()["count"]


def post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60)


def test_plain_message(server):
    message = client(server).messages.create(model="tiny", max_tokens=12, **GREEDY, system="Be brief.",
                                             messages=USER)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "tiny" and [block.type for block in message.content] == ["text"]
    assert message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    assert (message.usage.output_tokens == 12) == (message.stop_reason == "max_tokens")
    assert message.usage.input_tokens == prompt_tokens(server, [{"role": "system", "content": "Be brief."}, *USER])
    raw = post(server, {"model": "tiny", "max_tokens": 12, "temperature": 0, "system": "Be brief.", "messages": USER})
    assert set(raw.json()) == {"id", "type", "role", "content", "model", "stop_reason", "stop_sequence", "usage"}
    assert raw.json()["content"][0]["text"] == message.content[0].text  # greedy: the same text again


def test_streamed_text_equals_the_whole_message(server):
    kw = dict(model="tiny", max_tokens=24, **GREEDY, messages=USER)
    whole = client(server).messages.create(**kw)
    with client(server).messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text
    assert final.content[0].text == text and final.stop_reason == whole.stop_reason
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens
    kinds = [event.type for event in client(server).messages.create(**kw, stream=True)]
    assert kinds[:2] == ["message_start", "content_block_start"] and set(kinds[2:-3]) == {"content_block_delta"}
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_stop_sequence(server):
    kw = dict(model="tiny", max_tokens=24, **GREEDY, messages=USER)
    text = client(server).messages.create(**kw).content[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    message = client(server).messages.create(**kw, stop_sequences=["\u2603 never", stop])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert message.content[0].text == text[:text.index(stop)]


def test_tool_round_trip(server):
    tools = custom_tools("nested")
    first = client(server).messages.create(model="tiny", max_tokens=200, **GREEDY, messages=USER, tools=tools,
                                           tool_choice={"type": "tool", "name": "get_weather"})
    assert first.stop_reason == "tool_use"
    use = first.content[-1]
    assert use.type == "tool_use" and use.id.startswith("toolu_") and use.name == "get_weather"
    jsonschema.validate(use.input, tools[0]["input_schema"])
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": '{"temp_c": 21}'}]}
    conversation = [*USER, {"role": "assistant", "content": first.content}, result]
    final = client(server).messages.create(model="tiny", max_tokens=16, **GREEDY, messages=conversation,
                                           tools=tools, tool_choice={"type": "none"})
    assert [block.type for block in final.content] == ["text"] and final.stop_reason in ("end_turn", "max_tokens")
    # The prompt is exactly chat's for the same turns: the call as assistant tool_calls, its result a tool message.
    chat = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": use.id, "type": "function", "function": {"name": use.name, "arguments": json.dumps(use.input)}}]},
        {"role": "tool", "tool_call_id": use.id, "content": '{"temp_c": 21}'}]
    assert final.usage.input_tokens == prompt_tokens(server, chat)


def test_streamed_tool_use_equals_the_whole_message(server):
    kw = dict(model="tiny", max_tokens=200, **GREEDY, messages=USER, tools=custom_tools("arrays"),
              tool_choice={"type": "any"})
    whole = client(server).messages.create(**kw)
    with client(server).messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert whole.stop_reason == final.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in final.content] == [(b.type, b.name, b.input) for b in whole.content]


@pytest.mark.parametrize("tool_set", list(TOOL_SETS))
def test_tool_inputs_always_match_their_schema(server, tool_set):
    """A random-weight model at temperature 1: every tool_use, in 8 samples per tool set, names a
    declared tool and has an input valid for its input_schema (the grammar, not luck)."""
    tools = custom_tools(tool_set)
    schemas = {tool["name"]: tool["input_schema"] for tool in tools}

    async def sample() -> list[anthropic.types.Message]:
        async with anthropic.AsyncAnthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120) as sampler:
            return await asyncio.gather(*(sampler.messages.create(
                model="tiny", max_tokens=200, extra_body={"temperature": 1.0}, messages=USER, tools=tools,
                tool_choice={"type": "any", "disable_parallel_tool_use": True}) for _ in range(8)))

    for message in asyncio.run(sample()):
        uses = [block for block in message.content if block.type == "tool_use"]
        assert message.stop_reason == "tool_use" and len(uses) == 1, message
        jsonschema.validate(uses[0].input, schemas[uses[0].name])


SERVER_TOOL = {"type": "web_search_20250305", "name": "web_search", "max_uses": 2}
TOOL_USE = {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {"tz": "UTC"}}
BASE = {"model": "tiny", "max_tokens": 8}


@pytest.mark.parametrize("body, named", [
    ({"model": "tiny", "messages": USER}, "max_tokens"),
    ({**BASE, "max_tokens": 10**6, "messages": USER}, "max_tokens"),
    ({**BASE, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "x"}}]}]},
     "'image'"),
    ({**BASE, "messages": [{"role": "user", "content": [TOOL_USE]}]}, "messages.0.content.0.type"),
    ({**BASE, "messages": [{"role": "user", "content": [{"type": ["text"]}]}]}, "messages.0.content.0.type"),
    ({**BASE, "messages": [{"role": "user", "content": []}]}, "messages.0.content"),
    ({**BASE, "messages": [*USER, {"role": "assistant", "content": [{**TOOL_USE, "input": "UTC"}]}, *USER]},
     "messages.1.content.0.input"),
    ({**BASE, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "document"}]}]}]}, "'document'"),
    ({**BASE, "messages": USER, "tools": [SERVER_TOOL]}, "web_search_20250305"),
    ({**BASE, "messages": USER, "tools": [{"name": "f", "input_schema": {"type": "objekt"}}]}, "tools.0.input_schema"),
    ({**BASE, "messages": USER, "tools": custom_tools("enums"), "tool_choice": {"type": "tool", "name": "nope"}},
     "'nope'"),
    ({**BASE, "messages": [*USER, {"role": "assistant", "content": "Sure"}]}, "prefill"),
    ({**BASE, "messages": USER, "top_k": -5}, "top_k"),
])
def test_bad_requests_are_400_in_anthropic_shape(server, body, named):
    response = post(server, body)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"type", "error"} and response.json()["type"] == "error"
    error = response.json()["error"]
    assert set(error) == {"type", "message"} and error["type"] == "invalid_request_error" and named in error["message"]


def test_too_large_body_is_413_in_anthropic_shape(server):
    response = post(server, {**BASE, "messages": [{"role": "user", "content": "x" * MAX_BODY}]})
    assert response.status_code == 413
    assert response.json() == {"type": "error", "error": {"type": "request_too_large",
                                                          "message": response.json()["error"]["message"]}}


def test_client_raises_with_anthropic_error_bodies(server):
    with pytest.raises(anthropic.BadRequestError) as bad:
        client(server).messages.create(model="tiny", max_tokens=8, messages=USER, tools=[SERVER_TOOL])
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError) as missing:
        client(server).messages.create(model="claude-nope", max_tokens=8, messages=USER)
    assert missing.value.body["error"]["type"] == "not_found_error"


def test_api_key_as_x_api_key_or_bearer(server):
    with pytest.raises(anthropic.AuthenticationError) as denied:
        client(server, key="wrong").messages.create(model="tiny", max_tokens=4, messages=USER)
    assert denied.value.status_code == 401
    assert denied.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                            "message": denied.value.body["error"]["message"]}}
    body = {**BASE, "messages": USER}
    for header in ({"x-api-key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        response = httpx.post(f"{server.url}/v1/messages", json=body, headers=header, timeout=60)
        assert response.status_code == 200 and response.json()["type"] == "message", header
    for header in ({"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}, {}):
        response = httpx.post(f"{server.url}/v1/messages", json=body, headers=header, timeout=60)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error", header
    # The OpenAI routes take x-api-key too, and keep their own error shape.
    assert httpx.get(f"{server.url}/v1/models", headers={"x-api-key": KEY}).status_code == 200
    refused = httpx.get(f"{server.url}/v1/models", headers={"x-api-key": "wrong"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
