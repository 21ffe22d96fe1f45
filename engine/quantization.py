"""Weight-only quantization: the packed formats our CPU kernels read, made from float weights (round to
nearest) or taken exactly from a GGUF file's blocks.

Two formats, both read by PyTorch's own CPU kernels (``engine.models.linear``):
- int8, per output channel, symmetric: ``w = q * scale`` with ``q`` in [-127, 127];
- int4, group-wise with scale and zero point: ``w = (q - 8) * scale + zero`` with ``q`` in [0, 15] and
  one (scale, zero) per ``group_size`` inputs of a row.

GGUF's Q4_0 (``d * (q - 8)``) and Q4_1 (``d * q + m``) blocks of 32 are int4 with group 32, exactly:
zero = 0 and zero = m + 8d. Q8_0 (``d * q``, int8 with one scale per 32) has no group-wise int8 kernel
in PyTorch, so it is kept exact as two int4 planes, ``q = 16 * hi + lo``: ``hi`` with scale 16d and
``lo`` with scale d and zero 8d, read by two int4 matmuls whose sum is the Q8_0 product.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

METHODS = ("int8", "int4")
INT4_GROUP_SIZE = 32  # llama.cpp's block size; torch's int4 kernel takes 32, 64, 128 or 256
KERNEL_DTYPE = torch.bfloat16  # the packed CPU kernels' activations, scales and zeros (their float32 path is scalar)


@dataclass
class QuantizedWeight:
    """A [out, in] weight as integers plus scales: int8 per channel (scale [out], no zero) or int4 group-wise
    (scale and zero [out, in / group_size]). ``planes`` > 1 is a sum of int4 weights (GGUF Q8_0)."""

    bits: int
    q: torch.Tensor  # int8 [out, in] for 8 bits; uint8 [planes, out, in], values 0..15, for 4 bits
    scale: torch.Tensor  # float32 [out] for 8 bits; [planes, out, in / group_size] for 4 bits
    zero: torch.Tensor | None  # like scale, 4 bits only
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape[-2:])

    @property
    def format(self) -> tuple[int, int, int]:
        """What must agree for two weights to be stacked into one matrix."""
        return self.bits, self.group_size, 1 if self.bits == 8 else self.q.shape[0]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight the integers stand for (exactly the file's values for GGUF blocks)."""
        if self.bits == 8:
            return self.q.float() * self.scale[:, None]
        out, cols = self.shape
        groups = self.q.float().view(-1, out, cols // self.group_size, self.group_size) - 8
        planes = groups * self.scale[..., None] + self.zero[..., None]
        return planes.sum(0).view(out, cols)

    def rounded(self) -> QuantizedWeight:
        """The same integers with the scales and zeros the packed kernels see (a GGUF file's are fp16)."""
        return replace(self, scale=to_kernel_dtype(self.scale), zero=None if self.zero is None else to_kernel_dtype(self.zero))

    def rows(self, permute) -> QuantizedWeight:
        """The same weight with its rows reordered by ``permute`` (a function of a rows-first tensor)."""
        def per_row(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return permute(t) if self.bits == 8 else torch.stack([permute(plane) for plane in t])  # 4 bits: planes
        return QuantizedWeight(self.bits, per_row(self.q), per_row(self.scale), per_row(self.zero), self.group_size)


def stack_rows(parts: list[QuantizedWeight]) -> QuantizedWeight | None:
    """Several weights of one format as one matrix (q/k/v into qkv, gate/up into gate_up), or None when
    their formats differ."""
    if len({p.format for p in parts}) != 1:
        return None
    row_dim = 0 if parts[0].bits == 8 else 1  # 4 bits: planes first

    def cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if tensors[0] is None else torch.cat(tensors, dim=row_dim)
    return QuantizedWeight(parts[0].bits, cat([p.q for p in parts]), cat([p.scale for p in parts]),
                           cat([p.zero for p in parts]), parts[0].group_size)


def quantize(weight: torch.Tensor, method: str) -> QuantizedWeight:
    """Round-to-nearest quantization of a float [out, in] weight: int8 per channel (absmax), or int4 per group
    of 32 (min/max, as llama.cpp's Q4_1)."""
    w = weight.detach().float()
    if method == "int8":
        scale = to_kernel_dtype((w.abs().amax(dim=1) / 127).clamp(min=1e-12))
        return QuantizedWeight(8, torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale, None,
                               w.shape[1])
    if method != "int4":
        raise ValueError(f"quantization: unsupported {method!r}; choose one of {', '.join(METHODS)}")
    out, cols = w.shape
    groups = w.view(out, cols // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = to_kernel_dtype(((high - low) / 15).clamp(min=1e-12))
    zero = to_kernel_dtype(low + 8 * scale)  # the value of q = 8
    q = torch.round((groups - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.uint8).view(1, out, cols)
    return QuantizedWeight(4, q, scale[None], zero[None], INT4_GROUP_SIZE)


def to_kernel_dtype(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to what the packed kernels see, kept in float32: quantizing against the rounded scales
    makes the dense weight (``dequantize``) exactly the values the kernels multiply by."""
    return t.to(KERNEL_DTYPE).float()


def can_quantize(shape: tuple[int, int], method: str) -> str | None:
    """Why PyTorch's kernels cannot take a weight of this shape in this format, or None when they can
    (the int8 kernel reads garbage for inputs not a multiple of 16; the int4 packer needs rows by 16)."""
    out, cols = shape
    if method == "int8" and cols % 16:
        return f"{cols} inputs are not a multiple of 16"
    if method == "int4" and (cols % INT4_GROUP_SIZE or out % 16):
        return f"{out} x {cols} is not a multiple of 16 x {INT4_GROUP_SIZE}"
    return None


# Bytes per block of 32 weights: an fp16 scale d (Q4_1: then an fp16 min m), then the quants
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def from_gguf_blocks(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantizedWeight | None:
    """The exact QuantizedWeight of a GGUF tensor in Q4_0, Q4_1 or Q8_0 (``data``: its raw uint8 blocks,
    row by row), or None for another type. Block layouts as in ggml-quants.c."""
    if type_name not in BLOCK_BYTES:
        return None
    out, cols = shape
    blocks = np.ascontiguousarray(data).reshape(out, cols // 32, BLOCK_BYTES[type_name])
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    if type_name == "Q8_0":
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8).astype(np.int16)).view(out, cols)
        hi, lo = torch.div(q, 16, rounding_mode="floor"), q.remainder(16)  # q = 16 * hi + lo, hi in [-8, 7]
        planes = torch.stack([hi + 8, lo]).to(torch.uint8)
        return QuantizedWeight(4, planes, torch.stack([16 * d, d]), torch.stack([torch.zeros_like(d), 8 * d]), 32)
    packed = torch.from_numpy(blocks[..., -16:].copy())  # 16 bytes: elements j (low nibble) and j + 16 (high)
    q = torch.cat([packed & 15, packed >> 4], dim=-1).view(1, out, cols)
    if type_name == "Q4_0":
        return QuantizedWeight(4, q, d[None], torch.zeros_like(d)[None], 32)
    m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    return QuantizedWeight(4, q, d[None], (m + 8 * d)[None], 32)
