"""Hardening against hostile or sloppy clients: body size, prompt size, strict booleans, auth scheme,
request ids, what the open /metrics shows, and an /openapi.json that describes the real API."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server_process import running_server

KEY = "sk-hardening"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 128
MAX_REQUEST_BYTES = 3_000_000
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def server(model):
    # No --served-model-name: the model is served under its path, as `kvserve serve ./folder` does.
    with running_server(model, "--kv-cache-memory", "8MiB", "--max-model-len", str(MAX_MODEL_LEN), "--api-key", KEY,
                        "--max-request-bytes", str(MAX_REQUEST_BYTES)) as srv:
        yield srv


def post(server, path: str, body: dict | bytes, headers: dict | None = None, **kwargs) -> httpx.Response:
    headers = {**AUTH, "content-type": "application/json", **(headers or {})}
    content = body if isinstance(body, bytes) else httpx.Request("POST", "/", json=body).content
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=60, **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    return error


def test_body_over_the_limit_is_413_by_content_length(server):
    body = b'{"prompt": "' + b"a" * MAX_REQUEST_BYTES + b'"}'
    response = post(server, "/v1/completions", body)
    error = assert_error(response, 413, None)
    assert str(MAX_REQUEST_BYTES) in error["message"] and response.headers["x-request-id"]


def test_chunked_body_is_counted_as_it_arrives(server):
    """No Content-Length (chunked upload): refused once the bytes passed the limit; a small one goes through."""
    def chunks(total: int):
        yield b'{"prompt": "'
        for _ in range(total // 65536):
            yield b"a" * 65536
        yield b'", "max_tokens": 1}'

    headers = {**AUTH, "content-type": "application/json"}
    too_big = httpx.post(f"{server.url}/v1/completions", content=chunks(MAX_REQUEST_BYTES + 65536), headers=headers,
                         timeout=60)
    assert_error(too_big, 413, None)
    small = httpx.post(f"{server.url}/tokenize", content=chunks(65536), headers=headers, timeout=60)
    assert small.status_code == 200 and small.json()["count"] > 0


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "a" * 40_000}, "prompt"),
    ("/v1/completions", {"prompt": ["hi", "a" * 40_000]}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a" * 40_000}]}]},
     "messages"),
])
def test_prompt_too_many_bytes_for_the_context_is_refused_untokenized(server, path, body, param):
    """128 tokens of at most 256 bytes (Qwen's longest token) cannot hold 40,000 bytes: 400 from the byte count."""
    error = assert_error(post(server, path, body), 400, param)
    assert "bytes" in error["message"], error


def test_tokenizing_a_large_request_leaves_the_event_loop_free(server):
    """Thousands of prompts (each fits) take seconds to tokenize; /health answers meanwhile."""
    prompts = [f"hello world, this is a longish prompt {i} " * 8 for i in range(8000)]
    with ThreadPoolExecutor(1) as pool:
        start = time.monotonic()
        big = pool.submit(post, server, "/v1/completions", {"prompt": prompts, "max_tokens": 1})
        latencies = []
        while not big.done():
            sent = time.monotonic()
            assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
            latencies.append(time.monotonic() - sent)
            time.sleep(0.05)
        took = time.monotonic() - start
    assert_error(big.result(), 400, "n")  # tokenized, then too many sequences for this server
    assert took > 1.0 and max(latencies) < took / 3, (took, max(latencies))


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "hi", "echo": 1}, "echo"),
    ("/v1/completions", {"prompt": "hi", "ignore_eos": "true"}, "ignore_eos"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": "true"}, "logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "stream": 1}, "stream"),
    ("/v1/chat/completions", {"messages": CHAT, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ("/tokenize", {"prompt": "hi", "add_special_tokens": 0}, "add_special_tokens"),
])
def test_booleans_are_strict(server, path, body, param):
    assert_error(post(server, path, body), 400, param)


