"""Weight-only quantization: GGUF blocks read exactly, packed kernels equal to their dequantized weights,
the quantized engine equal to Hugging Face run on those same dequantized weights (through continuous
batching, chunked prefill, preemption and the prefix cache), perplexity bounds, and the kernel probe."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import LLM, SamplingParams
from engine.models import cpu_gemv
from engine.models.gguf import iter_gguf_weights
from engine.models.linear import KernelProbe, Linear
from engine.quantization import can_quantize, from_gguf_blocks, quantize
from test_gguf import CHATS, HEADS, TEXT, llama_cpp_permute, write_gguf
from test_model_exactness import PROMPTS, hf_greedy, run_positions

Q = gguf.GGMLQuantizationType
PACKED_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0]


AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")  # where our kernels must build and run
KERNELS = ["torch", pytest.param("avx2", marks=pytest.mark.skipif(not AVX2, reason="our kernels need AVX2"))]


def packed_linear(weight, bias: torch.Tensor | None = None, dtype=torch.float32, kernel: str = "torch") -> Linear:
    """A Linear holding ``weight`` (a QuantizedWeight) packed, planned to run packed at every row count on
    PyTorch's kernel or on ours (engine.models.cpu_gemv)."""
    dense = weight.dequantize()
    layer = Linear(dense.shape[1], dense.shape[0], bias=bias is not None).to(dtype)
    layer.weight.data.copy_(dense)
    if bias is not None:
        layer.bias.data.copy_(bias)
    layer.set_quantized(weight)
    layer.set_plan([(1 << 62, f"int{weight.bits}" if kernel == "torch" else f"int{layer.gemv.bits}-avx2")])
    return layer


def assert_within_bf16_rounding(got: torch.Tensor, exact: torch.Tensor, x: torch.Tensor, weight: torch.Tensor):
    """|got - exact| within bf16's worst case (the packed kernels take bf16 activations and scales and give
    a bf16 result): two relative roundings of 2^-8 on every product |x_i w_i|, one on the output."""
    bound = 2 ** -7 * F.linear(x.abs(), weight.abs()) + 2 ** -8 * exact.abs()
    assert ((got - exact).abs() <= bound).all(), ((got - exact).abs() / bound).max()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("qtype", PACKED_TYPES, ids=lambda q: q.name)
