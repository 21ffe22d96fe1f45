"""Speculative decoding: a proposer drafts tokens, the target checks them all in one forward pass.

Exact by rejection sampling (Leviathan et al. 2023; Chen et al. 2023): draft x, drawn from q, is
accepted with probability min(1, p(x) / q(x)); at the first rejection the token is drawn from
normalize(max(0, p - q)) instead; when every draft is accepted the target adds a bonus token from p.
Each token is then distributed exactly as if drawn from p alone. p and q are shaped as without
speculation: logit bias, penalties over the history including the earlier drafts, the grammar mask
after the earlier drafts, temperature, top-k, top-p, min-p. Greedy requests accept drafts while they
equal the target's argmax. A deterministic proposer (n-gram lookup) has a one-hot q.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engine.config import SpeculativeConfig
from engine.model_runner import ModelRunner
from engine.outputs import ScheduledRequest, SchedulerOutput, SpecStats, TokenLogprob
from engine.request import Request
from engine.sampler import Sampler
from engine.spec_policy import AdaptivePolicy
from engine.structured import StructuredOutputs


@dataclass
class Proposal:
    token_ids: list[int]
    probs: torch.Tensor | None = None  # [len(token_ids), vocab]: the draft's distributions; None: one-hot


class DraftPosition:
    """A request as the sampler sees it after its first ``drafts``: same parameters and generator,
    the drafts appended to its history (for penalties)."""

    __slots__ = ("request", "drafts")

    def __init__(self, request: Request, drafts: list[int]):
        self.request, self.drafts = request, drafts

    @property
    def params(self):
        return self.request.params

    @property
    def generator(self) -> torch.Generator | None:
        return self.request.generator

    @property
    def matcher(self):
        """The request's grammar matcher, already advanced over the drafts by the proposer."""
        return self.request.matcher

    @property
    def token_ids(self) -> list[int]:
        return self.request.token_ids + self.drafts

    @property
    def output_token_ids(self) -> list[int]:
        return self.request.output_token_ids + self.drafts


def grammar_prefix(req: Request, tokens: list[int]) -> list[int]:
    """The longest prefix of ``tokens`` the request's grammar accepts, cut after a stop token
    (nothing after it can be used); the matcher is left as it was."""
    kept: list[int] = []
    for token in tokens:
        if req.matcher is not None and not req.matcher.accept_token(token):
            break
        kept.append(token)
        if token in req.stop_token_ids or (req.matcher is not None and req.matcher.is_terminated()):
            break
    if req.matcher is not None and kept:
        req.matcher.rollback(len(kept))
    return kept


