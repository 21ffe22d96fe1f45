"""The reference (tiled online softmax) and the SDPA backend against naive softmax(QK^T/sqrt(d))V."""

from __future__ import annotations

import math

import pytest
import torch

from engine.attention import AttentionMetadata, write_kv
from engine.attention.cpu import SdpaBackend
from engine.attention.torch_ref import ReferenceBackend, flash_attention

AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")  # where engine.kernels must build and run
# SdpaBackend serves short queries from our C kernel where it runs; without it, from one padded SDPA call.
BACKENDS = [pytest.param(ReferenceBackend, id="reference"), pytest.param(SdpaBackend, id="sdpa+native"),
            pytest.param(lambda: SdpaBackend(native=False), id="sdpa")]


def naive_attention(q, k, v, query_pos, sliding_window=None):
    """softmax(QK^T / sqrt(d)) V with K/V heads repeated for GQA, in float64."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    scores = torch.einsum("nhd,thd->hnt", q.double(), k) / math.sqrt(q.shape[-1])
    key_pos = torch.arange(k.shape[0])
    mask = key_pos[None, :] <= query_pos[:, None]
    if sliding_window is not None:
        mask &= key_pos[None, :] > query_pos[:, None] - sliding_window
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hnt,thd->nhd", scores.softmax(-1), v).float()


def build_batch(seqs, num_heads, num_kv_heads, head_dim, block_size, seed=0):
    """seqs: list of (cached_prefix_len, new_tokens). Returns q, caches, metadata and per-sequence K/V."""
    g = torch.Generator().manual_seed(seed)
    total_blocks = sum(-(-(c + n) // block_size) for c, n in seqs) + 3
    k_cache = torch.zeros(total_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(total_blocks, generator=g).tolist()  # scattered, non-contiguous blocks
    qs, full_k, full_v, tables, query_start = [], [], [], [], [0]
    for cached, new in seqs:
        ctx = cached + new
        table = [free.pop() for _ in range(-(-ctx // block_size))]
        k = torch.randn(ctx, num_kv_heads, head_dim, generator=g)
        v = torch.randn(ctx, num_kv_heads, head_dim, generator=g)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(cached)], dtype=torch.long)
        if cached:  # the prefix is already in the cache from earlier steps
            write_kv(k[:cached], v[:cached], k_cache, v_cache, slots)
        qs.append(torch.randn(new, num_heads, head_dim, generator=g) * 2)
        full_k.append(k), full_v.append(v), tables.append(table)
        query_start.append(query_start[-1] + new)
    max_blocks = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables])
    slot_mapping = torch.cat([torch.tensor([t[p // block_size] * block_size + p % block_size for p in range(c, c + n)],
                                           dtype=torch.long) for t, (c, n) in zip(tables, seqs)])
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, seqs)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, seqs)])
    write_kv(new_k, new_v, k_cache, v_cache, slot_mapping)
    meta = AttentionMetadata(slot_mapping=slot_mapping, query_start=query_start, context_lens=[c + n for c, n in seqs],
                             block_tables=block_tables, block_size=block_size, scale=head_dim ** -0.5,
                             num_kv_heads=num_kv_heads, head_dim=head_dim, cache_dtype=k_cache.dtype)
    return torch.cat(qs), k_cache, v_cache, meta, full_k, full_v


def expected_output(q, meta, seqs, full_k, full_v, sliding_window=None):
    outs = []
    for i, (cached, new) in enumerate(seqs):
        qi = q[meta.query_start[i]:meta.query_start[i + 1]]
        outs.append(naive_attention(qi, full_k[i], full_v[i], torch.arange(cached, cached + new), sliding_window))
    return torch.cat(outs)


# Ragged batches: decodes (new=1), prefills with no prefix, chunks after prefixes not aligned to blocks.
RAGGED = [(0, 37), (5, 1), (0, 1), (33, 17), (100, 1), (16, 16), (47, 3), (250, 50), (299, 1)]


@pytest.mark.parametrize("backend_cls", BACKENDS)
@pytest.mark.parametrize("head_dim", [64, 72, 128])
@pytest.mark.parametrize("group", [1, 4, 8, 20])
@pytest.mark.parametrize("block_size", [16, 32])
def test_backends_equal_naive_attention(backend_cls, head_dim, group, block_size):
    num_kv_heads = 2
    q, k_cache, v_cache, meta, full_k, full_v = build_batch(RAGGED, num_kv_heads * group, num_kv_heads, head_dim, block_size)
    backend = backend_cls()
    out = backend.forward(q, k_cache, v_cache, backend.build_metadata(meta))
    torch.testing.assert_close(out, expected_output(q, meta, RAGGED, full_k, full_v), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_sliding_window(backend_cls):
    seqs = [(40, 1), (0, 30), (20, 9)]
    q, k_cache, v_cache, meta, full_k, full_v = build_batch(seqs, 8, 2, 64, 16)
    meta.sliding_window = 7
    backend = backend_cls()
    out = backend.forward(q, k_cache, v_cache, backend.build_metadata(meta))
    torch.testing.assert_close(out, expected_output(q, meta, seqs, full_k, full_v, 7), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seqs", [
    [(5, 5), (40, 5), (17, 5)],  # speculative verification: every sequence checks 4 drafts (no padding)
    [(5, 1), (40, 1)],  # plain decoding
    [(9, 5), (0, 3), (31, 1), (0, 40)],  # ragged short queries (padded) beside a long prefill
])
@pytest.mark.parametrize("native", [pytest.param(True, marks=pytest.mark.skipif(not AVX2, reason="needs AVX2")), False])
def test_short_queries_share_one_call(seqs, native):
    """Decodes and verifications: one native call (queries as they are) or one padded SDPA call."""
    q, k_cache, v_cache, meta, full_k, full_v = build_batch(seqs, 8, 2, 64, 16)
    backend = SdpaBackend(native=native)
    meta = backend.build_metadata(meta)
    plan = meta.backend_data
    assert len(plan.prefills) == sum(n > 17 for _, n in seqs)
    assert (plan.native is not None, plan.batched is not None) == (native, not native)
    if native:
        assert len(plan.native) == sum(n for _, n in seqs if n <= 17)
    out = backend.forward(q, k_cache, v_cache, meta)
    torch.testing.assert_close(out, expected_output(q, meta, seqs, full_k, full_v), atol=1e-4, rtol=1e-4)


def test_native_kernel_leaves_caches_it_cannot_read_to_sdpa():
    q, k_cache, v_cache, meta, full_k, full_v = build_batch([(5, 1), (40, 1)], 8, 2, 64, 16)
    meta.cache_dtype = torch.bfloat16
    plan = SdpaBackend().build_metadata(meta).backend_data
    assert plan.native is None and plan.batched is not None


def test_online_softmax_rescales_when_a_later_tile_has_the_maximum():
    """Scores that grow along the keys force a new running maximum in every tile."""
    ctx, d = 64, 16
    k = torch.arange(ctx, dtype=torch.float)[:, None, None].expand(ctx, 1, d).contiguous() * 0.5
    v = torch.randn(ctx, 1, d)
    q = torch.ones(2, 1, d)
    query_pos = torch.tensor([40, 63])
    out = flash_attention(q, k, v, query_pos, scale=d ** -0.5, tile=8)
    torch.testing.assert_close(out, naive_attention(q, k, v, query_pos), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(20))
def test_random_ragged_batches(seed):
    g = torch.Generator().manual_seed(seed)
    seqs = [(int(torch.randint(0, 300, (1,), generator=g)), int(torch.randint(1, 64, (1,), generator=g))) for _ in range(6)]
    for backend_cls in (ReferenceBackend, SdpaBackend, lambda: SdpaBackend(native=False)):
        q, k_cache, v_cache, meta, full_k, full_v = build_batch(seqs, 8, 2, 64, 16, seed)
        backend = backend_cls()
        out = backend.forward(q, k_cache, v_cache, backend.build_metadata(meta))
        torch.testing.assert_close(out, expected_output(q, meta, seqs, full_k, full_v), atol=1e-4, rtol=1e-4)
