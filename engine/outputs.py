"""Typed messages between the layers: scheduler -> runner -> engine -> callers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.request import Request, RequestTimes


@dataclass
class ScheduledRequest:
    """``num_new_tokens`` of the request's own tokens, then (speculative decoding) draft tokens that the
    same forward pass verifies; ``num_lookahead`` KV slots were reserved for them."""

    request: Request
    num_new_tokens: int
    num_lookahead: int = 0
    spec_token_ids: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None  # [len(spec_token_ids), vocab]; None: a deterministic proposal

    @property
    def num_scheduled_tokens(self) -> int:
        return self.num_new_tokens + len(self.spec_token_ids)

    @property
    def samples(self) -> bool:
        """True when this step computes the request's last known token, so a new one is sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted: list[Request] = field(default_factory=list)


@dataclass
class RunnerOutput:
    """Float32 logits of the rows to sample (in scheduled order; 1 + number of drafts per request), and of the prompt positions whose
    logprobs were asked for: request id -> (first position, [n, vocab])."""

    logits: torch.Tensor
    prompt_logits: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)


@dataclass
class TokenLogprob:
    """The sampled token's log-probability and the top-N alternatives (token id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class RequestOutput:
    """A delta for one request from one engine step: what is new since the last delta."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    new_logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first delta, when asked for
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    cumulative_logprob: float = 0.0
    times: RequestTimes | None = None
    error: str | None = None


@dataclass
class GenerationOutput:
    """The whole result of one prompt, as ``LLM.generate`` returns it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None
    logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[TokenLogprob | None] | None
    cumulative_logprob: float
    num_cached_tokens: int


@dataclass
class SpecStats:
    """Speculative decoding counters: ``num_drafts`` request-steps with drafts; per draft position j,
    how many drafts were proposed there and how many accepted (which needs all earlier ones accepted)."""

    num_drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    switches: int = 0  # the adaptive policy turned speculation on or off

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a request gains per speculative step: accepted drafts + the one the target adds."""
        return 1 + self.accepted_tokens / self.num_drafts if self.num_drafts else 0.0


@dataclass
class EngineStats:
    """Counters and gauges the server exports as metrics."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    jump_forward_tokens: int
    spec: SpecStats = field(default_factory=SpecStats)
    max_loras: int = 0  # LoRA slots (0: LoRA not enabled)
    running_loras: list[str] = field(default_factory=list)  # adapters of running requests, by name
    waiting_loras: list[str] = field(default_factory=list)  # adapters only waiting requests use
