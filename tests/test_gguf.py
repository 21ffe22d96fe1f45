"""GGUF loading: a real Q4_1 chat model against transformers' own GGUF loader, and small written files
for dequantization, llama.cpp's q/k row order and the unsupported cases."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.models.gguf import iter_gguf_weights
from engine.models.gguf_file import GGUFFile, Strings

Q = gguf.GGMLQuantizationType

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three fruits that are red.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a tip for learning to play the guitar.",
    "Why do leaves change colour in autumn?",
]
TEXT = (
    "The history of the printing press begins in the middle of the fifteenth century, when Johannes "
    "Gutenberg, a goldsmith from Mainz, combined several existing technologies into a single system for "
    "producing books. Movable metal type, an oil-based ink and a wooden press adapted from those used to "
    "make wine allowed a small workshop to print hundreds of copies of a page in a day. Before this, books "
    "in Europe were copied by hand, usually by monks or professional scribes, and a single Bible could take "
    "years to finish. The new method spread quickly: by the year 1500, printing shops were working in more "
    "than two hundred cities, and millions of books had been produced. Prices fell, literacy rose, and ideas "
    "moved across borders faster than ever before. Scholars could compare identical copies of a text, which "
    "made it easier to correct errors and to build on each other's work. Many historians believe that the "
    "printing press played an important part in the Renaissance, the Reformation and the scientific revolution."
)


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    folder, name = os.path.split(smollm2_gguf)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(smollm2_float32):
    return smollm2_float32


def test_config_equals_transformers(llm, hf_model):
    ours, ref = llm.engine.hf_config, hf_model.config
    fields = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "rms_norm_eps", "rope_parameters", "max_position_embeddings", "vocab_size",
              "tie_word_embeddings", "bos_token_id", "eos_token_id"]
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(ref, f) for f in fields}
    assert llm.engine.eos_token_ids == {2}  # <|im_end|>, which ends a ChatML turn


def test_greedy_chat_equals_transformers_generate(llm, hf_model):
    tok = llm.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": chat}], add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False) for chat in CHATS]
    outs = llm.generate(prompt_token_ids=prompts,
                        sampling_params=SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    for ids, out in zip(prompts, outs):
        # an explicit mask: generate() would infer one that hides the prompt's <|im_end|> (= pad id)
        ref = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=32, do_sample=False, eos_token_id=None)
        assert out.token_ids == ref[0, len(ids):].tolist(), tok.decode(ids)
    assert "Paris" in outs[0].text  # a real chat model, not just two equal wrong ones


def test_perplexity_equals_transformers(llm, hf_model):
    ids = llm.tokenizer.encode(TEXT)
    assert 150 <= len(ids) <= 250
    out = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    ours = math.exp(-sum(lp.logprob for lp in out.prompt_logprobs[1:]) / (len(ids) - 1))
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0, :-1].float()
    ref = math.exp(F.cross_entropy(logits, torch.tensor(ids[1:])).item())
    assert ours == pytest.approx(ref, rel=1e-3)
    assert ours < 30  # English prose, read by a working model


def write_gguf(path, arch: str, tensors: dict[str, tuple[np.ndarray, Q]], metadata: dict | None = None) -> str:
    """A GGUF file with an architecture, these tensors (already in their stored form) and metadata
    (key -> str, int or float)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        add = {str: writer.add_string, int: writer.add_uint32, float: writer.add_float32}[type(value)]
        add(key, value)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj/k_proj rows of Llama-architecture models."""
    head_rows = weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
    return head_rows.swapaxes(1, 2).reshape(weight.shape)


HF_NAMES = {"blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
            "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
            "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
            "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
            "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
            "token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}
HEADS = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2)
# stored type -> (tensor it is written as, largest relative RMS error of its round trip)
ROUND_TRIPS = {Q.F16: ("blk.0.attn_v.weight", 1e-3), Q.BF16: ("blk.0.attn_output.weight", 5e-3),
               Q.Q8_0: ("blk.0.ffn_gate.weight", 1e-2), Q.Q5_0: ("blk.0.ffn_up.weight", 0.05),
               Q.Q5_1: ("blk.0.ffn_down.weight", 0.05), Q.Q4_0: ("token_embd.weight", 0.1),
               Q.Q4_1: ("output.weight", 0.1)}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_weights_dequantized_renamed_and_rope_rows_restored(arch, tmp_path):
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((32, 64), np.float32), rng.standard_normal((16, 64), np.float32)  # 4 and 2 heads of 8
    originals = {qtype: rng.standard_normal((16, 64), np.float32) for qtype in ROUND_TRIPS}
    # llama.cpp permutes q/k only for Llama-architecture files (Qwen2 runs its RoPE in HF's layout)
    stored_q, stored_k = (llama_cpp_permute(q, 4), llama_cpp_permute(k, 2)) if arch == "llama" else (q, k)
    tensors = {"blk.0.attn_q.weight": (stored_q, Q.F32), "blk.0.attn_k.weight": (stored_k, Q.F32),
               "blk.0.attn_norm.weight": (np.ones(64, np.float32), Q.F32)}
    tensors |= {name: (gguf.quants.quantize(originals[qtype], qtype), qtype)
                for qtype, (name, _) in ROUND_TRIPS.items()}
    path = write_gguf(tmp_path / "w.gguf", arch, tensors)

    weights = dict(iter_gguf_weights(path, HEADS, progress=False))
    assert torch.equal(weights["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(q))
    assert torch.equal(weights["model.layers.0.self_attn.k_proj.weight"], torch.from_numpy(k))
    assert torch.equal(weights["model.layers.0.input_layernorm.weight"], torch.ones(64))
    for qtype, (name, tolerance) in ROUND_TRIPS.items():
        got, want = weights[HF_NAMES[name]], torch.from_numpy(originals[qtype])
        assert got.dtype == torch.float32 and got.shape == want.shape, qtype.name
        error = ((got - want).norm() / want.norm()).item()
        assert error < tolerance, (qtype.name, error)


# k-quant type -> byte offsets of its fp16 super-block scales (gguf-py has no quantizer for these)
K_QUANT_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def test_k_quants_decode_like_transformers(tmp_path):
    """Random k-quant blocks (with finite scales) read through our loader (gguf-py's decoders) equal
    transformers' own torch decoders, an independent implementation."""
    from transformers.integrations.gguf.dequant import dequantize

    rng = np.random.default_rng(0)
    tensors = {}
    for (qtype, offsets), name in zip(K_QUANT_SCALES.items(), HF_NAMES):
        block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
        blocks = rng.integers(0, 256, (4, 2, block_bytes), dtype=np.uint8)  # 4 rows of 2 blocks (512 values)
        for offset in offsets:
            blocks[..., offset:offset + 2] = np.array([0.01], np.float16).view(np.uint8)
        tensors[name] = (blocks.reshape(4, -1), qtype)
    weights = dict(iter_gguf_weights(write_gguf(tmp_path / "k.gguf", "llama", tensors), HEADS, progress=False))
    for name, (data, qtype) in tensors.items():
        want = dequantize(torch.from_numpy(data.reshape(-1)), qtype.value).reshape(4, 512)
        torch.testing.assert_close(weights[HF_NAMES[name]], want, msg=qtype.name)


def f32(*shape: int) -> tuple[np.ndarray, Q]:
    return np.zeros(shape, np.float32), Q.F32


IQ2_XXS_ROWS = (np.zeros((4, gguf.GGML_QUANT_SIZES[Q.IQ2_XXS][1]), np.uint8), Q.IQ2_XXS)  # 4 rows of one block
UNSUPPORTED = {  # case -> (architecture, tensors, the error)
    "architecture": ("frobnicator", {"token_embd.weight": f32(4, 32)},
                     "GGUF architecture 'frobnicator' is not supported; supported: llama, mistral, qwen2"),
    "quantization": ("llama", {"token_embd.weight": IQ2_XXS_ROWS}, "GGUF tensor type.* IQ2_XXS not supported"),
    "tensor": ("llama", {"blk.0.ffn_gate_exps.weight": f32(4, 32)}, "'blk.0.ffn_gate_exps.weight' has no counterpart"),
    "rope scaling metadata": ("llama", {"token_embd.weight": f32(4, 32)}, "rope.scaling metadata", {"llama.rope.scaling.type": "yarn"}),
    "metadata": ("llama", {"token_embd.weight": f32(4, 32)}, "GGUF metadata lacks llama.context_length"),
}


def equals_gguf_reader(path: str) -> None:
    """Our header reader against the gguf package's: every metadata value (string arrays by length) and
    every tensor's name, type, torch-order shape and bytes."""
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):  # the reader's own header pseudo-fields
            continue
        value = ours.metadata[key]
        if isinstance(value, Strings):
            assert field.types[-1] == gguf.GGUFValueType.STRING and value.count == len(field.data), key
        else:
            assert value == pytest.approx(field.contents()), key
    assert len(ours.metadata) == len([key for key in theirs.fields if not key.startswith("GGUF.")])
    assert [(t.name, t.type, t.shape) for t in ours.tensors] == \
        [(t.name, t.tensor_type, tuple(reversed(t.shape.tolist()))) for t in theirs.tensors]
    for mine, reference in zip(ours.tensors, theirs.tensors):
        assert mine.data.tobytes() == np.ascontiguousarray(reference.data).tobytes(), mine.name


