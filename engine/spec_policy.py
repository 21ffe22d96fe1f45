"""How many tokens to draft this step: speculation only where it pays for itself.

A step that drafts k tokens per request costs k draft forwards plus a verify step that is dearer than
a plain decode step (1 + k tokens per request; on a CPU the step from one row to two, matrix-vector to
matrix-matrix, costs the most, so the cost is measured per k rather than assumed linear), and gains each request
1 + a1 + a1*a2 + ... + a1*...*ak tokens, where aj is the measured rate at which draft position j is
accepted once every earlier one was. The policy keeps moving averages of those costs per batch-size
bucket (decode is memory-bound at small batches and compute-bound at large ones, so the answer
changes with the batch) and of the acceptance rates, and picks the k with the most tokens per
second; k = 0 is plain decoding. A choice held for ``PROBE_EVERY`` steps in a row is challenged once
by the other extreme, so costs and acceptance are re-measured and speculation comes back when it
pays again; each probe that confirms the choice doubles the wait before the next. Turning speculation
back on must win by ``SWITCH_MARGIN``, while it goes off as soon as plain decoding looks faster:
plain is the safe side, and where the two are close one noisy step would otherwise flip the choice
back and forth.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

EMA = 0.2  # weight of the newest measurement
OUTLIER = 2.0  # a measurement above this multiple of the average counts as this multiple
PROBE_EVERY = 16  # steps a choice is held before the other extreme is tried; doubles while probes confirm it
MAX_PROBE_EVERY = 512
WARM_UP = 1  # first measurements of each kind per bucket dropped (new shapes: one-off allocations)
TRUSTED = 3  # measurements of each kind a bucket needs before it is trusted
SWITCH_MARGIN = 0.1  # how much faster speculation must look than plain decoding to be turned back on


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new


def _cost_ema(old: float | None, new: float) -> float:
    """A cost's moving average, one measurement counting as at most ``OUTLIER`` times the average: a
    single stalled step (a GC pause, a busy neighbour) cannot flip the choice, while a lasting change
    still moves it by up to 20% a step."""
    return _ema(old, new if old is None else min(new, OUTLIER * old))


class _Bucket:
    """Measured costs at one batch-size range, in seconds."""

    def __init__(self) -> None:
        self.plain_step: float | None = None
        self.draft_forward: float | None = None  # one draft forward for the whole batch
        self.verify_step: dict[int, float] = {}  # k -> the target's step (forward, sampling, outputs) with k drafts
        self.num_plain = 0
        self.num_spec = 0
        self.last_choice: int | None = None  # None: nothing chosen yet
        self.streak = 0
        self.probe_every = PROBE_EVERY


class AdaptivePolicy:
    def __init__(self, max_k: int):
        self.max_k = max_k
        self.acceptance: list[float | None] = [None] * max_k  # conditional acceptance per draft position
        self.buckets: dict[int, _Bucket] = {}
        self.speculating = True  # it starts on, while the first costs and acceptance are measured
        self.switches = 0

    def choose(self, batch_size: int) -> int:
        """Draft tokens per request for a step of ``batch_size`` decoding requests."""
        bucket = self.buckets.setdefault(max(batch_size, 1).bit_length(), _Bucket())
        if bucket.num_plain < TRUSTED:
            return 0
        if bucket.num_spec < TRUSTED or self.acceptance[0] is None:
            return self.max_k
        rates = [self.tokens_per_second(bucket, k) for k in range(self.max_k + 1)]
        best = max(range(self.max_k + 1), key=lambda k: (rates[k], -k))
        if bucket.last_choice == 0 and best > 0 and rates[best] < rates[0] * (1 + SWITCH_MARGIN):
            best = 0
        if (best > 0) != ((bucket.last_choice or 0) > 0):
            bucket.streak, bucket.probe_every = 0, PROBE_EVERY
        bucket.streak += 1
        bucket.last_choice = best
        self._note_switch(best > 0)
        if bucket.streak >= bucket.probe_every:  # re-measure the road not taken, less often while it keeps losing
            bucket.streak, bucket.probe_every = 0, min(2 * bucket.probe_every, MAX_PROBE_EVERY)
            return 0 if best else self.max_k
        return best

    def expected_tokens(self, k: int) -> float:
        """Tokens a request gains from a step that drafts k: 1 + a1 + a1*a2 + ..."""
        total, reach = 1.0, 1.0
        last = 0.0
        for j in range(k):
            last = self.acceptance[j] if self.acceptance[j] is not None else last
            reach *= last
            total += reach
        return total

    def tokens_per_second(self, bucket: _Bucket, k: int) -> float:
        if k == 0:
            return 1.0 / bucket.plain_step
        # A k not measured yet costs what the nearest measured one did (the larger on a tie).
        nearest = min(bucket.verify_step, key=lambda measured: (abs(measured - k), -measured))
        return self.expected_tokens(k) / (k * bucket.draft_forward + bucket.verify_step[nearest])

    def observe_step(self, batch_size: int, k: int, draft_seconds: float, step_seconds: float) -> None:
        """A decode step of ``batch_size`` requests that drafted ``k`` tokens each (0: plain):
        ``draft_seconds`` drafting, ``step_seconds`` everything else (the forward, sampling, outputs)."""
        bucket = self.buckets.setdefault(max(batch_size, 1).bit_length(), _Bucket())
        if k == 0:
            bucket.num_plain += 1
            if bucket.num_plain > WARM_UP:
                bucket.plain_step = _cost_ema(bucket.plain_step, step_seconds)
        elif bucket.plain_step is not None:
            bucket.num_spec += 1
            if bucket.num_spec > WARM_UP:
                bucket.draft_forward = _cost_ema(bucket.draft_forward, draft_seconds / k)
                bucket.verify_step[k] = _cost_ema(bucket.verify_step.get(k), step_seconds)

    def observe_acceptance(self, reached: list[int], accepted: list[int]) -> None:
        """Per draft position j in one step: how many requests had a draft there with every earlier one
        accepted, and how many of those had it accepted."""
        for j, (r, a) in enumerate(zip(reached, accepted)):
            if r:
                self.acceptance[j] = _ema(self.acceptance[j], a / r)

    def _note_switch(self, on: bool) -> None:
        if on != self.speculating:
            self.switches += 1
            logger.info("speculative decoding %s: expected %.2f tokens per step at acceptance %s",
                        "on" if on else "off", self.expected_tokens(self.max_k),
                        [round(a, 2) for a in self.acceptance if a is not None])
        self.speculating = on
