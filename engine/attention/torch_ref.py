"""The reference: flash attention's online-softmax algorithm written plainly in torch.

Keys and values stream through in tiles. Each query keeps a running maximum ``m``, a running
softmax denominator ``l`` and an unnormalised partial output ``acc``; when a tile brings a larger
maximum, the old ``l`` and ``acc`` are rescaled by ``exp(m_old - m_new)``. The N x N score matrix
is never formed. Every other backend is tested against this one (and it against naive attention).
"""

from __future__ import annotations

import torch

from engine.attention import AttentionBackend, AttentionMetadata, context_slots, visible


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_pos: torch.Tensor,
                    scale: float, sliding_window: int | None = None, tile: int = 16) -> torch.Tensor:
    """q: [n, heads, d] at positions ``query_pos``; k, v: [ctx, kv_heads, d] at positions 0..ctx-1."""
    n, num_heads, head_dim = q.shape
    ctx, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    # GQA without repeating K/V: view the query heads as [kv_head, group].
    qf = q.float().reshape(n, num_kv_heads, group, head_dim) * scale
    m = torch.full((n, num_kv_heads, group), float("-inf"), device=q.device)
    l = torch.zeros((n, num_kv_heads, group), device=q.device)
    acc = torch.zeros((n, num_kv_heads, group, head_dim), device=q.device)
    for start in range(0, ctx, tile):
        kt, vt = k[start:start + tile].float(), v[start:start + tile].float()
        key_pos = torch.arange(start, start + kt.shape[0], device=q.device)
        scores = torch.einsum("nhgd,thd->nhgt", qf, kt)
        mask = visible(query_pos[:, None], key_pos[None, :], sliding_window)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        m_new = torch.maximum(m, scores.amax(dim=-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows that saw nothing yet
        alpha = torch.exp(m - m_safe)  # exp(m_old - m_new): rescales what was accumulated so far
        p = torch.exp(scores - m_safe[..., None])
        l = l * alpha + p.sum(dim=-1)
        acc = acc * alpha[..., None] + torch.einsum("nhgt,thd->nhgd", p, vt)
        m = m_new
    return (acc / l[..., None]).reshape(n, num_heads, head_dim).to(q.dtype)


class ReferenceBackend(AttentionBackend):
    """Runs ``flash_attention`` per sequence over K/V read through the block table."""

    def build_metadata(self, metadata: AttentionMetadata) -> AttentionMetadata:
        return metadata

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        k_flat, v_flat = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
        for i, ctx in enumerate(meta.context_lens):
            start, end = meta.query_start[i], meta.query_start[i + 1]
            slots = context_slots(meta.block_tables[i], ctx, meta.block_size)
            query_pos = torch.arange(ctx - (end - start), ctx, device=q.device)
            out[start:end] = flash_attention(q[start:end], k_flat[slots], v_flat[slots], query_pos,
                                             meta.scale, meta.sliding_window)
        return out
