"""The CPU backend: PyTorch SDPA over each sequence's K/V gathered from the paged cache.

K/V are gathered by whole blocks (one contiguous copy per block, not per token), positions past a
sequence's context are masked. Decoding sequences (one query each) are gathered into one padded
batch served by a single SDPA call per layer; prefill chunks (with or without a cached prefix) get
one call each. Block lists and masks are built once per step and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata, visible


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


@dataclass
class _Decode:
    token_index: torch.Tensor | None  # [b] rows of the flat batch; None when every row decodes
    gather: _Gather  # b * max_blocks block ids, padded
    mask: torch.Tensor  # [b, 1, 1, max_blocks * block_size]


@dataclass
class _Prefill:
    start: int
    end: int
    gather: _Gather  # this sequence's blocks
    mask: torch.Tensor | None  # [n, num_blocks * block_size]; None: plain causal over the chunk itself


@dataclass
class _SdpaPlan:
    decode: _Decode | None
    prefills: list[_Prefill]


class SdpaBackend:
    def build_metadata(self, meta: AttentionMetadata) -> AttentionMetadata:
        device, bs = meta.slot_mapping.device, meta.block_size
        # CPUs without bf16/fp16 arithmetic run SDPA much faster in float32 (the upcast copies are small).
        compute = torch.float32 if device.type == "cpu" else meta.cache_dtype
        num_new = [meta.query_start[i + 1] - meta.query_start[i] for i in range(len(meta.context_lens))]
        decode_rows = [i for i, n in enumerate(num_new) if n == 1]
        decode = None
        if decode_rows:
            ctx = torch.tensor([meta.context_lens[i] for i in decode_rows], device=device)
            num_blocks = -(-int(ctx.max()) // bs)
            key_pos = torch.arange(num_blocks * bs, device=device)
            mask = visible((ctx - 1)[:, None], key_pos[None, :], meta.sliding_window) & (key_pos[None, :] < ctx[:, None])
            token_index = None
            if len(decode_rows) < len(num_new):
                token_index = torch.tensor([meta.query_start[i] for i in decode_rows], device=device)
            blocks = meta.block_tables[decode_rows, :num_blocks].flatten()
            decode = _Decode(token_index, make_gather(blocks, meta, compute), mask[:, None, None, :])
        prefills = []
        for i, (ctx, n) in enumerate(zip(meta.context_lens, num_new)):
            if n == 1:
                continue
            num_blocks = -(-ctx // bs)
            mask = None
            if ctx != n or meta.sliding_window is not None or ctx % bs:
                query_pos = torch.arange(ctx - n, ctx, device=device)
                key_pos = torch.arange(num_blocks * bs, device=device)
                mask = visible(query_pos[:, None], key_pos[None, :], meta.sliding_window)
            prefills.append(_Prefill(meta.query_start[i], meta.query_start[i + 1],
                                     make_gather(meta.block_tables[i, :num_blocks], meta, compute), mask))
        meta.backend_data = _SdpaPlan(decode, prefills)
        return meta

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        plan: _SdpaPlan = meta.backend_data
        kv_heads, head_dim = k_cache.shape[2:]
        compute = torch.float32 if q.device.type == "cpu" else q.dtype
        out = torch.empty_like(q)
        if plan.decode is not None:
            d = plan.decode
            b = d.mask.shape[0]
            kd = gather(d.gather, k_cache, 0, compute).view(b, -1, kv_heads, head_dim).transpose(1, 2)
            vd = gather(d.gather, v_cache, 1, compute).view(b, -1, kv_heads, head_dim).transpose(1, 2)
            qd = q if d.token_index is None else q.index_select(0, d.token_index)
            od = F.scaled_dot_product_attention(qd.unsqueeze(2).to(compute), kd, vd, attn_mask=d.mask, scale=meta.scale,
                                                enable_gqa=True).squeeze(2).to(q.dtype)  # [b, heads, d]
            if d.token_index is None:  # every row decodes: nothing else to fill in
                return od
            out.index_copy_(0, d.token_index, od)
        for p in plan.prefills:
            kp = gather(p.gather, k_cache, 0, compute).transpose(0, 1).unsqueeze(0)
            vp = gather(p.gather, v_cache, 1, compute).transpose(0, 1).unsqueeze(0)
            qp = q[p.start:p.end].transpose(0, 1).unsqueeze(0).to(compute)  # [1, heads, n, d]
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, is_causal=p.mask is None,
                                                scale=meta.scale, enable_gqa=True)
            out[p.start:p.end] = op.squeeze(0).transpose(0, 1).to(q.dtype)
        return out
