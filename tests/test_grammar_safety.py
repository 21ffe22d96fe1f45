"""Grammars that could stall or exhaust the server are refused, bounded or killed; schemas whose
keywords contradict each other never produce output that breaks them (issues 16 and 21)."""

from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest
import xgrammar as xgr

from conftest import SHARED_MODELS, STORIES
from engine import LLM, InvalidRequestError, SamplingParams
from engine.grammar_check import check_grammar
from engine.grammar_worker import CompileJob, CompileLimits, CompilePool, CompileError, fixed_separators
from engine.schema_check import SchemaLimits, checked_schema
from engine.structured import StructuredOutputParams as Structured

# Required recursion: every `n` needs two more `n`s, so no finite document exists.
RECURSIVE = {"$defs": {"n": {"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}, "b": {"$ref": "#/$defs/n"}},
                             "required": ["a", "b"]}}, "$ref": "#/$defs/n"}
BFCL_BOOLEAN = {"type": "boolean", "enum": ["True", "False", "dontcare"]}  # as 16 of BFCL's functions declare it


def ebnf(text: str) -> str:
    return str(xgr.Grammar.from_ebnf(text))


def schema_ebnf(schema: dict) -> str:
    return str(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False))


@pytest.mark.parametrize("grammar", ['root ::= "a" root', "root ::= root", 'root ::= "x" | "y" r\nr ::= "a" r'])
def test_grammars_that_never_end_are_found(grammar):
    assert "can never end" in check_grammar(ebnf(grammar), 65536)


def test_required_recursion_in_a_schema_never_ends():
    assert "`defs_n`" in check_grammar(schema_ebnf(RECURSIVE), 65536)


@pytest.mark.parametrize("grammar", ['root ::= "(" root ")" | "x"', 'root ::= [^a]* "x"? ("y" | "z")+ [\\]a]{2,3}'])
def test_grammars_that_can_end_pass(grammar):
    assert check_grammar(ebnf(grammar), 65536) is None


def test_optional_recursion_and_big_schemas_pass():
    optional = {"$defs": {"n": {"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"}
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(1000)},
            "required": [f"p{i}" for i in range(1000)]}
    deep: dict = {"type": "string"}
    for _ in range(60):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    for schema in (optional, wide, deep):
        started = time.perf_counter()
        assert check_grammar(schema_ebnf(schema), 65536) is None
        assert time.perf_counter() - started < 5  # linear: a 1000-property chain once took minutes


def test_a_huge_shortest_output_is_refused():
    assert "over the limit of 65536" in check_grammar(ebnf('root ::= "ab"{40000, 40000}'), 65536)


def test_a_tool_schema_inside_a_triggered_tag_is_checked():
    tools = [{"type": "function", "function": {"name": "f", "parameters": RECURSIVE}}]
    tag = xgr.get_model_structural_tag("qwen_3", tools=tools, tool_choice="auto", reasoning="disabled")
    assert "can never end" in check_grammar(str(xgr.Grammar.from_structural_tag(tag)), 65536)


# --- schema checks ----------------------------------------------------------------------------
def test_enum_values_the_type_forbids_are_dropped():
    assert checked_schema({"type": "string", "enum": ["a", 1, "b"]}, "p")["enum"] == ["a", "b"]


def test_an_impossible_required_value_is_refused_naming_its_path():
    schema = {"type": "object", "properties": {"flag": BFCL_BOOLEAN}, "required": ["flag"]}
    with pytest.raises(InvalidRequestError, match="/properties/flag/enum") as caught:
        checked_schema(schema, "response_format")
    assert caught.value.param == "response_format"
    with pytest.raises(InvalidRequestError, match="const"):
        checked_schema({"type": "integer", "const": "x"}, "p")


def test_an_impossible_optional_property_is_left_out():
    schema = {"type": "object", "properties": {"flag": BFCL_BOOLEAN, "x": {"type": "integer"}}, "required": ["x"]}
    assert checked_schema(schema, "p")["properties"] == {"x": {"type": "integer"}}
    assert "flag" in schema["properties"]  # the caller's schema is untouched
    open_object = {**schema, "additionalProperties": True}  # the name could come back with any value
    with pytest.raises(InvalidRequestError):
        checked_schema(open_object, "p")


def test_impossible_branches_and_items():
    assert checked_schema({"anyOf": [{"type": "integer", "const": "x"}, {"type": "string"}]}, "p") == {
        "anyOf": [{"type": "string"}]}
    assert checked_schema({"type": "array", "items": BFCL_BOOLEAN}, "p") == {"type": "array", "maxItems": 0}
    with pytest.raises(InvalidRequestError):
        checked_schema({"type": "array", "items": BFCL_BOOLEAN, "minItems": 1}, "p")


