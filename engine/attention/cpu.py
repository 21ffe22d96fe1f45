"""The CPU backend: PyTorch SDPA over each sequence's K/V gathered from the paged cache, and our C kernel
(engine/kernels/attention.c) for the short queries of decodes and verifications where it can run.

K/V are gathered by whole blocks (one contiguous copy per block, not per token), positions past a
sequence's context are masked. Sequences with few new tokens (decodes: one; speculative verification:
the last token and its drafts) are padded to the same query count and served by a single SDPA call
per layer; longer prefill chunks (with or without a cached prefix) get one call each. Block lists and
masks are built once per step and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine import kernels
from engine.attention import AttentionBackend, AttentionMetadata, visible
from engine.config import MAX_SPECULATIVE_TOKENS


@dataclass
class _Gather:
    """Which blocks to read, and buffers for them made once per step and reused by every layer:
    in eager mode, fresh multi-megabyte tensors per layer cost more in page faults than the copy."""

    blocks: torch.Tensor
    raw: torch.Tensor  # [2 (K, V), num_blocks, block_size * kv_heads * head_dim] in the cache dtype
    converted: torch.Tensor | None  # the same in the compute dtype, when it differs


def make_gather(blocks: torch.Tensor, meta: AttentionMetadata, compute: torch.dtype) -> _Gather:
    shape = (2, len(blocks), meta.block_size * meta.num_kv_heads * meta.head_dim)
    raw = torch.empty(shape, dtype=meta.cache_dtype, device=blocks.device)
    converted = torch.empty(shape, dtype=compute, device=blocks.device) if compute != meta.cache_dtype else None
    return _Gather(blocks, raw, converted)


def gather(g: _Gather, cache: torch.Tensor, which: int, compute: torch.dtype) -> torch.Tensor:
    """The blocks' K (which=0) or V (1) as [num_blocks * block_size, kv_heads, head_dim] in ``compute``."""
    flat = cache.view(cache.shape[0], -1)
    if torch.compiler.is_compiling():  # inductor plans its own buffers
        out = flat.index_select(0, g.blocks).to(compute)
    else:
        out = torch.index_select(flat, 0, g.blocks, out=g.raw[which])
        if g.converted is not None:
            out = g.converted[which].copy_(out)
    return out.view(-1, *cache.shape[2:])


# Sequences with up to this many new tokens share the batched call: decodes, and verifications (the
# last token plus its drafts).
MAX_BATCHED_QUERY = 1 + MAX_SPECULATIVE_TOKENS


@dataclass
class _Batched:
    """Short-query sequences padded to ``qlen`` queries each (a pad repeats its sequence's last query)."""

    token_index: torch.Tensor | None  # [b * qlen] flat-batch row per padded query; None: the batch is exactly these, in order
    out_index: torch.Tensor | None  # flat-batch rows of the real queries
    real: torch.Tensor | None  # [b * qlen] which padded queries are real; None: no padding
    gather: _Gather  # b * max_blocks block ids, padded
    mask: torch.Tensor  # [b, 1, qlen, max_blocks * block_size]


@dataclass
class _Prefill:
    start: int
    end: int
    gather: _Gather  # this sequence's blocks
    mask: torch.Tensor | None  # [n, num_blocks * block_size]; None: plain causal over the chunk itself


@dataclass
class _SdpaPlan:
    batched: _Batched | None
    prefills: list[_Prefill]
    native: torch.Tensor | None = None  # [queries, 4] for attention.c (then batched is None)


def native_queries(rows: list[int], num_new: list[int], meta: AttentionMetadata) -> torch.Tensor | None:
    """attention.c's description of the short queries (their row, sequence, and visible keys [start, end)),
    or None where the kernel cannot serve them: it runs float32 caches and head_dim a multiple of 8 up to
    256, on CPUs where engine.kernels built."""
    if (meta.cache_dtype != torch.float32 or meta.head_dim % 8 or meta.head_dim > 256 or meta.num_kv_heads == 0
            or kernels.library() is None):
        return None
    queries = []
    for i in rows:
        ctx, n = meta.context_lens[i], num_new[i]
        for j in range(n):
            pos = ctx - n + j
            start = 0 if meta.sliding_window is None else max(0, pos - meta.sliding_window + 1)
            queries.append((meta.query_start[i] + j, i, start, pos + 1))
    return torch.tensor(queries, dtype=torch.long)


