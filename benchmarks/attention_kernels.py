"""Micro-benchmark of the Triton attention kernels on CUDA (bf16, Llama-3.2-1B heads: 32 on 8 KV
heads, head_dim 64): prefill vs SDPA's flash backend on contiguous K/V (TFLOP/s), paged decode vs
gather + SDPA (GB/s of K/V read). Writes one JSON object. Not a test; needs a GPU.

    python benchmarks/attention_kernels.py --out report.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from engine.attention import AttentionMetadata
from engine.attention.triton_kernels import TritonBackend

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 64, 16
DT = torch.bfloat16


def paged_batch(seqs: list[tuple[int, int]]):
    """(cached, new) per sequence -> q, caches and metadata with shuffled blocks."""
    blocks_per = [-(-(c + n) // BLOCK) for c, n in seqs]
    total = sum(blocks_per)
    perm = torch.randperm(total).tolist()
    tables, query_start, slots = [], [0], []
    for (c, n), nb in zip(seqs, blocks_per):
        table = [perm.pop() for _ in range(nb)]
        tables.append(table + [0] * (max(blocks_per) - nb))
        query_start.append(query_start[-1] + n)
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(c, c + n)]
    k_cache = torch.randn(total, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=DT)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(query_start[-1], HEADS, HEAD_DIM, device="cuda", dtype=DT)
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots, device="cuda"), query_start=query_start,
                             context_lens=[c + n for c, n in seqs], block_tables=torch.tensor(tables, device="cuda"),
                             block_size=BLOCK, scale=HEAD_DIM ** -0.5)
    return q, k_cache, v_cache, meta


def bench_prefill(seq_len: int, batch: int) -> dict:
    backend = TritonBackend()
    q, k_cache, v_cache, meta = paged_batch([(0, seq_len)] * batch)
    backend.build_metadata(meta)
    ms = do_bench(lambda: backend.forward(q, k_cache, v_cache, meta))
    qs = torch.randn(batch, HEADS, seq_len, HEAD_DIM, device="cuda", dtype=DT)
    ks = torch.randn(batch, HEADS, seq_len, HEAD_DIM, device="cuda", dtype=DT)  # SDPA flash wants equal heads
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ms_sdpa = do_bench(lambda: F.scaled_dot_product_attention(qs, ks, ks, is_causal=True))
    flops = 4 * batch * HEADS * HEAD_DIM * seq_len * seq_len / 2  # causal: half of QK^T and PV
    return {"seq_len": seq_len, "batch": batch, "triton_ms": ms, "sdpa_flash_ms": ms_sdpa,
            "triton_tflops": flops / ms / 1e9, "sdpa_flash_tflops": flops / ms_sdpa / 1e9}


def bench_decode(context: int, batch: int) -> dict:
    backend = TritonBackend()
    q, k_cache, v_cache, meta = paged_batch([(context - 1, 1)] * batch)
    backend.build_metadata(meta)
    ms = do_bench(lambda: backend.forward(q, k_cache, v_cache, meta))
    blocks = meta.block_tables[:, :-(-context // BLOCK)].flatten()

    def gather_sdpa():
        k = k_cache.index_select(0, blocks).view(batch, -1, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = v_cache.index_select(0, blocks).view(batch, -1, KV_HEADS, HEAD_DIM).transpose(1, 2)
        return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True)

    ms_base = do_bench(gather_sdpa)
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * k_cache.element_size()
    return {"context": context, "batch": batch, "triton_ms": ms, "gather_sdpa_ms": ms_base,
            "triton_gbps": kv_bytes / ms / 1e6, "gather_sdpa_gbps": kv_bytes / ms_base / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    report = {"device": torch.cuda.get_device_name(), "shape": {"heads": HEADS, "kv_heads": KV_HEADS,
                                                                "head_dim": HEAD_DIM, "block_size": BLOCK},
              "prefill": [], "decode": []}
    rows = [("prefill", bench_prefill, n, b) for n, b in [(512, 8), (2048, 4), (8192, 1)]] + \
           [("decode", bench_decode, c, b) for c, b in [(1024, 64), (8192, 16), (32768, 4), (131072, 1)]]
    for kind, bench, length, batch in rows:
        report[kind].append(bench(length, batch))
        print(json.dumps(report[kind][-1]), flush=True)
        with open(args.out, "w") as f:  # after every row: a run cut short keeps what finished
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
