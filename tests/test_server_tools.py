"""Tool calling over HTTP with the openai client: Qwen2.5's template and syntax, a random-weight model
at temperature 1.0 (the worst case), every call schema-valid in every mode, streamed or not."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from server_process import running_server

TOOL_CALL_TOKEN = 151657  # "<tool_call>" in the Qwen2.5 vocabulary


def function(name: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"{name} tool", "parameters": parameters}}


TOOL_SETS = {
    "nested": [function("get_weather", {
        "type": "object", "properties": {
            "location": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                          "country": {"enum": ["FR", "DE", "JP"]}},
                         "required": ["city", "country"], "additionalProperties": False},
            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["location", "days"], "additionalProperties": False}),
        function("get_time", {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 6}},
                              "required": ["tz"], "additionalProperties": False})],
    "enums": [function("set_mode", {
        "type": "object", "properties": {"mode": {"enum": ["eco", "fast", "off"]}, "level": {"enum": [1, 2, 3]},
                                         "on": {"type": "boolean"}},
        "required": ["mode", "level", "on"], "additionalProperties": False})],
    "arrays": [function("add_items", {
        "type": "object", "properties": {
            "items": {"type": "array", "maxItems": 3, "minItems": 1, "items": {
                "type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                 "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["name", "qty"], "additionalProperties": False}},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
        "required": ["items", "tags"], "additionalProperties": False})],
}
MESSAGES = [{"role": "user", "content": "Use a tool."}]


@pytest.fixture(scope="module")
def server(tiny_model):
    # Plain temperature-1 sampling (not the Qwen generation config's top_k 20 / top_p 0.8): the logit
    # bias below is sized for the whole distribution of the random model.
    with running_server(tiny_model("qwen2"), "--kv-cache-memory", "128MiB", "--served-model-name", "tiny",
                        "--max-n", "32", "--generation-config", "vllm") as srv:
        yield srv


def schemas(tools: list[dict]) -> dict[str, dict]:
    return {t["function"]["name"]: t["function"]["parameters"] for t in tools}


def assert_valid(call, tools: list[dict]) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    declared = schemas(tools)
    assert call.function.name in declared
    jsonschema.validate(json.loads(call.function.arguments), declared[call.function.name])


def ask(client, tools, tool_choice, n=30, **kw):
    kw = {"max_tokens": 200, "temperature": 1.0, "seed": 0, **kw}
    return client.chat.completions.create(model="tiny", messages=MESSAGES, tools=tools, tool_choice=tool_choice, n=n, **kw)


@pytest.mark.parametrize("tool_set", list(TOOL_SETS))
def test_required_and_named_always_give_valid_calls(server, tool_set):
    tools = TOOL_SETS[tool_set]
    named = tools[-1]["function"]["name"]
    for choice in ["required", {"type": "function", "function": {"name": named}}]:
        response = ask(server.client(), tools, choice, parallel_tool_calls=False)
        assert len(response.choices) == 30
        for c in response.choices:
            assert c.message.tool_calls and len(c.message.tool_calls) == 1, c.message
            assert_valid(c.message.tool_calls[0], tools)
            if isinstance(choice, dict):
                assert c.message.tool_calls[0].function.name == named
            assert c.finish_reason == "tool_calls"
            assert "<tool_call>" not in (c.message.content or "")


@pytest.mark.parametrize("tool_set", list(TOOL_SETS))
def test_auto_every_call_that_appears_is_valid(server, tool_set):
    """The bias makes the random model open a call in about half the samples; once it opens one,
    the grammar sees it through to a declared tool with valid arguments."""
    tools = TOOL_SETS[tool_set]
    response = ask(server.client(), tools, "auto", logit_bias={str(TOOL_CALL_TOKEN): 10.0}, parallel_tool_calls=False,
                   max_tokens=120)
    with_calls = [c for c in response.choices if c.message.tool_calls]
    assert 3 <= len(with_calls) < 30
    for c in response.choices:
        assert "<tool_call>" not in (c.message.content or "")
        if not c.message.tool_calls:
            assert c.message.content and c.finish_reason == "length"  # free text stays free
            continue
        assert len(c.message.tool_calls) == 1
        if c.finish_reason == "length":  # cut off by max_tokens inside the call: unfinished, not wrong
            continue
        assert c.finish_reason == "tool_calls"
        assert_valid(c.message.tool_calls[0], tools)


def test_parallel_tool_calls(server):
    tools = TOOL_SETS["nested"]
    bias = {str(TOOL_CALL_TOKEN): 16.0}
    many = ask(server.client(), tools, "required", n=10, parallel_tool_calls=True, logit_bias=bias, max_tokens=300)
    counts = [len(c.message.tool_calls or []) for c in many.choices]
    assert max(counts) >= 2, counts
    for c in many.choices:
        for call in c.message.tool_calls[:-1] if c.finish_reason == "length" else c.message.tool_calls:
            assert_valid(call, tools)
    one = ask(server.client(), tools, "required", n=10, parallel_tool_calls=False, logit_bias=bias, max_tokens=300)
    assert all(len(c.message.tool_calls) == 1 for c in one.choices)


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_streaming_reassembles_to_the_same_calls(server, tool_choice):
    tools = TOOL_SETS["nested"]
    client = server.client()
    for seed in range(3):
        kw = dict(n=1, seed=seed, logit_bias={str(TOOL_CALL_TOKEN): 10.0}, max_tokens=150)
        whole = ask(client, tools, tool_choice, **kw).choices[0]
        content, calls, reasons, ids = "", {}, [], set()
        for chunk in ask(client, tools, tool_choice, stream=True, **kw):
            for choice in chunk.choices:
                content += choice.delta.content or ""
                for delta in choice.delta.tool_calls or []:
                    if delta.id:
                        ids.add(delta.id)
                        calls[delta.index] = [delta.function.name, ""]
                    calls[delta.index][1] += delta.function.arguments or ""
                reasons.append(choice.finish_reason)
        assert content == (whole.message.content or "")
        assert [tuple(calls[i]) for i in sorted(calls)] == [
            (call.function.name, call.function.arguments) for call in whole.message.tool_calls or []]
        assert len(ids) == len(calls) and "<tool_call>" not in content
        assert reasons[-1] == whole.finish_reason
        if tool_choice == "required":
            assert calls


def test_agent_loop_renders_calls_and_results(server):
    tools = TOOL_SETS["nested"]
    client = server.client()
    first = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=1.0, seed=3, max_tokens=200)
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    conversation = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
    ]
    second = client.chat.completions.create(model="tiny", messages=conversation, tools=tools, max_tokens=20, seed=0,
                                            temperature=0.0, tool_choice="none")
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].message.content

    rendered = httpx.post(f"{server.url}/tokenize", json={"messages": conversation, "tools": tools}).json()
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": rendered["tokens"]}).json()["prompt"]
    arguments = json.dumps(json.loads(call.function.arguments), ensure_ascii=False)  # as the template's tojson
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call>' in text
    assert '<tool_response>\n{"temp_c": 21}\n</tool_response>' in text
    assert '"name": "get_weather"' in text.split("<|im_start|>user")[0]  # the tools are declared in the system turn
    assert text.endswith("<|im_start|>assistant\n")
    # tool_choice none leaves the tools out of the prompt, so the second turn's prompt is the same minus them.
    no_tools = httpx.post(f"{server.url}/tokenize", json={"messages": conversation}).json()
    assert second.usage.prompt_tokens == no_tools["count"]


@pytest.mark.parametrize("body, param", [
    ({"tools": TOOL_SETS["enums"], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [function("f", {"type": "objekt"})]}, "tools.0.function.parameters"),
    ({"messages": MESSAGES + [{"role": "tool", "content": "42"}]}, "messages.1.tool_call_id"),
    ({"tools": TOOL_SETS["enums"], "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_tool_input_is_400(server, body, param):
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


CHATML_WITHOUT_TOOLS = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_template_without_tools_gets_hermes_tool_prompt(tiny_model, tmp_path):
    """SmolLM2-style ChatML ignores ``tools``: they arrive as a Hermes system prompt, calls and results as text."""
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML_WITHOUT_TOOLS)
    tools = TOOL_SETS["enums"]
    with running_server(tiny_model("llama"), "--kv-cache-memory", "16MiB", "--served-model-name", "tiny",
                        "--chat-template", str(template)) as srv:
        response = srv.client().chat.completions.create(model="tiny", messages=MESSAGES, tools=tools, temperature=1.0,
                                                        tool_choice="required", seed=1, max_tokens=120)
        call = response.choices[0].message.tool_calls[0]
        assert_valid(call, tools)
        conversation = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                                   {"role": "tool", "tool_call_id": call.id, "content": "done"}]
        tokens = httpx.post(f"{srv.url}/tokenize", json={"messages": conversation, "tools": tools}).json()["tokens"]
        text = httpx.post(f"{srv.url}/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert json.dumps(tools[0], ensure_ascii=False) in text
    arguments = json.dumps(json.loads(call.function.arguments), ensure_ascii=False)
    assert f'<|im_start|>assistant\n<tool_call>\n{{"name": "set_mode", "arguments": {arguments}}}\n</tool_call><|im_end|>' in text
    assert "<|im_start|>user\n<tool_response>\ndone\n</tool_response><|im_end|>" in text
