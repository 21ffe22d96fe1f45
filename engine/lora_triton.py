"""Segmented LoRA matmuls (punica / S-LoRA style) for the CUDA path of ``engine.lora.LoRALayer``.

A step's rows come as segments: rows ``seg_start[g] .. seg_start[g] + seg_len[g] - 1`` all use adapter
slot ``seg_slot[g]``. One kernel serves both products: its grid is (segments, row tiles of the longest
segment, column tiles), and each program multiplies its rows by its segment's slot of a stacked
[slots, K, N] matrix, so a batch mixing adapters is one launch and nothing is gathered. Slot -1 is a
base-model segment (a decode CUDA graph's static buffers hold one segment per row, -1 for rows without
an adapter): its programs return at once, as do those past their segment's end; rows outside every
segment are neither read nor written.

* ``lora_shrink``: t[rows] = x[rows] @ A[slot]^T, every slice's rank at once, into fp32 t.
* ``lora_expand``: y[rows, cols] += t[rows, slice] @ B[slot][:, cols] for one slice's columns, in place.

Products accumulate in fp32; fp32 dots use IEEE precision (not TF32). On a machine without CUDA the
kernel runs under Triton's interpreter: set ``TRITON_INTERPRET=1`` before this module is imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _segmented_matmul_kernel(a_ptr, b_ptr, out_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, K, N,
                             stride_am, stride_ak, stride_bs, stride_bk, stride_bn, stride_om, stride_on,
                             ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Grid (segments, row tiles, column tiles): out[rows, cols] = (out +) a[rows, :K] @ b[slot, :K, cols]
    for one tile of segment g's rows, slot = seg_slot[g]."""
    g = tl.program_id(0)
    slot = tl.load(seg_slot_ptr + g).to(tl.int64)
    seg_len = tl.load(seg_len_ptr + g)
    first = tl.program_id(1) * BLOCK_M
    if (slot < 0) | (first >= seg_len):  # a base-model segment, or the grid is sized for a longer one
        return
    m = first + tl.arange(0, BLOCK_M)
    m_ok = m < seg_len
    rows = tl.load(seg_start_ptr + g).to(tl.int64) + m
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    b_slot = b_ptr + slot * stride_bs
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_slot + k[:, None] * stride_bk + n[None, :] * stride_bn, mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        a = a.to(b.dtype)  # expand: fp32 t meets B in B's precision (tensor cores), as the CPU path's bmm does
        if UPCAST_DOT:  # the interpreter's tl.dot multiplies bf16 bit patterns as integers (Triton 3.9)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    out_ptrs = out_ptr + rows[:, None] * stride_om + n[None, :] * stride_on
    ok = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=ok)


_INTERPRETED = isinstance(_segmented_matmul_kernel, InterpretedFunction)  # TRITON_INTERPRET=1 at import


def _block(size: int, cap: int) -> int:
    """A tile side: the size padded to a power of two, at least 16 (the smallest tl.dot side), at most cap."""
    return max(16, min(cap, triton.next_power_of_2(size)))


def _segmented_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, seg_start: torch.Tensor,
                      seg_len: torch.Tensor, seg_slot: torch.Tensor, max_seg_len: int, accumulate: bool) -> None:
    """out[rows] = (out +) a[rows] @ b[slot] per segment; a [T, K], b [slots, K, N], out [T, N], any strides."""
    _, k, n = b.shape
    block_m, block_n = _block(max_seg_len, 64), _block(n, 64)
    grid = (seg_slot.numel(), triton.cdiv(max_seg_len, block_m), triton.cdiv(n, block_n))
    _segmented_matmul_kernel[grid](
        a, b, out, seg_start, seg_len, seg_slot, k, n, *a.stride(), *b.stride(), *out.stride(),
        ACCUMULATE=accumulate, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_block(k, 64),
        PRECISION="ieee" if b.dtype == torch.float32 else None,  # None: the target's default
        UPCAST_DOT=_INTERPRETED and b.dtype == torch.bfloat16)


def lora_shrink(x: torch.Tensor, A: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor,
                seg_slot: torch.Tensor, max_seg_len: int, out: torch.Tensor) -> None:
    """out[rows] = x[rows] @ A[slot]^T for every segment's rows: x [T, in], A [slots, S*R, in], out fp32 [T, S*R]."""
    _segmented_matmul(x, A.transpose(1, 2), out, seg_start, seg_len, seg_slot, max_seg_len, accumulate=False)


def lora_expand(t: torch.Tensor, B: torch.Tensor, y: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor,
                seg_slot: torch.Tensor, max_seg_len: int, t_offset: int, col_start: int, num_cols: int) -> None:
    """y[rows, col_start:col_start + num_cols] += t[rows, t_offset:t_offset + R] @ B[slot][:, those columns]
    for every segment's rows: t fp32 [T, S*R], B [slots, R, out], y [T, out] in place (fp32 sum, y's dtype)."""
    rank = B.shape[1]
    _segmented_matmul(t.narrow(1, t_offset, rank), B.narrow(2, col_start, num_cols), y.narrow(1, col_start, num_cols),
                      seg_start, seg_len, seg_slot, max_seg_len, accumulate=True)
