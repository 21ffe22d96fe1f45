"""LoRA adapters in the engine against Hugging Face + peft (PeftModel.from_pretrained on the same tiny
random base): greedy tokens and log-probabilities, base and several adapters batched in one step,
more adapters than slots, the prefix cache per adapter, refused adapters, and the quantized,
speculative and structured paths with an adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, InvalidRequestError, LoRARequest, SamplingParams
from engine.structured import StructuredOutputParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = [[1, 50, 60, 70, 80], [1, 300, 12, 9], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
ATTN, MLP, ALL = ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"], "all-linear"
# name -> LoraConfig fields: ranks, alphas, rslora, target modules and layers all vary
ADAPTERS = {
    "attn": dict(r=8, lora_alpha=16, target_modules=ATTN),
    "mlp-rslora": dict(r=4, lora_alpha=8, target_modules=MLP, use_rslora=True),
    "patterns": dict(r=16, lora_alpha=32, target_modules=ATTN + MLP, rank_pattern={"o_proj": 4},
                     alpha_pattern={"down_proj": 3}),
    "layer-1-qv": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    "all-linear": dict(r=6, lora_alpha=5, target_modules=ALL),
}


def make_adapter(base: Path, out: Path, seed: int, **fields) -> Path:
    """A PEFT adapter with random (non-zero) A and B, saved as peft's save_pretrained writes it.
    peft is imported here, never at module level: it imports triton, which tests/test_triton_attention.py must
    first switch to its interpreter when it is collected."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(init_lora_weights=False, **fields))
    model.save_pretrained(out)
    return out


def hf_model(base: Path, adapter: Path | None):
    from peft import PeftModel  # imported late, as in make_adapter

    model = AutoModelForCausalLM.from_pretrained(base)
    return (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()


def peft_greedy(base: Path, adapter: Path | None, prompts: list[list[int]], n: int = GREEDY.max_tokens) -> list[list[int]]:
    model = hf_model(base, adapter)
    return [model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(p):].tolist()
            for p in prompts]


def peft_logprobs(base: Path, adapter: Path | None, ids: list[int]) -> torch.Tensor:
    """log p(token i | tokens before it) for i >= 1, from peft."""
    with torch.no_grad():
        logits = hf_model(base, adapter)(torch.tensor([ids])).logits[0, :-1].double()
    return logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


def engine_logprobs(llm: LLM, ids: list[int], lora: LoRARequest | None) -> torch.Tensor:
    out = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=0),
                       lora_request=lora)[0]
    return torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]], dtype=torch.float64)


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    base = tiny_model("llama")
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(base, root / name, seed, **fields) for seed, (name, fields) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def references(tiny_model, adapters) -> dict[str | None, list[list[int]]]:
    base = tiny_model("llama")
    return {name: peft_greedy(base, adapters.get(name), PROMPTS) for name in [None, *adapters]}


def requests_of(adapters: dict[str, Path]) -> dict[str, LoRARequest]:
    return {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())}


def record_steps(llm: LLM) -> list[list[int]]:
    """Each step's slot per item (a request's rows; -1: the base model), recorded as the engine prepares it."""
    steps, prepare = [], llm.engine.lora.prepare

    def recording(*args, **kwargs):
        prepare(*args, **kwargs)
        steps.append(list(llm.engine.lora.item_slots))

    llm.engine.lora.prepare = recording
    return steps


def test_adapters_batched_with_the_base_match_peft(tiny_model, adapters, references):
    llm = LLM(str(tiny_model("llama")), enable_lora=True, max_loras=len(adapters), kv_cache_memory="4MiB")
    steps = record_steps(llm)
    loras = [None, *requests_of(adapters).values()]
    jobs = [(lora, i) for lora in loras for i in range(len(PROMPTS))]
    outs = llm.generate(prompt_token_ids=[PROMPTS[i] for _, i in jobs], sampling_params=GREEDY,
                        lora_request=[lora for lora, _ in jobs])
    for (lora, i), out in zip(jobs, outs):
        assert out.token_ids == references[lora and lora.lora_name][i], (lora, i)
    mixed = [s for s in steps if -1 in s and len(set(s) - {-1}) == len(adapters)]
    assert mixed, "the base and every adapter never ran in one step"
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_logprobs_match_peft_within_float32(tiny_model, adapters):
    base = tiny_model("llama")
    llm = LLM(str(base), enable_lora=True, kv_cache_memory="4MiB")
    ids = PROMPTS[2]
    for name, lora in requests_of(adapters).items():
        ours, theirs = engine_logprobs(llm, ids, lora), peft_logprobs(base, adapters[name], ids)
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (name, (ours - theirs).abs().max())
        assert not torch.allclose(ours, peft_logprobs(base, None, ids), atol=1e-2), f"{name} changed nothing"


def test_qwen2_biases_and_tied_embeddings(tiny_model, tmp_path):
    base = tiny_model("qwen2")
    adapter = make_adapter(base, tmp_path / "qwen", 7, r=8, lora_alpha=16, target_modules=ALL)
    llm = LLM(str(base), enable_lora=True, kv_cache_memory="4MiB")
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, lora_request=LoRARequest("q", 1, str(adapter)))
    assert [o.token_ids for o in outs] == peft_greedy(base, adapter, PROMPTS)


