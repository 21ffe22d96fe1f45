"""The Triton kernels (varlen prefill over a paged prefix, split-K paged decode, KV write) against naive
softmax(QK^T/sqrt(d))V in float64 and against the reference online-softmax backend, on CPU through
Triton's interpreter. Triton ships with torch's dependencies: if it is missing these tests fail."""

from __future__ import annotations

import os

# Must precede `import triton`: Triton builds its own tl.* library (and @triton.jit builds our kernels)
# either for the interpreter or for a GPU at import, one mode per process.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402  (an ImportError here is a failure, never a skip)
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import engine.attention.triton_kernels as triton_kernels  # noqa: E402
import engine.cuda_graphs as cuda_graphs  # noqa: E402
import engine.llm_engine  # noqa: E402
from conftest import STORIES  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.attention import context_slots, write_kv  # noqa: E402
from engine.attention.torch_ref import ReferenceBackend  # noqa: E402
from test_attention import RAGGED, build_batch, expected_output  # noqa: E402

COMPILED_FIRST = not (isinstance(tl.sum, InterpretedFunction)
                      and isinstance(triton_kernels._prefill_kernel, InterpretedFunction))
WHY = "triton (or the kernels) was imported for a GPU before this module set TRITON_INTERPRET=1"
if COMPILED_FIRST and not torch.cuda.is_available():  # on a CPU machine that is a bug, never a skip
    raise ImportError(WHY)
# Only in a GPU session, where tests/test_gpu.py imported triton first and covers the compiled kernels.
pytestmark = pytest.mark.skipif(COMPILED_FIRST, reason=WHY)

TritonBackend = triton_kernels.TritonBackend
ATOL = 1e-3


def run_backend(backend, q, k_cache, v_cache, meta):
    return backend.forward(q, k_cache, v_cache, backend.build_metadata(meta))


def check(seqs, num_heads, num_kv_heads, head_dim, block_size, backend=None, sliding_window=None, seed=0,
          against_reference=True):
    """Triton output == naive float64 attention (and == the reference backend) on one ragged batch."""
    q, k_cache, v_cache, meta, full_k, full_v = build_batch(seqs, num_heads, num_kv_heads, head_dim, block_size, seed)
    meta.sliding_window = sliding_window
    out = run_backend(backend or TritonBackend(decode_partition=64), q, k_cache, v_cache, meta)
    torch.testing.assert_close(out, expected_output(q, meta, seqs, full_k, full_v, sliding_window), atol=ATOL, rtol=0)
    if against_reference:
        reference = run_backend(ReferenceBackend(), q, k_cache, v_cache, meta)
        torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)
    return out


# RAGGED (from test_attention): decodes with contexts 1 to 300 (several flash-decoding partitions of 64
# keys, and partitions past the context), prefills without a prefix, chunks after prefixes that are
# not block aligned, a 50-token chunk after 250 cached tokens.
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_and_decode_equal_naive_and_reference(head_dim, group, block_size):
    num_kv_heads = 2
    check(RAGGED, num_kv_heads * group, num_kv_heads, head_dim, block_size)


def test_decode_only_batch_single_partition_and_split_k_agree():
    """All rows decoding: the one-kernel path (context within one partition) and the split-K path
    with its reduction give the same answer."""
    seqs = [(0, 1), (17, 1), (130, 1), (299, 1)]
    single = check(seqs, 8, 2, 64, 16, backend=TritonBackend(decode_partition=512))
    split = check(seqs, 8, 2, 64, 16, backend=TritonBackend(decode_block_n=32, decode_partition=32))
    torch.testing.assert_close(single, split, atol=1e-5, rtol=0)


def test_prefill_only_with_small_query_tiles():
    """Tiles smaller than a sequence (several query tiles per sequence, a key tile spanning part of a block)."""
    seqs = [(0, 40), (21, 19), (3, 2)]
    check(seqs, 8, 2, 64, 32, backend=TritonBackend(prefill_block_m=16, prefill_block_n=16))


@pytest.mark.parametrize("block_size", [16, 32])
def test_sliding_window(block_size):
    """Windows that start inside a key tile, inside a decode partition, and cover whole partitions."""
    seqs = [(40, 1), (0, 30), (20, 9), (200, 1), (150, 20)]
    for window in (7, 70):
        check(seqs, 8, 2, 64, block_size, sliding_window=window)


