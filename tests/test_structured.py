"""Grammar-constrained decoding in the engine: every output valid, bad grammars rejected, others unaffected."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from engine import LLM, SamplingParams
from conftest import STORIES
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


@pytest.fixture(scope="module", params=["plain", "draft", *(pytest.param(p, marks=pytest.mark.slow) for p in ("ngram", "int4 draft"))])
def llm(request, tiny_model, draft_of):
    """The random Qwen2 model "wants" arbitrary tokens from a 151k vocabulary: only the mask keeps it
    valid. Every test runs without speculation, with a draft model, and with n-gram lookup: the
    grammar must hold at every draft position and across rollbacks; and with int4 packed weights
    (target and draft). The last two run the whole module under -m slow, the nested schema by default."""
    target = tiny_model("qwen2")
    draft = dict(method="draft", draft_model=str(draft_of(target, noise=0.02)), adaptive=False)
    spec = {"plain": None, "draft": draft, "ngram": dict(method="ngram", adaptive=False), "int4 draft": draft}
    return LLM(str(target), kv_cache_memory="64MiB", max_num_batched_tokens=256, speculative_config=spec[request.param],
               quantization="int4" if request.param.startswith("int4") else None)


def sample(llm, spec: Structured, n: int, max_tokens: int = 160, temperature: float = 1.0):
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i, structured_output=spec) for i in range(n)]
    return llm.generate(["Reply in the format asked for."] * n, params)


SCHEMAS = {
    "nested": SCHEMA,
    "arrays": {"type": "object", "properties": {
        "scores": {"type": "array", "items": {"type": "number", "minimum": -1, "maximum": 1}, "minItems": 2, "maxItems": 4},
        "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}, "minItems": 1, "maxItems": 2}},
        "required": ["scores", "matrix"], "additionalProperties": False},
    "enums": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3]}, "ok": {"type": "boolean"},
        "unit": {"const": "cm"}}, "required": ["color", "size", "ok", "unit"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999}, "note": {"type": "string", "maxLength": 8},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 10}, "flag": {"type": ["boolean", "null"]}},
        "required": ["id"], "additionalProperties": False},
    "patterns": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}, "day": {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])$"},
        "id": {"type": "string", "format": "uuid"}},
        "required": ["code", "day", "id"], "additionalProperties": False},
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_outputs_always_validate(llm, name):
    """30 samples at temperature 1.0 from a model that knows nothing of JSON: every finished one validates."""
    schema = SCHEMAS[name]
    outs = sample(llm, Structured(json_schema=schema), n=30, max_tokens=100)
    finished = [o for o in outs if o.finish_reason == "stop"]
    assert len(finished) >= 20, [o.text for o in outs if o.finish_reason != "stop"]
    for out in finished:
        value = json.loads(out.text)
        jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())


@pytest.mark.parametrize("llm", ["ngram", "int4 draft"], indirect=True)
def test_nested_schema_with_ngram_lookup_and_with_int4_weights(llm):
    test_json_schema_outputs_always_validate(llm, "nested")


def max_blank_run_outside_strings(text: str) -> int:
    longest = run = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            in_string = escaped or ch != '"'
            escaped = not escaped and ch == "\\"
            continue
        in_string = ch == '"'
        run = run + 1 if ch in " \t\n\r" else 0
        longest = max(longest, run)
    return longest


def test_strings_never_hold_utf16_surrogates(llm):
    """xgrammar admits ED A0..BF (a surrogate, which UTF-8 forbids) inside JSON strings and free-form
    grammars. With byte tokens ED and A0 pushed up by logit_bias, the output would be full of them;
    the mask keeps every constrained output valid UTF-8, whatever token splits the bytes."""
    byte_token = {b: llm.tokenizer.convert_tokens_to_ids(c) for b, c in ((0xED, "í"), (0xA0, "ł"))}
    bias = {token: 30.0 for token in byte_token.values()}
    for spec in (Structured(json_schema={"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}),
                 Structured(regex="[^a-z]{1,40}")):
        outputs = llm.generate(["Reply."] * 4, [SamplingParams(max_tokens=40, temperature=1.0, seed=i, logit_bias=bias,
                                                               structured_output=spec) for i in range(4)])
        raw = [b"".join(llm.engine.structured.token_bytes[t] for t in o.token_ids) for o in outputs]
        assert sum(r.count(b"\xed") for r in raw) >= 10  # the bias took hold: many 3-byte characters open with ED
        for r, o in zip(raw, outputs):
            assert re.search(rb"\xed[\xa0-\xbf]", r) is None, r
            assert "\ufffd" not in o.text


def test_a_draft_row_looks_at_the_draft_before_it(llm):
    """The draft model masks its k-th proposal after the matcher took the first k - 1: a draft that
    ends in the lead byte ED bars surrogate tails from the next row, the request's own last token
    does not."""
    from engine.request import Request
    from engine.speculative import DraftPosition

    structured = llm.engine.structured
    ed, tail = (llm.tokenizer.convert_tokens_to_ids(c) for c in ("í", "ł"))  # bytes ED and A0
    spec = Structured(json_schema={"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]})
    req = Request("r", [1, 2], SamplingParams(structured_output=spec), set())
    req.matcher = structured.matcher(spec)
    for token in llm.tokenizer.encode('{"s": "'):
        assert req.matcher.accept_token(token)
        req.token_ids.append(token)
    assert req.matcher.accept_token(ed)  # the draft: the first byte of a 3-byte character
    allowed = lambda rows: bool((rows[0][0][tail // 32] >> (tail % 32)) & 1)  # noqa: E731
    assert not allowed(structured.bitmask([DraftPosition(req, [ed])]))
    # The same matcher state seen through the request itself (what the draft model used to pass):
    # its last token is the quote, so the surrogate tail got through.
    assert allowed(structured.bitmask([req]))
    req.matcher.rollback(1)


def test_whitespace_between_tokens_is_bounded(llm):
    many_optional = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(12)}}
    for out in sample(llm, Structured(json_schema=many_optional), n=30, max_tokens=80) + \
            sample(llm, Structured(json_object=True), n=10, max_tokens=60):
        assert max_blank_run_outside_strings(out.text) <= 1, out.text


def test_jump_forward_same_greedy_text_in_fewer_steps():
    """stories260K writes this opening by itself; the regex forces most of it, jump-forward skips the
    forced parts (re-encoded with the model's tokenizer) and the greedy text stays the same."""
    spec = Structured(regex=r"Once upon a time, there was a little girl named (Lily|Sue|Tom)\. She loved to (play|eat)[a-z ,.]{0,60}")
    results = {}
    for on in (True, False):
        llm = LLM(str(STORIES), kv_cache_memory="16MiB", enable_jump_forward=on)
        out = llm.generate(prompt_token_ids=[[1]], sampling_params=SamplingParams(max_tokens=80, temperature=0, structured_output=spec))[0]
        results[on] = (out.text, llm.engine.num_steps, llm.engine.jump_forward_tokens_total)
    assert results[True][0] == results[False][0]
    assert results[True][0].startswith("Once upon a time, there was a little girl named Lily. She loved to play")
    assert results[True][1] < results[False][1] and results[True][2] > 0 and results[False][2] == 0


def test_regex_choice_and_ebnf(llm):
    for out in sample(llm, Structured(regex=r"[a-z]{2,5}-\d{3}"), n=30):
        assert re.fullmatch(r"[a-z]{2,5}-\d{3}", out.text) and out.finish_reason == "stop"
    choices = ["yes", "no", "maybe so", "café ☕"]
    texts = {o.text for o in sample(llm, Structured(choice=choices), n=30, temperature=20.0)}  # flatten the peaked random model
    assert texts <= set(choices) and len(texts) > 1
    grammar = 'root ::= "(" item ("," item)* ")"\nitem ::= [a-c] | "x" [0-9]'
    for out in sample(llm, Structured(grammar=grammar), n=6, max_tokens=60, temperature=0.7):
        assert re.fullmatch(r"\((?:[a-c]|x[0-9])(?:,(?:[a-c]|x[0-9]))*\)", out.text), out.text


def test_json_object_is_parseable_or_cut_by_length(llm):
    for out in sample(llm, Structured(json_object=True), n=30, max_tokens=80):
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
