"""Tool-call syntaxes: the incremental parser (streamed in any chunking == all at once) and each
syntax's grammar, sampled from a random model: every call it writes parses and validates."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import xgrammar as xgr

from engine import LLM, SamplingParams
from engine.structured import StructuredOutputParams
from server.errors import APIError
from server.tool_calls import SYNTAXES, ToolCallParser, ToolRequest, detect_syntax

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                         "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

WRITTEN = {
    "hermes": 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\nris", "unit": "C"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": {"x": [2]}}}\n</tool_call>',
    "llama3_json": '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}',
    "mistral": 'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}, '
               '{"name": "add", "arguments": {"a": 1, "b": 2}}]',
}


def streamed(syntax: str, text: str, seed: int) -> tuple[str, list[tuple[str, str, str]]]:
    """Feed ``text`` in random pieces; reassemble content and calls as an OpenAI client would."""
    rng = random.Random(seed)
    parser, content, calls = ToolCallParser(SYNTAXES[syntax]), "", {}
    pos = 0
    while pos < len(text):
        size = rng.randint(1, 7)
        deltas = [parser.feed(text[pos:pos + size])]
        pos += size
        if pos >= len(text):
            deltas.append(parser.finish())
        for delta in deltas:
            content += delta.content
            for call in delta.calls:
                if call.id is not None:
                    calls[call.index] = [call.id, call.name, ""]
                calls[call.index][2] += call.arguments
    return content, [tuple(c) for _, c in sorted(calls.items())]


@pytest.mark.parametrize("syntax", list(WRITTEN))
def test_streamed_parse_equals_whole_parse(syntax):
    whole = ToolCallParser(SYNTAXES[syntax])
    whole.feed(WRITTEN[syntax], final=True)
    assert whole.calls and all(call.complete for call in whole.calls)
    assert json.loads(whole.calls[0].arguments)["unit"] == "C"
    for seed in range(20):
        content, calls = streamed(syntax, WRITTEN[syntax], seed)
        assert content == whole.content
        assert [(name, args) for _, name, args in calls] == [(c.name, c.arguments) for c in whole.calls]


def test_hermes_content_and_escaped_control_characters():
    parser = ToolCallParser(SYNTAXES["hermes"])
    parser.feed(WRITTEN["hermes"], final=True)
    assert parser.content == "Sure."  # blanks next to calls dropped, no tag text leaks
    assert [c.name for c in parser.calls] == ["get_weather", "add"]
    assert json.loads(parser.calls[0].arguments) == {"city": "Pa\nris", "unit": "C"}  # strict JSON
    assert json.loads(parser.calls[1].arguments) == {"a": 1, "b": {"x": [2]}}


def test_partial_marker_is_held_back_then_released():
    parser = ToolCallParser(SYNTAXES["hermes"])
    assert parser.feed("a <tool_").content == "a"
    assert parser.feed("box> b").content == " <tool_box> b"
    assert parser.finish().content == "" and parser.calls == []


def test_text_without_calls_is_unchanged():
    text = "  Hello,\n world <tool  \n"
    parser = ToolCallParser(SYNTAXES["hermes"])
    assert parser.feed(text[:9]).content + parser.feed(text[9:]).content + parser.finish().content == text


def test_call_cut_by_max_tokens_is_incomplete():
    parser = ToolCallParser(SYNTAXES["hermes"])
    parser.feed('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b', final=True)
    assert [(c.name, c.arguments, c.complete) for c in parser.calls] == [("add", '{"a": 1, "b', False)]


def test_detect_syntax_from_template(tiny_model):
    from transformers import AutoTokenizer
    qwen = AutoTokenizer.from_pretrained(tiny_model("qwen2"))
    assert detect_syntax(qwen.chat_template).name == "hermes"
    assert detect_syntax("{{ '[TOOL_CALLS]' }}").name == "mistral"
    assert detect_syntax("{{- '<|python_tag|>' }}").name == "llama3_json"


@pytest.mark.parametrize("tools, choice, param", [
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    (None, "auto", "tool_choice"),
    (TOOLS, "sometimes", "tool_choice"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}], None, "tools.0.function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"properties": 5}}}], None, "tools.0.function.parameters"),
    ([{"type": "function", "function": {"name": "bad name!"}}], None, "tools.0.function.name"),
    ([{"type": "retrieval"}], None, "tools.0"),
])
def test_bad_tool_requests_name_the_parameter(tools, choice, param):
    with pytest.raises(APIError) as err:
        ToolRequest.from_body(tools, choice, None)
    assert err.value.status == 400 and err.value.param == param


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model("qwen2")), kv_cache_memory="64MiB")


@pytest.mark.parametrize("syntax", list(SYNTAXES))
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}], ids=["required", "named"])
def test_every_syntax_grammar_yields_valid_calls(llm, syntax, choice):
    """A random-weight model at temperature 1 under each syntax's grammar: every response carries
    complete calls naming a declared tool with schema-valid arguments."""
    tag = ToolRequest(TOOLS, choice, parallel=False).structural_tag(SYNTAXES[syntax])
    spec = StructuredOutputParams(structural_tag=tag)
    params = [SamplingParams(max_tokens=120, temperature=1.0, seed=i, structured_output=spec, skip_special_tokens=False)
              for i in range(10)]
    for out in llm.generate(["Call a tool."] * 10, params):
        parser = ToolCallParser(SYNTAXES[syntax])
        parser.feed(out.text, final=True)
        assert len(parser.calls) == 1 and parser.calls[0].complete, out.text
        call = parser.calls[0]
        assert isinstance(choice, str) or call.name == "add"
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("syntax", ["hermes", "llama3_json"])
def test_after_a_required_call_a_newline_may_end_the_output(llm, syntax, parallel):
    """The grammar itself: after a call and a newline the output may stop (a second call may follow
    only when parallel calls are allowed); the newline is never a separator that forces one."""
    tag = ToolRequest([TOOLS[1]], "required", parallel=parallel).structural_tag(SYNTAXES[syntax])
    grammar = llm.engine.structured.compile(StructuredOutputParams(structural_tag=tag))
    call = {"hermes": '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
            "llama3_json": '{"name": "add", "parameters": {"a": 1, "b": 2}}'}[syntax]
    for written in (call, call + "\n", call + "\n" + call):
        matcher = xgr.GrammarMatcher(grammar)
        allowed = parallel or written.count(call) == 1
        assert matcher.accept_string(written) is allowed, written
        assert matcher.is_completed() or not allowed, written


def test_required_calls_end_when_the_model_prefers_a_newline(llm):
    """Sampled: a model that likes a newline after its call (biased here, as SmolLM2 does by itself)
    writes it and stops with its one call."""
    tokenizer = llm.engine.tokenizer
    bias = {tokenizer.encode("\n", add_special_tokens=False)[0]: 100.0}
    tag = ToolRequest([TOOLS[1]], "required", parallel=True).structural_tag(SYNTAXES["hermes"])
    params = SamplingParams(max_tokens=80, temperature=1.0, seed=0, logit_bias=bias, skip_special_tokens=False,
                            structured_output=StructuredOutputParams(structural_tag=tag))
    out = llm.generate(["Add two numbers."], params)[0]
    parser = ToolCallParser(SYNTAXES["hermes"], calls_only=True)
    parser.feed(out.text, final=True)
    assert out.text.endswith("</tool_call>\n") and out.finish_reason == "stop", out.text
    assert len(parser.calls) == 1 and parser.calls[0].complete and parser.content == ""


def test_a_cut_marker_is_not_content_when_only_calls_are_allowed():
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n<'
    parser = ToolCallParser(SYNTAXES["hermes"], calls_only=True)
    parser.feed(text, final=True)
    assert parser.content == "" and len(parser.calls) == 1
    free = ToolCallParser(SYNTAXES["hermes"])
    free.feed(text, final=True)
    assert free.content == "<"  # in auto mode the text could be the model's own