def test_online_softmax_rescales_when_a_later_tile_has_the_maximum():
    """Scores that grow along the keys give every key tile (and every decode partition) a new maximum."""
    ctx, d = 150, 64
    seqs = [(ctx - 20, 20), (ctx - 1, 1)]
    q, k_cache, v_cache, meta, full_k, full_v = build_batch(seqs, 4, 1, d, 16)
    ramp = torch.arange(ctx, dtype=torch.float)[:, None, None].expand(ctx, 1, d) * 0.05
    for i, k in enumerate(full_k):
        k.copy_(ramp)
        write_kv(k, full_v[i], k_cache, v_cache, context_slots(meta.block_tables[i], ctx, meta.block_size))
    q = q.abs()
    out = run_backend(TritonBackend(prefill_block_n=16, decode_block_n=16, decode_partition=32), q, k_cache, v_cache, meta)
    torch.testing.assert_close(out, expected_output(q, meta, seqs, full_k, full_v), atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(8, 4, 8), (9, 3, 64), (6, 2, 80)])
def test_odd_shapes(num_heads, num_kv_heads, head_dim):
    """stories260K (head_dim 8, padded to 16), bench-135m (GQA group 3: a tile of 21 tokens x 3 heads
    in 64 rows), and a head dim that is not a power of two."""
    check([(0, 23), (30, 1), (45, 12), (5, 1)], num_heads, num_kv_heads, head_dim, 16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    """bf16/fp16 q and cache; softmax and accumulation stay fp32. Compared with float64 attention over
    the same rounded inputs; the tolerance covers p's rounding before the PV product and the output's."""
    seqs = [(0, 33), (40, 1), (70, 9), (129, 1)]
    q, k_cache, v_cache, meta, full_k, full_v = build_batch(seqs, 8, 2, 64, 16)
    q, k_cache, v_cache = q.to(dtype), k_cache.to(dtype), v_cache.to(dtype)
    full_k = [k.to(dtype).float() for k in full_k]
    full_v = [v.to(dtype).float() for v in full_v]
    out = run_backend(TritonBackend(decode_partition=64), q, k_cache, v_cache, meta)
    assert out.dtype == dtype
    expected = expected_output(q.float(), meta, seqs, full_k, full_v)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_forward_reused_across_layers():
    """One build_metadata per step, forward per layer: the split-K scratch is shared, results are not."""
    seqs = [(0, 20), (90, 1), (150, 1)]
    q, k_cache, v_cache, meta, full_k, full_v = build_batch(seqs, 4, 2, 64, 16, seed=1)
    # A second layer: other queries over the same block tables, K and V caches swapped.
    q2, k_cache2, v_cache2, full_k2, full_v2 = -0.5 * q, v_cache, k_cache, full_v, full_k
    backend = TritonBackend(decode_partition=64)
    backend.build_metadata(meta)
    out1 = backend.forward(q, k_cache, v_cache, meta)
    out2 = backend.forward(q2, k_cache2, v_cache2, meta)
    torch.testing.assert_close(out1, expected_output(q, meta, seqs, full_k, full_v), atol=ATOL, rtol=0)
    torch.testing.assert_close(out2, expected_output(q2, meta, seqs, full_k2, full_v2), atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_equals_index_copy(dtype):
    """Same cache as engine.attention.write_kv, from non-contiguous K/V views (as split off a fused
    QKV projection); a negative slot (padding) writes nothing."""
    g = torch.Generator().manual_seed(0)
    num_blocks, block_size, kv_heads, head_dim = 6, 16, 2, 64
    qkv = torch.randn(10, (4 + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    key = qkv[:, 4 * head_dim:(4 + kv_heads) * head_dim].view(10, kv_heads, head_dim)
    value = qkv[:, (4 + kv_heads) * head_dim:].view(10, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:10]
    expected_k = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    expected_v = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    k_cache, v_cache = expected_k.clone(), expected_v.clone()
    write_kv(key, value, expected_k, expected_v, slots)
    triton_kernels.write_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)

    padded = torch.cat([slots[:4], torch.tensor([-1, -1])])
    before_k, before_v = k_cache.clone(), v_cache.clone()
    triton_kernels.write_kv(key[:6] * 2, value[:6] * 2, k_cache, v_cache, padded)
    write_kv(key[:4] * 2, value[:4] * 2, before_k, before_v, slots[:4])
    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(30))
def test_random_ragged_batches(seed):
    """Random shapes, lengths up to 300 after prefixes up to 300, windows, tile sizes and partitions."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    seqs = [(int(torch.randint(0, 300, (1,), generator=g)), pick([1, 1, 2, 5, int(torch.randint(1, 300, (1,), generator=g))]))
            for _ in range(int(torch.randint(1, 8, (1,), generator=g)))]
    num_kv_heads, group, head_dim = pick([1, 2]), pick([1, 2, 3, 4, 8]), pick([8, 64, 96, 128])
    backend = TritonBackend(prefill_block_m=pick([16, 32, 64]), prefill_block_n=pick([16, 32, 64]),
                            decode_block_n=16, decode_partition=pick([16, 64, 256]))
    check(seqs, num_kv_heads * group, num_kv_heads, head_dim, pick([16, 32]), backend=backend,
          sliding_window=pick([None, None, 5, 33, 128]), seed=seed)


def triton_llm(monkeypatch, **engine_args) -> LLM:
    """stories260K (head_dim 8, 8 heads on 4 KV heads) behind the Triton backend, interpreted."""
    real_get_backend = engine.llm_engine.get_backend
    monkeypatch.setattr(engine.llm_engine, "get_backend", lambda name, device: TritonBackend(decode_partition=64)
                        if name == "triton" else real_get_backend(name, device))
    return LLM(str(STORIES), dtype="float32", kv_cache_memory="8MiB", max_num_batched_tokens=64, **engine_args)


@pytest.mark.parametrize("max_tokens", [4, pytest.param(40, marks=pytest.mark.slow)])
def test_engine_greedy_with_triton_backend_equals_torch_backend(monkeypatch, max_tokens):
    """The backend behind the real engine: a batch of a BOS-only prompt, an 82-token prompt that the
    64-token budget splits into chunks, and a short one decodes the same tokens as the SDPA backend,
    with decode steps eager and through the CUDA graphs' static buffers."""
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outputs = {}
    for backend, eager in (("triton", True), ("triton", False), ("torch", True)):
        llm = triton_llm(monkeypatch, attention_backend=backend, enforce_eager=eager)
        prompts = [[1], llm.tokenizer.encode("Once upon a time, in a big forest, there lived a bear" * 4),
                   llm.tokenizer.encode("The cat")]
        outputs[backend, eager] = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=greedy)]
        graphs = llm.engine.runner.graphs
        assert (graphs is None) == eager and (eager or graphs.replays > 0)
    assert outputs["triton", True] == outputs["triton", False] == outputs["torch", True]


def test_decode_graph_buffers_pad_and_reset_rows(monkeypatch):
    """Decode batches of sizes 5 down to 1 over captured sizes 1, 2, 4, 5: each runs the next size
    up, its extra rows padded. Requests finish at different lengths while queued ones take
    their freed blocks, so a padding row that kept a finished request's slot would overwrite a live
    request's KV. Small batches cut each context into several flash-decoding partitions, full ones
    into one. Every request's tokens equal eager decoding's."""
    assert [cuda_graphs.decode_splits(size, 4, cuda_graphs.INTERPRETER_SMS) for size in (1, 2, 4, 5)] == [4, 2, 1, 1]
    prompts = [[1] + list(range(300, 300 + 3 * i)) for i in range(8)]
    params = [SamplingParams(max_tokens=2 + 3 * (i % 4), temperature=0, ignore_eos=True) for i in range(8)]
    outputs = {}
    for eager in (True, False):
        llm = triton_llm(monkeypatch, attention_backend="triton", enforce_eager=eager, max_num_seqs=5)
        outputs[eager] = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
    graphs = llm.engine.runner.graphs
    assert graphs.sizes == [1, 2, 4, 5] and graphs.replays > 10
    assert outputs[True] == outputs[False]
