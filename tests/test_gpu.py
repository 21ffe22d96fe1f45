"""The Triton attention backend compiled for CUDA: the interpreter tests' comparisons on the device
(fp32 and bf16), long contexts against SDPA, the KV write, the engine end to end, CUDA graphs
against eager decoding (with LoRA adapters too), and the KV cache sized by gpu_memory_utilization.
Run with ``pytest -m gpu`` on a machine with CUDA (``benchmarks/gpu_check.sh``)."""

from __future__ import annotations

import gc
import logging

import pytest
import torch
import torch.nn.functional as F

from conftest import STORIES
from engine import LLM, SamplingParams
from engine.attention import context_slots, write_kv
from engine.attention.torch_ref import ReferenceBackend
from test_attention import RAGGED, build_batch, expected_output
from test_engine import documented_stories_text
from test_lora import ADAPTERS, GREEDY, PROMPTS, make_adapter, peft_greedy, requests_of

INTERPRETED = False  # whether triton was imported for its interpreter (by the CPU tests) before this module
if torch.cuda.is_available():
    # Only here: importing triton fixes the process's mode (compiled vs interpreter), and on a CPU
    # machine tests/test_triton_attention.py needs it to be the interpreter.
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from engine.attention import triton_kernels

    INTERPRETED = isinstance(tl.sum, InterpretedFunction)
    TritonBackend = triton_kernels.TritonBackend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(INTERPRETED, reason="triton was imported under TRITON_INTERPRET=1; run this file "
                                                     "in its own process without it (benchmarks/gpu_check.sh does)")]

CUDA = torch.device("cuda")


def to_cuda(q, k_cache, v_cache, meta, dtype=torch.float32):
    meta.slot_mapping, meta.block_tables = meta.slot_mapping.to(CUDA), meta.block_tables.to(CUDA)
    return q.to(CUDA, dtype), k_cache.to(CUDA, dtype), v_cache.to(CUDA, dtype), meta


def run(backend, q, k_cache, v_cache, meta):
    out = backend.forward(q, k_cache, v_cache, backend.build_metadata(meta))
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("sliding_window", [None, 40])
def test_fp32_equals_naive_and_reference(head_dim, group, block_size, sliding_window):
    q, k_cache, v_cache, meta, full_k, full_v = build_batch(RAGGED, 2 * group, 2, head_dim, block_size)
    meta.sliding_window = sliding_window
    expected = expected_output(q, meta, RAGGED, full_k, full_v, sliding_window)
    reference = ReferenceBackend().forward(q, k_cache, v_cache, meta)
    for backend in (TritonBackend(), TritonBackend(decode_partition=64)):  # one-kernel and split-K decode
        out = run(backend, *to_cuda(q, k_cache, v_cache, meta)).cpu()
        torch.testing.assert_close(out, expected, atol=1e-3, rtol=0)
        torch.testing.assert_close(out, reference, atol=1e-3, rtol=0)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_equals_naive(head_dim, group, dtype):
    q, k_cache, v_cache, meta, full_k, full_v = build_batch(RAGGED, 2 * group, 2, head_dim, 16)
    q, k_cache, v_cache, meta = to_cuda(q, k_cache, v_cache, meta, dtype)
    out = run(TritonBackend(decode_partition=64), q, k_cache, v_cache, meta)
    assert out.dtype == dtype
    rounded_k = [k.to(dtype).float() for k in full_k]
    rounded_v = [v.to(dtype).float() for v in full_v]
    expected = expected_output(q.cpu().float(), meta, RAGGED, rounded_k, rounded_v)
    torch.testing.assert_close(out.cpu().float(), expected, atol=2e-2, rtol=2e-2)


