"""JSON Schema keywords: each one is enforced by the grammar or refused by name (issue 19).

Three layers: what xgrammar itself does with each keyword (an invalid document its grammar accepts
is why kvserve refuses that keyword); the refusal (a 400 naming the keyword's JSON pointer, or
best effort with ``strict: false``); and sampling, where a random model at temperature 1 under each
enforced keyword writes only documents that ``jsonschema`` with its format checker accepts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
import xgrammar as xgr

from engine import LLM, SamplingParams
from engine.errors import InvalidRequestError
from engine.grammar_worker import json_schema_grammar
from engine.schema_check import checked_schema, unenforced_keywords
from engine.structured import StructuredOutputParams

# keyword -> (schema, a document the schema forbids that xgrammar's grammar for it accepts)
IGNORED_BY_XGRAMMAR = {
    "uniqueItems": ({"type": "array", "items": {"type": "boolean"}, "uniqueItems": True}, "[true, true]"),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "1"),
    "multipleOf": ({"type": "number", "multipleOf": 0.5}, "0.3"),
    "allOf": ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"required": ["b"]}]}, '{"a": 1}'),
    "if": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}, '{"a": 1}'),
    "not": ({"type": "integer", "not": {"const": 5}}, "5"),
    "contains": ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, "[1]"),
    "dependentRequired": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "dependentRequired": {"a": ["b"]}}, '{"a": 1}'),
    "minLength": ({"type": "string", "pattern": "^[a-z]+$", "minLength": 3}, '"ab"'),
    "format": ({"type": "string", "format": "regex"}, '"[unclosed"'),
}
DATE = {"type": "string", "format": "date"}
FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model("qwen2")), kv_cache_memory="64MiB")


def xgrammar_accepts(llm, schema: dict, document: str) -> bool:
    """Whether xgrammar's own grammar for ``schema`` (as kvserve compiles JSON Schemas) admits ``document``."""
    compiler = xgr.GrammarCompiler(llm.engine.structured.pool.info)
    grammar = compiler.compile_grammar(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False,
                                                                     strict_mode=True))
    matcher = xgr.GrammarMatcher(grammar)
    return matcher.accept_string(document) and matcher.is_completed()


@pytest.mark.parametrize("keyword", list(IGNORED_BY_XGRAMMAR))
def test_keywords_xgrammar_ignores_are_refused_by_name(llm, keyword):
    schema, invalid = IGNORED_BY_XGRAMMAR[keyword]
    assert not jsonschema.Draft202012Validator(schema, format_checker=FORMATS).is_valid(json.loads(invalid))
    assert xgrammar_accepts(llm, schema, invalid)  # compiled as it is, the keyword would not hold
    with pytest.raises(InvalidRequestError, match=f"cannot enforce /{keyword}") as err:
        checked_schema(schema, "response_format")
    assert err.value.param == "response_format" and "strict: false" in str(err.value)
    assert unenforced_keywords(checked_schema(schema, "response_format", best_effort=True))[0] == f"/{keyword}"


def test_refusal_names_the_nested_path():
    schema = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(InvalidRequestError, match="/properties/tags/uniqueItems"):
        checked_schema(schema, "p")
    assert checked_schema({"type": "array", "uniqueItems": False}, "p")  # false constrains nothing


def test_xgrammars_loose_date_is_replaced_by_an_exact_pattern(llm):
    assert xgrammar_accepts(llm, DATE, '"5531-04-31"')  # xgrammar's own date format: any day 01-31
    exact = checked_schema(DATE, "p")
    assert "format" not in exact and not xgrammar_accepts(llm, exact, '"5531-04-31"')
    for day, valid in (("2024-02-29", True), ("2023-02-29", False), ("2000-02-29", True), ("1900-02-29", False),
                       ("2024-04-30", True), ("2024-04-31", False), ("0000-01-01", False)):
        assert xgrammar_accepts(llm, exact, f'"{day}"') is valid, day
    ipv4 = checked_schema({"type": "string", "format": "ipv4"}, "p")
    assert xgrammar_accepts(llm, ipv4, '"10.0.0.1"') and not xgrammar_accepts(llm, ipv4, '"01.0.0.1"')


