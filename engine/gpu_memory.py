"""GPU memory planning: how many KV blocks fit beside the weights and the activations.

The KV cache takes what is left of the engine's share of the GPU (``gpu_memory_utilization`` of its
total memory) once the weights, the peak activation memory of the largest step the scheduler can
produce, and the memory held outside PyTorch's allocator (the CUDA context, cuBLAS workspaces,
other processes) are subtracted. The peak comes from running that step, not from a formula: a
profile step of ``max_num_batched_tokens`` tokens over ``max_num_seqs`` sequences, each sampling,
so the logits and the sampler's softmax and sort of the whole vocabulary are in it too. CUDA graphs
are captured afterwards; their small pools come out of the remaining headroom.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

logger = logging.getLogger(__name__)

GiB = 2**30


@dataclass
class MemoryProfile:
    total: int  # the device's memory
    peak_torch: int  # the most PyTorch's allocator held at once: weights plus the largest step
    non_torch: int  # used on the device outside PyTorch's allocator

    def kv_cache_bytes(self, utilization: float) -> int:
        """What the KV cache may take; negative when the weights and activations alone exceed the share."""
        return int(self.total * utilization) - self.peak_torch - self.non_torch

    def describe(self, utilization: float) -> str:
        return (f"{utilization:.2f} x {self.total / GiB:.1f} GiB; weights and peak activations "
                f"{self.peak_torch / GiB:.2f} GiB, outside PyTorch {self.non_torch / GiB:.2f} GiB")


def profile(step: Callable[[], None], device: torch.device) -> MemoryProfile:
    """Run ``step`` (the largest step, on the loaded models) and measure the device's memory."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return MemoryProfile(total=total, peak_torch=torch.cuda.max_memory_allocated(device),
                         non_torch=total - free - torch.cuda.memory_reserved(device))


def plan_num_blocks(memory: MemoryProfile, utilization: float, block_bytes: int) -> int:
    """KV blocks for the planned budget; a clear error when not even one fits."""
    budget = memory.kv_cache_bytes(utilization)
    if budget < block_bytes:
        raise ValueError(f"gpu_memory_utilization {utilization} leaves no memory for the KV cache "
                         f"({memory.describe(utilization)}); raise gpu_memory_utilization or lower "
                         f"max_num_batched_tokens or max_num_seqs")
    logger.info("GPU memory: %s -> KV cache %.2f GiB", memory.describe(utilization), budget / GiB)
    return budget // block_bytes
