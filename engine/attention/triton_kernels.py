"""The GPU backend: Triton flash-attention kernels over the paged KV cache.

Three kernels, all reading K/V through block tables (no gathered copies, no N x N scores):

* ``_prefill_kernel`` -- varlen prefill: the new queries of a sequence attend to its cached prefix
  and causally to themselves. One program owns a tile of query *rows*, where a row is one
  (token, query head) pair of a single KV head: the GROUP query heads that share a KV head are packed
  into the tile, so each K/V tile is loaded once for all of them and repeated K/V never exists.
* ``_decode_kernel`` + ``_decode_reduce_kernel`` -- flash-decoding: one query per sequence, the
  context split into partitions that run in parallel (a lone long sequence would otherwise keep one
  SM busy); each partition leaves (m, l, unnormalised acc) and the reduce rescales them by
  ``exp(m_s - max m)`` and sums. With a single partition the first kernel writes the output itself.
* ``_write_kv_kernel`` -- scatters new K/V rows into their cache slots (slot < 0 is skipped, so
  padded batches, e.g. CUDA graphs, can point unused rows at -1).

The softmax is the reference's online softmax (``torch_ref.flash_attention``): running maximum m,
denominator l and accumulator, rescaled by exp(m_old - m_new); all of it in fp32, in base 2 (the
scale is pre-multiplied by log2(e), so ``exp2`` replaces ``exp``). Inputs may be fp32, bf16 or fp16;
fp32 dots use IEEE precision (not TF32) so fp32 results match the reference to ~1e-6.

On a machine without CUDA the kernels run under Triton's interpreter: set ``TRITON_INTERPRET=1``
before this module is imported (the tests do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from engine.attention import AttentionBackend, AttentionMetadata

_LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax_tile(q, k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head, start, key_end, q_pos,
                         window, m_i, l_i, acc, scale_log2,
                         stride_kb, stride_ks, stride_kh, stride_kd,
                         stride_vb, stride_vs, stride_vh, stride_vd,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, USE_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                         UPCAST_DOT: tl.constexpr):
    """One K/V tile of positions [start, start + BLOCK_N) folded into (m, l, acc) for query rows q.

    Keys are addressed per position through the block table, so a tile may span several cache
    blocks and BLOCK_N is independent of the cache's block size. Keys at or past key_end are masked
    (they are not in the context, or past the tile's last query), as are keys after the row's own
    position (causal) and before its window."""
    key_pos = start + tl.arange(0, BLOCK_N)
    key_ok = key_pos < key_end
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    block = tl.load(bt_row_ptr + key_pos // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
    offset = key_pos % BLOCK_SIZE
    kt = tl.load(k_cache_ptr + block[None, :] * stride_kb + offset[None, :] * stride_ks + kv_head * stride_kh
                 + d[:, None] * stride_kd, mask=key_ok[None, :] & d_ok[:, None], other=0.0)  # [D, N]
    if UPCAST_DOT:  # the interpreter's tl.dot multiplies bf16 bit patterns as integers (Triton 3.9)
        q = q.to(tl.float32)
        kt = kt.to(tl.float32)
    scores = tl.dot(q, kt, input_precision=PRECISION) * scale_log2  # [M, N], base-2 logits
    seen = key_ok[None, :] & (key_pos[None, :] <= q_pos[:, None])
    if USE_WINDOW:
        seen &= key_pos[None, :] > q_pos[:, None] - window
    scores = tl.where(seen, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
    alpha = tl.exp2(m_i - m_safe)  # exp(m_old - m_new): rescales what was accumulated so far
    p = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vs + kv_head * stride_vh
                + d[None, :] * stride_vd, mask=key_ok[:, None] & d_ok[None, :], other=0.0)  # [N, D]
    p = p.to(v.dtype)  # the PV product runs in the input precision, as on tensor cores
    if UPCAST_DOT:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, query_start_ptr,
                    context_lens_ptr, seq_ids_ptr, scale_log2, window,
                    stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
                    stride_kb, stride_ks, stride_kh, stride_kd,
                    stride_vb, stride_vs, stride_vh, stride_vd, stride_bt,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, USE_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST_DOT: tl.constexpr):
    """Grid (prefill sequences, query tiles of BLOCK_Q tokens, KV heads). Row r of the tile is token
    r // GROUP of the tile and query head kv_head * GROUP + r % GROUP."""
    seq = tl.load(seq_ids_ptr + tl.program_id(0))
    tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if tile * BLOCK_Q >= q_len:  # the grid is sized for the longest sequence
        return
    ctx = tl.load(context_lens_ptr + seq)
    rows = tl.arange(0, BLOCK_M)
    tok = tile * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    q_pos = ctx - q_len + tok  # the new tokens are the last q_len positions of the context
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    tok64 = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + tok64[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    first_pos = ctx - q_len + tile * BLOCK_Q
    key_end = tl.minimum(first_pos + BLOCK_Q, ctx)  # nothing after the tile's last query is visible
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(lo, key_end, BLOCK_N):
        m_i, l_i, acc = _online_softmax_tile(
            q, k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head, start, key_end, q_pos, window, m_i, l_i, acc,
            scale_log2, stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
            HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, USE_WINDOW, PRECISION, UPCAST_DOT)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok64[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, m_ptr, l_ptr, acc_ptr, block_tables_ptr,
                   context_lens_ptr, seq_ids_ptr, token_ids_ptr, scale_log2, window, num_splits,
                   stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
                   stride_kb, stride_ks, stride_kh, stride_kd,
                   stride_vb, stride_vs, stride_vh, stride_vd, stride_bt,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, USE_WINDOW: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                   SINGLE_SPLIT: tl.constexpr):
    """Grid (decode rows, KV heads, partitions). The GROUP query heads of a KV head share the
    program (padded to BLOCK_G >= 16 rows, the smallest tensor-core tile). Each row's context is cut
    into num_splits equal partitions of whole key tiles, so the grid depends on the batch size and
    num_splits only (a captured CUDA graph replays it for any context lengths). Scratch layout:
    m, l [rows, heads, splits]; acc [rows, heads, splits, HEAD_DIM]."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(seq_ids_ptr + row)
    tok = tl.load(token_ids_ptr + row).to(tl.int64)
    ctx = tl.load(context_lens_ptr + seq)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < GROUP
    head = kv_head * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + tok * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = tl.zeros([BLOCK_G], tl.int32) + (ctx - 1)
    partition = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N  # the row's share, in whole key tiles
    lo = split * partition
    key_end = tl.minimum(lo + partition, ctx)
    if USE_WINDOW:  # skip the tiles that lie wholly before the window
        lo = tl.maximum(lo, tl.maximum(ctx - window, 0) // BLOCK_N * BLOCK_N)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(lo, key_end, BLOCK_N):  # empty for partitions past the context
        m_i, l_i, acc = _online_softmax_tile(
            q, k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head, start, key_end, q_pos, window, m_i, l_i, acc,
            scale_log2, stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
            HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, USE_WINDOW, PRECISION, UPCAST_DOT)
    if SINGLE_SPLIT:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + tok * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        stat = (row.to(tl.int64) * (GROUP * tl.num_programs(1)) + head) * num_splits + split
        tl.store(m_ptr + stat, m_i, mask=g_ok)
        tl.store(l_ptr + stat, l_i, mask=g_ok)
        tl.store(acc_ptr + stat[:, None] * HEAD_DIM + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_reduce_kernel(out_ptr, m_ptr, l_ptr, acc_ptr, token_ids_ptr, num_splits,
                          stride_ot, stride_oh, stride_od,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Grid (decode rows, query heads): out = sum_s w_s acc_s / sum_s w_s l_s, w_s = exp(m_s - max m).
    Empty partitions carry m = -inf, l = 0 and get weight 0."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    tok = tl.load(token_ids_ptr + row).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < num_splits
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    base = (row.to(tl.int64) * tl.num_programs(1) + head) * num_splits
    m = tl.load(m_ptr + base + s, mask=s_ok, other=float("-inf"))
    l = tl.load(l_ptr + base + s, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
    acc = tl.load(acc_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(w * l, 0)
    tl.store(out_ptr + tok * stride_ot + head * stride_oh + d * stride_od, out.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
                     stride_ckb, stride_cks, stride_ckh, stride_ckd,
                     stride_cvb, stride_cvs, stride_cvh, stride_cvd,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Grid (tokens,): copy one token's [kv_heads, head_dim] K and V rows into cache slot
    slot_mapping[t] = block * BLOCK_SIZE + offset; negative slots are padding and skipped."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    ok = (h < NUM_KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
    k = tl.load(key_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :] * stride_kd, mask=ok)
    v = tl.load(value_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :] * stride_vd, mask=ok)
    tl.store(k_cache_ptr + block * stride_ckb + offset * stride_cks + h[:, None] * stride_ckh + d[None, :] * stride_ckd,
             k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_cache_ptr + block * stride_cvb + offset * stride_cvs + h[:, None] * stride_cvh + d[None, :] * stride_cvd,
             v.to(v_cache_ptr.dtype.element_ty), mask=ok)


_INTERPRETED = isinstance(_prefill_kernel, InterpretedFunction)  # TRITON_INTERPRET=1 at import


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V rows ([num_tokens, kv_heads, head_dim]) into their cache slots; same contract
    as ``engine.attention.write_kv``, plus: a negative slot leaves the cache untouched."""
    num_tokens, kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, *key.stride(), *value.stride(), *k_cache.stride(),
        *v_cache.stride(), NUM_KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_SIZE=k_cache.shape[1])


def _head_block(head_dim: int) -> int:
    """Head dim padded to a power of two and to 16, the smallest K of a tensor-core dot."""
    return max(16, triton.next_power_of_2(head_dim))


@dataclass
class TritonPlan:
    """Per-step tensors shared by every layer, built once in ``build_metadata``."""

    query_start: torch.Tensor  # int32 [num_seqs + 1]
    context_lens: torch.Tensor  # int32 [num_seqs]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    prefill_seqs: torch.Tensor | None  # int32 [p]: sequences with more than one new token
    max_prefill_len: int
    decode_seqs: torch.Tensor | None  # int32 [b]: sequences with exactly one new token
    decode_tokens: torch.Tensor | None  # int32 [b]: their rows in the flat batch
    num_splits: int  # flash-decoding partitions per decode row (each row's context cut into this many)
    scratch: dict = field(default_factory=dict)  # (heads, head_dim) -> (m, l, acc), reused by all layers


class TritonBackend(AttentionBackend):
    """Paged flash attention in Triton: varlen prefill (cached prefix + causal chunk) and split-K decode.

    ``decode_partition`` (a multiple of ``decode_block_n``) sets the flash-decoding split count: the
    longest decode context over ``decode_partition`` keys, rounded up; a step whose contexts all fit
    in one partition takes the single-kernel path. (Captured CUDA graphs fix the count per batch
    size instead: ``engine.cuda_graphs``.)
    """

    def __init__(self, prefill_block_m: int = 64, prefill_block_n: int = 64, decode_block_n: int = 64,
                 decode_partition: int = 512, num_warps: int = 4, num_stages: int = 2):
        if decode_partition % decode_block_n:
            raise ValueError("decode_partition must be a multiple of decode_block_n")
        self.prefill_block_m, self.prefill_block_n = prefill_block_m, prefill_block_n
        self.decode_block_n, self.decode_partition = decode_block_n, decode_partition
        self.num_warps, self.num_stages = num_warps, num_stages

    write_kv = staticmethod(write_kv)
    supports_cuda_graphs = True

    def build_metadata(self, meta: AttentionMetadata) -> AttentionMetadata:
        """Once per step: int32 copies of the layout, the prefill and decode rows, the partition count."""
        device = meta.block_tables.device
        num_new = [meta.query_start[i + 1] - meta.query_start[i] for i in range(len(meta.context_lens))]
        prefill = [i for i, n in enumerate(num_new) if n > 1]
        decode = [i for i, n in enumerate(num_new) if n == 1]

        def ints(values: list[int]) -> torch.Tensor | None:
            return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True) if values else None

        max_decode_ctx = max((meta.context_lens[i] for i in decode), default=0)
        meta.backend_data = TritonPlan(
            query_start=ints(meta.query_start), context_lens=ints(meta.context_lens),
            block_tables=meta.block_tables.to(torch.int32).contiguous(),
            prefill_seqs=ints(prefill), max_prefill_len=max((num_new[i] for i in prefill), default=0),
            decode_seqs=ints(decode), decode_tokens=ints([meta.query_start[i] for i in decode]),
            num_splits=max(1, math.ceil(max_decode_ctx / self.decode_partition)))
        return meta

    def static_decode_metadata(self, meta: AttentionMetadata, context_lens: torch.Tensor,
                               num_splits: int) -> AttentionMetadata:
        """A pure-decode step over buffers the caller owns and refreshes in place between runs (what a
        CUDA graph replays): ``meta.slot_mapping``, int32 ``meta.block_tables`` and int32
        ``context_lens``, one row per sequence, every context cut into ``num_splits`` partitions."""
        rows = torch.arange(len(context_lens) + 1, dtype=torch.int32, device=context_lens.device)
        meta.backend_data = TritonPlan(query_start=rows, context_lens=context_lens, block_tables=meta.block_tables,
                                       prefill_seqs=None, max_prefill_len=0, decode_seqs=rows[:-1],
                                       decode_tokens=rows[:-1], num_splits=num_splits)
        return meta

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [num_tokens, heads, head_dim] -> out of the same shape; K/V already written to the cache."""
        plan: TritonPlan = meta.backend_data
        _, num_heads, head_dim = q.shape
        num_kv_heads = k_cache.shape[2]
        group = num_heads // num_kv_heads
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        window = meta.sliding_window or 0
        common = dict(HEAD_DIM=head_dim, BLOCK_D=_head_block(head_dim), GROUP=group, BLOCK_SIZE=meta.block_size,
                      USE_WINDOW=meta.sliding_window is not None,
                      PRECISION="ieee" if q.dtype == torch.float32 else None,  # None: the target default
                      UPCAST_DOT=_INTERPRETED and q.dtype == torch.bfloat16,
                      num_warps=self.num_warps, num_stages=self.num_stages)
        strides = (*q.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(), plan.block_tables.stride(0))
        scale_log2 = meta.scale * _LOG2E
        if plan.prefill_seqs is not None:
            block_m = max(self.prefill_block_m, triton.next_power_of_2(group))
            block_q = block_m // group
            grid = (plan.prefill_seqs.numel(), triton.cdiv(plan.max_prefill_len, block_q), num_kv_heads)
            _prefill_kernel[grid](
                q, k_cache, v_cache, out, plan.block_tables, plan.query_start, plan.context_lens, plan.prefill_seqs,
                scale_log2, window, *strides, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=self.prefill_block_n,
                **common)
        if plan.decode_seqs is not None:
            rows, splits = plan.decode_seqs.numel(), plan.num_splits
            key = (num_heads, head_dim)
            if splits > 1 and key not in plan.scratch:
                plan.scratch[key] = (torch.empty(rows, num_heads, splits, dtype=torch.float32, device=q.device),
                                     torch.empty(rows, num_heads, splits, dtype=torch.float32, device=q.device),
                                     torch.empty(rows, num_heads, splits, head_dim, dtype=torch.float32, device=q.device))
            m, l, acc = plan.scratch[key] if splits > 1 else (out, out, out)  # unused when single split
            _decode_kernel[(rows, num_kv_heads, splits)](
                q, k_cache, v_cache, out, m, l, acc, plan.block_tables, plan.context_lens, plan.decode_seqs,
                plan.decode_tokens, scale_log2, window, splits, *strides,
                BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=self.decode_block_n,
                SINGLE_SPLIT=splits == 1, **common)
            if splits > 1:
                _decode_reduce_kernel[(rows, num_heads)](
                    out, m, l, acc, plan.decode_tokens, splits, *out.stride(), HEAD_DIM=head_dim,
                    BLOCK_D=_head_block(head_dim), BLOCK_S=triton.next_power_of_2(splits), num_warps=self.num_warps)
        return out
