"""Where one decode step's time goes: the model's forward for one sequence, whole and with parts replaced by
no-ops (their cost is the difference), offline, minimum and median over many steps.

    python benchmarks/decode_step.py [MODEL] [--context 200] [--steps 60]

MODEL defaults to the embedded SmolLM2-135M-Instruct Q4_1 file (served packed). The parts: attention (the
backend's forward), the KV write, the linear layers (each returns an empty output of its shape), and the
rest is what remains (norms, RoPE, activations, residual adds, Python). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.attention import AttentionBackend  # noqa: E402
from engine.models.linear import Linear  # noqa: E402
from engine.outputs import ScheduledRequest, SchedulerOutput  # noqa: E402
from engine.request import Request  # noqa: E402
from server.cli import embedded_model  # noqa: E402


@contextmanager
def replaced(owner, name: str, value):
    original = owner.__dict__[name]
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    engine = LLM(args.model or embedded_model()).engine
    req = Request("step", list(range(100, 101 + args.context)), SamplingParams(), set())
    engine.kv.allocate(req.block_table, args.context + 1)
    req.num_computed_tokens = args.context
    sched = SchedulerOutput([ScheduledRequest(req, 1)])

    def step_ms() -> tuple[float, float]:
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            engine.runner.execute(sched)
            times.append(time.perf_counter() - start)
        return 1000 * min(times), 1000 * statistics.median(times)

    backend = type(engine.runner.backend)
    step_ms()  # warm-up
    rows = {"whole step": step_ms()}
    with replaced(backend, "forward", lambda self, q, k, v, meta: torch.empty_like(q)):
        rows["without attention"] = step_ms()
        with replaced(AttentionBackend, "write_kv", staticmethod(lambda *args: None)):
            rows["without attention and KV write"] = step_ms()
    with replaced(Linear, "forward", lambda self, x: x.new_empty(x.shape[0], self.out_features)):
        rows["without linear layers"] = step_ms()
    rows["whole step again"] = step_ms()
    for name, (low, median) in rows.items():
        print(f"{name:32s} min {low:6.2f} ms   median {median:6.2f} ms")
    whole = min(rows["whole step"][0], rows["whole step again"][0])
    attention = whole - rows["without attention and KV write"][0]
    linear = whole - rows["without linear layers"][0]
    print(f"by minimum: attention + KV write {attention:.1f} ms, linear layers {linear:.1f} ms, "
          f"the rest {whole - attention - linear:.1f} ms of {whole:.1f} ms")


if __name__ == "__main__":
    main()
