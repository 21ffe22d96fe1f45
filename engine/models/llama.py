"""Llama-family decoder-only models (Llama 2/3, Qwen2/2.5, Mistral, SmolLM) on a flat token layout.

Every tensor is ``[num_tokens, ...]`` for the whole batch, with no padding: sequences are told
apart only by the attention metadata. Parameter names follow Hugging Face's, except that q/k/v
and gate/up are fused into one matrix each (fewer, larger matmuls); ``load_weights`` maps them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine import kernels
from engine.attention import AttentionMetadata
from engine.config import head_dim
from engine.models.linear import Linear

# HF name fragment -> (our fused parameter, index of the shard inside it)
FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def rope_parameters(config) -> dict:
    """transformers 5 keeps them in ``rope_parameters``; older configs in rope_theta/rope_scaling."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return params


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin for every position, rotate-half (GPT-NeoX / HF) layout."""

    STATIC_TYPES = ("default", "linear", "llama3", "yarn")

    def __init__(self, config, head_dim: int, max_positions: int):
        super().__init__()
        params = rope_parameters(config)
        rope_type = params.get("rope_type", "default")
        if rope_type not in self.STATIC_TYPES:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(self.STATIC_TYPES)}")
        if rope_type == "default":
            base = params["rope_theta"]
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        factors = getattr(config, "rope_freq_factors", None)  # llama.cpp's rope_freqs (Llama 3.1+ GGUF files)
        if factors is not None:
            inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float)
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for the batch's positions, [num_tokens, 1, head_dim]; computed once per step."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def native_cpu(x: torch.Tensor):
    """engine/kernels' library where it serves ``x`` (float32 on CPU, eager; compiled code keeps torch's
    ops so that inductor can fuse them), else None."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.compiler.is_compiling():
        return None
    return kernels.library()


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual stream's add fused with the norm that follows
        it. On CPU in float32 one call to layers.c does both, adding into ``residual`` in place."""
        lib = native_cpu(x)
        if lib is None:
            if residual is not None:
                x = x + residual
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps), x
        x = x.contiguous()
        out = torch.empty_like(x)
        lib.add_rms_norm(x.numel() // x.shape[-1], x.shape[-1], x.data_ptr(),
                         None if residual is None else residual.data_ptr(), self.weight.data_ptr(), self.eps, out.data_ptr())
        return out, x if residual is None else residual


class Attention(nn.Module):
    def __init__(self, config, backend, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=o_bias)
        self.shard_sizes = {"qkv_proj": (self.q_size, self.kv_size, self.kv_size)}
        self.backend = backend

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        n = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        lib = native_cpu(qkv)
        if lib is None:
            qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
            qk = apply_rope(qk.view(n, self.num_heads + self.num_kv_heads, self.head_dim), rope)  # q and k in one go
        else:  # rotated in place by layers.c
            qkv = qkv.contiguous()
            lib.rope_rotate_half(n, self.num_heads + self.num_kv_heads, self.head_dim, qkv.shape[1], qkv.data_ptr(),
                                 rope[0].data_ptr(), rope[1].data_ptr())
            qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
            qk = qk.view(n, self.num_heads + self.num_kv_heads, self.head_dim)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        self.backend.write_kv(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
        out = self.backend.forward(q, kv_cache[0], kv_cache[1], meta)
        return self.o_proj(out.reshape(n, self.q_size))


class MLP(nn.Module):
    def __init__(self, config, bias: bool):
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * inter, bias=bias)
        self.down_proj = Linear(inter, config.hidden_size, bias=bias)
        self.shard_sizes = {"gate_up_proj": (inter, inter)}
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        lib = native_cpu(gate_up)
        if lib is None:
            gate, up = gate_up.chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        gate_up = gate_up.contiguous()
        act = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
        lib.silu_mul(act.shape[0], act.shape[1], gate_up.data_ptr(), act.data_ptr())  # layers.c
        return self.down_proj(act)


class DecoderLayer(nn.Module):
    def __init__(self, config, backend, qkv_bias: bool, o_bias: bool, mlp_bias: bool):
        super().__init__()
        self.self_attn = Attention(config, backend, qkv_bias, o_bias)
        self.mlp = MLP(config, mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, rope, hidden, residual, kv_cache, meta):
        """One layer on (its input's delta, the residual stream so far): returns the same pair for the next,
        so that each residual add runs fused with the norm after it (the first layer has no residual yet)."""
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden, residual = self.post_attention_layernorm(self.self_attn(rope, hidden, kv_cache, meta), residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, backend, qkv_bias: bool, o_bias: bool, mlp_bias: bool):
        super().__init__()
        self.rotary = RotaryEmbedding(config, head_dim(config), config.max_position_embeddings)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, backend, qkv_bias, o_bias, mlp_bias) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, kv_caches, meta):
        hidden, residual = self.embed_tokens(input_ids), None
        cos, sin = self.rotary(positions)
        rope = (cos.to(hidden.dtype), sin.to(hidden.dtype))
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(rope, hidden, residual, kv_cache, meta)
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    qkv_bias_default = False

    def __init__(self, config, backend):
        super().__init__()
        self.config = config
        attention_bias = getattr(config, "attention_bias", self.qkv_bias_default)
        self.model = LlamaModel(config, backend, qkv_bias=attention_bias or self.qkv_bias_default,
                                o_bias=attention_bias and not self.qkv_bias_default,
                                mlp_bias=getattr(config, "mlp_bias", False))
        self.tie_word_embeddings = getattr(config, "tie_word_embeddings", False)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def sliding_window(self) -> int | None:
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into our (partly fused) parameters; every parameter must be covered."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded: dict[str, set[int]] = {}  # parameter -> shards copied
        for name, tensor in weights:
            if "rotary_emb" in name or (self.tie_word_embeddings and name == "lm_head.weight"):
                continue
            fragment = next((f for f in FUSED if f".{f}." in name), None)
            if fragment is None:
                if name not in params:
                    raise ValueError(f"unexpected weight {name!r} in checkpoint")
                params[name].data.copy_(tensor)
                loaded.setdefault(name, set()).add(0)
                continue
            fused, shard = FUSED[fragment]
            target = name.replace(fragment, fused)
            sizes = modules[target.rsplit(".", 2)[0]].shard_sizes[fused]
            params[target].data.narrow(0, sum(sizes[:shard]), sizes[shard]).copy_(tensor)
            loaded.setdefault(target, set()).add(shard)
        missing = [name for name in params if len(loaded.get(name, ())) < self._num_shards(name, modules)]
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(missing[:8])}")

    @staticmethod
    def _num_shards(name: str, modules: dict[str, nn.Module]) -> int:
        parts = name.split(".")
        owner = modules[".".join(parts[:-2])]
        return len(getattr(owner, "shard_sizes", {}).get(parts[-2], (None,)))


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: biases on q/k/v (not on o_proj)."""

    qkv_bias_default = True

    def __init__(self, config, backend):
        if getattr(config, "use_sliding_window", False):
            raise ValueError("Qwen2 with use_sliding_window=True is not supported")
        super().__init__(config, backend)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama plus an optional sliding attention window."""

    @property
    def sliding_window(self) -> int | None:
        return getattr(self.config, "sliding_window", None)