def test_gguf_blocks_read_exactly_and_packed_kernels_equal_their_dequantized_weight(qtype, kernel, tmp_path):
    """A written GGUF file: the kept blocks dequantize to exactly gguf-py's values (q rows restored from
    llama.cpp's RoPE order too), and the packed matmul equals the float matmul within bf16 rounding."""
    rng = np.random.default_rng(0)
    q_rows = rng.standard_normal((32, 64), np.float32)
    down = rng.standard_normal((64, 128), np.float32)
    tensors = {"blk.0.attn_q.weight": (gguf.quants.quantize(llama_cpp_permute(q_rows, 4), qtype), qtype),
               "blk.0.ffn_down.weight": (gguf.quants.quantize(down, qtype), qtype)}
    packed = {}
    weights = dict(iter_gguf_weights(write_gguf(tmp_path / "q.gguf", "llama", tensors), HEADS, packed, progress=False))
    reference = dict(iter_gguf_weights(str(tmp_path / "q.gguf"), HEADS, progress=False))
    assert set(packed) == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"}
    for name, weight in packed.items():
        assert torch.equal(weight.dequantize(), reference[name]) and torch.equal(weights[name], reference[name])
    q_error = (reference["model.layers.0.self_attn.q_proj.weight"] - torch.from_numpy(q_rows)).abs().max()
    assert q_error < 0.3  # the rows are back in HF's order (a wrong order would be off by O(1))
    for name, weight in packed.items():
        dense = reference[name]
        for rows in (1, 2, 3, 5, 17):
            x = torch.randn(rows, dense.shape[1])
            assert_within_bf16_rounding(packed_linear(weight, kernel=kernel)(x), F.linear(x, dense), x, dense)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_round_to_nearest_weights_and_packed_kernels(method, kernel):
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 128), torch.randn(96)
    q = quantize(weight, method)
    dense = q.dequantize()
    step = q.scale[:, None] if method == "int8" else q.scale[0].repeat_interleave(32, 1)  # levels apart
    range_step = (weight.abs().amax(1, keepdim=True) / 127) if method == "int8" else \
        (weight.view(96, -1, 32).amax(-1) - weight.view(96, -1, 32).amin(-1)).repeat_interleave(32, 1) / 15
    assert ((step / range_step - 1).abs() <= 2 ** -8).all()  # the range's step, rounded to the kernels' bf16
    assert torch.equal(q.scale, q.scale.bfloat16().float())
    assert ((dense - weight).abs() <= step / 2 + 1e-6).all()  # rounded to the nearest level
    layer = packed_linear(q, bias, kernel=kernel)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 128).to(dtype)
        y = layer.to(dtype)(x) if dtype == torch.float32 else packed_linear(q, bias, dtype, kernel)(x)
        assert y.dtype == dtype
        exact = F.linear(x.float(), dense, bias)
        assert_within_bf16_rounding(y.float(), exact, x.float(), dense)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_greedy_text_does_not_depend_on_which_form_served_the_rows(method, tiny_model, monkeypatch):
    """The probe picks forms by timing, so two starts of one server may serve a decode step from different
    forms: every form rounds as the packed kernel does, and the greedy text is the same under any plan."""
    tok = AutoTokenizer.from_pretrained(str(tiny_model("llama")))
    prompts = [tok.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    texts = {}
    for form in ["dense", method] + [f"{method}-avx2"] * AVX2:
        monkeypatch.setattr(KernelProbe, "plan", lambda self, layers, form=form: [(1 << 62, form)])
        llm = LLM(str(tiny_model("llama")), quantization=method, kv_cache_memory="16MiB")
        assert all(layer.plan_names == {form} for layer in llm.engine.model.modules() if isinstance(layer, Linear))
        texts[form] = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
    assert all(texts[form] == texts["dense"] for form in texts), {form: texts[form] == texts["dense"] for form in texts}


def test_shapes_the_kernels_cannot_take_are_named():
    assert can_quantize((64, 172), "int8") == "172 inputs are not a multiple of 16"
    assert "not a multiple of 16 x 32" in can_quantize((50257, 64), "int4")
    assert can_quantize((50257, 64), "int8") is None and can_quantize((128, 64), "int4") is None


def test_probe_runs_packed_for_few_rows_and_dense_for_a_prefill_chunk():
    """The probe's plan on a real layer shape (SmolLM2's 3072 x 576 gate_up, 4 layers): packed int4 for one
    row, where it reads 4x fewer bytes than float32, and a GEMM for a 128-row chunk."""
    layers = []
    for _ in range(4):
        layer = Linear(576, 3072, bias=False)
        layer.set_quantized(quantize(layer.weight, "int4"))
        layers.append(layer)
    with torch.inference_mode():
        plan = KernelProbe(128).plan(layers)
    assert plan[0][1] in ("int4", "int4-avx2") and plan[-1] == (1 << 62, "dense"), plan
    for layer in layers:
        layer.set_plan(plan)
        layer.drop_unused_forms()
    x = torch.randn(1, 576)
    one_row = layers[0]._packed if plan[0][1] == "int4" else layers[0]._gemv
    assert torch.equal(layers[0](x), one_row(x))
    assert (layers[0].packed is None) == (plan[0][1] == "int4-avx2") and (layers[0].gemv is None) == (plan[0][1] == "int4")


@pytest.mark.skipif(not AVX2, reason="our kernels need AVX2")
@pytest.mark.parametrize("form", ["int4", "int8", "Q8_0"])
def test_own_kernels_equal_the_dense_weight_within_bf16_rounding(form):
    """cpu_gemv.c on an odd number of output rows (its two-row tiles end with one alone), several groups,
    and 1-9 input rows (passes of four, then the rest); the result in bf16 exactly as stored."""
    torch.manual_seed(0)
    weight = torch.randn(33, 96)
    if form == "Q8_0":
        blocks = gguf.quants.quantize(weight.numpy(), Q.Q8_0)
        q = from_gguf_blocks(blocks.reshape(-1).view(np.uint8), "Q8_0", (33, 96))
    else:
        q = quantize(weight, form)
    gemv = cpu_gemv.GemvWeight(q)
    assert gemv.bits == (4 if form == "int4" else 8)
    dense = q.rounded().dequantize()
    for rows in range(1, 10):
        x = torch.randn(rows, 96)
        y = gemv(x)
        assert torch.equal(y, y.bfloat16().float())
        assert_within_bf16_rounding(y, F.linear(x, dense), x, dense)


def hf_on_dequantized_weights(path: str, method: str, bf16_activations: bool = False) -> torch.nn.Module:
    """Hugging Face's model with each linear weight replaced by what the engine's packed form stands for:
    the same format choice per fused matrix (q/k/v, gate/up), the same rounding (and a tied embedding
    shares the quantized head, as in the engine); ``bf16_activations`` rounds each linear's input and
    output as the engine's packed layers do."""
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    fused = {"q_proj": ("q_proj", "k_proj", "v_proj"), "k_proj": ("q_proj", "k_proj", "v_proj"),
             "v_proj": ("q_proj", "k_proj", "v_proj"), "gate_proj": ("gate_proj", "up_proj"),
             "up_proj": ("gate_proj", "up_proj")}
    modules = dict(hf.named_modules())
    for name, module in list(modules.items()):
        if not isinstance(module, torch.nn.Linear):
            continue
        prefix, _, leaf = name.rpartition(".")
        rows = sum(modules[f"{prefix}.{part}"].out_features for part in fused.get(leaf, (leaf,))) if prefix else \
            module.out_features
        chosen = next(m for m in (method, "int8") if can_quantize((rows, module.in_features), m) is None)
        module.weight.data.copy_(quantize(module.weight, chosen).dequantize())  # a tied embedding too
        if bf16_activations:  # as every form of a packed layer rounds its input and output
            module.register_forward_pre_hook(lambda _, args: (args[0].bfloat16().float(),))
            module.register_forward_hook(lambda _, args, out: out.bfloat16().float())
    return hf


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_engine_equals_hf_on_the_dequantized_weights(method, tiny_model):
    """16 prompts in one batch with chunked prefill and preemption, then again from the prefix cache: the
    quantized engine's greedy tokens equal Hugging Face's on the weights the packed forms stand for, with
    their bf16 rounding of activations. (The 512-token vocabulary keeps greedy margins above summation
    order; the 50k and 151k ones of the random models below have near-ties, so there only the logits are
    compared.)"""
    path = str(tiny_model("llama"))
    tok = AutoTokenizer.from_pretrained(path)
    hf = hf_on_dequantized_weights(path, method, bf16_activations=True)
    prompts = [tok.encode(p) for p in PROMPTS]
    expected = [hf_greedy(hf, ids, 12) for ids in prompts]
    llm = LLM(path, quantization=method, kv_cache_memory=16 * 16 * 512, max_num_batched_tokens=24, max_num_seqs=16,
              max_model_len=256)
    assert all(m.quantized for m in llm.engine.model.modules() if isinstance(m, Linear))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert llm.engine.stats().num_preemptions > 0, "the KV budget was meant to force preemption"
    assert [o.token_ids for o in outs] == expected
    long = [3, 4, 14]  # prompts of two blocks or more
    for _ in range(2):  # the second time from the prefix cache
        again = llm.generate(prompt_token_ids=[prompts[i] for i in long], sampling_params=params)
    assert [o.token_ids for o in again] == [expected[i] for i in long]
    assert all(o.num_cached_tokens >= 16 for o in again)
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_logits_equal_hf_on_the_dequantized_weights(arch, method, tiny_model):
    """Prefill and each decode step (packed kernels for few rows, the dense weight for many): Hugging Face
    on the dequantized weights, with the same bf16 rounding of each linear's input and output, up to
    summation order; a tied head (qwen2) quantizes the embedding with it, a head the int4 kernel cannot
    take (50257 rows) is int8."""
    path = str(tiny_model(arch))
    hf = hf_on_dequantized_weights(path, method, bf16_activations=True)
    llm = LLM(path, quantization=method, kv_cache_memory="16MiB")
    full = AutoTokenizer.from_pretrained(path).encode(PROMPTS[3] + PROMPTS[10])
    with torch.no_grad():
        ref = hf(torch.tensor([full])).logits[0]
    split = len(full) // 2
    ours = torch.cat([run_positions(llm.engine, full, 0, split)] +
                     [run_positions(llm.engine, full, pos, 1) for pos in range(split, len(full))])
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max() < 0.01 * scale and (ours - ref).abs().mean() < 0.0005 * scale
    unquantized = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (unquantized(torch.tensor([full])).logits[0] - ref).abs().mean() > 3 * (ours - ref).abs().mean()


def perplexity(llm: LLM, ids: list[int]) -> float:
    out = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    return math.exp(-sum(lp.logprob for lp in out.prompt_logprobs[1:]) / (len(ids) - 1))


@pytest.mark.parametrize("method,bound", [("int8", 0.01), ("int4", 0.05)])
def test_perplexity_within_bound_of_the_unquantized_model(method, bound, tiny_model):
    """The real stories260K on a TinyStories story: int8 within +1%, int4 within +5% of float32's perplexity.
    The random tiny models model no language (perplexity ~5e5 on prose, so a percentage of it measures
    noise, not damage): their cross-entropy, ~13 nats, within +0.5% (int8) and +1% (int4)."""
    from conftest import STORIES

    story = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, "
             "she saw a big, red ball. She wanted to play with it, but it was too high. Lily's mom said, \"Lily, let's "
             "go to the park.\" Lily was sad and didn't know what to do. She said, \"I want to play with your ball.\"")
    nats_bound = {"int8": 0.005, "int4": 0.01}[method]
    cases = [(str(STORIES), story, bound, False)] + [(str(tiny_model(a)), TEXT, nats_bound, True) for a in ("llama", "qwen2")]
    for path, text, limit, in_nats in cases:
        ids = AutoTokenizer.from_pretrained(path).encode(text)
        base = perplexity(LLM(path, kv_cache_memory="16MiB"), ids)
        quantized = perplexity(LLM(path, kv_cache_memory="16MiB", quantization=method), ids)
        if in_nats:
            base, quantized = math.log(base), math.log(quantized)
        assert quantized <= base * (1 + limit), (path, base, quantized)
        assert base != quantized  # the weights were quantized, not the same ones served twice


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf, smollm2_float32):
    """The embedded model served packed (the default for a GGUF file), dequantized in float32, and
    dequantized in bf16 (the yardstick for "within bf16 rounding")."""
    def build(**kwargs) -> LLM:
        return LLM(str(smollm2_gguf), kv_cache_memory="64MiB", max_model_len=1024, **kwargs)
    return build(), smollm2_float32, build(quantization="none", dtype="bfloat16")


