"""Graceful shutdown: uvicorn's server with a drain in front of its own shutdown.

uvicorn alone closes the listener at the signal (so /health refuses connections) and cuts whatever
still streams at its graceful-shutdown timeout, mid-response: no last chunk, no finish_reason, no
[DONE]. Here the listener stays open while in-flight generation gets ``--shutdown-timeout``; what is
left then is aborted through the engine, so every response still ends the way the API says.
"""

from __future__ import annotations

import logging
import time
from types import FrameType

import uvicorn

from server.serving import ServerState

logger = logging.getLogger("kvserve.server")

CLOSE_GRACE_S = 2.0  # uvicorn's own timeout after the drain: the aborted responses' last bytes


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT: /health answers 503 "draining" and new generation requests get
    503 + Retry-After (``ServerState.admit``) while the admitted ones run up to ``timeout`` seconds;
    then the engine aborts the rest, which ends each stream with a finish_reason "abort" chunk and
    ``data: [DONE]`` and each non-streamed request with a 503 (``serving.collect``); then uvicorn's
    shutdown (connections closed, lifespan end, engine stopped). A second signal ends the drain at
    once. The signal is handled, not re-raised, so the exit status is 0."""

    def __init__(self, config: uvicorn.Config, state: ServerState, timeout: float):
        super().__init__(config)
        self.state, self.timeout = state, timeout
        self.signals = 0
        self.deadline: float | None = None  # set when the drain begins

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """A signal handler: it only counts; ``on_tick`` acts, on the event loop."""
        self.signals += 1

    async def on_tick(self, counter: int) -> bool:
        """uvicorn calls this every 0.1 s; True ends its main loop and starts its shutdown."""
        state = self.state
        if self.signals and self.deadline is None:
            self.deadline = time.monotonic() + self.timeout
            state.draining = True
            logger.info("draining: %d sequences in flight get up to %.1fs (--shutdown-timeout)",
                        state.num_sequences, self.timeout)
        if self.deadline is None:
            return await super().on_tick(counter)
        if state.num_sequences and self.signals == 1 and time.monotonic() < self.deadline:
            return False
        if state.num_sequences:
            logger.warning("shutdown: aborting %d unfinished sequences", state.num_sequences)
            state.engine.abort_all()
        return True
