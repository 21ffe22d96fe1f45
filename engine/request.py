"""A request's sampling parameters and its state as it moves through the engine."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.errors import InvalidRequestError
from engine.structured import StructuredOutputParams

if TYPE_CHECKING:
    from engine.lora import LoRAAdapter

MAX_LOGPROBS = 20
MAX_TOP_K = 2**31 - 1
GREEDY_TEMPERATURE = 1e-5
# Penalties past these are clamped: float32 makes 5e-324 a 0 (logits / 0 = inf, NaN probabilities) and
# 1e300 an inf (0 * inf = NaN), while at these bounds the penalty already decides every token it touches.
REPETITION_PENALTY_RANGE = (1e-6, 1e6)


@dataclass
class SamplingParams:
    """Per-request generation settings, named and defaulted like vLLM's so habits carry over.

    Every invalid value raises ``ValueError`` naming the parameter, so the server can turn it into
    a 400 that points at the right field.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the sampled token's; N: plus the top N alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (for echo)
    skip_special_tokens: bool = True
    structured_output: StructuredOutputParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1", self.max_tokens)
        _check(math.isfinite(self.temperature) and self.temperature >= 0, "temperature", "must be finite and >= 0",
               self.temperature)
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        _check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "must be -1 (disabled), 0 (disabled) or >= 1", self.top_k)
        self.top_k = min(self.top_k, MAX_TOP_K)  # more than the vocabulary is all of it; and it fits a tensor
        _check(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]", self.min_p)
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]", self.presence_penalty)
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]", self.frequency_penalty)
        _check(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
               "must be finite and > 0", self.repetition_penalty)
        self.repetition_penalty = min(max(self.repetition_penalty, REPETITION_PENALTY_RANGE[0]), REPETITION_PENALTY_RANGE[1])
        _check(self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", f"must be in [0, {MAX_LOGPROBS}]", self.logprobs)
        _check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS, "prompt_logprobs",
               f"must be in [0, {MAX_LOGPROBS}]", self.prompt_logprobs)
        _check(all(-100 <= v <= 100 for v in self.logit_bias.values()), "logit_bias", "values must be in [-100, 100]", self.logit_bias)
        _check(self.seed is None or isinstance(self.seed, int), "seed", "must be an integer", self.seed)

    @property
    def greedy(self) -> bool:
        """Temperatures this small are greedy (as in vLLM): dividing logits by them overflows to NaN."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _check(ok: bool, param: str, rule: str, value: object) -> None:
    if not ok:
        raise InvalidRequestError(param, f"{param} {rule}, got {value!r}")


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestTimes:
    """Wall-clock instants (time.monotonic) the server turns into queue time, TTFT and latency."""

    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


class Request:
    """One sequence: its tokens, its place in the KV cache and how far its KV has been computed.

    ``token_ids`` holds prompt and output together; the KV of the first ``num_computed_tokens`` of
    them is in the cache. Each step the scheduler lets that number catch up with ``len(token_ids)``.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: set[int], arrival: float | None = None):
        self.request_id = request_id
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.draft_num_computed = 0  # speculative decoding: how much of token_ids the draft model has KV for
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_token_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_token_ids)
        self.cumulative_logprob = 0.0
        # prompt_logprobs[i]: how likely prompt token i was given the ones before (None for i = 0)
        self.prompt_logprobs: list | None = [None] * len(prompt_token_ids) if params.prompt_logprobs is not None else None
        self.times = RequestTimes() if arrival is None else RequestTimes(arrival=arrival)
        self.matcher = None  # xgrammar.GrammarMatcher when the output is constrained
        self.lora: LoRAAdapter | None = None  # the adapter it runs with (held: unloading it lets this finish)
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed % 2**64)  # any int, as OpenAI allows

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def cache_root(self) -> bytes | None:
        """Where its prefix-cache hash chain starts: its adapter's identity, or None for the base model."""
        return None if self.lora is None else self.lora.uid

    @property
    def finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