class SdpaBackend(AttentionBackend):
    def __init__(self, native: bool = True):
        """``native``: serve short queries from attention.c where it can run (off: always SDPA)."""
        self.native = native

    def build_metadata(self, meta: AttentionMetadata) -> AttentionMetadata:
        device, bs = meta.slot_mapping.device, meta.block_size
        # CPUs without bf16/fp16 arithmetic run SDPA much faster in float32 (the upcast copies are small).
        compute = torch.float32 if device.type == "cpu" else meta.cache_dtype
        num_new = [meta.query_start[i + 1] - meta.query_start[i] for i in range(len(meta.context_lens))]
        short = [i for i, n in enumerate(num_new) if n <= MAX_BATCHED_QUERY]
        native = native_queries(short, num_new, meta) if short and self.native and device.type == "cpu" else None
        batched = self._plan_batched(short, num_new, meta, compute) if short and native is None else None
        prefills = []
        for i, (ctx, n) in enumerate(zip(meta.context_lens, num_new)):
            if n <= MAX_BATCHED_QUERY:
                continue
            num_blocks = -(-ctx // bs)
            mask = None
            if ctx != n or meta.sliding_window is not None or ctx % bs:
                query_pos = torch.arange(ctx - n, ctx, device=device)
                key_pos = torch.arange(num_blocks * bs, device=device)
                mask = visible(query_pos[:, None], key_pos[None, :], meta.sliding_window)
            prefills.append(_Prefill(meta.query_start[i], meta.query_start[i + 1],
                                     make_gather(meta.block_tables[i, :num_blocks], meta, compute), mask))
        meta.backend_data = _SdpaPlan(batched, prefills, native)
        return meta

    @staticmethod
    def _plan_batched(rows: list[int], num_new: list[int], meta: AttentionMetadata, compute: torch.dtype) -> _Batched:
        device, bs = meta.slot_mapping.device, meta.block_size
        qlen = max(num_new[i] for i in rows)
        ctx = torch.tensor([meta.context_lens[i] for i in rows], device=device)
        n = torch.tensor([num_new[i] for i in rows], device=device)
        j = torch.arange(qlen, device=device)
        offset = torch.minimum(j[None, :], (n - 1)[:, None])  # [b, qlen]: pads repeat the last query
        num_blocks = -(-int(ctx.max()) // bs)
        key_pos = torch.arange(num_blocks * bs, device=device)
        query_pos = (ctx - n)[:, None] + offset
        mask = visible(query_pos[:, :, None], key_pos, meta.sliding_window) & (key_pos < ctx[:, None, None])
        token_index = out_index = real = None
        if len(rows) < len(num_new) or any(num_new[i] != qlen for i in rows):
            starts = torch.tensor([meta.query_start[i] for i in rows], device=device)
            token_index = (starts[:, None] + offset).flatten()
            real = (j[None, :] < n[:, None]).flatten()
            out_index = token_index[real]
        blocks = meta.block_tables[rows, :num_blocks].flatten()
        return _Batched(token_index, out_index, real, make_gather(blocks, meta, compute), mask[:, None])

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        plan: _SdpaPlan = meta.backend_data
        kv_heads, head_dim = k_cache.shape[2:]
        compute = torch.float32 if q.device.type == "cpu" else q.dtype
        out = torch.empty_like(q)
        if plan.native is not None:
            self._native(q, k_cache, v_cache, meta, out)
        if plan.batched is not None:
            d = plan.batched
            b, _, qlen, _ = d.mask.shape
            kd = gather(d.gather, k_cache, 0, compute).view(b, -1, kv_heads, head_dim).transpose(1, 2)
            vd = gather(d.gather, v_cache, 1, compute).view(b, -1, kv_heads, head_dim).transpose(1, 2)
            qd = q if d.token_index is None else q.index_select(0, d.token_index)
            qd = qd.view(b, qlen, *q.shape[1:]).transpose(1, 2).to(compute)  # [b, heads, qlen, d]
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=d.mask, scale=meta.scale, enable_gqa=True)
            od = od.transpose(1, 2).reshape(b * qlen, *q.shape[1:]).to(q.dtype)
            if d.token_index is None:  # the batch is exactly these queries: nothing else to fill in
                return od
            out.index_copy_(0, d.out_index, od[d.real])
        for p in plan.prefills:
            kp = gather(p.gather, k_cache, 0, compute).transpose(0, 1).unsqueeze(0)
            vp = gather(p.gather, v_cache, 1, compute).transpose(0, 1).unsqueeze(0)
            qp = q[p.start:p.end].transpose(0, 1).unsqueeze(0).to(compute)  # [1, heads, n, d]
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, is_causal=p.mask is None,
                                                scale=meta.scale, enable_gqa=True)
            out[p.start:p.end] = op.squeeze(0).transpose(0, 1).to(q.dtype)
        return out

    @staticmethod
    @kernels.eager_only
    def _native(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                out: torch.Tensor) -> None:
        """The short queries' rows of ``out``, from attention.c."""
        num_blocks, block_size, kv_heads, head_dim = k_cache.shape
        heads, queries = q.shape[1], meta.backend_data.native
        q = q.float().contiguous()
        tables = meta.block_tables.contiguous()
        kernels.library().paged_decode_attention(
            len(queries), heads, kv_heads, head_dim, block_size, tables.shape[1], meta.scale, q.data_ptr(),
            k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), queries.data_ptr(), out.data_ptr())
