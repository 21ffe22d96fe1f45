"""GGUF files (llama.cpp's single-file format) for the Llama family: config, tokenizer and weights.

The config comes from the file's metadata keys (llama.cpp's names mapped to Hugging Face's), the
tokenizer (with its chat template) from transformers' GGUF tokenizer converter, the header from
engine.models.gguf_file, and the weights through the ``gguf`` package: every tensor is dequantized
once at load and renamed to Hugging Face's names, so the models' ``load_weights`` takes them exactly
like a safetensors checkpoint; the blocks our packed kernels read exactly (Q4_0, Q4_1, Q8_0) are kept
as well (engine.quantization).

We build the config ourselves rather than through ``AutoConfig.from_pretrained(gguf_file=...)``:
transformers parses the whole metadata (100k tokenizer strings) again for it, ~7 s for SmolLM2.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator

import gguf
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerFast

from engine.models.gguf_file import GGUFFile
from engine.quantization import QuantizedWeight, from_gguf_blocks

# general.architecture -> (transformers model_type, our model class). llama.cpp writes Llama 2/3,
# Mistral and SmolLM files as "llama"; a file that says "mistral" gets its sliding window.
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "mistral": ("mistral", "MistralForCausalLM"),
                 "qwen2": ("qwen2", "Qwen2ForCausalLM")}
# llama.cpp applies RoPE to interleaved pairs for these, so its converter reorders the q/k rows
ROPE_PERMUTED = {"llama", "mistral"}
# What gguf.quants dequantizes in numpy: plain floats, the legacy block types and the k-quants.
SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}

# metadata key below "<architecture>." -> HF config field
CONFIG_KEYS = {"context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
               "embedding_length": "hidden_size", "feed_forward_length": "intermediate_size",
               "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
               "attention.key_length": "head_dim", "attention.layer_norm_rms_epsilon": "rms_norm_eps",
               "attention.sliding_window": "sliding_window", "rope.freq_base": "rope_theta"}
REQUIRED_KEYS = ["context_length", "block_count", "embedding_length", "feed_forward_length",
                 "attention.head_count", "attention.layer_norm_rms_epsilon"]
TOKEN_ID_KEYS = {"bos_token_id": "tokenizer.ggml.bos_token_id", "eos_token_id": "tokenizer.ggml.eos_token_id",
                 "pad_token_id": "tokenizer.ggml.padding_token_id"}

GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}
LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
ROPE_FREQS = "rope_freqs.weight"


def is_gguf(path: str) -> bool:
    return path.endswith(".gguf") and os.path.isfile(path)


def open_gguf(path: str) -> GGUFFile:
    """A reader for a file we can serve: an unsupported architecture, tensor type or tensor, or scaled
    RoPE, is a ValueError naming it, raised before anything is built."""
    return _open_gguf(os.path.abspath(path), os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _open_gguf(path: str, mtime_ns: int) -> GGUFFile:
    """Cached because a load asks twice (config, then weights); the modification time in the key makes
    a rewritten file parse again."""
    reader = GGUFFile(path)
    arch = reader.metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    unsupported = {t.type.name for t in reader.tensors} - SUPPORTED_TYPES
    if unsupported:
        raise ValueError(f"{path}: GGUF tensor type(s) {', '.join(sorted(unsupported))} not supported; "
                         f"supported: {', '.join(sorted(SUPPORTED_TYPES))}")
    # RoPE scaling by metadata (rope.scaling.*: linear, yarn) is not in the config we build, so serving
    # such a file would silently change every attention score. Llama 3.1+'s per-frequency factors
    # (the rope_freqs tensor) are.
    if reader.metadata.get(f"{arch}.rope.scaling.type", "none") != "none":
        raise ValueError(f"{path}: GGUF files with rope.scaling metadata are not supported")
    for tensor in reader.tensors:
        if tensor.name != ROPE_FREQS:
            hf_name(tensor.name)
    return reader


def load_gguf_config(path: str) -> PretrainedConfig:
    """The HF config the metadata describes (the keys transformers' own GGUF loader reads)."""
    reader = open_gguf(path)
    metadata = reader.metadata
    arch = metadata["general.architecture"]
    model_type, model_class = ARCHITECTURES[arch]
    missing = [f"{arch}.{key}" for key in REQUIRED_KEYS if f"{arch}.{key}" not in metadata]
    if missing:
        raise ValueError(f"{path}: GGUF metadata lacks {', '.join(missing)}")
    fields = {field: metadata.get(f"{arch}.{key}") for key, field in CONFIG_KEYS.items()}
    fields |= {field: metadata.get(key) for field, key in TOKEN_ID_KEYS.items()}
    fields = {field: value for field, value in fields.items() if value is not None}
    fields.setdefault("num_key_value_heads", fields["num_attention_heads"])
    fields.setdefault("sliding_window", None)  # none in the file means full attention, not a class default
    fields["vocab_size"] = metadata.get(f"{arch}.vocab_size") or metadata["tokenizer.ggml.tokens"].count
    # llama.cpp writes no output matrix when it is the embedding matrix
    fields["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    # Llama 3.1+: RoPE frequency i is divided by factor i (llama.cpp's form of the llama3 scaling)
    fields |= {"rope_freq_factors": gguf.quants.dequantize(t.data, t.type).tolist()
               for t in reader.tensors if t.name == ROPE_FREQS}
    return AutoConfig.for_model(model_type, architectures=[model_class], **fields)


def load_gguf_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """The tokenizer the metadata describes: vocabulary, merges, special tokens and chat template.
    Built as the generic fast tokenizer: AutoTokenizer would first rebuild the whole config from
    the file (seconds) only to choose a class that converts the same metadata."""
    folder, name = os.path.split(os.path.abspath(path))
    return PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name)


def hf_name(gguf_name: str) -> tuple[str, str]:
    """(HF parameter name, GGUF tensor kind) for a GGUF tensor name, e.g. blk.3.attn_q.weight ->
    (model.layers.3.self_attn.q_proj.weight, attn_q)."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.{suffix}", base
    match = LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match[2] not in LAYER_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no counterpart in our Llama-family models")
    return f"model.layers.{match[1]}.{LAYER_NAMES[match[2]]}.{match[3]}", match[2]


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute`` in convert_hf_to_gguf.py: per head, it moves HF's rotate-half
    pairs (i, i + head_dim/2) to adjacent rows (2i, 2i + 1); this moves them back."""
    return weight.reshape(num_heads, -1, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def iter_gguf_weights(path: str, config, packed: dict[str, QuantizedWeight] | None = None,
                      progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every tensor of the file, dequantized and with q/k rows restored.
    With ``packed``, the Q4_0 / Q4_1 / Q8_0 tensors are also put there as they are in the file (exact
    integers and scales), for the packed kernels; the float tensor is then their dequantized value."""
    reader = open_gguf(path)
    permuted = reader.metadata["general.architecture"] in ROPE_PERMUTED
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for tensor in tqdm(reader.tensors, desc="Loading GGUF tensors", unit="tensor", disable=not progress):
        if tensor.name == ROPE_FREQS:  # part of the config (load_gguf_config), not a weight
            continue
        name, kind = hf_name(tensor.name)
        unpermute = functools.partial(unpermute_rope_rows, num_heads=heads[kind]) if permuted and kind in heads \
            else None
        blocks = from_gguf_blocks(tensor.data, tensor.type.name, tensor.shape) \
            if packed is not None and len(tensor.shape) == 2 else None
        if blocks is not None:
            packed[name] = blocks.rows(unpermute) if unpermute else blocks
            yield name, packed[name].dequantize()
            continue
        values = gguf.quants.dequantize(tensor.data, tensor.type)
        weight = torch.from_numpy(values if values.flags.writeable else values.copy())
        yield name, unpermute(weight) if unpermute else weight
