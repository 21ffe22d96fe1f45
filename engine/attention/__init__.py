"""Attention over the paged KV cache, behind one interface.

A backend has ``build_metadata(...)`` (once per step, shared by every layer), ``write_kv`` and
``forward(q, k_cache, v_cache, metadata)``. Before calling forward, the layer has written the step's
new keys and values into the cache with the backend's ``write_kv``; the backend then reads each
sequence's whole context (cached prefix plus the new tokens) through its block table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """The flat batch's layout: sequence i owns queries ``query_start[i]:query_start[i+1]``,
    which sit at the last positions of its ``context_lens[i]`` tokens."""

    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    query_start: list[int]  # [num_seqs + 1]
    context_lens: list[int]  # [num_seqs] tokens of context after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks] padded with 0
    block_size: int
    scale: float
    sliding_window: int | None = None
    num_kv_heads: int = 0  # the cache layout, for backends that size buffers up front
    head_dim: int = 0
    cache_dtype: torch.dtype = torch.float32
    backend_data: object = None  # whatever the backend precomputed for this step


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V rows ([num_tokens, kv_heads, head_dim]) into their cache slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value)


class AttentionBackend:
    """What every backend provides; the model code sees only this."""

    write_kv = staticmethod(write_kv)
    # Decode steps can replay as CUDA graphs: the backend has static_decode_metadata() and its
    # write_kv skips negative (padding) slots. The Triton backend does.
    supports_cuda_graphs = False

    def build_metadata(self, meta: AttentionMetadata) -> AttentionMetadata:
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError


def context_slots(block_table: torch.Tensor, num_tokens: int, block_size: int) -> torch.Tensor:
    """Cache slots of a sequence's first ``num_tokens`` positions."""
    positions = torch.arange(num_tokens, device=block_table.device)
    return block_table[positions // block_size] * block_size + positions % block_size


def visible(query_pos: torch.Tensor, key_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Causal (and optionally sliding-window) mask: may query at query_pos see key_pos?"""
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask &= key_pos > query_pos - sliding_window
    return mask


def get_backend(name: str, device: torch.device):
    """'auto' picks the Triton kernels on CUDA and SDPA elsewhere."""
    from engine.attention import cpu, torch_ref

    backends = {"torch": cpu.SdpaBackend, "sdpa": cpu.SdpaBackend, "reference": torch_ref.ReferenceBackend}
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "triton":
        # Imported only when chosen: Triton fixes at import whether it interprets (CPU tests) or compiles.
        from engine.attention.triton_kernels import TritonBackend

        return TritonBackend()
    if name not in backends:
        raise ValueError(f"attention_backend: unsupported {name!r}; choose one of auto, triton, {', '.join(backends)}")
    return backends[name]()