def test_embedded_model_is_served_packed_by_default(smollm2_pair):
    """Every layer decodes from a packed form; the Q4_1 layers as int4, the Q8_0 head as two int4 planes
    (PyTorch's kernel) or as int8 (ours), whichever the probe found faster."""
    model = smollm2_pair[0].engine.model
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert layers and all(m.quantized and m.plan[0][1] in (m._packed, m._gemv) for m in layers)
    assert all((m.packed or m.gemv).bits == 4 for m in layers if m is not model.lm_head)
    head = model.lm_head
    assert len(head.packed.planes) == 2 if head.packed else head.gemv.bits == 8


def test_packed_logits_equal_the_dequantized_float32_path_within_bf16_rounding(smollm2_pair):
    """Packed kernels (bf16 activations, exact integers) stay as close to the float32 path on the file's
    dequantized weights as the same dense model run in bf16 does."""
    packed, exact, bf16 = smollm2_pair
    ids = packed.tokenizer.encode(TEXT)[:64]
    logits = {}
    for name, llm in (("packed", packed), ("exact", exact), ("bf16", bf16)):
        logits[name] = torch.cat([run_positions(llm.engine, ids, 0, 48)] +
                                 [run_positions(llm.engine, ids, pos, 1) for pos in range(48, 64)]).float()
    packed_error = (logits["packed"] - logits["exact"]).abs()
    bf16_error = (logits["bf16"] - logits["exact"]).abs()
    assert packed_error.mean() <= 1.5 * bf16_error.mean(), (packed_error.mean(), bf16_error.mean())
    assert packed_error.max() <= 1.5 * bf16_error.max(), (packed_error.max(), bf16_error.max())


