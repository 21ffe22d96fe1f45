"""Engine configuration: what the user asks for, validated, plus what follows from it."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from engine.quantization import METHODS as QUANTIZATION_METHODS

MAX_LORA_RANK = 256

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}


def parse_memory(value: int | str) -> int:
    """'2GiB', '512MiB', '1.5GB' or a plain byte count -> bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"kv_cache_memory: cannot parse {value!r} (use e.g. '2GiB', '512MiB' or bytes)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU (exact, and as fast as bf16 for small-batch matmuls here), bfloat16 on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype: unsupported {dtype!r}; choose one of auto, float32, bfloat16, float16")
    return DTYPES[dtype]


# Most draft tokens per step: grammar matchers keep this many tokens of rollback, and KV tables,
# CUDA graphs and the CPU's batched attention leave room for them.
MAX_SPECULATIVE_TOKENS = 16


def head_dim(hf_config) -> int:
    """Per-head size: the config's own ``head_dim`` when it has one (Qwen3, Gemma), else hidden / heads."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


@dataclass
class SpeculativeConfig:
    """Speculative decoding: a proposer drafts up to ``num_speculative_tokens`` tokens per request and
    the target checks them all in one forward pass (engine.speculative)."""

    method: str = "draft"  # "draft": a smaller model with the same vocabulary; "ngram": prompt lookup
    draft_model: str | None = None
    num_speculative_tokens: int = 4
    ngram_max: int = 4  # n-gram lookup tries the longest suffix first
    ngram_min: int = 1
    # Measure what a draft step and a verify step cost and how often drafts are accepted, and draft
    # only as many tokens per step (possibly none) as pay for themselves.
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.method not in ("draft", "ngram"):
            raise ValueError(f"speculative_method: unsupported {self.method!r}; choose draft or ngram")
        self.draft_model = str(self.draft_model) if self.draft_model else None  # a Path is welcome too
        if self.method == "draft" and not self.draft_model:
            raise ValueError("speculative_method draft needs a draft model (--draft-model PATH)")
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], "
                             f"got {self.num_speculative_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"ngram_min and ngram_max must satisfy 1 <= ngram_min <= ngram_max, "
                             f"got {self.ngram_min} and {self.ngram_max}")


@dataclass
class EngineConfig:
    model: str
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    device: str = "auto"
    load_format: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    # KV cache size; None: 2GiB on CPU, and on CUDA whatever gpu_memory_utilization leaves after the
    # weights and the largest step's activations (engine.gpu_memory).
    kv_cache_memory: int | str | None = None
    gpu_memory_utilization: float = 0.9  # the share of the GPU's memory this engine may take
    max_num_seqs: int = 64
    # Tokens per step (decodes plus prefill chunks); None: 128 on CPU, 2048 on GPU. On CPU each
    # prefill token adds ~1.8 ms to a step, so a bigger budget stalls every running stream: with 16
    # streams, 512 gave ITL p99/p50 = 6, 128 gave 2.7 at the same throughput and lower TTFT.
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    attention_backend: str = "auto"
    # torch.compile the decode step: fuses the small per-layer ops (norms, RoPE, SwiGLU), which on CPU
    # cut bench-135m's decode step from ~44 to ~28 ms, for a one-off compile of a minute or two at start.
    compile: bool = False
    # CUDA graphs off: every step launches its kernels from Python (debugging, or to compare).
    enforce_eager: bool = False
    # Weight-only quantization of the linear layers (engine.quantization): "int8" or "int4" (round to
    # nearest at load), "gguf" (a GGUF file's Q4_0/Q4_1/Q8_0 blocks as they are), "none"; None: "gguf"
    # for a .gguf file on CPU, else "none". Packed kernels serve the small batches of decoding; larger
    # ones run from the dense weight, kept for them (engine.models.linear).
    quantization: str | None = None
    # Append the tokens a grammar forces (e.g. the next JSON key) without sampling them one step each.
    enable_jump_forward: bool = True
    # Grammar compiles run in this many worker processes, each compile bounded in CPU seconds
    # (engine.grammar_worker); a compile over the bound is the client's 400.
    structured_output_workers: int = 1
    structured_output_compile_timeout: float = 5.0
    speculative: SpeculativeConfig | None = None
    # Default sampling parameters: "auto" from the model's generation_config.json (as vLLM), "vllm"
    # none (SamplingParams' own defaults), or another folder's generation_config.json.
    generation_config: str = "auto"
    # LoRA adapters (engine.lora): requests may name one; ``max_loras`` of them run at once (slots of
    # rank up to ``max_lora_rank``), ``max_cpu_loras`` (None: max_loras) stay loaded on the host.
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy", "safetensors"):
            raise ValueError(f"load_format: unsupported {self.load_format!r}; choose auto, safetensors or dummy")
        if self.quantization not in (None, "none", "gguf", *QUANTIZATION_METHODS):
            raise ValueError(f"quantization: unsupported {self.quantization!r}; choose none, gguf, "
                             f"{', '.join(QUANTIZATION_METHODS)}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.structured_output_workers < 1 or not self.structured_output_compile_timeout > 0:
            raise ValueError("structured_output_workers must be >= 1 and structured_output_compile_timeout > 0")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not 1 <= self.max_lora_rank <= MAX_LORA_RANK:
            raise ValueError(f"max_lora_rank must be in [1, {MAX_LORA_RANK}], got {self.max_lora_rank}")
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        self.max_cpu_loras = self.max_cpu_loras or self.max_loras
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        self.torch_device = resolve_device(self.device)
        planned = self.kv_cache_memory is None and self.torch_device.type == "cuda"
        self.kv_cache_bytes = None if planned else parse_memory(self.kv_cache_memory or "2GiB")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = 2048 if self.torch_device.type == "cuda" else 128
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        self.torch_dtype = resolve_dtype(self.dtype, self.torch_device)