def sdpa_over_gathered(q, k_cache, v_cache, meta):
    """Baseline: each sequence's K/V gathered from the cache, SDPA in fp32 with an explicit causal mask."""
    out = torch.empty_like(q)
    k_flat, v_flat = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    for i, ctx in enumerate(meta.context_lens):
        start, end = meta.query_start[i], meta.query_start[i + 1]
        slots = context_slots(meta.block_tables[i], ctx, meta.block_size)
        k, v = k_flat[slots].transpose(0, 1).float(), v_flat[slots].transpose(0, 1).float()
        qi = q[start:end].transpose(0, 1).float()
        mask = torch.arange(ctx, device=q.device)[None, :] <= torch.arange(ctx - (end - start), ctx, device=q.device)[:, None]
        out[start:end] = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=meta.scale,
                                                        enable_gqa=True).transpose(0, 1).to(q.dtype)
    return out


def test_long_contexts_bf16_equal_sdpa():
    """Realistic shapes: Llama-3.2-1B heads (32 on 8 KV heads, d 64), decodes up to 16k keys (many
    partitions), a 2048-token chunk after a 3000-token prefix."""
    seqs = [(16383, 1), (8000, 1), (511, 1), (3000, 2048), (0, 700)]
    q, k_cache, v_cache, meta, _, _ = build_batch(seqs, 32, 8, 64, 16)
    q, k_cache, v_cache, meta = to_cuda(q, k_cache, v_cache, meta, torch.bfloat16)
    out = run(TritonBackend(), q, k_cache, v_cache, meta)
    torch.testing.assert_close(out.float(), sdpa_over_gathered(q, k_cache, v_cache, meta).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_equals_index_copy(dtype):
    g = torch.Generator().manual_seed(0)
    num_blocks, block_size, kv_heads, head_dim, n = 64, 16, 8, 128, 300
    qkv = torch.randn(n, (32 + 2 * kv_heads) * head_dim, generator=g).to(CUDA, dtype)
    key = qkv[:, 32 * head_dim:(32 + kv_heads) * head_dim].view(n, kv_heads, head_dim)
    value = qkv[:, (32 + kv_heads) * head_dim:].view(n, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:n].to(CUDA)
    expected_k = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(CUDA, dtype)
    expected_v = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(CUDA, dtype)
    k_cache, v_cache = expected_k.clone(), expected_v.clone()
    padded = slots.clone()
    padded[-5:] = -1  # padding rows (as in a captured CUDA-graph batch) write nothing
    write_kv(key[:-5], value[:-5], expected_k, expected_v, slots[:-5])
    triton_kernels.write_kv(key, value, k_cache, v_cache, padded)
    torch.cuda.synchronize()
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_stories260k_greedy_on_cuda_reproduces_documented_text():
    expected = documented_stories_text()
    llm = LLM(str(STORIES), dtype="float32", device="cuda", kv_cache_memory="32MiB", max_num_batched_tokens=64,
              attention_backend="triton")
    greedy = SamplingParams(max_tokens=256, temperature=0, ignore_eos=True)
    alone = llm.generate(prompt_token_ids=[[1]], sampling_params=greedy)[0]
    assert alone.text == expected
    others = ["Lily and Tom", "Once upon a time, in a big forest, there lived a bear" * 3, "The cat"]
    batch = llm.generate(prompt_token_ids=[[1]] + [llm.tokenizer.encode(p) for p in others],
                         sampling_params=[greedy] + [SamplingParams(max_tokens=64, temperature=0)] * 3)
    assert batch[0].token_ids == alone.token_ids
    torch_llm = LLM(str(STORIES), dtype="float32", device="cuda", kv_cache_memory="32MiB", max_num_batched_tokens=64,
                    attention_backend="torch")
    reference = torch_llm.generate(prompt_token_ids=[[1]] + [llm.tokenizer.encode(p) for p in others],
                                   sampling_params=[greedy] + [SamplingParams(max_tokens=64, temperature=0)] * 3)
    assert [o.token_ids for o in batch] == [o.token_ids for o in reference]


def stories_on_cuda(**engine_args) -> LLM:
    return LLM(str(STORIES), dtype="float32", device="cuda", max_num_batched_tokens=64, attention_backend="triton",
               **{"kv_cache_memory": "32MiB", **engine_args})


def test_cuda_graphs_equal_eager_decoding():
    """Decode steps replayed from graphs: batches shrinking from 5 to 1 over captured sizes 1, 2, 4, 5
    while queued requests take finished ones' blocks, the tokens of eager decoding."""
    prompts = [[1] + list(range(300, 300 + 3 * i)) for i in range(8)]
    params = [SamplingParams(max_tokens=8 + 9 * (i % 4), temperature=0, ignore_eos=True) for i in range(8)]
    outputs = {}
    for eager in (True, False):
        llm = stories_on_cuda(max_num_seqs=5, enforce_eager=eager)
        outputs[eager] = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
    graphs = llm.engine.runner.graphs
    assert sorted(graphs.graphs) == graphs.sizes == [1, 2, 4, 5] and graphs.replays > 20
    assert outputs[True] == outputs[False]


def test_cuda_graphs_with_a_draft_model_equal_plain_decoding():
    """The draft model's single-token steps replay its own graphs; greedy output is unchanged."""
    prompts = [[1], [1, 400, 401, 402]]
    greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    plain = [o.token_ids for o in stories_on_cuda().generate(prompt_token_ids=prompts, sampling_params=greedy)]
    llm = stories_on_cuda(speculative_config=dict(method="draft", draft_model=str(STORIES), num_speculative_tokens=3,
                                                  adaptive=False))
    assert [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=greedy)] == plain
    spec = llm.engine.stats().spec
    assert llm.engine.runners[1].graphs.replays > 0 and spec.accepted_tokens == spec.draft_tokens > 0