@pytest.mark.parametrize("schema,limit", [
    ({"type": "string", "enum": [f"v{i}" for i in range(5000)]}, "4096"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(1100)}}, "1024"),
    ({"type": "string", "description": "x" * 300_000}, "262144"),
])
def test_size_limits_are_named(schema, limit):
    with pytest.raises(InvalidRequestError, match=f"over the limit of {limit}"):
        checked_schema(schema, "p", SchemaLimits())


def test_nesting_limit_even_past_pythons_recursion_limit():
    deep: dict = {"type": "string"}
    for _ in range(5000):
        deep = {"type": "array", "items": deep}
    with pytest.raises(InvalidRequestError, match="nests deeper than the limit of 64"):
        checked_schema(deep, "p")


# --- the compile workers ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool(qwen_tokenizer_info):
    return CompilePool(qwen_tokenizer_info, 1, CompileLimits(timeout_s=1.0))


@pytest.fixture(scope="module")
def qwen_tokenizer_info():
    from transformers import AutoTokenizer

    return xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(SHARED_MODELS / "qwen2.5-tokenizer"))


def slow_schema(n: int = 1000) -> str:
    """Compiles for several CPU seconds: many optional properties, each with a pattern."""
    return json.dumps({"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": f"[a-z]{{{i % 7 + 1}}}x+"}
                                                        for i in range(n)}})


def test_a_compile_over_the_cpu_limit_is_killed_and_the_pool_recovers(pool):
    started = time.monotonic()
    with pytest.raises(CompileError, match="longer than the 1 s limit"):
        pool.compile(CompileJob("json_schema", slow_schema()))
    assert time.monotonic() - started < 20
    assert pool.num_killed == 1
    grammar = pool.compile(CompileJob("regex", "[0-9]{3}"))  # a fresh worker serves the next job
    matcher = xgr.GrammarMatcher(grammar)
    assert matcher.accept_string("123") and matcher.is_completed()


def test_compiler_errors_carry_no_source_paths(pool):
    with pytest.raises(CompileError) as caught:
        pool.compile(CompileJob("json_schema", '{"type": "integer", "minimum": 5, "maximum": 2}'))
    assert "minimum greater than maximum" in str(caught.value)
    assert not re.search(r"\.cc:\d+|/project/", str(caught.value))


def test_results_are_cached(pool):
    job = CompileJob("grammar", 'root ::= "cached"')
    first = pool.compile(job)
    assert pool.cached(job) is first and pool.compile(job) is first


def test_structural_tag_json_uses_the_fixed_separators_of_response_format():
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<a>", "end": "</a>", "content": {
        "type": "json_schema", "json_schema": {"type": "object", "properties": {"x": {"type": "integer"}},
                                               "required": ["x"]}}}}
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(xgr.TokenizerInfo([])).compile_grammar(
        xgr.Grammar.from_structural_tag(json.dumps(fixed_separators(tag)))))
    assert not matcher.accept_string('<a>{ "x" :1}')
    matcher.reset()
    assert matcher.accept_string('<a>{"x": 1}</a>')


# --- through the engine -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm():
    return LLM(str(STORIES), kv_cache_memory="16MiB", structured_output_compile_timeout=2.0)


@pytest.mark.parametrize("spec", [Structured(grammar='root ::= "a" root'), Structured(grammar="root ::= root"),
                                  Structured(json_schema=RECURSIVE)])
def test_endless_grammars_are_refused_before_running(llm, spec):
    with pytest.raises(InvalidRequestError, match="can never end") as caught:
        llm.generate("Once", SamplingParams(max_tokens=4, structured_output=spec))
    assert caught.value.param == spec.kind


def test_forced_text_is_cut_to_max_tokens(llm):
    """A grammar forcing 60,000 characters: the request emits max_tokens tokens, no more, at once."""
    started = time.perf_counter()
    out = llm.generate("Once", SamplingParams(max_tokens=5, structured_output=Structured(grammar='root ::= "ab"{30000, 30000}')))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    assert out.text and set(out.text) <= {"a", "b"}
    assert time.perf_counter() - started < 30


def test_bfcl_style_enum_output_validates_against_the_schema_as_written(llm):
    schema = {"type": "object", "properties": {"flag": BFCL_BOOLEAN, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    outs = llm.generate(["Once"] * 4, [SamplingParams(max_tokens=40, temperature=1.0, seed=i,
                                                      structured_output=Structured(json_schema=schema)) for i in range(4)])
    for out in outs:
        jsonschema.validate(json.loads(out.text), schema)  # flag can only be left out
