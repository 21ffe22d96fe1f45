"""AsyncEngine: the step loop in a background thread, an async stream of deltas per request.

The event loop never runs model code: it validates, hands commands (add, abort, a call such as
loading a LoRA adapter) to the engine thread through a queue, and receives each step's outputs in
one ``call_soon_threadsafe`` batch.
Leaving ``generate()`` early (client gone, task cancelled) aborts the request; the abort is applied
between two steps, so its blocks are free within one step.

A watchdog on the event loop logs a step that runs longer than ``stall_timeout`` (once, with the
requests in it) and ``stalled`` says so while it lasts, for a health check: the event loop keeps
answering while the engine thread hangs in a kernel.

The engine is built on the engine thread too, and no other thread may run torch ops. libgomp
gives each thread that opens a parallel region its own worker team; once two teams exist on a
machine with few cores, libgomp counts itself oversubscribed and its workers stop spin-waiting,
which made every decode step ~1.7x slower when the model was loaded on the main thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.lora import LoRARequest
from engine.outputs import EngineStats, RequestOutput
from engine.request import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float | None
    lora_request: LoRARequest | None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    """Run ``fn(engine)`` on the engine thread (it may run torch ops) and settle ``future`` with its result."""

    fn: Callable[[LLMEngine], Any]
    future: asyncio.Future


class _AbortAll:
    """End every request now, each stream getting its finish_reason "abort" delta."""


class AsyncEngine:
    def __init__(self, config: EngineConfig, stall_timeout: float = 60.0):
        """Load the model on a new engine thread and wait until it is ready (load errors re-raise
        here); the thread runs steps once ``start()`` hands it the event loop. A step running longer
        than ``stall_timeout`` seconds counts as a stall."""
        self.stall_timeout = stall_timeout
        self._step_started: float | None = None  # time.monotonic() when the step in progress began
        self._watchdog: asyncio.Task | None = None
        self._commands: queue.SimpleQueue[_Add | _Abort | _AbortAll | _Call] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._started = threading.Event()
        self._streams: dict[str, asyncio.Queue[RequestOutput | Exception]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self.engine: LLMEngine
        self._thread = threading.Thread(target=self._run, args=(config,), name="kvserve-engine", daemon=True)
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error

    @property
    def is_running(self) -> bool:
        return self._started.is_set() and self._thread.is_alive()

    @property
    def stalled(self) -> bool:
        """Has the step in progress run longer than ``stall_timeout``?"""
        return self._stalled(self._step_started)

    def _stalled(self, started: float | None) -> bool:
        return started is not None and time.monotonic() - started > self.stall_timeout

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def start(self) -> None:
        """Begin stepping; call from inside the event loop that consumes the streams."""
        self._loop = asyncio.get_running_loop()
        self._watchdog = self._loop.create_task(self._watch())
        self._started.set()

    def shutdown(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._stopping = True
        self._started.set()
        self._wakeup.set()
        self._thread.join(timeout=30)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def _watch(self) -> None:
        """Log each stalled step once, with the requests in it."""
        logged = None
        while True:
            await asyncio.sleep(min(self.stall_timeout / 2, 1.0))
            started = self._step_started
            if self._stalled(started) and started != logged:
                logged = started
                logger.error("engine step running for %.1fs, longer than the stall timeout (%.1fs); requests in it: %s",
                             time.monotonic() - started, self.stall_timeout, ", ".join(self.engine.step_request_ids))

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       arrival: float | None = None, lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's deltas until it finishes. Raises InvalidRequestError (a ValueError
        naming the parameter) for bad input up front. ``arrival``: time.monotonic() when the request
        reached the server, so queue time and TTFT include the HTTP layer. ``lora_request``: the
        adapter it runs with (loaded on the engine thread on first use)."""
        if not self.is_running:
            raise RuntimeError("AsyncEngine is not running; call start() inside the event loop first")
        if request_id in self._streams:
            raise InvalidRequestError("request_id", f"request_id {request_id!r} is already in use")
        self.engine.validate(prompt_token_ids, params)
        if params.structured_output is not None:  # compile here, off the step loop; errors are the caller's
            await asyncio.to_thread(lambda: self.engine.structured.compile(params.structured_output))
        stream: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        self._streams[request_id] = stream
        self._submit(_Add(request_id, list(prompt_token_ids), params, arrival, lora_request))
        finished = False
        try:
            while not finished:
                out = await stream.get()
                if isinstance(out, Exception):
                    finished = True
                    raise out
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._submit(_Abort(request_id))

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """``fn(engine)`` run on the engine thread between two steps (loading a LoRA adapter, say); its
        exception re-raises here."""
        if not self.is_running:
            raise RuntimeError("AsyncEngine is not running; call start() inside the event loop first")
        future = asyncio.get_running_loop().create_future()
        self._submit(_Call(fn, future))
        return await future

    def abort_all(self) -> None:
        """End every request in the engine within a step; unlike ``abort`` (for callers that have left),
        each stream still gets its last delta, finish_reason "abort" (a server's shutdown timeout)."""
        self._submit(_AbortAll())

    def _submit(self, command: _Add | _Abort | _AbortAll | _Call) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # --- engine thread --------------------------------------------------------------------
    def _run(self, config: EngineConfig) -> None:
        try:
            self.engine = LLMEngine(config)
        except BaseException as exc:  # re-raised by __init__ on the caller's thread
            self._build_error = exc
            return
        finally:
            self._built.set()
        self._started.wait()
        try:
            # Ready before the first grammar request: building xgrammar's tokenizer info and starting
            # the compile worker holds the GIL for a second, which mid-stream would stall every client.
            self.engine.structured  # noqa: B018
            self._loop_steps()
        except BaseException:
            logger.critical("the engine thread died; requests in flight: %s", ", ".join(self.engine.requests) or "none",
                            exc_info=True)
        finally:  # whatever ends this thread, no client may wait forever
            error = RuntimeError("the engine stopped")
            for request_id in list(self._streams):
                self._loop.call_soon_threadsafe(self._deliver, request_id, error)

    def _loop_steps(self) -> None:
        while not self._stopping:
            self._apply_commands()
            if not self.engine.has_unfinished_requests():
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            self._step_started = time.monotonic()
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a scheduler bug (the step isolates requests' own failures): fail them all
                logger.exception("engine step failed")
                self._abort_all(f"engine step failed: {exc}")
                continue
            finally:
                self._step_started = None
            if outputs:
                self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _abort_all(self, error: str | None = None) -> None:
        """Abort every request, telling its stream (finish_reason "error" with ``error`` if given)."""
        outputs = [self.engine.abort_request(rid) for rid in list(self.engine.requests)]
        if error is not None:
            for out in outputs:
                out.finish_reason, out.error = "error", error
        if outputs:
            self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Abort):
                self.engine.abort_request(command.request_id)
                continue
            if isinstance(command, _AbortAll):
                self._abort_all()
                continue
            if isinstance(command, _Call):
                self._settle(command)
                continue
            try:
                self.engine.add_request(command.request_id, command.prompt_token_ids, command.params, command.arrival,
                                        command.lora_request)
            except Exception as exc:  # the caller's error, never the engine thread's end
                self._loop.call_soon_threadsafe(self._deliver, command.request_id, exc)

    def _settle(self, call: _Call) -> None:
        try:
            result, error = call.fn(self.engine), None
        except Exception as exc:  # the caller's error, never the engine thread's end
            result, error = None, exc

        def settle() -> None:
            if call.future.cancelled():
                return
            if error is not None:
                call.future.set_exception(error)
            else:
                call.future.set_result(result)

        self._loop.call_soon_threadsafe(settle)

    def _deliver(self, request_id: str, item: RequestOutput | Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(item)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._deliver(out.request_id, out)