class NgramProposer:
    """Prompt lookup: the latest earlier occurrence of the sequence's last n tokens (longest n first)
    and the tokens that followed it. No model and no KV; the proposal is deterministic."""

    forward_seconds: tuple[float, ...] = ()  # no model forwards: drafting costs only the lookup

    def __init__(self, ngram_min: int, ngram_max: int):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max

    def propose(self, reqs: list[Request], num_drafts: list[int]) -> list[Proposal]:
        return [Proposal(grammar_prefix(req, self.lookup(req.token_ids, k))) for req, k in zip(reqs, num_drafts)]

    def lookup(self, token_ids: list[int], k: int) -> list[int]:
        tokens = np.asarray(token_ids)
        for n in range(min(self.ngram_max, len(tokens) - 1), self.ngram_min - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return tokens[start:start + k].tolist()
        return []


class _DraftSequence:
    """A request as the model runner sees it when running the draft model: the draft's own progress
    (``draft_num_computed``) over the request's tokens and the drafts so far, in the target's blocks."""

    prompt_logprobs = None

    def __init__(self, req: Request):
        self.request_id = req.request_id
        self.token_ids = list(req.token_ids)
        self.num_prompt_tokens = req.num_prompt_tokens
        self.num_computed_tokens = req.draft_num_computed
        self.block_table = req.block_table

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class DraftModelProposer:
    """A smaller model on the same vocabulary. Its KV cache has its own tensors but the target's block
    tables, so it needs no block bookkeeping of its own. The first forward catches up on the tokens it
    has not seen (the prompt, then each step's accepted tokens) and drafts one token; each further
    forward drafts one more, for every request at once."""

    def __init__(self, runner: ModelRunner, sampler: Sampler, structured: Callable[[], StructuredOutputs]):
        self.runner, self.sampler, self.structured = runner, sampler, structured
        self.forward_seconds: list[float] = []  # the last proposal's forwards, the catch-up one first

    def propose(self, reqs: list[Request], num_drafts: list[int]) -> list[Proposal]:
        self.forward_seconds = []
        seqs = [_DraftSequence(req) for req in reqs]
        drafts: list[list[int]] = [[] for _ in reqs]
        probs: list[list[torch.Tensor]] = [[] for _ in reqs]
        active = [i for i, k in enumerate(num_drafts) if k > 0]
        try:
            while active:
                started = time.perf_counter()
                sched = SchedulerOutput([ScheduledRequest(seqs[i], seqs[i].num_tokens - seqs[i].num_computed_tokens)
                                         for i in active])
                logits = self.runner.execute(sched).logits
                views = [DraftPosition(reqs[i], drafts[i]) for i in active]
                bitmask = self.structured().bitmask(views) if any(v.matcher is not None for v in views) else None
                logits, p = self.sampler.shape(logits, views, bitmask)
                tokens = self.sampler.pick(logits, p, views).tolist()
                still = []
                for row, (i, token) in enumerate(zip(active, tokens)):
                    req, seq = reqs[i], seqs[i]
                    seq.num_computed_tokens = seq.num_tokens
                    if req.matcher is not None and not req.matcher.accept_token(token):
                        continue  # only a grammar with nothing left to allow gets here: stop drafting
                    seq.token_ids.append(token)
                    drafts[i].append(token)
                    if not req.params.greedy:
                        probs[i].append(p[row])
                    ended = token in req.stop_token_ids or (req.matcher is not None and req.matcher.is_terminated())
                    if len(drafts[i]) < num_drafts[i] and not ended:
                        still.append(i)
                active = still
                self.forward_seconds.append(time.perf_counter() - started)
        finally:  # the grammar ends where it began, also when a failed step is run again
            for req, d in zip(reqs, drafts):
                if req.matcher is not None and d:
                    req.matcher.rollback(len(d))
        for req, seq in zip(reqs, seqs):
            req.draft_num_computed = seq.num_computed_tokens
        return [Proposal(d, torch.stack(q) if q else None) for d, q in zip(drafts, probs)]


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Rows of normalize(max(0, p - q)): where a rejected draft's token is drawn from. A row with no
    mass left (p <= q everywhere, i.e. p == q up to rounding) falls back to p."""
    r = (p - q).clamp_(min=0)
    total = r.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=torch.finfo(r.dtype).tiny), p)


@dataclass
class Verified:
    """Per request: the tokens this step adds (accepted drafts + the target's own) and their logprobs."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Speculator:
    """Drafts for the scheduled requests, verifies them, keeps the stats, and (adaptive) decides how
    many tokens to draft per step."""

    def __init__(self, config: SpeculativeConfig, proposer, sampler: Sampler,
                 structured: Callable[[], StructuredOutputs]):
        self.max_k = config.num_speculative_tokens
        self.proposer, self.sampler, self.structured = proposer, sampler, structured
        self.policy = AdaptivePolicy(self.max_k) if config.adaptive else None
        self.stats = SpecStats(drafted_per_position=[0] * self.max_k, accepted_per_position=[0] * self.max_k)
        self.step_k = self.max_k
        self.draft_seconds = 0.0

    def lookahead(self, batch_size: int) -> Callable[[Request], int]:
        """Draft slots per request for the next step. Seeded requests always draft the full k, so the
        random numbers they consume, and so their text, do not depend on the policy's timing."""
        self.step_k = self.policy.choose(batch_size) if self.policy is not None else self.max_k
        return lambda req: self.max_k if req.generator is not None else self.step_k

    def propose(self, sched: SchedulerOutput) -> None:
        started = time.perf_counter()
        items = [item for item in sched.scheduled if item.num_lookahead]
        if items:
            proposals = self.proposer.propose([item.request for item in items], [item.num_lookahead for item in items])
            for item, proposal in zip(items, proposals):
                item.spec_token_ids, item.draft_probs = proposal.token_ids, proposal.probs
        self.draft_seconds = time.perf_counter() - started

    @torch.inference_mode()
    def verify(self, logits: torch.Tensor, items: list[ScheduledRequest]) -> list[Verified]:
        """``logits``: 1 + len(drafts) rows per item (runner order)."""
        reqs = [item.request for item in items]
        drafts = [item.spec_token_ids for item in items]
        views = [DraftPosition(req, d[:j]) for req, d in zip(reqs, drafts) for j in range(len(d) + 1)]
        raw = logits.log_softmax(dim=-1) if any(r.params.logprobs is not None for r in reqs) else None
        bitmask = self.structured().bitmask(reqs, drafts) if any(r.matcher is not None for r in reqs) else None
        logits, probs = self.sampler.shape(logits, views, bitmask)
        argmax = logits.argmax(dim=-1)
        starts = np.cumsum([0] + [len(d) + 1 for d in drafts]).tolist()
        accepted = self._accept_drafts(argmax, probs, items, starts)
        final = self._final_tokens(argmax, probs, items, starts, accepted)
        out = []
        for req, d, start, n, token in zip(reqs, drafts, starts, accepted, final):
            tokens = d[:n] + [token]
            rows = slice(start, start + n + 1)
            logprobs = (self.sampler.logprobs(raw[rows], torch.tensor(tokens, device=logits.device), [req] * (n + 1))
                        if raw is not None else [None] * (n + 1))
            out.append(Verified(tokens, logprobs))
        return out

    def _accept_drafts(self, argmax: torch.Tensor, probs: torch.Tensor | None, items: list[ScheduledRequest],
                       starts: list[int]) -> list[int]:
        """How many leading drafts each request accepts."""
        rows, ids, q, greedy = [], [], [], []
        for item, start in zip(items, starts):
            d = item.spec_token_ids
            rows.extend(range(start, start + len(d)))
            ids.extend(d)
            greedy.extend([item.request.params.greedy] * len(d))
            q.append(item.draft_probs[torch.arange(len(d)), d] if item.draft_probs is not None else torch.ones(len(d)))
        if not rows:
            return [0] * len(items)
        device = argmax.device
        rows_t, ids_t = torch.tensor(rows, device=device), torch.tensor(ids, device=device)
        ok = argmax[rows_t] == ids_t
        if probs is not None:
            views = [DraftPosition(item.request, []) for item in items for _ in item.spec_token_ids]
            u = self.sampler.uniforms(views, device)
            by_ratio = u * torch.cat(q).to(device, torch.float64) <= probs[rows_t, ids_t].double()
            ok = torch.where(torch.tensor(greedy, device=device), ok, by_ratio)
        flags = ok.tolist()
        counts, pos = [], 0
        for item in items:
            n = len(item.spec_token_ids)
            row_flags = flags[pos:pos + n]
            counts.append(row_flags.index(False) if False in row_flags else n)
            pos += n
        return counts

    def _final_tokens(self, argmax: torch.Tensor, probs: torch.Tensor | None, items: list[ScheduledRequest],
                      starts: list[int], accepted: list[int]) -> list[int]:
        """The target's own token per request: after the accepted drafts, from the residual where a
        draft was rejected, from p where all were accepted (the bonus token); argmax for greedy rows."""
        rows = [start + n for start, n in zip(starts, accepted)]
        tokens = argmax[rows]
        if probs is None:
            return tokens.tolist()
        p = probs[rows]
        q = torch.zeros_like(p)
        for i, (item, n) in enumerate(zip(items, accepted)):
            if n < len(item.spec_token_ids):  # rejected at draft n
                if item.draft_probs is not None:
                    q[i] = item.draft_probs[n]
                else:
                    q[i, item.spec_token_ids[n]] = 1.0
        rejected = torch.tensor([n < len(item.spec_token_ids) for item, n in zip(items, accepted)], device=p.device)
        dist = torch.where(rejected[:, None], residual(p, q), p)
        reqs = [item.request for item in items]
        greedy = torch.tensor([r.params.greedy for r in reqs], device=p.device)
        return torch.where(greedy, tokens, self.sampler.draw(dist, reqs)).tolist()

    def record(self, items: list[ScheduledRequest], accepted: list[int]) -> None:
        """Count drafts and acceptances (overall and per position) and tell the policy."""
        k = max((len(item.spec_token_ids) for item in items), default=0)
        reached, accepted_at = [0] * k, [0] * k
        for item, n in zip(items, accepted):
            d = len(item.spec_token_ids)
            if not d:
                continue
            self.stats.num_drafts += 1
            self.stats.draft_tokens += d
            self.stats.accepted_tokens += n
            for j in range(d):
                self.stats.drafted_per_position[j] += 1
                self.stats.accepted_per_position[j] += j < n
                reached[j] += j <= n
                accepted_at[j] += j < n
        if self.policy is not None:
            self.policy.observe_acceptance(reached, accepted_at)
            self.stats.switches = self.policy.switches

    def observe_step(self, items: list[ScheduledRequest], step_seconds: float) -> None:
        """Tell the policy what a pure decode step cost (drafting, and the rest), when every request
        drafted the step's k."""
        if self.policy is not None and all(item.num_lookahead == self.step_k for item in items):
            k = max((len(item.spec_token_ids) for item in items), default=0)
            self.policy.observe_step(len(items), k, self.draft_cost(k), step_seconds - self.draft_seconds)

    def draft_cost(self, k: int) -> float:
        """What drafting k tokens costs in steady state. The first draft forward also catches up on the
        tokens the draft has not seen, which after a stretch without speculation can be many; counting
        them would make every probe look dear and keep speculation off, so single-token forwards set the price."""
        forwards = self.proposer.forward_seconds
        steady = forwards[1:] or forwards
        return k * sum(steady) / len(steady) if steady else self.draft_seconds