def test_lora_adapters_under_cuda_graphs_equal_peft(tiny_model, tmp_path):
    """Base rows and two adapters' rows in the same decode steps, replayed from graphs (each row's
    adapter slot is an input of the graph) and run eagerly, through the Triton LoRA kernels: every
    request's greedy tokens are peft's on the CPU."""
    base = tiny_model("llama")
    adapters = {name: make_adapter(base, tmp_path / name, seed, **ADAPTERS[name])
                for seed, name in enumerate(["attn", "mlp-rslora"])}
    expected = {name: peft_greedy(base, adapters.get(name), PROMPTS) for name in [None, *adapters]}
    loras = [None, *requests_of(adapters).values()]
    jobs = [(lora, i) for lora in loras for i in range(len(PROMPTS))]
    for eager in (True, False):
        llm = LLM(str(base), dtype="float32", device="cuda", kv_cache_memory="32MiB", attention_backend="triton",
                  enable_lora=True, max_loras=len(adapters), enforce_eager=eager)
        outs = llm.generate(prompt_token_ids=[PROMPTS[i] for _, i in jobs], sampling_params=GREEDY,
                            lora_request=[lora for lora, _ in jobs])
        for (lora, i), out in zip(jobs, outs):
            assert out.token_ids == expected[lora and lora.lora_name][i], (eager, lora, i)
    assert llm.engine.runner.graphs.replays > 0


def test_gpu_memory_utilization_sizes_the_kv_cache(caplog):
    """No kv_cache_memory on CUDA: the KV cache takes the share left after the profiled step, and
    the log names the blocks and the tokens they hold; a share too small is a clear error."""
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info()[1]
    with caplog.at_level(logging.INFO):
        llm = stories_on_cuda(kv_cache_memory=None, gpu_memory_utilization=0.05)
    kv_bytes = sum(2 * k.numel() * k.element_size() for k, _ in llm.engine.runner.kv_caches)
    assert 0.03 * total < kv_bytes <= 0.05 * total
    assert f"KV cache: {llm.engine.kv.num_blocks} blocks of 16 tokens" in caplog.text
    assert "GPU memory: 0.05 x" in caplog.text
    assert llm.generate(prompt_token_ids=[[1]], sampling_params=SamplingParams(max_tokens=4))[0].token_ids
    del llm
    gc.collect()
    with pytest.raises(ValueError, match="gpu_memory_utilization 1e-05 leaves no memory for the KV cache"):
        stories_on_cuda(kv_cache_memory=None, gpu_memory_utilization=1e-5)
