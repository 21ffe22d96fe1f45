"""Build a model from an HF folder (config via transformers, safetensors weights), a GGUF file, or dummy weights."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from engine.models import model_class
from engine.models.gguf import is_gguf, iter_gguf_weights, load_gguf_config, load_gguf_tokenizer

logger = logging.getLogger(__name__)


def load_config(model_path: str):
    if is_gguf(model_path):
        return load_gguf_config(model_path)
    return AutoConfig.from_pretrained(model_path)


def load_tokenizer(path: str):
    """An HF folder's tokenizer, or the one a GGUF file describes (vocabulary, merges, chat template)."""
    if is_gguf(path):
        return load_gguf_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def load_draft_config(draft_path: str, target_config, target_tokenizer):
    """The draft model's config, after checking it speaks the target's vocabulary: same size, and
    the same token strings when the draft carries a tokenizer of its own."""
    config = load_config(draft_path)
    if config.vocab_size != target_config.vocab_size:
        raise ValueError(f"draft model {draft_path}: vocabulary of {config.vocab_size} tokens, the target's has "
                         f"{target_config.vocab_size}; a draft must share the target's tokenizer")
    try:
        draft_vocab = load_tokenizer(draft_path).get_vocab()
    except (OSError, ValueError):  # no tokenizer files: the config's vocabulary size is all there is to check
        return config
    if draft_vocab != target_tokenizer.get_vocab():
        raise ValueError(f"draft model {draft_path}: its tokenizer's vocabulary differs from the target's; "
                         "a draft must share the target's tokenizer")
    return config


def safetensors_files(model_path: str) -> list[str]:
    """The shard list from the index file, or the single model.safetensors."""
    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_path, s) for s in shards]
    single = os.path.join(model_path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_path}; "
                            "use load_format='dummy' for random weights")


def iter_safetensors(files: list[str], progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    for path in tqdm(files, desc="Loading safetensors shards", unit="shard", disable=not progress):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def init_dummy_weights(model: torch.nn.Module, seed: int, std: float) -> None:
    """Seeded random weights of the right shapes (norm weights stay 1), for benchmarks."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            continue
        values = torch.randn(param.shape, generator=generator) * std
        param.data.copy_(values.to(param.dtype))


def load_model(model_path: str, backend, dtype: torch.dtype, device: torch.device,
               load_format: str = "auto", seed: int = 0, hf_config=None) -> torch.nn.Module:
    config = hf_config or load_config(model_path)
    cls = model_class(config)
    with torch.device(device):
        model = cls(config, backend).to(dtype)
    if load_format == "dummy":
        init_dummy_weights(model, seed, getattr(config, "initializer_range", 0.02))
    elif is_gguf(model_path):
        model.load_weights(iter_gguf_weights(model_path, config))
    else:
        model.load_weights(iter_safetensors(safetensors_files(model_path)))
    for module in model.modules():
        if hasattr(module, "prepare_cpu_half"):
            module.prepare_cpu_half()
    return model.eval()
