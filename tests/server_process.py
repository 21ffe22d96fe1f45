"""Run a real ``kvserve serve`` process for the server tests (never an in-process app or a mock)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def client(self, api_key: str = "unused", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120, **kwargs)

    def async_client(self, api_key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def stats(self, **headers) -> dict:
        return httpx.get(f"{self.url}/internal/stats", headers=headers, timeout=10).json()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def kvserve_command() -> list[str]:
    script = Path(sys.executable).parent / "kvserve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]


@contextmanager
def running_server(model: Path | None, *flags: str, startup_timeout: float = 120):
    """Start ``kvserve serve MODEL`` (no MODEL: the embedded default) on a free port, wait for
    /health, stop it (SIGTERM) afterwards."""
    port = free_port()
    fd, name = tempfile.mkstemp(prefix="kvserve-", suffix=".log")
    os.close(fd)
    log = Path(name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([*kvserve_command(), "serve", *([str(model)] if model else []), "--host", "127.0.0.1", "--port", str(port),
                                 *flags], stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_ready(f"{server.url}/health", proc, log, startup_timeout)
        yield server
    finally:
        stop(proc, timeout=30)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll ``url`` until it answers 200; a process that exits or stays unready fails with its log."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become ready:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM (so servers drain), then SIGKILL if it takes longer than ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