def test_more_adapters_than_slots_evict_and_reload(tiny_model, adapters, references):
    llm = LLM(str(tiny_model("llama")), enable_lora=True, max_loras=2, max_cpu_loras=3, max_num_seqs=8,
              kv_cache_memory="4MiB")
    steps = record_steps(llm)
    loras = list(requests_of(adapters).values())
    jobs = [(lora, i) for _ in range(2) for lora in loras for i in range(len(PROMPTS))]  # 30 requests at once
    outs = llm.generate(prompt_token_ids=[PROMPTS[i] for _, i in jobs], sampling_params=GREEDY,
                        lora_request=[lora for lora, _ in jobs])
    for (lora, i), out in zip(jobs, outs):
        assert out.token_ids == references[lora.lora_name][i], (lora.lora_name, i)
    assert max(len(set(s) - {-1}) for s in steps) == 2
    assert llm.engine.lora.slot_loads > len(adapters)  # some adapter was evicted from its slot and loaded again
    assert len(llm.engine.lora.pool) == 3
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_prefix_cache_is_per_adapter(tiny_model, adapters, references):
    """The same prompt (a cached block and more) for the base, an adapter, the base again, the adapter
    again: each gets its own output, and only a repeat of the same model hits the cache."""
    llm = LLM(str(tiny_model("llama")), enable_lora=True, kv_cache_memory="4MiB", block_size=4)
    lora = requests_of(adapters)["attn"]
    order = [None, lora, None, lora]
    outs = [llm.generate(prompt_token_ids=[PROMPTS[2]], sampling_params=GREEDY, lora_request=r)[0] for r in order]
    for r, out in zip(order, outs):
        assert out.token_ids == references[r and r.lora_name][2]
    assert [o.num_cached_tokens > 0 for o in outs] == [False, False, True, True]


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"trainable_token_indices": [3, 4]}, "trainable_token_indices"),
    ({"bias": "all"}, "bias"),
    ({"peft_type": "IA3"}, "peft_type"),
])
def test_refused_adapter_configs_name_the_field(tiny_model, adapters, tmp_path, change, message):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes((adapters["attn"] / "adapter_model.safetensors").read_bytes())
    config = json.loads((adapters["attn"] / "adapter_config.json").read_text()) | change
    (folder / "adapter_config.json").write_text(json.dumps(config))
    llm = LLM(str(tiny_model("llama")), enable_lora=True, kv_cache_memory="4MiB")
    with pytest.raises(InvalidRequestError, match=message) as error:
        llm.generate(prompt_token_ids=[PROMPTS[0]], lora_request=LoRARequest("bad", 1, str(folder)))
    assert error.value.param == "lora_path"


def test_refused_adapters(tiny_model, adapters, tmp_path):
    base = tiny_model("llama")
    llm = LLM(str(base), enable_lora=True, max_lora_rank=8, kv_cache_memory="4MiB")
    embedding = make_adapter(base, tmp_path / "emb", 3, r=4, target_modules=["embed_tokens", "q_proj"])
    cases = {str(tmp_path / "missing"): "no adapter_config.json", str(adapters["patterns"]): "rank 16, above max_lora_rank 8",
             str(embedding): "embed_tokens"}
    for path, message in cases.items():
        with pytest.raises(InvalidRequestError, match=message):
            llm.generate(prompt_token_ids=[PROMPTS[0]], lora_request=LoRARequest("x", 1, path))
    assert llm.engine.requests == {}
    off = LLM(str(base), kv_cache_memory="4MiB")
    with pytest.raises(InvalidRequestError, match="not enabled") as error:
        off.generate(prompt_token_ids=[PROMPTS[0]], lora_request=requests_of(adapters)["attn"])
    assert error.value.param == "model"
    with pytest.raises(ValueError, match="max_lora_rank"):
        LLM(str(base), enable_lora=True, max_lora_rank=257)


def test_speculative_decoding_drafts_without_the_adapter(tiny_model, draft_of, adapters, references):
    """The draft (the base's first layer) knows no adapter; the target verifies with it: greedy output
    is still exactly the adapter's."""
    base = tiny_model("llama")
    llm = LLM(str(base), enable_lora=True, kv_cache_memory="4MiB",
              speculative_config={"method": "draft", "draft_model": str(draft_of(base, 1)), "adaptive": False})
    loras = [None, *requests_of(adapters).values()]
    outs = llm.generate(prompt_token_ids=PROMPTS * len(loras), sampling_params=GREEDY,
                        lora_request=[lora for lora in loras for _ in PROMPTS])
    for k, out in enumerate(outs):
        lora = loras[k // len(PROMPTS)]
        assert out.token_ids == references[lora and lora.lora_name][k % len(PROMPTS)]
    assert llm.engine.speculator.stats.accepted_tokens > 0


def test_quantized_base_with_an_adapter(tiny_model, adapters):
    """int8 weights under the adapter: its log-probabilities are as close to peft's as the int8 base's
    are to the float base's (the quantization's own error), and far from the base's."""
    base = tiny_model("llama")
    llm = LLM(str(base), enable_lora=True, quantization="int8", kv_cache_memory="4MiB")
    ids, lora = PROMPTS[2], requests_of(adapters)["all-linear"]
    theirs, base_only = peft_logprobs(base, adapters["all-linear"], ids), peft_logprobs(base, None, ids)
    adapter_error = (engine_logprobs(llm, ids, lora) - theirs).abs().mean()
    int8_error = (engine_logprobs(llm, ids, None) - base_only).abs().mean()
    assert adapter_error < 2 * int8_error + 1e-3, (adapter_error, int8_error)
    assert adapter_error < 0.2 * (base_only - theirs).abs().mean()


def test_structured_output_with_an_adapter(tiny_model, adapters):
    llm = LLM(str(tiny_model("llama")), enable_lora=True, kv_cache_memory="4MiB")
    choices = ["apple pie", "banana"]
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=3, structured_output=StructuredOutputParams(choice=choices))
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, lora_request=requests_of(adapters)["attn"])
    assert all(out.text in choices for out in outs), [out.text for out in outs]
