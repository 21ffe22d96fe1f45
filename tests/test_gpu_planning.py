"""What the GPU path decides on the host, checked without a GPU: the KV cache's size from a memory
profile, the captured batch sizes and flash-decoding splits, and the flags that control them.
(tests/test_gpu.py runs the same on CUDA; tests/test_triton_attention.py runs the graphs' padded
decode steps through Triton's interpreter.)"""

from __future__ import annotations

import pytest

from engine.config import EngineConfig, SpeculativeConfig
from engine.cuda_graphs import capture_sizes, decode_splits
from engine.gpu_memory import GiB, MemoryProfile, plan_num_blocks
from server.cli import parser


def test_kv_cache_gets_the_share_left_after_weights_activations_and_others():
    memory = MemoryProfile(total=100 * GiB, peak_torch=10 * GiB, non_torch=2 * GiB)
    assert memory.kv_cache_bytes(0.9) == 78 * GiB
    assert plan_num_blocks(memory, 0.9, block_bytes=GiB // 4) == 312
    assert plan_num_blocks(memory, 0.5, block_bytes=GiB // 4) == 152


def test_a_share_too_small_for_the_weights_is_a_clear_error():
    memory = MemoryProfile(total=16 * GiB, peak_torch=15 * GiB, non_torch=GiB // 2)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization 0\.9 leaves no memory for the KV cache"):
        plan_num_blocks(memory, 0.9, block_bytes=2**20)


def test_capture_sizes_cover_every_batch_up_to_max_num_seqs():
    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]


def test_decode_splits_fill_the_gpu_at_small_batches_only():
    """H200: 132 SMs. One sequence on 8 KV heads gets 64 partitions (the cap); 64 sequences get 2."""
    assert [decode_splits(b, 8, 132) for b in (1, 2, 8, 16, 64)] == [64, 33, 9, 5, 2]
    assert decode_splits(64, 32, 132) == 1


def test_gpu_memory_utilization_outside_0_1_is_rejected():
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
            EngineConfig(model="m", device="cpu", gpu_memory_utilization=bad)


def test_kv_cache_memory_defaults_to_2gib_on_cpu():
    assert EngineConfig(model="m", device="cpu").kv_cache_bytes == 2 * GiB
    assert EngineConfig(model="m", device="cpu", kv_cache_memory="512MiB").kv_cache_bytes == 512 * 2**20


def test_cli_flags_for_the_gpu_path():
    args = parser().parse_args(["serve", "m", "--gpu-memory-utilization", "0.8", "--enforce-eager"])
    assert args.gpu_memory_utilization == 0.8 and args.enforce_eager and args.kv_cache_memory is None
    args = parser().parse_args(["serve", "m"])
    assert args.gpu_memory_utilization == 0.9 and not args.enforce_eager


def test_profile_step_runs_the_largest_batch_on_every_model(monkeypatch):
    """The planning path on a CPU, with the GPU's measurement replaced: the profile step runs the
    target and the draft model over max_num_batched_tokens tokens in max_num_seqs sampling
    sequences with prompt logprobs (every row but each sequence's last, which samples), and the KV
    cache gets the planned share."""
    from conftest import STORIES
    from engine import gpu_memory
    from engine.kv_cache import kv_block_bytes
    from engine.llm_engine import LLMEngine
    from engine.model_runner import ModelRunner

    steps = []
    real_execute = ModelRunner.execute

    def execute(runner, sched):
        steps.append([item.num_new_tokens for item in sched.scheduled])
        out = real_execute(runner, sched)
        assert out.logits.shape[0] == len(sched.scheduled)  # every profile sequence samples
        assert sum(len(logits) for _, logits in out.prompt_logits.values()) == 100 - 8  # prompt logprobs: all rows
        return out

    def profile(step, device):
        step()
        return MemoryProfile(total=10 * GiB, peak_torch=GiB, non_torch=0)

    monkeypatch.setattr(ModelRunner, "execute", execute)
    monkeypatch.setattr(gpu_memory, "profile", profile)
    config = EngineConfig(model=str(STORIES), dtype="float32", device="cpu", max_num_seqs=8, max_num_batched_tokens=100,
                          gpu_memory_utilization=0.5,
                          speculative=SpeculativeConfig(method="draft", draft_model=str(STORIES), adaptive=False))
    config.kv_cache_bytes = None  # what a CUDA device gets when kv_cache_memory is not given
    engine = LLMEngine(config)
    assert steps == [[13] * 7 + [9]] * 2  # the target, then the draft
    block_bytes = 2 * kv_block_bytes(engine.hf_config, 16, 4)
    assert engine.kv.num_blocks == (5 * GiB - GiB) // block_bytes
