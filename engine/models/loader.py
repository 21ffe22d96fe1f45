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
from engine.models.linear import Linear, plan_linear_kernels
from engine.models.llama import FUSED
from engine.quantization import QuantizedWeight, can_quantize, quantize, stack_rows

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


def quantization_for(model_path: str, requested: str | None, device: torch.device) -> str | None:
    """What a model is served as: ``requested`` (int8, int4, gguf, none) or, by default, a GGUF file
    packed as its blocks are (on CPU) and anything else as it is."""
    method = requested or ("gguf" if is_gguf(model_path) and device.type == "cpu" else "none")
    if method == "gguf" and not is_gguf(model_path):
        raise ValueError(f"quantization gguf: {model_path} is not a .gguf file")
    return None if method == "none" else method


def quantize_linears(model: torch.nn.Module, method: str, file_weights: dict[str, QuantizedWeight]) -> None:
    """Give every Linear its packed form: the file's own blocks for ``gguf`` (a fused matrix only when all
    its parts share one packed format), round-to-nearest int8/int4 of the loaded weight otherwise; the
    dense weight becomes the packed one's value (so a tied embedding is quantized too, as in llama.cpp).
    Layers PyTorch's kernels cannot take stay dense; the log says which, and why."""
    fused_parts = {}
    for fragment, (fused, _) in FUSED.items():
        fused_parts.setdefault(fused, []).append(fragment)
    tied = getattr(model, "tie_word_embeddings", False)
    dense, packed_bytes = {}, 0
    for name, layer in model.named_modules():
        if not isinstance(layer, Linear):
            continue
        if method == "gguf":
            prefix, dot, leaf = name.rpartition(".")
            parts = [f"{prefix}{dot}{fragment}.weight" for fragment in fused_parts.get(leaf, [leaf])]
            if name == "lm_head" and tied:
                parts = ["model.embed_tokens.weight"]
            found = [file_weights.get(part) for part in parts]
            weight = stack_rows(found) if all(found) else None
            reason = "not stored in a packed GGUF type" if weight is None else \
                can_quantize(weight.shape, f"int{weight.bits}")
        else:
            shape = tuple(layer.weight.shape)
            chosen = next((m for m in (method, "int8") if can_quantize(shape, m) is None), None)
            reason = None if chosen else can_quantize(shape, method)
            if chosen and chosen != method:
                logger.info("%s: %s, so int8 instead of %s", name, can_quantize(shape, method), method)
            weight = quantize(layer.weight, chosen) if chosen else None
        if reason:
            dense[name] = reason
            continue
        layer.set_quantized(weight)
        packed_bytes += layer.packed.nbytes
    logger.info("quantization %s: %.1f MB of packed weights in %d layers%s", method, packed_bytes / 1e6,
                sum(isinstance(m, Linear) and m.packed is not None for m in model.modules()),
                "".join(f"; {name} dense ({why})" for name, why in list(dense.items())[:8]))


def load_model(model_path: str, backend, dtype: torch.dtype, device: torch.device,
               load_format: str = "auto", seed: int = 0, hf_config=None, quantization: str | None = None,
               max_rows: int = 128) -> torch.nn.Module:
    """The model with its weights, its linear layers packed as ``quantization`` says (quantization_for) and
    each one's CPU kernel per row count chosen by measurement, up to ``max_rows`` (the step's token budget)."""
    config = hf_config or load_config(model_path)
    method = quantization_for(model_path, quantization, device)
    cls = model_class(config)
    with torch.device(device):
        model = cls(config, backend).to(dtype)
    file_weights: dict[str, QuantizedWeight] = {}
    if load_format == "dummy":
        init_dummy_weights(model, seed, getattr(config, "initializer_range", 0.02))
    elif is_gguf(model_path):
        model.load_weights(iter_gguf_weights(model_path, config, file_weights if method == "gguf" else None))
    else:
        model.load_weights(iter_safetensors(safetensors_files(model_path)))
    if method == "gguf" and not file_weights:
        method = None  # dummy weights, or a file of float / K-quant tensors only: nothing to pack exactly
        logger.info("%s: no Q4_0 / Q4_1 / Q8_0 tensors, served dequantized", model_path)
    if method:
        if device.type != "cpu":
            raise ValueError(f"quantization {method}: packed weights are served on CPU only (PyTorch's packed "
                             "CPU kernels); on CUDA serve the model unquantized")
        quantize_linears(model, method, file_weights)
    plan_linear_kernels(model, max_rows)
    return model.eval()
