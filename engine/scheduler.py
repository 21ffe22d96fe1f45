"""Continuous batching with one token budget and no prefill/decode phases.

Each step, every request's ``num_computed_tokens`` catches up with its ``num_tokens`` as far as the
budget allows: a decoding request needs one token, a prompt needs many and may be split into
chunks across steps (chunked prefill), so prefills and decodes share a step. Running requests go
first, in admission order; then waiting ones are admitted while budget, sequence slots and blocks last.
When blocks run out, the most recently admitted running request is preempted: its blocks are
freed and it goes back to the front of the queue to be recomputed later (its cached prefix blocks
usually survive, so the recompute is cheap). With LoRA adapters, at most ``max_loras`` distinct ones
run at once: a waiting request of another adapter is passed over (keeping its place) until one's
requests finish, and the requests behind it go ahead.

With speculative decoding, a request whose chunk reaches its last token also gets up to
``lookahead_of(request)`` extra KV slots (and budget) for draft tokens; lookahead never causes preemption:
when blocks are short a request simply decodes without drafts this step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from engine.kv_cache import KVCacheManager
from engine.outputs import ScheduledRequest, SchedulerOutput
from engine.request import Request, RequestStatus


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_loras: int = 0):
        """``max_loras``: the most distinct LoRA adapters running at once (the slots of engine.lora)."""
        self.kv = kv
        self.max_loras = max_loras
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, lookahead_of: Callable[[Request], int] | None = None) -> SchedulerOutput:
        """``lookahead_of``: draft slots wanted per request (speculative decoding); None: none."""
        lookahead_of = lookahead_of or (lambda _req: 0)
        budget = self.max_num_batched_tokens
        out = SchedulerOutput(scheduled=[])
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            # Drafts never take the token the running requests after this one need to decode at all.
            spare = budget - (len(self.running) - i - 1)
            wanted = self._lookahead(req, req.num_computed_tokens, num_new, spare, lookahead_of(req))
            while (lookahead := self._allocate(req, req.num_computed_tokens + num_new, wanted)) is None:
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, num_new, lookahead))
                budget -= num_new + lookahead
                i += 1
        adapters = {req.lora.uid for req in self.running if req.lora is not None}
        passed_over: list[Request] = []  # waiting for a LoRA slot; they keep their place in the queue
        while self.waiting and not out.preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.lora is not None and req.lora.uid not in adapters and len(adapters) >= self.max_loras:
                passed_over.append(self.waiting.popleft())
                continue
            # Prompt logprobs need every prompt position computed, so such requests skip the cache.
            cached = [] if req.prompt_logprobs is not None else self.kv.find_cached_prefix(req.token_ids, req.cache_root)
            if self._prefix_in_flight(req, len(cached)):
                break
            num_computed = len(cached) * self.kv.block_size
            num_new = min(req.num_tokens - num_computed, budget)
            lookahead = self._allocate(req, num_computed + num_new,
                                       self._lookahead(req, num_computed, num_new, budget, lookahead_of(req)), cached)
            if lookahead is None:
                break
            if req.prompt_logprobs is None:
                self.kv.prefix_queries += req.num_tokens
                self.kv.prefix_hits += num_computed
            self.waiting.popleft()
            req.num_computed_tokens = num_computed
            if req.times.first_scheduled is None:
                req.num_cached_tokens = num_computed
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            if req.lora is not None:
                adapters.add(req.lora.uid)
            out.scheduled.append(ScheduledRequest(req, num_new, lookahead))
            budget -= num_new + lookahead
        self.waiting.extendleft(reversed(passed_over))
        return out

    def _prefix_in_flight(self, req: Request, num_cached_blocks: int) -> bool:
        """Is a running request about to compute the next block of this one's prompt (the same
        tokens so far)? Then this one waits at the head of the queue and takes it from the cache
        afterwards: the n samples of one prompt (n > 1, best_of) prefill it once, not n times."""
        if not self.kv.enable_prefix_caching or req.prompt_logprobs is not None:
            return False
        end = (num_cached_blocks + 1) * self.kv.block_size  # the next block; a hit never covers the last token
        if end >= req.num_tokens:
            return False
        prefix = req.token_ids[:end]
        return any(other.num_computed_tokens < end <= other.num_tokens and other.cache_root == req.cache_root
                   and other.token_ids[:end] == prefix for other in self.running)

    @staticmethod
    def _lookahead(req: Request, num_computed: int, num_new: int, budget: int, wanted: int) -> int:
        """Draft slots worth reserving: only when this chunk reaches the request's last token, and
        never past max_tokens (the target adds one token of its own) or the step's budget."""
        if wanted <= 0 or num_computed + num_new < req.num_tokens:
            return 0
        return max(0, min(wanted, budget - num_new, req.params.max_tokens - req.num_output_tokens - 1))

    def _allocate(self, req: Request, num_tokens: int, lookahead: int, cached: Sequence[int] = ()) -> int | None:
        """Blocks for ``num_tokens`` plus the lookahead if possible, else without it; the lookahead
        granted, or None when not even ``num_tokens`` fit."""
        if lookahead and self.kv.allocate(req.block_table, num_tokens + lookahead, cached):
            return lookahead
        return 0 if self.kv.allocate(req.block_table, num_tokens, cached) else None

    def update(self, sched: SchedulerOutput) -> None:
        """After the forward pass: the scheduled tokens' KV is in the cache (the KV of accepted draft
        tokens is counted by the engine once it knows which were accepted)."""
        for item in sched.scheduled:
            req = item.request
            req.num_computed_tokens += item.num_new_tokens
            self.kv.cache_full_blocks(req.block_table, req.block_hashes, req.token_ids, req.num_computed_tokens,
                                      req.cache_root)

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request from wherever it is and free its blocks at once."""
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status == RequestStatus.WAITING:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        self.kv.free_blocks(req.block_table)

    def _preempt(self, req: Request) -> None:
        self.kv.free_blocks(req.block_table)
        req.block_hashes.clear()
        req.num_computed_tokens = 0
        req.draft_num_computed = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1
