"""Grammar-constrained decoding in the engine: every output valid, bad grammars rejected, others unaffected."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from engine import LLM, SamplingParams
from engine.structured import StructuredOutputParams as Structured

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                    "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "age", "pets", "address"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(tiny_model):
    # The random Qwen2 model "wants" arbitrary tokens from a 151k vocabulary: only the mask keeps it valid.
    return LLM(str(tiny_model("qwen2")), kv_cache_memory="64MiB", max_num_batched_tokens=256)


def sample(llm, spec: Structured, n: int, max_tokens: int = 160, temperature: float = 1.0):
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i, structured_output=spec) for i in range(n)]
    return llm.generate(["Reply in the format asked for."] * n, params)


def test_json_schema_outputs_always_validate(llm):
    for out in sample(llm, Structured(json_schema=SCHEMA), n=8):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_regex_choice_and_ebnf(llm):
    for out in sample(llm, Structured(regex=r"[a-z]{2,5}-\d{3}"), n=6):
        assert re.fullmatch(r"[a-z]{2,5}-\d{3}", out.text) and out.finish_reason == "stop"
    choices = ["yes", "no", "maybe so", "café ☕"]
    texts = {o.text for o in sample(llm, Structured(choice=choices), n=12, temperature=20.0)}  # flatten the peaked random model
    assert texts <= set(choices) and len(texts) > 1
    grammar = 'root ::= "(" item ("," item)* ")"\nitem ::= [a-c] | "x" [0-9]'
    for out in sample(llm, Structured(grammar=grammar), n=6, max_tokens=60, temperature=0.7):
        assert re.fullmatch(r"\((?:[a-c]|x[0-9])(?:,(?:[a-c]|x[0-9]))*\)", out.text), out.text


def test_json_object_is_parseable_or_cut_by_length(llm):
    for out in sample(llm, Structured(json_object=True), n=6, max_tokens=80, temperature=0.8):
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)
        else:
            assert out.finish_reason == "length" and out.text.lstrip().startswith("{")


def test_max_tokens_inside_the_structure_finishes_with_length(llm):
    out = sample(llm, Structured(json_schema=SCHEMA), n=1, max_tokens=5)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


@pytest.mark.parametrize("spec,param", [
    (Structured(regex="[a-"), "regex"),
    (Structured(json_schema={"type": "no-such-type"}), "json_schema"),
    (Structured(json_schema="{not json"), "json_schema"),
    (Structured(grammar="root ::= undefined_rule"), "grammar"),
])
def test_invalid_grammars_raise_value_error_with_compiler_message(llm, spec, param):
    with pytest.raises(ValueError, match=param):
        llm.generate(["x"], SamplingParams(structured_output=spec))
    assert llm.engine.stats().num_free_blocks == llm.engine.stats().num_blocks


def test_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        Structured(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one"):
        Structured()


def test_constrained_and_free_requests_share_a_batch_unchanged(llm):
    free = SamplingParams(max_tokens=24, temperature=0)
    alone = llm.generate(["Tell me a story"], free)[0]
    mixed = llm.generate(["Tell me a story", "Reply in JSON"],
                         [free, SamplingParams(max_tokens=120, temperature=1.0, seed=3, structured_output=Structured(json_schema=SCHEMA))])
    assert mixed[0].token_ids == alone.token_ids
    jsonschema.validate(json.loads(mixed[1].text), SCHEMA)