def test_negative_max_completion_tokens_is_named_as_sent(server):
    error = assert_error(post(server, "/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": -1}), 400,
                         "max_completion_tokens")
    assert error["message"].startswith("max_completion_tokens ") and " max_tokens" not in error["message"], error


@pytest.mark.parametrize("header, status", [
    (f"Bearer {KEY}", 200), (f"bearer {KEY}", 200), (f"BEARER {KEY}", 200), (f"Bearer  {KEY}", 200),
    ("Bearer sk-wrong", 401), (f"Basic {KEY}", 401), (KEY, 401), (f"Bearer {KEY}x", 401),
])
def test_authorization_scheme_is_case_insensitive(server, header, status):
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": header}).status_code == status


@pytest.mark.parametrize("sent, echoed", [
    (b"req-42_ABC.xyz:1", True), (b"x" * 128, True), (b"x" * 129, False), (b"a b", False), (b"caf\xc3\xa9", False),
    (b"<script>\x7f", False),
])
def test_request_id_is_echoed_only_when_sane(server, sent, echoed):
    got = httpx.get(f"{server.url}/v1/models", headers={**AUTH, "X-Request-Id": sent}).headers["x-request-id"]
    assert (got.encode("latin-1") == sent) == echoed and 0 < len(got) <= 128 and got.isascii()


def test_open_metrics_show_no_filesystem_path(server, model):
    text = httpx.get(f"{server.url}/metrics").text
    assert str(model) not in text and str(model.parent) not in text
    assert f'model_name="{model.name}"' in text


def test_sampling_values_float32_rounds_to_zero_do_not_fail_a_constrained_request(server):
    """top_p and repetition_penalty of 5e-324 are 0 in float32, a temperature of 1e300 is inf; under a
    grammar they made NaN probabilities and a 500 ("the grammar rejected token ...")."""
    for extra in ({"top_p": 5e-324}, {"repetition_penalty": 5e-324}, {"repetition_penalty": 1e300},
                  {"temperature": 9.49e307, "min_p": 0.25}):
        body = {"prompt": "A JSON object:", "max_tokens": 8, "response_format": {"type": "json_object"}} | extra
        response = post(server, "/v1/completions", body)
        assert response.status_code == 200, (extra, response.text)
        assert response.json()["usage"]["completion_tokens"] >= 1


def test_openapi_describes_the_real_api(server):
    document = httpx.get(f"{server.url}/openapi.json", headers=AUTH).json()
    operations = [op for path in document["paths"].values() for op in path.values()]
    assert all("422" not in op["responses"] for op in operations)
    assert "HTTPValidationError" not in document["components"]["schemas"]
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, whole, chunk in [("/v1/completions", "CompletionResponse", "CompletionResponse"),
                               ("/v1/chat/completions", "ChatCompletionResponse", "ChatCompletionChunk")]:
        responses = document["paths"][path]["post"]["responses"]
        assert all(responses[s]["content"]["application/json"]["schema"] == error
                   for s in ("400", "401", "404", "413", "503"))
        assert responses["200"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{whole}"}
        event = responses["200"]["content"]["text/event-stream"]["schema"]
        assert {"$ref": f"#/components/schemas/{chunk}"} in event["properties"]["data"]["anyOf"][1]["contentSchema"]["anyOf"]
        assert chunk in document["components"]["schemas"]
    chat = document["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    formats = chat["response_format"]["anyOf"][0]["oneOf"]
    assert [f["properties"]["type"]["const"] for f in formats] == ["text", "json_object", "json_schema"]
    assert chat["tools"]["anyOf"][0]["items"]["properties"]["function"]["required"] == ["name"]
    assert chat["tool_choice"]["anyOf"][0]["enum"] == ["none", "auto", "required"]
    assert set(chat["structured_outputs"]["anyOf"][0]["properties"]) >= {"json", "regex", "grammar", "choice"}
    assert chat["stream"]["type"] == "boolean" and chat["temperature"]["minimum"] == 0
