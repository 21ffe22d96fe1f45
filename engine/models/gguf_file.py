"""A GGUF file's metadata and tensor table, read in one pass over the memory-mapped header.

Our own reader rather than ``gguf.GGUFReader``: that one builds numpy views for every element of
every array, and SmolLM2's ~100k tokenizer strings alone took it 4-5 s of each start-up. Here string
arrays are only counted (the tokenizer comes from transformers' converter, which reads them itself);
scalars, strings and arrays of scalars are read as Python values. The ``gguf`` package still supplies
the type ids, block sizes and dequantization.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class Strings:
    """A metadata array of strings, skipped over: only its length is kept."""

    count: int


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: the fastest-moving dimension last
    data: np.ndarray  # the file's bytes, uint8 [*shape[:-1], bytes per row] (what gguf.quants and our blocks take)


class GGUFFile:
    def __init__(self, path: str):
        blob = np.memmap(path, mode="r", dtype=np.uint8)
        if bytes(blob[:4]) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (no GGUF magic)")
        version, num_tensors, num_keys = struct.unpack_from("<IQQ", blob, 4)
        if version not in VERSIONS:  # a big-endian file reads as a huge version
            raise ValueError(f"{path}: GGUF version {version} is not supported (little-endian versions 2 and 3 are)")
        self.metadata: dict[str, object] = {}
        pos = 24
        for _ in range(num_keys):
            key, pos = _string(blob, pos)
            (kind,) = struct.unpack_from("<I", blob, pos)
            self.metadata[key], pos = _value(blob, pos + 4, kind, f"{path}: metadata key {key!r}")
        table = []
        for _ in range(num_tensors):
            name, pos = _string(blob, pos)
            (num_dims,) = struct.unpack_from("<I", blob, pos)
            dims = struct.unpack_from(f"<{num_dims}Q", blob, pos + 4)
            type_id, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * num_dims)
            pos += 4 + 8 * num_dims + 12
            table.append((name, tuple(reversed(dims)), type_id, offset))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-pos // alignment) * alignment
        self.tensors = [self._tensor(blob, path, data_start, *entry) for entry in table]

    @staticmethod
    def _tensor(blob: np.ndarray, path: str, data_start: int, name: str, shape: tuple[int, ...], type_id: int,
                offset: int) -> GGUFTensor:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise ValueError(f"{path}: tensor {name!r} has ggml type {type_id}, which the gguf package does not know") from None
        block_size, block_bytes = GGML_QUANT_SIZES[qtype]
        row_bytes = shape[-1] // block_size * block_bytes
        rows = math.prod(shape[:-1])
        start = data_start + offset
        if start + rows * row_bytes > len(blob):
            raise ValueError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
        return GGUFTensor(name, qtype, shape, blob[start:start + rows * row_bytes].reshape(*shape[:-1], row_bytes))


def _string(blob: np.ndarray, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    return bytes(blob[pos + 8:pos + 8 + length]).decode("utf-8"), pos + 8 + length


def _value(blob: np.ndarray, pos: int, kind: int, where: str) -> tuple[object, int]:
    """One metadata value and the offset just past it."""
    if kind in SCALAR_FORMATS:
        fmt = "<" + SCALAR_FORMATS[kind]
        return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
    if kind == STRING:
        return _string(blob, pos)
    if kind == ARRAY:
        item, count = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if item in SCALAR_FORMATS:
            fmt = f"<{count}{SCALAR_FORMATS[item]}"
            return list(struct.unpack_from(fmt, blob, pos)), pos + struct.calcsize(fmt)
        if item == STRING:
            for _ in range(count):
                pos += 8 + struct.unpack_from("<Q", blob, pos)[0]
            return Strings(count), pos
        raise ValueError(f"{where}: arrays of value type {item} are not read")
    raise ValueError(f"{where}: value type {kind} is not read")
