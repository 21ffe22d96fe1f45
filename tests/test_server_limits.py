"""API key and admission control (bounded queue, 503 + Retry-After); SIGTERM is tests/test_shutdown.py."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from server_process import running_server

KEY = "sekret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True}


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def server(model):
    # One sequence runs at a time and two may wait: the fourth concurrent sequence is refused.
    with running_server(model, "--kv-cache-memory", "8MiB", "--api-key", KEY, "--max-num-seqs", "1",
                        "--max-waiting-requests", "2") as srv:
        yield srv


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}], ids=["missing", "wrong", "no_bearer", "basic"])
def test_missing_or_wrong_key_is_401(server, headers):
    for method, path in [("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/internal/stats"),
                         ("POST", "/tokenize")]:
        response = httpx.request(method, f"{server.url}{path}", headers=headers, json={"prompt": "hi", "max_tokens": 2})
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_right_key_is_200_and_health_stays_open(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").status_code == 200
    client = server.client(api_key=KEY)
    assert client.completions.create(model=server_model(server), prompt="hi", max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="nope").models.list()


def server_model(server) -> str:
    return httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"][0]["id"]


def test_admission_refuses_beyond_the_queue_and_admitted_complete(server):
    results: list[httpx.Response] = []

    def post() -> None:
        results.append(httpx.post(f"{server.url}/v1/completions", json=LONG, headers=AUTH, timeout=120))

    admitted = [threading.Thread(target=post) for _ in range(3)]
    for t in admitted:
        t.start()
    deadline = time.monotonic() + 10
    while server.stats(**AUTH)["num_sequences_admitted"] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for _ in range(3):
        refused = httpx.post(f"{server.url}/v1/completions", json={**LONG, "max_tokens": 2}, headers=AUTH)
        assert refused.status_code == 503
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "server_overloaded"
    # n counts as n sequences: a request for 2 choices does not fit either.
    assert httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, json={
        "messages": [{"role": "user", "content": "hi"}], "n": 2}).status_code == 503
    for t in admitted:
        t.join()
    assert [r.status_code for r in results] == [200, 200, 200]
    assert all(r.json()["usage"]["completion_tokens"] == 300 for r in results)
    assert server.stats(**AUTH)["num_sequences_admitted"] == 0
    assert httpx.post(f"{server.url}/v1/completions", json={**LONG, "max_tokens": 2}, headers=AUTH).status_code == 200
