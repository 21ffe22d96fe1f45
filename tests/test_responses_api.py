"""OpenAI's Responses API on a real `kvserve serve`, through the official client and the OpenAI Agents
SDK: plain, streamed, a function-tool round trip, JSON Schema output and previous_response_id; tool
arguments always valid at temperature 1; bad input a 400 naming the field; every body as OpenAI's
published schema says (tests/fixtures/openai_schemas.py)."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest

from fixtures.openai_schemas import check, check_event
from server_process import running_server

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer"}},
        "required": ["city", "population"], "additionalProperties": False}


@pytest.fixture(scope="module")
def smollm2():
    """The embedded SmolLM2-135M-Instruct: a real model, so tool calls and answers make sense."""
    with running_server(None, "--served-model-name", "m") as srv:
        yield srv


@pytest.fixture(scope="module")
def tiny(tiny_model):
    """A random qwen2: at temperature 1 it writes anything the grammar allows."""
    with running_server(tiny_model("qwen2"), "--served-model-name", "tiny", "--max-model-len", "512") as srv:
        yield srv


def raw(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/responses", json=body, timeout=120)


def test_plain_response_and_its_retrieval(smollm2):
    client = smollm2.client()
    response = client.responses.create(model="m", input="What is the capital of France?", temperature=0,
                                       max_output_tokens=16, instructions="Answer in one sentence.")
    assert response.status in ("completed", "incomplete") and "Paris" in response.output_text
    assert response.usage.output_tokens <= 16 and response.usage.input_tokens > 0
    assert client.responses.retrieve(response.id).output_text == response.output_text
    check("Response", raw(smollm2, {"model": "m", "input": "Hi", "max_output_tokens": 4}).json())


def test_streamed_events_add_up_to_the_response(smollm2):
    body = {"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": "Name a color."}]}],
            "temperature": 0, "max_output_tokens": 12}
    events = list(smollm2.client().responses.create(**body, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in ("response.completed",
                                                                                         "response.incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text and text == events[-1].response.output_text
    done = [event.item for event in events if event.type == "response.output_item.done"]
    assert [item.model_dump() for item in done] == [item.model_dump() for item in events[-1].response.output]
    with httpx.stream("POST", f"{smollm2.url}/v1/responses", json={**body, "stream": True}, timeout=120) as response:
        datas = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert datas
    for data in datas:
        check_event(data)


def test_function_tool_round_trip(smollm2):
    client = smollm2.client()
    first = client.responses.create(model="m", input="What is the weather like in Paris?", tools=[WEATHER],
                                    tool_choice="required", temperature=0, max_output_tokens=48)
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and set(json.loads(calls[0].arguments)) == {"city"}
    second = client.responses.create(model="m", previous_response_id=first.id, tools=[WEATHER], temperature=0,
                                     max_output_tokens=32, tool_choice="none", input=[
                                         {"type": "function_call_output", "call_id": calls[0].call_id,
                                          "output": "Sunny, 24 C"}])
    assert second.output_text and not [item for item in second.output if item.type == "function_call"]
    assert second.previous_response_id == first.id
    alone = client.responses.create(model="m", input="What is the weather like in Paris?", max_output_tokens=1)
    assert second.usage.input_tokens > alone.usage.input_tokens + 10  # the call and its result are in the prompt


def test_streamed_function_call_events(smollm2):
    body = {"model": "m", "input": "What is the weather like in Paris?", "tools": [WEATHER], "tool_choice": "required",
            "temperature": 0, "max_output_tokens": 48, "stream": True}
    with httpx.stream("POST", f"{smollm2.url}/v1/responses", json=body, timeout=120) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    for event in events:
        check_event(event)
    final = events[-1]["response"]
    calls = [item for item in final["output"] if item["type"] == "function_call"]
    assert calls and calls[0]["name"] == "get_weather"
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"
                     and e["item_id"] == calls[0]["id"])
    assert deltas == calls[0]["arguments"] and json.loads(deltas)["city"]


def test_previous_response_id_carries_the_conversation(smollm2):
    client = smollm2.client()
    first = client.responses.create(model="m", input="My name is Ada. Say hello.", temperature=0, max_output_tokens=12)
    again = client.responses.create(model="m", previous_response_id=first.id, input="What is my name?",
                                    temperature=0, max_output_tokens=12)
    alone = client.responses.create(model="m", input="What is my name?", temperature=0, max_output_tokens=12)
    assert again.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    with pytest.raises(openai.BadRequestError, match="previous_response_id|not found"):
        client.responses.create(model="m", previous_response_id="resp_nope", input="hi")
    not_stored = client.responses.create(model="m", input="hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(not_stored.id)


def test_json_schema_output_always_validates(tiny):
    client = tiny.client()
    for seed in range(10):
        response = client.responses.create(model="tiny", input="A city as JSON", temperature=1.0, max_output_tokens=60,
                                           text={"format": {"type": "json_schema", "name": "city", "schema": CITY}},
                                           extra_body={"seed": seed})
        if response.status == "completed":
            jsonschema.validate(json.loads(response.output_text), CITY)
        else:
            assert response.incomplete_details.reason == "max_output_tokens"


def test_tool_arguments_are_schema_valid_at_temperature_1(tiny):
    """A random model, sampled freely: every call's arguments are valid for its tool, as in chat."""
    city = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}
    tools = [{**WEATHER, "parameters": city}, {"type": "function", "name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}]
    schemas = {tool["name"]: tool["parameters"] for tool in tools}

    async def one(client: openai.AsyncOpenAI, seed: int) -> list:
        response = await client.responses.create(model="tiny", input="call a tool", tools=tools, tool_choice="required",
                                                 temperature=1.0, max_output_tokens=120, extra_body={"seed": seed})
        return [item for item in response.output if item.type == "function_call"] if response.status == "completed" else []

    async def run() -> list:
        client = tiny.async_client()
        return [call for calls in await asyncio.gather(*(one(client, seed) for seed in range(24))) for call in calls]

    calls = asyncio.run(run())
    assert len(calls) >= 12
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])


@pytest.mark.parametrize("body, param", [
    ({"input": [{"type": "image_generation_call"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "temperature": -1}, "temperature"),
    ({"input": "hi", "previous_response_id": "resp_unknown"}, "previous_response_id"),
    ({"input": []}, "input"),
    ({}, "input"),
])
def test_bad_requests_are_400_naming_the_field(tiny, body, param):
    response = raw(tiny, {"model": "tiny", **body})
    assert response.status_code == 400, response.text
    check("ErrorResponse", response.json())
    assert response.json()["error"]["param"] == param


def test_openai_agents_sdk_runs_an_agent_with_a_function_tool(smollm2):
    """The Agents SDK's default model is the Responses API: an agent calls its tool, gets the result
    and answers."""
    import agents

    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        seen.append(city)
        return f"Sunny and 24 C in {city}"

    agents.set_tracing_disabled(True)
    model = agents.OpenAIResponsesModel(model="m", openai_client=smollm2.async_client())
    agent = agents.Agent(name="weather", instructions="Use the tool, then answer in one short sentence.",
                         tools=[get_weather], model=model,
                         model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=200))
    result = agents.Runner.run_sync(agent, "What is the weather like in Paris?", max_turns=4)
    assert seen and isinstance(result.final_output, str) and result.final_output