def test_header_reader_equals_the_gguf_package(smollm2_gguf, tmp_path):
    equals_gguf_reader(str(smollm2_gguf))  # 49k-token vocabulary and merges, Q4_1 / Q8_0 / F32 tensors
    small = {"token_embd.weight": f32(4, 32), "output_norm.weight": (np.ones(32, np.float32), Q.F32),
             "blk.0.attn_v.weight": (np.ones((4, 32), np.float16), Q.F16)}
    path = write_gguf(tmp_path / "small.gguf", "llama", small, {"llama.context_length": 64, "llama.rope.freq_base": 0.5,
                                                                "general.name": "tiny"})
    equals_gguf_reader(path)
    data = open(path, "rb").read()
    (tmp_path / "cut.gguf").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="'blk.0.attn_v.weight' runs past the end of the file"):
        GGUFFile(str(tmp_path / "cut.gguf"))
    (tmp_path / "not.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(str(tmp_path / "not.gguf"))


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_unsupported_file_is_a_clear_error(case, tmp_path):
    arch, tensors, message, *metadata = UNSUPPORTED[case]
    with pytest.raises(ValueError, match=message):
        LLM(write_gguf(tmp_path / "bad.gguf", arch, tensors, *metadata))


def llama_cpp_rope_factors(inv_freq: torch.Tensor, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py writes as rope_freqs for a Llama 3.1+ checkpoint."""
    factors = []
    for freq in inv_freq.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, np.float32)


def test_llama31_rope_freqs_give_transformers_llama3_rope(tmp_path):
    """A Llama 3.1+ GGUF carries its RoPE scaling as per-frequency factors (rope_freqs); the config
    keeps them and the rotary tables equal transformers' own llama3 scaling for the same model."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from engine.models.gguf import load_gguf_config
    from engine.models.llama import RotaryEmbedding

    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=500000.0,
                     max_position_embeddings=1024, rope_scaling={"rope_type": "llama3", **scaling})
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16)
    factors = llama_cpp_rope_factors(inv_freq, *scaling.values())
    assert 1.0 in factors and 8.0 in factors and ((factors > 1) & (factors < 8)).any()  # all three bands
    metadata = {"llama.context_length": 1024, "llama.block_count": 1, "llama.embedding_length": 64,
                "llama.feed_forward_length": 128, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                "llama.attention.key_length": 16, "llama.attention.layer_norm_rms_epsilon": 1e-5,
                "llama.rope.freq_base": 500000.0, "llama.vocab_size": 32}
    path = write_gguf(tmp_path / "llama31.gguf", "llama", {"rope_freqs.weight": (factors, Q.F32),
                                                            "token_embd.weight": f32(32, 64)}, metadata)
    config = load_gguf_config(path)
    assert config.rope_freq_factors == pytest.approx(factors.tolist())
    assert [name for name, _ in iter_gguf_weights(path, config, progress=False)] == ["model.embed_tokens.weight"]

    positions = torch.arange(1024)
    ours = RotaryEmbedding(config, 16, 1024)(positions)
    cos, sin = LlamaRotaryEmbedding(hf)(torch.zeros(1), positions[None])
    torch.testing.assert_close(ours[0][:, 0], cos[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[1][:, 0], sin[0], atol=1e-4, rtol=0)
    plain = RotaryEmbedding(LlamaConfig(head_dim=16, rope_theta=500000.0, max_position_embeddings=1024), 16, 1024)(positions)
    assert not torch.allclose(plain[0], ours[0], atol=1e-2)  # the factors do change the tables
