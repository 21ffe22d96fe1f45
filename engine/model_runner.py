"""Turns a SchedulerOutput into tensors, runs the model, returns the logits that need sampling.

Owns the KV cache tensors: one [num_blocks, block_size, kv_heads, head_dim] tensor for K and one for
V per layer, and the CUDA graphs of its decode steps. Attention metadata is built here and passed
down explicitly (no global context), so two models (a draft and a target) can run side by side.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata
from engine.config import MAX_SPECULATIVE_TOKENS, head_dim
from engine.cuda_graphs import DecodeGraphs
from engine.lora import LoRAManager
from engine.outputs import RunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

COMPILED_DECODE_MAX_BATCH = 4


@dataclass
class StepLayout:
    """One step's flat batch on the host: sequence i owns rows ``query_start[i]:query_start[i+1]``."""

    input_ids: list[int]
    positions: list[int]
    query_start: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    sample_rows: list[int]

    @property
    def is_pure_decode(self) -> bool:
        return len(self.input_ids) == len(self.context_lens)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, backend, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, compile_decode: bool = False,
                 lora: LoRAManager | None = None):
        """``lora``: the model's adapters (engine.lora), when requests may name one."""
        config = model.config
        self.model = model
        self.lora = lora
        # Small pure-decode steps have one graph shape (batch size and context kept symbolic) and are
        # dominated by per-op overhead, which compiling removes. Steps with prefill chunks vary too much,
        # and larger decode batches ran slower compiled here (bench-135m bf16, batch 32: ~400 ms vs ~250 ms eager).
        self.decode_forward = torch.compile(model.forward, dynamic=True) if compile_decode else model.forward
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim(config)
        self.scale = self.head_dim ** -0.5
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                          for _ in range(config.num_hidden_layers)]
        self.graphs: DecodeGraphs | None = None

    def metadata(self, slot_mapping: torch.Tensor, block_tables: torch.Tensor, query_start: list[int],
                 context_lens: list[int]) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=slot_mapping, query_start=query_start, context_lens=context_lens,
                                 block_tables=block_tables, block_size=self.block_size, scale=self.scale,
                                 sliding_window=self.model.sliding_window, num_kv_heads=self.num_kv_heads,
                                 head_dim=self.head_dim, cache_dtype=self.kv_caches[0][0].dtype)

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Decode steps of up to ``max_num_seqs`` sequences replay CUDA graphs from now on (on a
        machine without CUDA: run through the same padded static buffers, see engine.cuda_graphs)."""
        start = time.perf_counter()
        before = torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else 0
        max_blocks = -(-(max_model_len + MAX_SPECULATIVE_TOKENS) // self.block_size)  # room for lookahead
        self.graphs = DecodeGraphs(self, max_num_seqs, max_blocks)
        if self.device.type == "cuda":
            self.graphs.capture()
            logger.info("CUDA graphs: decode batch sizes %s captured in %.1f s, %.0f MiB", self.graphs.sizes,
                        time.perf_counter() - start, (torch.cuda.memory_reserved(self.device) - before) / 2**20)

    def layout(self, sched: SchedulerOutput) -> StepLayout:
        batch = StepLayout([], [], [0], [], [], [])
        for item in sched.scheduled:
            req, start = item.request, item.request.num_computed_tokens
            end = start + item.num_scheduled_tokens
            batch.input_ids.extend(req.token_ids[start:start + item.num_new_tokens])
            batch.input_ids.extend(item.spec_token_ids)
            batch.positions.extend(range(start, end))
            batch.query_start.append(batch.query_start[-1] + item.num_scheduled_tokens)
            batch.context_lens.append(end)
            batch.block_tables.append(req.block_table)
            if item.samples:  # the last known token and each draft predict the token after them
                batch.sample_rows.extend(range(batch.query_start[-1] - 1 - len(item.spec_token_ids), batch.query_start[-1]))
        return batch

    def prepare(self, batch: StepLayout) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flat input ids, positions and attention metadata of an eager step."""
        max_blocks = max(len(table) for table in batch.block_tables)
        tables = [table + [0] * (max_blocks - len(table)) for table in batch.block_tables]
        to_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        positions = to_tensor(batch.positions)
        block_tables = to_tensor(tables)
        num_new = [b - a for a, b in zip(batch.query_start, batch.query_start[1:])]
        seq_of_token = torch.repeat_interleave(torch.arange(len(num_new), device=self.device), to_tensor(num_new))
        slot_mapping = (block_tables[seq_of_token, positions // self.block_size] * self.block_size
                        + positions % self.block_size)
        meta = self.metadata(slot_mapping, block_tables, batch.query_start, batch.context_lens)
        return to_tensor(batch.input_ids), positions, self.backend.build_metadata(meta)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run one step; logits for the rows that sample, plus prompt rows whose logprobs were asked for."""
        batch = self.layout(sched)
        if self.lora is not None:
            self.lora.prepare([item.request.lora for item in sched.scheduled],
                              [b - a for a, b in zip(batch.query_start, batch.query_start[1:])], self.device)
        try:
            hidden = self._forward(batch)
        finally:
            if self.lora is not None:
                self.lora.batch = None  # other runners of this model (memory profile, warm-up) run the base
        sample_rows = torch.tensor(batch.sample_rows, dtype=torch.long, device=self.device)
        out = RunnerOutput(self.model.compute_logits(hidden[sample_rows]))
        for item, row in zip(sched.scheduled, batch.query_start):
            req, start = item.request, item.request.num_computed_tokens
            end = min(start + item.num_new_tokens, req.num_prompt_tokens - 1)  # position p predicts token p + 1
            if req.prompt_logprobs is not None and start < end:
                out.prompt_logits[req.request_id] = (start, self.model.compute_logits(hidden[row:row + end - start]))
        return out

    def _forward(self, batch: StepLayout) -> torch.Tensor:
        if self.graphs is not None and self.graphs.fits(batch):
            return self.graphs.run(batch)
        input_ids, positions, meta = self.prepare(batch)
        small_decode = batch.is_pure_decode and len(batch.context_lens) <= COMPILED_DECODE_MAX_BATCH
        # A step with adapter rows runs eagerly: the compiled graph was traced without any.
        compiled = small_decode and (self.lora is None or self.lora.batch is None)
        forward = self.decode_forward if compiled else self.model.forward
        return forward(input_ids, positions, self.kv_caches, meta)
