"""Every client mistake is a 4xx in OpenAI's error shape naming the field, and the server goes on."""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from server_process import running_server

MAX_MODEL_LEN = 128
CHAT = [{"role": "user", "content": "hi"}]


TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(TEMPLATE)
    with running_server(tiny_model("qwen2"), "--kv-cache-memory", "8MiB", "--max-model-len", str(MAX_MODEL_LEN),
                        "--max-n", "4", "--served-model-name", "tiny", "--chat-template", str(template)) as srv:
        yield srv


LONG = "hello " * 200  # > MAX_MODEL_LEN tokens

# (name, path, json body or raw bytes, expected status, expected param)
CASES = [
    ("malformed_json", "/v1/completions", b'{"prompt": "hi",', 400, None),
    ("body_not_object", "/v1/completions", b'[1, 2]', 400, None),
    ("missing_prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("missing_messages", "/v1/chat/completions", {"max_tokens": 3}, 400, "messages"),
    ("ill_typed_max_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("ill_typed_prompt", "/v1/completions", {"prompt": {"text": "hi"}}, 400, "prompt"),
    ("empty_prompt_list", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("empty_prompt_string", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("token_id_outside_vocab", "/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt"),
    ("max_tokens_zero", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max_completion_tokens_negative", "/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": -1}, 400,
     "max_completion_tokens"),
    ("temperature_negative", "/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("temperature_infinite", "/v1/completions", b'{"prompt": "hi", "temperature": Infinity}', 400, "temperature"),
    ("repetition_penalty_infinite", "/v1/completions", b'{"prompt": "hi", "repetition_penalty": Infinity}', 400,
     "repetition_penalty"),
    ("top_p_above_one", "/v1/chat/completions", {"messages": CHAT, "top_p": 1.5}, 400, "top_p"),
    ("top_k_below_minus_one", "/v1/completions", {"prompt": "hi", "top_k": -3}, 400, "top_k"),
    ("min_p_above_one", "/v1/completions", {"prompt": "hi", "min_p": 2}, 400, "min_p"),
    ("presence_penalty_out_of_range", "/v1/completions", {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty"),
    ("frequency_penalty_out_of_range", "/v1/chat/completions", {"messages": CHAT, "frequency_penalty": -3}, 400,
     "frequency_penalty"),
    ("repetition_penalty_zero", "/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("logprobs_too_many", "/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("top_logprobs_too_many", "/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 50}, 400,
     "top_logprobs"),
    ("top_logprobs_without_logprobs", "/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("logit_bias_bad_key", "/v1/completions", {"prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("logit_bias_bad_value", "/v1/completions", {"prompt": "hi", "logit_bias": {"5": 500}}, 400, "logit_bias"),
    ("unknown_model", "/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("unknown_model_chat", "/v1/chat/completions", {"model": "gpt-4", "messages": CHAT}, 404, "model"),
    ("prompt_over_context", "/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("chat_over_context", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("prompt_plus_max_tokens_over_context", "/v1/completions", {"prompt": "hi", "max_tokens": MAX_MODEL_LEN}, 400,
     "max_tokens"),
    ("empty_messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("bad_role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("image_content_part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages.0.content"),
    ("n_too_large", "/v1/completions", {"prompt": "hi", "n": 5}, 400, "n"),
    ("n_zero", "/v1/chat/completions", {"messages": CHAT, "n": 0}, 400, "n"),
    ("best_of_below_n", "/v1/completions", {"prompt": "hi", "n": 3, "best_of": 2}, 400, "best_of"),
    ("best_of_streamed", "/v1/completions", {"prompt": "hi", "best_of": 3, "stream": True}, 400, "best_of"),
    ("suffix", "/v1/completions", {"prompt": "hi", "suffix": "bye"}, 400, "suffix"),
    ("unknown_response_format", "/v1/chat/completions",
     {"messages": CHAT, "response_format": {"type": "xml"}}, 400, "response_format"),
    ("detokenize_bad_id", "/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("lone_surrogate_prompt", "/v1/completions", b'{"prompt": "abc\\ud800", "max_tokens": 2}', 400, "prompt"),
    ("lone_surrogate_message", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi \\udc00"}], "max_tokens": 2}', 400, "messages.0.content"),
    ("lone_surrogate_stop", "/v1/completions", b'{"prompt": "hi", "stop": ["ok", "\\ud83d"]}', 400, "stop.1"),
    ("unknown_route", "/v1/engines", {}, 404, None),
]


@pytest.mark.parametrize("path, body, status, param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_an_openai_error(server, path, body, status, param):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(f"{server.url}{path}", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(response.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"


def test_extreme_sampling_values_run_beside_plain_requests(server):
    """top_k past int64 (it failed every request of its step: "Overflow when unpacking long long") is the
    whole vocabulary, and a temperature below 1e-5 (it gave NaN probabilities) is greedy; both in one
    batch with plain greedy and sampled requests, which all get their tokens."""
    bodies = [{"top_k": 10**31, "temperature": 1.0}, {"temperature": 1e-40}, {"temperature": 0}, {"temperature": 1.0}] * 2

    def complete(extra: dict) -> dict:
        body = {"prompt": "hi", "max_tokens": 6, "ignore_eos": True, "seed": 1} | extra
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(len(bodies)) as pool:
        outs = list(pool.map(complete, bodies))
    assert all(out["usage"]["completion_tokens"] == 6 for out in outs)
    assert outs[1]["choices"][0]["text"] == outs[2]["choices"][0]["text"]  # 1e-40 is greedy


def test_context_error_names_both_numbers(server):
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 200})
    message = response.json()["error"]["message"]
    assert "200" in message and str(MAX_MODEL_LEN) in message


def test_openai_client_sees_typed_errors_and_server_goes_on(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=CHAT, temperature=-1)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    stats = server.stats()
    assert stats["num_unfinished"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]


def test_unknown_fields_are_ignored(server):
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2, "store": True,
                                                                "metadata": {"a": "b"}, "service_tier": "auto"})
    assert response.status_code == 200


def test_chat_template_flag_replaces_the_tokenizers(server, tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model("qwen2"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    tokens = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()["tokens"]
    assert tokens == tokenizer.encode("<system>Be brief.\n<user>hi\n<assistant>", add_special_tokens=False)
    chat = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert chat.usage.prompt_tokens == len(tokens)


def test_unknown_hub_id_offline_is_a_clear_startup_error():
    from server_process import kvserve_command

    result = subprocess.run([*kvserve_command(), "serve", "no-such-org/no-such-model"], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode != 0
    assert "not a local folder" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
