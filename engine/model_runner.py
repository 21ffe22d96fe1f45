"""Turns a SchedulerOutput into tensors, runs the model, returns the logits that need sampling.

Owns the KV cache tensors: one [num_blocks, block_size, kv_heads, head_dim] tensor for K and one for
V per layer. Attention metadata is built here and passed down explicitly (no global context), so two
models (a draft and a target) can run side by side.
"""

from __future__ import annotations

import torch

from engine.attention import AttentionMetadata
from engine.config import head_dim
from engine.outputs import RunnerOutput, SchedulerOutput


COMPILED_DECODE_MAX_BATCH = 4


class ModelRunner:
    def __init__(self, model: torch.nn.Module, backend, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, compile_decode: bool = False):
        config = model.config
        self.model = model
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

    def prepare(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Flat input ids, positions, attention metadata and the rows whose logits are sampled."""
        input_ids: list[int] = []
        positions: list[int] = []
        query_start = [0]
        context_lens: list[int] = []
        sample_rows: list[int] = []
        for item in sched.scheduled:
            req, start = item.request, item.request.num_computed_tokens
            end = start + item.num_scheduled_tokens
            input_ids.extend(req.token_ids[start:start + item.num_new_tokens])
            input_ids.extend(item.spec_token_ids)
            positions.extend(range(start, end))
            query_start.append(query_start[-1] + item.num_scheduled_tokens)
            context_lens.append(end)
            if item.samples:  # the last known token and each draft predict the token after them
                sample_rows.extend(range(query_start[-1] - 1 - len(item.spec_token_ids), query_start[-1]))
        max_blocks = max(len(item.request.block_table) for item in sched.scheduled)
        tables = [item.request.block_table + [0] * (max_blocks - len(item.request.block_table)) for item in sched.scheduled]
        to_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        positions_t = to_tensor(positions)
        block_tables = to_tensor(tables)
        seq_of_token = torch.repeat_interleave(torch.arange(len(context_lens), device=self.device),
                                               to_tensor([item.num_scheduled_tokens for item in sched.scheduled]))
        slot_mapping = (block_tables[seq_of_token, positions_t // self.block_size] * self.block_size
                        + positions_t % self.block_size)
        meta = AttentionMetadata(slot_mapping=slot_mapping, query_start=query_start, context_lens=context_lens,
                                 block_tables=block_tables, block_size=self.block_size, scale=self.scale,
                                 sliding_window=self.model.sliding_window, num_kv_heads=self.num_kv_heads,
                                 head_dim=self.head_dim, cache_dtype=self.kv_caches[0][0].dtype)
        return to_tensor(input_ids), positions_t, self.backend.build_metadata(meta), to_tensor(sample_rows)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run one step; logits for the rows that sample, plus prompt rows whose logprobs were asked for."""
        input_ids, positions, meta, sample_rows = self.prepare(sched)
        small_decode = len(input_ids) == len(sched.scheduled) <= COMPILED_DECODE_MAX_BATCH
        forward = self.decode_forward if small_decode else self.model.forward
        hidden = forward(input_ids, positions, self.kv_caches, meta)
        out = RunnerOutput(self.model.compute_logits(hidden[sample_rows]))
        for item, row in zip(sched.scheduled, meta.query_start):
            req, start = item.request, item.request.num_computed_tokens
            end = min(start + item.num_new_tokens, req.num_prompt_tokens - 1)  # position p predicts token p + 1
            if req.prompt_logprobs is not None and start < end:
                out.prompt_logits[req.request_id] = (start, self.model.compute_logits(hidden[row:row + end - start]))
        return out