@pytest.mark.parametrize("fmt, wrong", [("email", "no-at-sign"), ("uuid", "123e4567"), ("uri", "not a uri")])
def test_formats_xgrammar_checks_reject_wrong_text(llm, fmt, wrong):
    schema = checked_schema({"type": "string", "format": fmt}, "p")
    assert schema["format"] == fmt and not xgrammar_accepts(llm, schema, json.dumps(wrong))


def test_one_of_with_disjoint_branches_is_enforced():
    for schema in ({"oneOf": [{"type": "string"}, {"type": "integer"}]},
                   {"oneOf": [{"const": "a"}, {"enum": ["b", "c"]}]},
                   {"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"type": "array"}]}):
        assert unenforced_keywords(checked_schema(schema, "p")) == []


ENFORCED = {  # sampled: every completed document must validate, formats included
    "multipleOf integer": {"type": "integer", "multipleOf": 7, "minimum": -1000, "maximum": 1000},
    "multipleOf unbounded": {"type": "integer", "multipleOf": 12},
    "number range": {"type": "number", "minimum": 1.5, "exclusiveMaximum": 9},
    "string length": {"type": "string", "minLength": 2, "maxLength": 6},
    "pattern": {"type": "string", "pattern": "^[a-c]{2}[0-9]$"},
    "date": DATE,
    "date-time": {"type": "string", "format": "date-time"},
    "ipv4": {"type": "string", "format": "ipv4"},
    "formats": {"type": "object", "properties": {f: {"type": "string", "format": f} for f in ("uuid", "time")},
                "required": ["uuid", "time"]},  # (email: a random model's address never ends; checked below)
    "oneOf disjoint": {"oneOf": [{"type": "string", "maxLength": 4}, {"type": "boolean"}]},
    "items": {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 1, "maxItems": 3},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "integer"}, {"const": "x"}], "items": False},
    "closed object": {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
                      "additionalProperties": False},
}


@pytest.mark.parametrize("name", list(ENFORCED))
def test_enforced_keywords_hold_at_temperature_1(llm, name):
    schema = ENFORCED[name]
    spec = StructuredOutputParams(json_schema=schema)
    params = [SamplingParams(max_tokens=200, temperature=1.0, seed=i, structured_output=spec) for i in range(30)]
    outs = llm.generate(["Write JSON."] * 30, params)
    done = [out for out in outs if out.finish_reason == "stop"]
    assert len(done) >= 10, [out.text for out in outs][:3]
    validator = jsonschema.Draft202012Validator(schema, format_checker=FORMATS)
    for out in done:
        validator.validate(json.loads(out.text))


SUITE = json.loads((Path(__file__).parent / "fixtures" / "schema_test_suite.json").read_text())


def suite_results(llm) -> Counter:
    """Each labelled document of the JSON Schema Test Suite against kvserve: its schema refused (a
    400), or the document accepted or rejected by the grammar kvserve compiles for it."""
    compiler = xgr.GrammarCompiler(llm.engine.structured.pool.info)
    results: Counter = Counter()
    for group in SUITE["groups"]:
        try:
            schema = checked_schema(group["schema"], "p")
            grammar = compiler.compile_grammar(json_schema_grammar(json.dumps(schema)))
        except (InvalidRequestError, RuntimeError):
            results["refused", "schema"] += 1
            continue
        for test in group["tests"]:
            matcher = xgr.GrammarMatcher(grammar)
            accepted = matcher.accept_string(json.dumps(test["data"], ensure_ascii=False)) and matcher.is_completed()
            results["valid" if test["valid"] else "invalid", "accepted" if accepted else "rejected"] += 1
            if accepted and not test["valid"]:
                results["invalid accepted", f"{group['file']}: {group['description']}: {test['data']!r}"] += 1
    return results


def test_no_invalid_document_of_the_schema_test_suite_is_accepted(llm):
    results = suite_results(llm)
    leaks = [key[1] for key in results if key[0] == "invalid accepted"]
    assert not leaks, leaks
    valid = results["valid", "accepted"] + results["valid", "rejected"]
    print(f"\nschema test suite: {len(SUITE['groups'])} schemas, {results['refused', 'schema']} refused; "
          f"{results['invalid', 'rejected']} invalid documents all rejected; {results['valid', 'rejected']} of "
          f"{valid} valid documents rejected")
    assert results["valid", "accepted"] > results["valid", "rejected"]
