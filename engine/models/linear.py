"""The linear layer every model matmul goes through, and the startup probe that picks its CPU kernel.

On CPU the fastest way to multiply depends on the row count and on the machine: PyTorch's packed
int8/int4 kernels read 2-4x fewer bytes than bf16 and win the matrix-vector products of decoding, but
they are not GEMMs and lose 3-10x to a dense matmul at prefill sizes; bf16 GEMMs run on AMX units where
a CPU has them and at a tenth of float32's speed where it has only AVX2. So each layer holds the forms
it may run (its weight; a float32 copy of a half weight; a packed form of a quantized one) and a plan,
measured once at load on the engine thread, of which form serves how many rows. No rule of thumb, so
no path is ever the 50x-slower one on a machine the rule was not written for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine import kernels
from engine.models import cpu_gemv
from engine.quantization import KERNEL_DTYPE, QuantizedWeight

logger = logging.getLogger(__name__)

# Row counts the probe times (then the step's whole token budget); each form serves the rows up to the
# largest count at which it was the fastest, the last one everything above.
PROBE_ROWS = (1, 2, 4, 8, 16, 32)
GIVE_UP = 2.0  # a form this many times slower than the best one so far stops being timed


class PackedWeight:
    """A QuantizedWeight laid out for PyTorch's CPU kernels: ``_weight_int8pack_mm`` (per-channel int8) or
    ``_weight_int4pack_mm_for_cpu`` (group-wise int4), one call per int4 plane."""

    def __init__(self, weight: QuantizedWeight):
        self.bits, self.group_size = weight.bits, weight.group_size
        if weight.bits == 8:
            self.planes = [(weight.q.contiguous(), weight.scale.to(KERNEL_DTYPE))]
        else:
            self.planes = [(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1),
                            torch.stack([scale.t(), zero.t()], dim=-1).to(KERNEL_DTYPE).contiguous())
                           for q, scale, zero in zip(weight.q, weight.scale, weight.zero)]
        self.nbytes = sum(t.numel() * t.element_size() for plane in self.planes for t in plane)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(KERNEL_DTYPE)
        if self.bits == 8:
            return torch.ops.aten._weight_int8pack_mm(x, *self.planes[0])
        out = None
        for packed, scales_zeros in self.planes:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, self.group_size, scales_zeros)
            out = y if out is None else out + y
        return out


class Linear(nn.Linear):
    """nn.Linear that serves each batch from the form its plan picked for that many rows, then adds the
    rows' LoRA products when adapters are enabled (engine.lora.LoRALayer)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.quantized = False
        self.packed: PackedWeight | None = None
        self.gemv: cpu_gemv.GemvWeight | None = None  # our AVX2 kernels' layout of the same weight
        self._fp32: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._bf16: cpu_gemv.Bf16Weight | None = None
        self._bf16_checked = False  # whether a float32 weight was checked for being all bf16 values
        self.plan: list[tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = []  # (up to rows, form)
        self.plan_names: set[str] = set()
        self.lora: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._planned(x)
        return y if self.lora is None else self.lora(x, y)

    def _planned(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        for max_rows, form in self.plan:
            if rows <= max_rows:
                return form(x)
        return self._dense(x)  # no plan: on GPU, or before the probe

    def set_quantized(self, weight: QuantizedWeight) -> None:
        """Pack ``weight`` for the few-row kernels and make the dense weight the very values they multiply by
        (its scales rounded to bf16), so that which form serves a batch never changes the result."""
        self.quantized = True
        self.packed = PackedWeight(weight)
        if self.weight.device.type == "cpu" and kernels.library() and cpu_gemv.GemvWeight.supports(weight):
            self.gemv = cpu_gemv.GemvWeight(weight)
        self.weight.data.copy_(weight.rounded().dequantize())

    def forms(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The forms this layer can run on CPU, by name; each takes and returns the model's dtype."""
        forms = {"dense": self._dense}
        if self.weight.dtype != torch.float32:
            if self._fp32 is None:
                self._fp32 = (self.weight.detach().float(), None if self.bias is None else self.bias.detach().float())
            forms["float32"] = self._float32
        if not self._bf16_checked:
            self._bf16_checked = True
            if not self.quantized and kernels.library() and cpu_gemv.Bf16Weight.supports(self.weight):
                self._bf16 = cpu_gemv.Bf16Weight(self.weight.detach())
        if self._bf16 is not None:
            forms["bf16-avx2"] = self._bf16_gemv
        if self.packed is not None:
            forms[f"int{self.packed.bits}"] = self._packed
        if self.gemv is not None:
            forms[f"int{self.gemv.bits}-avx2"] = self._gemv
        return forms

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return F.linear(x, self.weight, self.bias)
        # Round input and output as the packed kernel does: greedy text must not depend on the batch size
        y = F.linear(x.to(KERNEL_DTYPE).to(x.dtype), self.weight).to(KERNEL_DTYPE).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _float32(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), *self._fp32).to(x.dtype)

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        y = self.packed(x).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _gemv(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gemv(x).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _bf16_gemv(self, x: torch.Tensor) -> torch.Tensor:
        y = self._bf16(x)
        return y if self.bias is None else y + self.bias

    def set_plan(self, choice: list[tuple[int, str]]) -> None:
        """Serve rows up to each bound from the named form."""
        forms = self.forms()
        self.plan = [(max_rows, forms[name]) for max_rows, name in choice]
        self.plan_names = {name for _, name in choice}

    def drop_unused_forms(self) -> None:
        """Free the float32 copy and the packed layouts the plan does not use (each is a copy of the weight)."""
        used = self.plan_names
        if "float32" not in used:
            self._fp32 = None
        if self.packed is not None and f"int{self.packed.bits}" not in used:
            self.packed = None
        if self.gemv is not None and f"int{self.gemv.bits}-avx2" not in used:
            self.gemv = None
        if "bf16-avx2" not in used:
            self._bf16 = None


def is_vector_form(name: str) -> bool:
    """A matrix-vector kernel (packed, or ours): it serves a prefix of the row counts, since once a GEMM
    beats it a larger batch only widens the gap."""
    return name.startswith("int") or name.endswith("-avx2")


class KernelProbe:
    """Times each form at PROBE_ROWS and the token budget, once per group of layers of one shape, dtype and
    set of forms, run over every layer of the group in turn as a forward pass streams them (one layer
    timed alone sits in cache and flatters the bigger forms). A packed form serves a prefix of the row
    counts: once a GEMM beats it, a larger batch only widens the gap."""

    def __init__(self, max_rows: int, repeats: int = 3):
        self.row_counts = sorted({r for r in PROBE_ROWS if r < max_rows} | {max_rows})
        self.repeats = repeats

    def plan(self, layers: list[Linear]) -> list[tuple[int, str]]:
        names = list(layers[0].forms())
        if len(names) == 1:
            return [(1 << 62, names[0])]
        alive, best = set(names), []
        for rows in self.row_counts:
            if len(alive) == 1:  # the one form left serves the rest
                break
            x = torch.randn(rows, layers[0].in_features).to(layers[0].weight.dtype)
            last_winner = best[-1][1] if best else None
            times: dict[str, float] = {}
            for name in sorted((name for name in names if name in alive), key=lambda name: name != last_winner):
                give_up = GIVE_UP * min(times.values(), default=float("inf"))
                times[name] = self._time([layer.forms()[name] for layer in layers], x, give_up)
            winner = min(times, key=times.get)
            alive = {name for name in alive if name == winner or not is_vector_form(name)}
            best.append((rows, winner))
        best.append((1 << 62, next(iter(alive)) if len(alive) == 1 else winner))  # and everything above
        plan = []  # merge neighbours that chose the same form
        for rows, name in best:
            if plan and plan[-1][1] == name:
                plan[-1] = (rows, name)
            else:
                plan.append((rows, name))
        return plan

    def _time(self, forms: list[Callable], x: torch.Tensor, give_up: float) -> float:
        """Best of a few passes: this machine's noise (preempted vCPUs) only ever adds time. A form still
        slower than ``give_up`` after its warm-up pass cannot win, so it gets no more passes (a bf16 GEMM
        without bf16 hardware runs at 1-2 GFLOP/s: timing it in full took most of a start-up)."""
        best = float("inf")
        for attempt in range(self.repeats + 1):
            start = time.perf_counter()
            for form in forms:
                form(x)
            best = min(best, time.perf_counter() - start)
            if attempt and best > give_up:
                break
        return best


def plan_linear_kernels(model: nn.Module, max_rows: int) -> None:
    """Measure and set every Linear's plan (CPU only: on GPU each layer runs its weight as is)."""
    groups: dict[tuple, list[Linear]] = {}
    for layer in model.modules():
        if isinstance(layer, Linear) and layer.weight.device.type == "cpu":
            key = (tuple(layer.weight.shape), layer.weight.dtype, tuple(layer.forms()), layer.bias is not None)
            groups.setdefault(key, []).append(layer)
    start, probe = time.perf_counter(), KernelProbe(max_rows)
    with torch.inference_mode():
        for (shape, dtype, *_), layers in groups.items():
            plan = probe.plan(layers)
            for layer in layers:
                layer.set_plan(plan)
                layer.drop_unused_forms()
            logger.info("CPU matmul %s %s (%d layers): %s", "x".join(map(str, shape)), str(dtype).removeprefix("torch."),
                        len(layers), ", ".join(f"{name} up to {rows} rows" if rows < 1 << 62 else f"{name} above"
                                               for rows, name in plan))
    if groups:
        logger.info("CPU kernel probe: %d shapes in %.2f s", len(groups), time.perf_counter() - start)
