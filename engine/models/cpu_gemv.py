"""Weights in the layouts of our AVX2 matrix-vector kernels (engine/kernels/gemv.c): packed, and bf16."""

from __future__ import annotations

import torch

from engine.kernels import eager_only, library
from engine.quantization import QuantizedWeight


def blocks(scales: list[torch.Tensor], payload: torch.Tensor) -> torch.Tensor:
    """Rows of gemv.c's blocks: per group, the bf16 ``scales`` ([out, groups] each), then ``payload``'s
    bytes ([out, groups, bytes])."""
    heads = [s.to(torch.bfloat16).contiguous().view(torch.uint8).view(*s.shape, 2) for s in scales]
    return torch.cat([*heads, payload], dim=-1).contiguous()


class GemvWeight:
    """A QuantizedWeight in gemv.c's layout. int4 of one plane runs as int4; GGUF Q8_0's two planes
    (``q = 16 * hi + lo``, scales 16d and d) and per-channel int8 run as int8 with their exact values."""

    def __init__(self, weight: QuantizedWeight):
        weight = weight.rounded()
        out, cols = weight.shape
        self.out_features = out
        if weight.bits == 4 and weight.q.shape[0] == 1:
            self.bits, self.group_size = 4, weight.group_size
            nibbles = weight.q[0].view(out, cols // 16, 2, 8)  # inputs 16c + i and 16c + 8 + i share a byte
            packed = (nibbles[:, :, 0] | nibbles[:, :, 1] << 4).reshape(out, cols // self.group_size, -1)
            self.blocks = blocks([weight.scale[0], weight.zero[0]], packed)
        elif weight.bits == 8 or self.is_q8_0(weight):
            self.bits = 8
            if weight.bits == 8:  # per channel: one group per row
                self.group_size, q, scale = cols, weight.q, weight.scale[:, None]
            else:
                self.group_size, scale = weight.group_size, weight.scale[1]
                q = ((weight.q[0].to(torch.int16) - 8) * 16 + weight.q[1]).to(torch.int8)
            self.blocks = blocks([scale], q.view(torch.uint8).view(out, cols // self.group_size, self.group_size))
        else:
            raise ValueError(f"gemv.c has no layout for {weight.q.shape[0]} int4 planes")
        self.nbytes = self.blocks.numel()

    @staticmethod
    def is_q8_0(weight: QuantizedWeight) -> bool:
        """Two int4 planes that are exactly one int8 (quantization.from_gguf_blocks' Q8_0)."""
        return (weight.q.shape[0] == 2 and torch.equal(weight.scale[0], 16 * weight.scale[1])
                and not weight.zero[0].any() and torch.equal(weight.zero[1], 8 * weight.scale[1]))

    @staticmethod
    def supports(weight: QuantizedWeight) -> bool:
        return weight.bits == 8 or weight.q.shape[0] == 1 or GemvWeight.is_q8_0(weight.rounded())

    @eager_only
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] (any float dtype) to y [M, N] float32, both bf16-rounded as the packed kernels' are."""
        x = x.float().contiguous()
        y = torch.empty(x.shape[0], self.out_features)
        kernel = library().gemv_int4 if self.bits == 4 else library().gemv_int8
        kernel(x.shape[0], x.shape[1], self.out_features, self.group_size, x.data_ptr(), self.blocks.data_ptr(), y.data_ptr())
        return y


class Bf16Weight:
    """A float32 weight whose every value is a bf16 one (a bf16 checkpoint served in float32, as on CPU by
    default), kept as its bf16 halves for gemv_bf16: the float32 product up to summation order (inputs and
    outputs are not rounded), from half the bytes."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.to(torch.bfloat16).contiguous()
        self.nbytes = self.weight.numel() * 2

    @staticmethod
    def supports(weight: torch.Tensor) -> bool:
        return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.shape[1] % 16 == 0
                and torch.equal(weight, weight.bfloat16().float()))

    @eager_only
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 to y [M, N] float32."""
        x = x.contiguous()
        y = torch.empty(x.shape[0], self.weight.shape[0])
        library().gemv_bf16(x.shape[0], x.shape[1], self.weight.shape[0], x.data_ptr(), self.weight.data_ptr(), y.data_ptr())
        return y
