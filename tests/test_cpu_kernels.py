"""engine/kernels, our C kernels for CPUs with AVX2: built once into the cache (off, and said so, without a
compiler), the fused layer ops equal to PyTorch's, and a model served with them equal to one served
without them. (The matrix-vector kernels are checked in test_quantization, the attention kernel in
test_attention.)"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import LLM, SamplingParams, kernels
from engine.models.cpu_gemv import Bf16Weight
from engine.models.linear import KernelProbe, Linear
from engine.models.llama import RMSNorm, apply_rope
from test_model_exactness import PROMPTS

AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")  # where the kernels must build and run
needs_avx2 = pytest.mark.skipif(not AVX2, reason="our kernels need AVX2")


def test_built_once_into_the_cache_and_off_without_a_compiler(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KVSERVE_CACHE", str(tmp_path))
    kernels.library.cache_clear()
    try:
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        with caplog.at_level(logging.INFO):
            assert kernels.library() is None
        assert "own CPU kernels: off" in caplog.text
        assert not list(tmp_path.glob("kernels/*"))  # no half-written library left behind
        if AVX2:
            monkeypatch.delenv("CC")
            kernels.library.cache_clear()
            assert kernels.library() is not None
            built = list(tmp_path.glob("kernels/*"))
            assert len(built) == 1 and built[0].suffix == ".so"
            kernels.library.cache_clear()
            assert kernels.library() is not None and list(tmp_path.glob("kernels/*")) == built  # reused
    finally:
        kernels.library.cache_clear()


@needs_avx2
@pytest.mark.parametrize("size", [576, 100])  # a tail that is not a multiple of 8
def test_fused_add_rms_norm_equals_torch(size):
    torch.manual_seed(0)
    norm = RMSNorm(size, 1e-5)
    norm.weight.data.normal_()
    x, residual = torch.randn(3, size), torch.randn(3, size)
    expected_residual = x + residual
    expected = F.rms_norm(expected_residual, (size,), norm.weight, 1e-5)
    with torch.inference_mode():
        alone, same = norm(x)
        out, new_residual = norm(x, residual.clone())
    assert same is x  # no residual yet: the input is the stream
    torch.testing.assert_close(alone, F.rms_norm(x, (size,), norm.weight, 1e-5), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(new_residual, expected_residual, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@needs_avx2
def test_rope_in_place_equals_apply_rope():
    torch.manual_seed(0)
    rows, heads, kv_heads, dim = 5, 9, 3, 64
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim)
    angles = torch.randn(rows, 1, dim)
    cos, sin = angles.cos(), angles.sin()
    expected = apply_rope(qkv[:, :(heads + kv_heads) * dim].reshape(rows, heads + kv_heads, dim), (cos, sin))
    rotated = qkv.clone()
    kernels.library().rope_rotate_half(rows, heads + kv_heads, dim, rotated.shape[1], rotated.data_ptr(),
                                       cos.data_ptr(), sin.data_ptr())
    # bit for bit: with one rounding less (a fused multiply-add), the embedded model's greedy answer to the
    # README's question changed, since its packed layers round every input to bf16 and so amplify 1-ulp changes
    assert torch.equal(rotated[:, :(heads + kv_heads) * dim].view_as(expected), expected)
    assert torch.equal(rotated[:, (heads + kv_heads) * dim:], qkv[:, (heads + kv_heads) * dim:])  # v untouched


@needs_avx2
def test_bf16_valued_float32_weights_are_read_as_bf16_with_float32_results():
    """A bf16 checkpoint served in float32: gemv_bf16 reads half the bytes and gives the float32 product up
    to summation order, for 1-9 rows and an odd number of outputs; other float32 weights are not offered it."""
    torch.manual_seed(0)
    weight = torch.randn(33, 96).bfloat16().float()
    assert Bf16Weight.supports(weight) and not Bf16Weight.supports(weight + 1e-3)
    kernel = Bf16Weight(weight)
    for rows in range(1, 10):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(kernel(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    layers = [Linear(96, 33, bias=False) for _ in range(2)]
    layers[0].weight.data.copy_(weight)
    assert "bf16-avx2" in layers[0].forms() and "bf16-avx2" not in layers[1].forms()


@needs_avx2
def test_silu_mul_equals_torch():
    torch.manual_seed(0)
    gate_up = torch.cat([torch.randn(3, 1539) * 6, torch.tensor([[-120.0, 95.0, 0.0]]).expand(3, 3)], dim=1)
    gate_up = torch.cat([gate_up, torch.randn(3, 1542)], dim=1)  # [gate | up], with a scalar tail and extremes
    out = torch.empty(3, 1542)
    kernels.library().silu_mul(3, 1542, gate_up.data_ptr(), out.data_ptr())
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(out, F.silu(gate) * up, rtol=2e-6, atol=1e-30)


@needs_avx2
@pytest.mark.parametrize("quantization", ["none", "bf16-values", "int4"])
def test_engine_with_kernels_equals_engine_without(quantization, tiny_model, monkeypatch, tmp_path):
    """Every kernel at once (packed or bf16 products, decode attention, norms, RoPE, SiLU) against PyTorch's
    ops alone: the same greedy tokens, through prefill and decode steps, and the same logprobs: within float32
    noise unquantized (``bf16-values``: the tiny model's weights rounded to bf16, so that gemv_bf16 serves
    them); quantized, the packed products' bf16 outputs differ from PyTorch's kernel wherever a different
    summation order rounds to the neighbouring bf16 value (about 1 output in 5,000), which this random
    model's large logits turn into up to ~0.06 nats."""
    path = str(tiny_model("llama"))
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok.encode(p) for p in PROMPTS]
    if quantization == "bf16-values":
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        for p in hf.parameters():
            p.data = p.data.bfloat16().float()
        hf.save_pretrained(tmp_path)
        tok.save_pretrained(tmp_path)
        path, quantization = str(tmp_path), "none"
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)

    def our_kernels_for_decode_rows(probe, layers):  # not left to the probe's timing on a tiny model
        ours = [name for name in layers[0].forms() if name.endswith("-avx2")]
        return [(4, ours[0]), (1 << 62, "dense")] if ours else [(1 << 62, "dense")]
    monkeypatch.setattr(KernelProbe, "plan", our_kernels_for_decode_rows)
    runs, real = [], kernels.library
    for library in (real, lambda: None):
        monkeypatch.setattr(kernels, "library", library)
        llm = LLM(path, quantization=quantization, kv_cache_memory="16MiB")
        forms = {name for layer in llm.engine.model.modules() if isinstance(layer, Linear) for name in layer.plan_names}
        assert ("bf16-avx2" in forms) == (library is real and path == str(tmp_path)), forms
        runs.append(llm.generate(prompt_token_ids=prompts, sampling_params=params))
    with_kernels, without = runs
    assert [o.token_ids for o in with_kernels] == [o.token_ids for o in without]
    for a, b in zip(with_kernels, without):
        got = torch.tensor([step.logprob for step in a.logprobs])
        ref = torch.tensor([step.logprob for step in b.logprobs])
        tolerance = 1e-3 if quantization == "none" else 0.1
        torch.testing.assert_close(got, ref, rtol=0, atol=tolerance)
