"""The segmented LoRA kernels (engine.lora_triton) against float64 torch, and LoRALayer's segments path
(those kernels) against its CPU path (gather + bmm) and against the adapters' own pieces, on CPU through
Triton's interpreter. Triton ships with torch's dependencies: if it is missing these tests fail."""

from __future__ import annotations

import os
from types import SimpleNamespace

# Must precede `import triton`: Triton builds its tl.* library (and @triton.jit our kernels) either for the
# interpreter or for a GPU at import, one mode per process.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402  (an ImportError here is a failure, never a skip)
from torch import nn  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import engine.lora_triton as lora_triton  # noqa: E402
from engine.lora import LoRABatch, LoRALayer  # noqa: E402

COMPILED_FIRST = not (isinstance(tl.sum, InterpretedFunction)
                      and isinstance(lora_triton._segmented_matmul_kernel, InterpretedFunction))
WHY = "triton (or the kernels) was imported for a GPU before this module set TRITON_INTERPRET=1"
if COMPILED_FIRST and not torch.cuda.is_available():  # on a CPU machine that is a bug, never a skip
    raise ImportError(WHY)
# Only in a GPU session, where tests/test_gpu.py imported triton first and covers the compiled kernels.
pytestmark = pytest.mark.skipif(COMPILED_FIRST, reason=WHY)

NUM_SLOTS = 3
# (rows in the step, segments as (start, length, slot)); segments need not be in row order.
LAYOUTS = {
    # lengths 70 (two row tiles), 1, 37 and 5; a base-model segment (slot -1); rows 43, 44, 115..119 in none
    "mixed": (120, [(45, 70, 1), (0, 1, 0), (1, 37, 2), (38, 5, -1)]),
    # a decode step's CUDA-graph buffers: one segment per row, -1 for the base model's rows
    "decode": (6, [(i, 1, s) for i, s in enumerate([0, -1, 2, 2, -1, 1])]),
}
# (in_features, slice widths): a ragged single linear, and a fused q/k/v
SHAPES = {"ragged": (72, (100,)), "qkv": (64, (64, 32, 32))}


def segments(layout: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    start, length, slot = (torch.tensor(v, dtype=torch.int32) for v in zip(*layout))
    return start, length, slot, max(n for _, n, _ in layout)


def padded_view(rows: int, cols: int, dtype: torch.dtype, fill: float | None = None) -> torch.Tensor:
    """A [rows, cols] column slice of a wider tensor: kernels must follow strides, not assume contiguity."""
    full = torch.randn(rows, cols + 7) if fill is None else torch.full((rows, cols + 7), fill)
    return full.to(dtype)[:, 3:3 + cols]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 8, 16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_shrink_and_expand_equal_float64(layout, shape, rank, dtype):
    torch.manual_seed(rank)
    num_rows, segs = LAYOUTS[layout]
    in_features, widths = SHAPES[shape]
    columns = [(sum(widths[:s]), n) for s, n in enumerate(widths)]
    out_features = sum(widths)
    x = padded_view(num_rows, in_features, dtype)
    A = (torch.randn(NUM_SLOTS, len(widths) * rank, in_features) / in_features ** 0.5).to(dtype)
    B = (torch.randn(NUM_SLOTS, rank, out_features) / rank ** 0.5).to(dtype)
    y = padded_view(num_rows, out_features, dtype)
    y_before, y_base = y.clone(), y._base.clone()
    t = torch.full((num_rows, len(widths) * rank), float("nan"))  # rows the shrink must not write stay NaN

    lora_triton.lora_shrink(x, A, *segments(segs), t)
    for s, (start, n) in enumerate(columns):
        lora_triton.lora_expand(t, B, y, *segments(segs), s * rank, start, n)

    want_t = torch.full(t.shape, float("nan"), dtype=torch.float64)
    want_y = y_before.double()
    for start, n, slot in segs:
        if slot < 0:
            continue
        rows = slice(start, start + n)
        want_t[rows] = x[rows].double() @ A[slot].double().T
        for s, (col, width) in enumerate(columns):
            want_y[rows, col:col + width] += want_t[rows, s * rank:(s + 1) * rank] @ B[slot, :, col:col + width].double()
    torch.testing.assert_close(t.double(), want_t, atol=1e-4, rtol=1e-4, equal_nan=True)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(y.double(), want_y, **tol)
    untouched = [r for r in range(num_rows) if not any(s >= 0 and st <= r < st + n for st, n, s in segs)]
    assert torch.equal(y[untouched], y_before[untouched])  # base-model rows and rows in no segment: bit for bit
    outside = torch.ones_like(y_base, dtype=torch.bool)
    outside[:, 3:3 + out_features] = False
    assert torch.equal(y._base[outside], y_base[outside])  # nothing written outside the view


@pytest.mark.parametrize("row_slots", [[2, 2, -1, 0, 0, 0, -1, 1, 2, 0], [1] * 5, [1] * 12,
                                       [0] * 9 + [1, 2, -1, 1] + [2] * 8 + [-1]])  # runs of LONG_RUN+ and short rows
def test_layer_segments_path_equals_cpu_path(row_slots):
    """LoRALayer through the kernels (segments) == its gather + bmm path == the adapters' pieces in float64."""
    torch.manual_seed(0)
    max_rank, sizes, in_features = 8, (64, 32, 32), 48
    manager = SimpleNamespace(max_loras=NUM_SLOTS, max_rank=max_rank, dtype=torch.float32, batch=None)
    layer = LoRALayer(nn.Linear(in_features, sum(sizes)), sizes, manager)
    columns = [(sum(sizes[:s]), n) for s, n in enumerate(sizes)]
    # slot -> (slice, A [r, in], B^T * scale [r, n]): rank 8 on every slice; rank 4 on q and v; k alone
    layouts = {0: [(0, 8), (1, 8), (2, 8)], 1: [(0, 4), (2, 4)], 2: [(1, 8)]}
    pieces = {slot: [(s, torch.randn(r, in_features) / 7, torch.randn(r, sizes[s]) / 3) for s, r in layout]
              for slot, layout in layouts.items()}
    for slot, slot_pieces in pieces.items():
        layer.load(slot, slot_pieces)
    x, y = torch.randn(len(row_slots), in_features), torch.randn(len(row_slots), sum(sizes))

    want = y.double()
    for row, slot in enumerate(row_slots):
        for s, a, bt in pieces.get(slot, []):
            start, n = columns[s]
            want[row, start:start + n] += x[row].double() @ a.double().T @ bt.double()

    manager.batch = LoRABatch.build(row_slots, [1] * len(row_slots), torch.device("cpu"))
    assert manager.batch.seg_slot is None  # the CPU path
    cpu = layer(x, y.clone())
    runs = [(i, s) for i, s in enumerate(row_slots) if s >= 0 and (i == 0 or row_slots[i - 1] != s)]
    lens = [next((j for j in range(i, len(row_slots)) if row_slots[j] != s), len(row_slots)) - i for i, s in runs]
    start, length, slot, max_len = segments([(i, n, s) for (i, s), n in zip(runs, lens)])
    manager.batch = LoRABatch(seg_start=start, seg_len=length, seg_slot=slot, max_seg_len=max_len)
    kernels = layer(x, y.clone())

    torch.testing.assert_close(cpu.double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kernels.double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kernels, cpu, atol=1e-4, rtol=1e-4)
