"""Graceful shutdown on SIGTERM (server/shutdown.py) and the engine watchdog behind /health."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import build_tiny_model
from server_process import running_server

LONG = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000, "ignore_eos": True}
SHUTDOWN_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """Room for 4000-token streams (longer than any drain here), and layers wide enough that a
    3000-token prefill takes a good part of a second on CPU."""
    return build_tiny_model("llama", tmp_path_factory.mktemp("shutdown-llama"), hidden_size=256, intermediate_size=1024,
                            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                            max_position_embeddings=4096)


@pytest.fixture(scope="module")
def chat_template(tmp_path_factory) -> str:
    """The tiny llama's tokenizer (stories260K) has none."""
    path = tmp_path_factory.mktemp("template") / "chat.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    return str(path)


class Stream(threading.Thread):
    """One SSE request read line by line; ``events``: (arrival time, data) per event."""

    def __init__(self, url: str, body: dict):
        super().__init__()
        self.url, self.body = url, {**body, "stream": True}
        self.events: list[tuple[float, str]] = []
        self.started = threading.Event()

    def run(self) -> None:
        with httpx.stream("POST", self.url, json=self.body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.events.append((time.monotonic(), line.removeprefix("data: ")))
                    self.started.set()

    def data(self) -> list[str]:
        return [data for _, data in self.events]


def health(url: str, method: str = "GET") -> tuple[int, str | None]:
    response = httpx.request(method, f"{url}/health", timeout=5)
    return response.status_code, response.json()["status"] if response.content else None


def test_sigterm_drains_then_ends_every_stream_with_abort_and_done(model, chat_template):
    with running_server(model, "--kv-cache-memory", "64MiB", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT),
                        "--chat-template", chat_template) as srv:
        streams = [Stream(f"{srv.url}/v1/completions", LONG) for _ in range(2)]
        streams += [Stream(f"{srv.url}/v1/chat/completions", CHAT) for _ in range(2)]
        waiting: list[httpx.Response] = []
        plain = threading.Thread(target=lambda: waiting.append(
            httpx.post(f"{srv.url}/v1/completions", json=LONG, timeout=60)))
        for s in streams:
            s.start()
        plain.start()
        assert all(s.started.wait(30) for s in streams)
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        while health(srv.url) == (200, "ok"):
            assert time.monotonic() < signalled + 1
            time.sleep(0.02)
        # Draining: the listener is open, /health (GET and HEAD) says so, new generation is refused.
        assert health(srv.url) == (503, "draining")
        assert health(srv.url, "HEAD") == (503, None)
        refused = httpx.post(f"{srv.url}/v1/completions", json={**LONG, "max_tokens": 2}, timeout=5)
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "server_shutting_down"
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
        for s in [*streams, plain]:
            s.join(timeout=30)
        exit_code = srv.proc.wait(timeout=SHUTDOWN_TIMEOUT + 5 - (time.monotonic() - signalled))
        exited = time.monotonic() - signalled
        for s in streams:
            data = s.data()
            assert data[-1] == "[DONE]"
            assert json.loads(data[-2])["choices"][0]["finish_reason"] == "abort"
            assert s.events[-2][0] - signalled > SHUTDOWN_TIMEOUT - 0.5  # the stream went on during the drain
            assert len(data) < LONG["max_tokens"]
        # The non-streamed request: a retryable 503, not a partial text passed off as an answer.
        assert waiting[0].status_code == 503 and waiting[0].json()["error"]["code"] == "server_shutting_down"
        assert exit_code == 0 and SHUTDOWN_TIMEOUT <= exited < SHUTDOWN_TIMEOUT + 5
        print(f"exited {exited:.2f}s after SIGTERM (--shutdown-timeout {SHUTDOWN_TIMEOUT})")
        assert "aborting 5 unfinished sequences" in srv.log_text()


def test_sigterm_lets_in_flight_requests_finish_and_exits_once_drained(model):
    with running_server(model, "--kv-cache-memory", "64MiB", "--shutdown-timeout", "60") as srv:
        stream = Stream(f"{srv.url}/v1/completions", {**LONG, "max_tokens": 300, "stream_options": {"include_usage": True}})
        stream.start()
        assert stream.started.wait(30)
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        stream.join(timeout=60)
        assert srv.proc.wait(timeout=10) == 0
        exited = time.monotonic() - signalled
        data = stream.data()
        assert data[-1] == "[DONE]"
        assert json.loads(data[-3])["choices"][0]["finish_reason"] == "length"
        assert json.loads(data[-2])["usage"]["completion_tokens"] == 300
        assert exited < 60 and exited - (stream.events[-1][0] - signalled) < 3  # no waiting out the timeout
        assert "engine stopped" in srv.log_text()


def test_a_step_past_the_stall_timeout_turns_health_503_and_is_logged_once(model):
    with running_server(model, "--kv-cache-memory", "64MiB", "--engine-stall-timeout", "0.05",
                        "--max-num-batched-tokens", "4096") as srv:
        assert health(srv.url) == (200, "ok")
        assert health(srv.url, "HEAD") == (200, None)
        done: list[httpx.Response] = []
        # One step: a 3000-token prefill that samples the only token asked for.
        prompt = [1] + [7 + i % 400 for i in range(2999)]
        request = threading.Thread(target=lambda: done.append(httpx.post(
            f"{srv.url}/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=60)))
        request.start()
        seen = set()
        while request.is_alive():
            seen.add(health(srv.url))
            time.sleep(0.01)
        assert (503, "engine stalled") in seen
        assert health(srv.url) == (200, "ok")  # the step ended: healthy again
        request_id = f"{done[0].json()['id']}-0"
        stalls = [line for line in srv.log_text().splitlines() if "longer than the stall timeout" in line]
        assert sum(request_id in line for line in stalls) == 1