def test_packed_greedy_chat_equals_float32_or_parts_at_a_near_tie(smollm2_pair):
    """The 8 chats of test_gguf, up to 32 greedy tokens: the packed default gives the float32 path's text,
    or parts from it where float32 itself had two tokens within 0.2 nats (what bf16 activations move a
    logit here) of each other; and it keeps float32's text as often as the dense model run in bf16 does.
    The bf16 model is only the yardstick: its residual stream is bf16 too, and on CPUs whose bf16 GEMM
    rounds differently (AMX) it was seen parting from float32 at a 0.26-nat gap, so only its count is used."""
    packed, exact, bf16 = smollm2_pair
    tok = packed.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": chat}], add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False) for chat in CHATS]
    params = SamplingParams(max_tokens=32, temperature=0, logprobs=2)
    wanted = exact.generate(prompt_token_ids=prompts, sampling_params=params)
    same = {}
    for name, llm in (("packed", packed), ("bf16", bf16)):
        same[name] = 0
        for want, got in zip(wanted, llm.generate(prompt_token_ids=prompts, sampling_params=params)):
            if got.token_ids == want.token_ids:
                same[name] += 1
                continue
            at = next(i for i, (a, b) in enumerate(zip(want.token_ids, got.token_ids)) if a != b)
            top2 = sorted(want.logprobs[at].top.values(), reverse=True)[:2]
            assert name == "bf16" or top2[0] - top2[1] < 0.2, (name, tok.decode(want.token_ids), tok.decode(got.token_ids), top2)
    assert same["packed"] >= min(same["bf16"], 6) - 2, same


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_blocks_fill_every_fused_matrix_and_the_head(tied, tiny_model):
    """quantize_linears on a model whose every weight came as file blocks: q/k/v and gate/up stacked in
    their fused matrices, the head packed from its own blocks or, tied, from the embedding's."""
    from transformers import AutoConfig

    from engine.attention import get_backend
    from engine.models import model_class
    from engine.models.loader import quantize_linears

    config = AutoConfig.from_pretrained(tiny_model("llama"), tie_word_embeddings=tied)
    model = model_class(config)(config, get_backend("auto", torch.device("cpu")))
    hf = AutoModelForCausalLM.from_config(config)
    blocks = {name: quantize(p, "int4") for name, p in hf.named_parameters() if p.dim() == 2}
    quantize_linears(model, "gguf", blocks)
    for name, layer in model.named_modules():
        if isinstance(layer, Linear):
            assert layer.quantized and layer.packed is not None, name
    q, k, v = (blocks[f"model.layers.0.self_attn.{p}_proj.weight"].dequantize() for p in "qkv")
    assert torch.equal(model.model.layers[0].self_attn.qkv_proj.weight, torch.cat([q, k, v]))
    head = blocks["model.embed_tokens.weight" if tied else "lm_head.weight"].dequantize()
    assert torch.equal(model.lm_head.weight, head)
