"""Our own CPU kernels, in C (gemv.c: matrix-vector products of packed and of bf16 weights; attention.c: decode attention
over the paged KV cache; layers.c: fused residual add + RMSNorm, the rotary embedding, SiLU-and-multiply), built with the system's C compiler at first use and called through ctypes.

A plain C library, not a PyTorch extension: it compiles in about a second (a C++ extension's headers take
~40 s), and it needs nothing from torch but data pointers. Built with ``-fopenmp`` it shares the OpenMP
runtime torch has already loaded (the same ``libgomp.so.1``), so its threads are torch's threads. The
build is cached under ``$KVSERVE_CACHE`` (default ``~/.cache/kvserve``) by a hash of the sources and
flags. Without AVX2, on another architecture or without a compiler, ``library()`` is None (logged once)
and the callers keep PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("gemv.c", "attention.c", "layers.c"))
# No implicit FMA contraction: scalar code rounds as PyTorch's ops do (explicit _mm256_fmadd_ps stays fused).
FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
I64, PTR, F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
SIGNATURES = {"gemv_int4": [I64, I64, I64, I64, PTR, PTR, PTR], "gemv_int8": [I64, I64, I64, I64, PTR, PTR, PTR],
              "gemv_bf16": [I64, I64, I64, PTR, PTR, PTR],
              "paged_decode_attention": [I64, I64, I64, I64, I64, I64, F32, PTR, PTR, PTR, PTR, PTR, PTR],
              "add_rms_norm": [I64, I64, PTR, PTR, PTR, F32, PTR], "rope_rotate_half": [I64, I64, I64, I64, PTR, PTR, PTR],
              "silu_mul": [I64, I64, PTR, PTR]}


def eager_only(fn):
    """``fn`` (a ctypes call) as it is in eager mode; under torch.compile, behind a graph break, since dynamo
    cannot trace into C. (``torch.compiler.disable`` alone would add ~1 us to every eager call; it is made
    at the first compiled call, since making it imports dynamo, and with it Triton, which must not happen
    at import: the interpreter tests set Triton's mode before they import it.)"""
    disabled = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)
    return call


def cache_dir() -> Path:
    return Path(os.environ.get("KVSERVE_CACHE") or Path.home() / ".cache" / "kvserve") / "kernels"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run (the reason is logged)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        logger.info("own CPU kernels: off (they need x86-64 with AVX2; this CPU: %s %s)", platform.machine(),
                    torch.backends.cpu.get_cpu_capability())
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("own CPU kernels: off (no C compiler found; set CC); PyTorch's kernels serve instead")
        return None
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES) + " ".join(FLAGS).encode())
    path = cache_dir() / f"kvserve-{digest.hexdigest()[:16]}.so"
    if not path.exists():
        try:
            build(compiler, path)
        except (OSError, subprocess.CalledProcessError) as exc:
            logger.warning("own CPU kernels: off (building them failed: %s)", getattr(exc, "stderr", None) or exc)
            return None
    lib = ctypes.CDLL(str(path))
    for name, argtypes in SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
    return lib


def build(compiler: str, path: Path) -> None:
    """Compile into a temporary file beside ``path`` and rename it there, so that servers starting at once
    never load a half-written library."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
