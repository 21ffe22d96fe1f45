"""Structured outputs over HTTP: response_format and vLLM's guided_* / structured_outputs, streamed and not."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import pytest

from server_process import running_server
from test_structured import SCHEMAS

SCHEMA = SCHEMAS["nested"]


@pytest.fixture(scope="module")
def server(tiny_model):
    with running_server(tiny_model("qwen2"), "--kv-cache-memory", "64MiB", "--served-model-name", "tiny") as srv:
        yield srv


def ask(client, **kw):
    kw = {"max_tokens": 120, "temperature": 1.0, **kw}
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON please"}], **kw)


def test_response_format_json_schema_and_json_object(server):
    client = server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in range(4):
        out = ask(client, response_format=fmt, seed=seed).choices[0]
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.message.content), SCHEMA)
    obj = ask(client, response_format={"type": "json_object"}, seed=1, max_tokens=200).choices[0]
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.message.content), dict)
    assert obj.message.content.startswith("{")


def test_streamed_json_schema_is_valid_when_joined(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    chunks = list(ask(server.client(), response_format=fmt, seed=7, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_vllm_guided_fields_on_both_endpoints(server):
    client = server.client()
    regex = client.completions.create(model="tiny", prompt="Code:", max_tokens=20, temperature=1.0, seed=2,
                                      extra_body={"guided_regex": r"[A-Z]{3}-\d{4}"}).choices[0]
    assert re.fullmatch(r"[A-Z]{3}-\d{4}", regex.text)
    choice = ask(client, extra_body={"guided_choice": ["alpha", "beta"]}).choices[0]
    assert choice.message.content in ("alpha", "beta")
    grammar = client.completions.create(model="tiny", prompt="List:", max_tokens=30, temperature=1.0,
                                        extra_body={"structured_outputs": {"grammar": 'root ::= "[" [0-9] ("," [0-9])* "]"'}})
    assert re.fullmatch(r"\[\d(,\d)*\]", grammar.choices[0].text)
    guided_json = ask(client, extra_body={"guided_json": SCHEMAS["enums"]}, seed=3).choices[0]
    jsonschema.validate(json.loads(guided_json.message.content), SCHEMAS["enums"])


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such"}}}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_grammar": "root ::= missing"}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"structured_outputs": {"xml": "<a/>"}}, "structured_outputs"),
])
def test_bad_constraints_are_400_with_the_field(server, body, param):
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=30, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param


def test_invalid_schema_does_not_disturb_concurrent_requests(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}

    async def main():
        client = server.async_client()
        good = [client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"item {i}"}], max_tokens=60, temperature=1.0, seed=i,
            **({"response_format": fmt} if i % 2 else {})) for i in range(8)]
        async with httpx.AsyncClient(timeout=60) as raw:
            bad = raw.post(f"{server.url}/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": 5}}}})
            return await asyncio.gather(bad, *good)

    bad, *good = asyncio.run(main())
    assert bad.status_code == 400
    for i, out in enumerate(good):
        assert out.choices[0].finish_reason in ("stop", "length")
        if i % 2:
            jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    stats = server.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]
