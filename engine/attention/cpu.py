"""The CPU backend: PyTorch SDPA over each sequence's K/V gathered from the paged cache.

Decoding sequences (one query each) are gathered into one padded batch and served by a single SDPA
call per layer; prefill chunks (with or without a cached prefix) get one call each. The gather
indices and masks are built once per step and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata, context_slots, visible


@dataclass
class _Decode:
    token_index: torch.Tensor  # [b] rows of the flat batch
    slots: torch.Tensor  # [b, max_ctx] cache slots, padded
    mask: torch.Tensor  # [b, 1, 1, max_ctx]


@dataclass
class _Prefill:
    start: int
    end: int
    slots: torch.Tensor  # [ctx]
    mask: torch.Tensor | None  # [n, ctx]; None means plain causal over the chunk itself


@dataclass
class _SdpaPlan:
    decode: _Decode | None
    prefills: list[_Prefill]


class SdpaBackend:
    def build_metadata(self, meta: AttentionMetadata) -> AttentionMetadata:
        device = meta.slot_mapping.device
        decode_rows = [i for i in range(len(meta.context_lens)) if meta.query_start[i + 1] - meta.query_start[i] == 1]
        decode = None
        if decode_rows:
            ctx = torch.tensor([meta.context_lens[i] for i in decode_rows], device=device)
            positions = torch.arange(int(ctx.max()), device=device)
            tables = meta.block_tables[decode_rows]
            slots = tables[:, positions // meta.block_size] * meta.block_size + positions % meta.block_size
            mask = visible((ctx - 1)[:, None], positions[None, :], meta.sliding_window)
            token_index = torch.tensor([meta.query_start[i] for i in decode_rows], device=device)
            decode = _Decode(token_index, slots, mask[:, None, None, :])
        prefills = []
        for i, ctx in enumerate(meta.context_lens):
            start, end = meta.query_start[i], meta.query_start[i + 1]
            if end - start == 1:
                continue
            slots = context_slots(meta.block_tables[i], ctx, meta.block_size)
            mask = None
            if ctx != end - start or meta.sliding_window is not None:
                query_pos = torch.arange(ctx - (end - start), ctx, device=device)
                mask = visible(query_pos[:, None], torch.arange(ctx, device=device)[None, :], meta.sliding_window)
            prefills.append(_Prefill(start, end, slots, mask))
        meta.backend_data = _SdpaPlan(decode, prefills)
        return meta

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        plan: _SdpaPlan = meta.backend_data
        k_flat, v_flat = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
        out = torch.empty_like(q)
        if plan.decode is not None:
            d = plan.decode
            qd = q[d.token_index].unsqueeze(2)  # [b, heads, 1, d]
            kd = k_flat[d.slots].transpose(1, 2)  # [b, kv_heads, ctx, d]
            vd = v_flat[d.slots].transpose(1, 2)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=d.mask, scale=meta.scale, enable_gqa=True)
            out[d.token_index] = od.squeeze(2)
        for p in plan.prefills:
            qp = q[p.start:p.end].transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
            kp = k_flat[p.slots].transpose(0, 1).unsqueeze(0)
            vp = v_flat[p.slots].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, is_causal=p.mask is None,
                                                scale=meta.scale, enable_gqa=True)
            out[p.start:p.end] = op.squeeze(0).transpose(0, 1)
        return out
