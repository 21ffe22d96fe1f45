"""Batched sampling with per-request parameters in one set of tensor ops.

Order: logit bias -> penalties -> grammar mask -> (greedy rows: argmax) -> temperature -> top-k -> top-p -> min-p ->
draw. A draw is one uniform number per row, placed on the row's cumulative distribution (inverse-CDF
sampling, exact up to float rounding and O(1) random numbers per row); a request with a seed draws it
from its own generator, so its output does not depend on which other requests share the batch. Logprobs are those of the model's raw distribution (as vLLM's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.outputs import TokenLogprob
from engine.request import Request
from engine.structured import apply_bitmask

NEG_INF = float("-inf")
# A temperature above this samples as this one: logits differ by far less than 1e6, so the distribution is
# already uniform over the allowed tokens, while float32 turns 1e39 into inf and a masked -inf / inf into NaN.
MAX_TEMPERATURE = 1e6


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def apply_logit_bias(logits: torch.Tensor, reqs: list[Request]) -> None:
    for row, req in enumerate(reqs):
        if req.params.logit_bias:
            ids = torch.tensor(list(req.params.logit_bias), device=logits.device)
            logits[row, ids] += torch.tensor(list(req.params.logit_bias.values()), device=logits.device)


def apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> None:
    """OpenAI presence/frequency penalties over output tokens; HF-style repetition penalty over
    prompt and output tokens (positive logits divided by it, negative ones multiplied)."""
    device = logits.device
    counts = torch.zeros_like(logits)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    for row, req in enumerate(reqs):
        if req.params.has_penalties:
            out = torch.tensor(req.output_token_ids, dtype=torch.long, device=device)
            counts[row].index_add_(0, out, torch.ones(len(out), device=device))
            seen[row, torch.tensor(req.token_ids, dtype=torch.long, device=device)] = True
    tensor = lambda name: torch.tensor([getattr(r.params, name) for r in reqs], device=device)[:, None]  # noqa: E731
    rep = tensor("repetition_penalty")
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits.copy_(torch.where(seen, penalised, logits))
    logits -= tensor("frequency_penalty") * counts + tensor("presence_penalty") * (counts > 0)


def top_k_mask(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th included); k <= 0 keeps all."""
    vocab = logits.shape[1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_mask(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (renormalised)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = (mass_before >= top_p[:, None]) & (top_p < 1)[:, None]  # rows without top-p stay untouched
    drop_sorted[:, 0] = False  # the most likely token stays, even for a top_p float32 rounds to 0 (5e-324)
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def min_p_mask(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely one (renormalised)."""
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    probs = probs.masked_fill(probs < threshold, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def processed_probs(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """The distribution a (non-greedy) request samples from: temperature, top-k, top-p, min-p."""
    device = logits.device
    temps = torch.tensor([1.0 if r.params.greedy else min(r.params.temperature, MAX_TEMPERATURE) for r in reqs],
                         device=device)
    logits = logits / temps[:, None]
    if any(r.params.top_k > 0 for r in reqs):
        logits = top_k_mask(logits, torch.tensor([r.params.top_k for r in reqs], device=device))
    probs = logits.softmax(dim=-1)
    if any(r.params.top_p < 1 for r in reqs):
        probs = top_p_mask(probs, torch.tensor([r.params.top_p for r in reqs], device=device))
    if any(r.params.min_p > 0 for r in reqs):
        probs = min_p_mask(probs, torch.tensor([r.params.min_p for r in reqs], device=device))
    return probs


def token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, top_n: list[int | None]) -> list[TokenLogprob | None]:
    """Row i: the logprob of tokens[i] and the top_n[i] most likely alternatives (None: not asked for)."""
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
    max_n = max((n or 0) for n in top_n)
    top_vals, top_ids = logprobs.topk(max_n, dim=-1) if max_n else (None, None)
    out: list[TokenLogprob | None] = []
    for row, n in enumerate(top_n):
        if n is None:
            out.append(None)
            continue
        top = dict(zip(top_ids[row, :n].tolist(), top_vals[row, :n].tolist())) if n else {}
        out.append(TokenLogprob(int(tokens[row]), chosen[row], top))
    return out


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def uniforms(self, reqs: list[Request], device: torch.device) -> torch.Tensor:
        """One number in (0, 1] per row: seeded rows from their own generator, the rest from the engine's."""
        u = 1.0 - torch.rand(len(reqs), generator=self.generator, dtype=torch.float64)
        for row, req in enumerate(reqs):
            if req.generator is not None:
                u[row] = 1.0 - torch.rand(1, generator=req.generator, dtype=torch.float64)
        return u.to(device)

    def draw(self, probs: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Inverse-CDF draw: the first token whose cumulative probability reaches u * total. A token
        with probability 0 adds nothing to the cumulative sum, so it can never be the first to reach it."""
        cdf = probs.double().cumsum(dim=-1)
        target = (self.uniforms(reqs, probs.device) * cdf[:, -1])[:, None]
        return torch.searchsorted(cdf, target).squeeze(1).clamp_(max=probs.shape[1] - 1)

    @torch.inference_mode()  # the logits are inference tensors: in-place edits need the same mode
    def shape(self, logits: torch.Tensor, reqs: list, bitmask=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logit bias, penalties and the grammar mask applied to ``logits`` (in place), and the
        distribution the non-greedy rows sample from (None when every row is greedy). ``reqs`` are
        Requests or anything with their ``params``, ``token_ids``, ``output_token_ids`` and ``generator``."""
        if any(r.params.logit_bias for r in reqs):
            apply_logit_bias(logits, reqs)
        if any(r.params.has_penalties for r in reqs):
            apply_penalties(logits, reqs)
        apply_bitmask(logits, bitmask)
        return logits, None if all(r.params.greedy for r in reqs) else processed_probs(logits, reqs)

    def pick(self, logits: torch.Tensor, probs: torch.Tensor | None, reqs: list) -> torch.Tensor:
        """Argmax for greedy rows, a draw from ``probs`` for the others."""
        tokens = logits.argmax(dim=-1)
        if probs is None:
            return tokens
        greedy = torch.tensor([r.params.greedy for r in reqs], device=logits.device)
        return torch.where(greedy, tokens, self.draw(probs, reqs))

    def __call__(self, logits: torch.Tensor, reqs: list[Request], bitmask=None) -> SamplerOutput:
        """``bitmask``: the grammar mask for the constrained rows (see engine.structured)."""
        raw_logprobs = logits.log_softmax(dim=-1) if any(r.params.logprobs is not None for r in reqs) else None
        tokens = self.pick(*self.shape(logits, reqs, bitmask), reqs)
        return SamplerOutput(tokens.tolist(), self.logprobs(raw_logprobs, tokens, reqs))

    @staticmethod
    def logprobs(raw_logprobs: torch.Tensor | None, tokens: torch.Tensor, reqs: list) -> list[TokenLogprob | None]:
        """Per row, the chosen token's logprob and top alternatives, for the requests that asked."""
        if raw_logprobs is None:
            return [None] * len(reqs)
        return token_logprobs(raw_logprobs, tokens, [r.params.logprobs for r in reqs])
