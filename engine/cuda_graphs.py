"""Decode steps replayed from CUDA graphs.

At small batch sizes a decode step on a GPU is mostly kernel launches: a 16-layer model issues a
few hundred small kernels, each launched from Python in more time than it runs. A CUDA graph
records them once and replays them all in one launch. A replay repeats the recorded addresses and
shapes exactly, so:

* graphs are captured for batch sizes 1, 2, 4, 8 and every multiple of 8 up to ``max_num_seqs``; a
  step of b single-token sequences replays the smallest size >= b, the rows past b padded (cache slot
  -1, so they write no KV; context length 1, so they read one cached key; their output is dropped);
* the inputs (token ids, positions, slots, block tables, context lengths) live in static buffers
  sized for the largest graph and are copied in before each replay;
* with LoRA adapters, each row is its own segment of the LoRA kernel, its slot in a static buffer
  (-1 for the base model and the padding), so one graph serves any mix of adapters;
* the attention's layout is fixed per batch size: each row's context is cut into the same number of
  flash-decoding partitions, enough (row, KV head, partition) programs to fill the GPU.

Steps with prefill chunks or speculative drafts run eagerly. Without CUDA (Triton's interpreter in
the CPU tests) the same static buffers feed a direct call instead of a replay; that is how the
padding and the fixed layout are checked against eager decoding on a CPU.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import torch

from engine.lora import LoRABatch

if TYPE_CHECKING:
    from engine.attention import AttentionMetadata
    from engine.model_runner import ModelRunner, StepLayout

# Partitions per row: aim for this many waves of (row, KV head, partition) programs over the SMs.
WAVES = 4
MAX_SPLITS = 64
INTERPRETER_SMS = 4  # without CUDA: few enough that small test batches still take the split-K path


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to and including max_num_seqs."""
    return sorted({s for s in (1, 2, 4) if s < max_num_seqs} | set(range(8, max_num_seqs, 8)) | {max_num_seqs})


def decode_splits(batch_size: int, num_kv_heads: int, num_sms: int) -> int:
    """Flash-decoding partitions per row for a captured batch size: a lone sequence is cut into many
    so that it still keeps every SM busy; a full batch has enough programs without cutting."""
    return max(1, min(MAX_SPLITS, -(-WAVES * num_sms // (batch_size * num_kv_heads))))


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_num_seqs: int, max_blocks: int):
        device = runner.device
        self.sizes = capture_sizes(max_num_seqs)
        self.max_blocks = max_blocks
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else INTERPRETER_SMS
        self.metadata: dict[int, AttentionMetadata] = {
            size: runner.backend.static_decode_metadata(
                runner.metadata(self.slot_mapping[:size], self.block_tables[:size], list(range(size + 1)), [1] * size),
                self.context_lens[:size], decode_splits(size, runner.num_kv_heads, sms))
            for size in self.sizes}
        self.lora = runner.lora if device.type == "cuda" else None  # without CUDA: the step's own LoRA batch
        self.lora_slots = torch.full((n,), -1, dtype=torch.int32, device=device)
        self.lora_rows = torch.arange(n, dtype=torch.int32, device=device)
        self.lora_lens = torch.ones(n, dtype=torch.int32, device=device)

        def forward(size: int) -> torch.Tensor:
            if self.lora is not None:
                self.lora.batch = LoRABatch(seg_start=self.lora_rows[:size], seg_len=self.lora_lens[:size],
                                            seg_slot=self.lora_slots[:size])
            return runner.model.forward(self.input_ids[:size], self.positions[:size], runner.kv_caches,
                                        self.metadata[size])

        self.forward = forward
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0  # steps served from a graph (or, without CUDA, from the static buffers)

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per batch size, largest first, all in one memory pool (a smaller graph
        reuses the larger ones' activation memory). Each size runs twice first on a side stream:
        Triton compiles its kernels and the allocator settles outside the capture. The buffers hold
        padding only, so these runs write no KV."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.input_ids.device)
        for size in reversed(self.sizes):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.forward(size)
                self.forward(size)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.forward(size)
            self.graphs[size] = (graph, hidden)
        torch.cuda.synchronize()
        if self.lora is not None:
            self.lora.batch = None

    def fits(self, batch: StepLayout) -> bool:
        return (batch.is_pure_decode and len(batch.input_ids) <= self.sizes[-1]
                and max(len(table) for table in batch.block_tables) <= self.max_blocks)

    def run(self, batch: StepLayout) -> torch.Tensor:
        """Hidden states of the batch's rows: its inputs copied into the static buffers, the rows up
        to the captured size padded, the graph replayed."""
        b = len(batch.input_ids)
        size = self.sizes[bisect.bisect_left(self.sizes, b)]
        block_size = self.metadata[size].block_size
        slots = [table[p // block_size] * block_size + p % block_size
                 for table, p in zip(batch.block_tables, batch.positions)]
        width = max(len(table) for table in batch.block_tables)
        tables = [table + [0] * (width - len(table)) for table in batch.block_tables]
        longs = torch.tensor([batch.input_ids, batch.positions, slots], dtype=torch.long)
        ints = torch.tensor([[n] + table for n, table in zip(batch.context_lens, tables)], dtype=torch.int32)
        self.input_ids[:b].copy_(longs[0], non_blocking=True)
        self.positions[:b].copy_(longs[1], non_blocking=True)
        self.slot_mapping[:b].copy_(longs[2], non_blocking=True)
        self.slot_mapping[b:size].fill_(-1)  # rows a larger batch left behind must not write its KV
        self.context_lens[:b].copy_(ints[:, 0], non_blocking=True)
        self.context_lens[b:size].fill_(1)
        self.block_tables[:b, :width].copy_(ints[:, 1:], non_blocking=True)
        if self.lora is not None:
            self.lora_slots[:b].copy_(torch.tensor(self.lora.item_slots, dtype=torch.int32), non_blocking=True)
            self.lora_slots[b:size].fill_(-1)
        self.replays += 1
        if size not in self.graphs:  # no CUDA: the same buffers, called directly
            return self.forward(size)[:b]
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden[:b]
