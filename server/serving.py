"""The generation core completions and chat share: fan-out, admission, merging, SSE, logging.

An HTTP request becomes one ``Generation``: each returned choice (n, best_of, several prompts) is
its own engine request, all run concurrently and merged into one stream of deltas. The routes only
build prompts and sampling params, and format deltas into their API's shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from fastapi import Request
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from engine import AsyncEngine, InvalidRequestError, LoRARequest, RequestOutput, SamplingParams, TokenLogprob
from engine.structured import StructuredOutputParams
from server.chat_template import ChatRenderer
from server.errors import APIError, bad_request
from server.metrics import Metrics
from server.protocol import Usage
from server.responses import ResponseStore
from server.tool_calls import SYNTAXES, detect_syntax

logger = logging.getLogger("kvserve.requests")


@dataclass
class Settings:
    """What the HTTP layer needs beyond the engine (CLI flags)."""

    model_path: str
    served_model_names: list[str]
    api_key: str | None = None
    max_waiting_requests: int = 256
    max_n: int = 16
    chat_template: str | None = None
    tool_call_parser: str = "auto"  # or a name in server.tool_calls.SYNTAXES
    retry_after_s: int = 1
    max_request_bytes: int = 4 << 20  # larger bodies get 413 (server/app.py BodyLimit)
    lora_modules: list[LoRARequest] = field(default_factory=list)  # --lora-modules, already read by the engine
    allow_runtime_lora_updating: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter


@dataclass(frozen=True)
class ServedModel:
    """What a request's ``model`` names: the base model (``lora`` None) or one of its LoRA adapters."""

    name: str
    lora: LoRARequest | None = None


class ServerState:
    """Shared by all routes: the engine, the tokenizer, and the admission counter."""

    def __init__(self, engine: AsyncEngine, settings: Settings):
        self.engine = engine
        self.settings = settings
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self.default_sampling = engine.engine.default_sampling  # for the sampling fields a request leaves out
        # Sequences the engine can run at once plus the bounded queue behind them.
        self.capacity = engine.engine.config.max_num_seqs + settings.max_waiting_requests
        self.num_sequences = 0  # admitted engine requests not yet finished
        self.compile_slots = asyncio.Semaphore(engine.engine.config.structured_output_workers)
        self.draining = False  # SIGTERM came: admit nothing more (server/cli.py DrainingServer)
        self.token_text = lru_cache(maxsize=1 << 16)(lambda token_id: self.tokenizer.decode([token_id]))
        self.metrics = Metrics(metrics_name(self.model_name), engine.stats)
        # No token holds more UTF-8 bytes than its vocabulary entry spells (byte-level BPE: one char per
        # byte; sentencepiece: "▁" or "<0x0A>" for one byte), so this bounds the bytes a token can cover.
        self.longest_token_bytes = max(len(token.encode()) for token in self.tokenizer.get_vocab())
        self.chat = ChatRenderer(self.tokenizer, settings.chat_template)
        self.responses = ResponseStore()  # the Responses API's stored responses
        self.tool_syntax = (SYNTAXES[settings.tool_call_parser] if settings.tool_call_parser != "auto" else
                            detect_syntax(settings.chat_template or getattr(self.tokenizer, "chat_template", None)))
        # A marker that is a special token (mistral's [TOOL_CALLS]) must survive detokenization.
        self.tool_marker_is_special = self.tool_syntax.marker in self.tokenizer.all_special_tokens
        self.adapters = {lora.lora_name: lora for lora in settings.lora_modules}  # served name -> adapter
        self._lora_ids = itertools.count(max((lora.lora_int_id for lora in settings.lora_modules), default=0) + 1)

    async def token_bytes(self) -> list[bytes]:
        """Every token's raw bytes, from xgrammar's tokenizer info (built once, off the event loop)."""
        return (await asyncio.to_thread(lambda: self.engine.engine.structured)).token_bytes

    @property
    def model_name(self) -> str:
        return self.settings.served_model_names[0]

    def resolve_model(self, name: str | None) -> ServedModel:
        """The base model (also for no ``model``) or the adapter ``name`` is; anything else is OpenAI's 404."""
        if name is None or name in self.settings.served_model_names:
            return ServedModel(self.model_name)
        if name in self.adapters:
            return ServedModel(name, self.adapters[name])
        served = [*self.settings.served_model_names, *self.adapters]
        raise APIError(404, f"The model `{name}` does not exist. Served: {served}", "model", "model_not_found")

    async def load_adapter(self, name: str, path: str) -> LoRARequest:
        """Read and check the adapter at ``path`` on the engine thread, then serve it as ``name``
        (a 400 naming what is wrong: the name taken, a missing file, a refused config, its rank)."""
        taken = APIError(400, f"the model name {name!r} is already served", "lora_name")
        if name in self.settings.served_model_names or name in self.adapters:
            raise taken
        lora = LoRARequest(name, next(self._lora_ids), path)
        try:
            await self.engine.call(lambda engine: engine.lora_adapter(lora))
        except InvalidRequestError as exc:
            raise bad_request(exc) from None
        if name in self.adapters:  # a concurrent load of the same name finished first
            raise taken
        self.adapters[name] = lora
        return lora

    async def unload_adapter(self, name: str) -> None:
        """Stop serving ``name``: new requests for it get 404; those already running finish with it."""
        lora = self.adapters.pop(name, None)
        if lora is None:
            raise APIError(404, f"no LoRA adapter named {name!r} is loaded", "lora_name", "model_not_found")
        await self.engine.call(lambda engine: engine.remove_lora(lora.lora_int_id))

    def check_fits(self, num_bytes: int, param: str) -> None:
        """Refuse text that cannot fit in the context whatever its tokens, before tokenizing it (seconds
        of a thread for a multi-megabyte prompt)."""
        most = self.max_model_len * self.longest_token_bytes
        if num_bytes > most:
            raise APIError(400, f"{param} is {num_bytes} bytes of text; {self.max_model_len} tokens (max_model_len) "
                                f"of at most {self.longest_token_bytes} bytes each cannot hold more than {most}", param)

    def check_n(self, n: int, param: str = "n") -> None:
        if not 1 <= n <= self.settings.max_n:
            raise APIError(400, f"{param} must be in [1, {self.settings.max_n}], got {n}", param)

    def shutting_down(self) -> APIError:
        """The 503 for generation the server will not do because it is shutting down: retryable,
        elsewhere (the openai client retries a 503 by itself)."""
        return APIError(503, "the server is shutting down; retry the request", code="server_shutting_down",
                        headers={"Retry-After": str(self.settings.retry_after_s)})

    def admit(self, num_sequences: int) -> None:
        """Reserve room for ``num_sequences`` or refuse with 503: the queue never grows unbounded, and
        a draining server takes nothing new."""
        if self.draining:
            raise self.shutting_down()
        if num_sequences > self.capacity:  # could never fit: retrying is pointless
            raise APIError(400, f"the request needs {num_sequences} sequences (prompts x n / best_of); "
                                f"this server runs at most {self.capacity}", "n")
        if self.num_sequences + num_sequences > self.capacity:
            raise APIError(503, f"server is at capacity ({self.num_sequences} sequences in flight, "
                                f"--max-waiting-requests {self.settings.max_waiting_requests}); retry later",
                           code="server_overloaded", headers={"Retry-After": str(self.settings.retry_after_s)})
        self.num_sequences += num_sequences

    def release(self, num_sequences: int) -> None:
        self.num_sequences -= num_sequences

    async def compile_grammar(self, spec: StructuredOutputParams, param: str) -> None:
        """Compile off the event loop: a cache hit at once, a miss when a compile worker is free (so
        a slow schema holds up only other compiles, never steps); a bad grammar is a 400 naming ``param``."""
        structured = await asyncio.to_thread(lambda: self.engine.engine.structured)
        start = time.perf_counter()
        try:
            if await asyncio.to_thread(structured.cached, spec):
                self.metrics.labels(self.metrics.grammar_cache_hits).inc()
            else:
                async with self.compile_slots:
                    await asyncio.to_thread(structured.compile, spec)
        except ValueError as exc:
            raise bad_request(exc, {spec.kind: param}) from None
        self.metrics.labels(self.metrics.compile).observe(time.perf_counter() - start)


def metrics_name(served_name: str) -> str:
    """The ``model_name`` label: a served name that is a filesystem path (MODEL given as a folder or
    file, no --served-model-name) by its last part, so the open /metrics never shows the server's paths."""
    is_path = os.path.isabs(served_name) or os.path.exists(served_name)
    return os.path.basename(os.path.abspath(served_name)) if is_path else served_name


@dataclass
class Choice:
    """One returned choice = one engine request."""

    index: int
    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class ChoiceResult:
    """A choice's deltas merged, for non-streamed responses."""

    choice: Choice
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    cumulative_logprob: float = 0.0
    error: str | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        self.token_ids += out.new_token_ids
        self.logprobs += out.new_logprobs or []
        self.prompt_logprobs = out.prompt_logprobs or self.prompt_logprobs
        self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
        self.cumulative_logprob, self.error = out.cumulative_logprob, out.error


class Generation:
    """One HTTP request's engine work. Make it with ``await Generation.create(...)`` before answering
    (it validates, compiles any grammar and admits), then consume ``events()`` exactly once;
    ``close()`` (idempotent) aborts what is left, releases the admission slots and writes the log line."""

    @classmethod
    async def create(cls, state: ServerState, prefix: str, model: ServedModel, choices: list[Choice],
                     renames: dict[str, str] | None = None, grammar_field: str | None = None) -> Generation:
        gen = cls(state, prefix, model, choices, renames)
        state.admit(len(choices))  # a compile waits as part of its request: it counts against the queue limit
        spec = choices[0].params.structured_output
        if spec is not None:
            try:
                await state.compile_grammar(spec, grammar_field or spec.kind)
            except BaseException:
                state.release(len(choices))
                raise
            for choice in choices[1:]:
                choice.params.structured_output.compiled = spec.compiled
        gen._admitted = True
        if model.lora is not None:
            state.metrics.labels(state.metrics.lora_requests, lora_name=model.name).inc()
        return gen

    def __init__(self, state: ServerState, prefix: str, model: ServedModel, choices: list[Choice],
                 renames: dict[str, str] | None = None):
        self.state = state
        self.model = model  # its name is every response's ``model``
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.arrival = time.monotonic()
        self.choices = choices
        for choice in choices:
            try:
                state.engine.engine.validate(choice.prompt_ids, choice.params)
            except ValueError as exc:
                raise bad_request(exc, renames) from None
        self.last: dict[int, RequestOutput] = {}
        self._last_delta: dict[int, float] = {}  # choice index -> when its latest tokens arrived
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self._admitted = False

    async def events(self) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Every choice's deltas as they come, interleaved; ends when all choices finished."""
        queue: asyncio.Queue[tuple[Choice, RequestOutput | Exception]] = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            try:
                async for out in self.state.engine.generate(f"{self.id}-{choice.index}", choice.prompt_ids, choice.params,
                                                            self.arrival, self.model.lora):
                    queue.put_nowait((choice, out))
            except Exception as exc:  # delivered to the consumer; never lost in a task
                queue.put_nowait((choice, exc))

        self._tasks = [asyncio.create_task(pump(choice)) for choice in self.choices]
        remaining = len(self.choices)
        try:
            while remaining:
                choice, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                self._observe(choice, item)
                self.last[choice.index] = item
                remaining -= item.finished
                yield choice, item
        finally:
            self.close()

    def _observe(self, choice: Choice, out: RequestOutput) -> None:
        metrics, now = self.state.metrics, time.monotonic()
        if out.new_token_ids and choice.index in self._last_delta:
            metrics.observe_tokens(now - self._last_delta[choice.index], len(out.new_token_ids))
        if out.new_token_ids:
            self._last_delta[choice.index] = now
        if out.finished:
            metrics.observe_finished(out, len(choice.prompt_ids), self.arrival)

    @property
    def headers(self) -> dict[str, str]:
        """``X-Unenforced-Keywords``: a best-effort (strict: false) schema's keywords the grammar ignored."""
        spec = self.choices[0].params.structured_output
        return {"X-Unenforced-Keywords": ", ".join(spec.unenforced)} if spec is not None and spec.unenforced else {}

    def usage(self) -> Usage:
        prompts = {c.prompt_index: len(c.prompt_ids) for c in self.choices}
        completion = sum(out.num_output_tokens for out in self.last.values())
        return Usage(prompt_tokens=sum(prompts.values()), completion_tokens=completion,
                     total_tokens=sum(prompts.values()) + completion)

    def close(self) -> None:
        if self._closed or not self._admitted:
            return
        self._closed = True
        for task in self._tasks:  # a cancelled pump leaves generate(), which aborts its engine request
            task.cancel()
        self.state.release(len(self.choices))
        self._log()

    def _log(self) -> None:
        """One line per request; with ``--log-format json`` its fields are JSON keys too."""
        outs = list(self.last.values())
        times = [o.times for o in outs if o.times is not None]
        aborted = len(self.choices) - sum(o.finished for o in outs)
        if aborted:
            self.state.metrics.labels(self.state.metrics.request_success, finished_reason="abort").inc(aborted)
        reasons = "abort" if aborted else ",".join(sorted({o.finish_reason or "" for o in outs}))

        def since_arrival(values: list[float | None]) -> float | None:
            present = [v for v in values if v is not None]
            return round((min(present) - self.arrival) * 1000, 1) if present else None

        usage = self.usage()
        fields = {"request_id": self.id, "prompt_tokens": usage.prompt_tokens,
                  "completion_tokens": usage.completion_tokens,
                  "queue_ms": since_arrival([t.first_scheduled for t in times]),
                  "ttft_ms": since_arrival([t.first_token for t in times]),
                  "total_ms": round((time.monotonic() - self.arrival) * 1000, 1), "finish_reason": reasons}
        logger.info("%s prompt_tokens=%d completion_tokens=%d queue=%sms ttft=%sms total=%.1fms finish=%s",
                    *fields.values(), extra={"fields": fields})


async def collect(request: Request, gen: Generation) -> list[ChoiceResult]:
    """Run a non-streamed generation to the end; a client that hangs up aborts it."""
    results = {choice.index: ChoiceResult(choice) for choice in gen.choices}

    async def run() -> None:
        async with contextlib.aclosing(gen.events()) as events:
            async for choice, out in events:
                results[choice.index].add(out)

    work = asyncio.ensure_future(run())
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler itself is cancelled (shutdown timeout)
        watcher.cancel()
        if not work.done():
            work.cancel()
            gen.close()
    if work not in done:
        raise APIError(499, "client disconnected")
    work.result()
    failed = [r for r in results.values() if r.finish_reason == "error"]
    if failed:
        raise APIError(500, f"generation failed: {failed[0].error}")
    if any(r.finish_reason == "abort" for r in results.values()):  # only the shutdown timeout aborts a waiting caller
        raise gen.state.shutting_down()
    return [results[i] for i in sorted(results)]


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is already read, so only disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def stream(gen: Generation, make_chunk: Callable[[Choice, RequestOutput, bool], BaseModel | None],
           usage_chunk: Callable[[Usage], BaseModel] | None) -> StreamingResponse:
    """OpenAI's SSE: one ``data: {chunk}`` per useful delta, the usage chunk if asked, then ``data: [DONE]``.
    ``make_chunk(choice, delta, first)`` formats a delta (None: nothing worth sending)."""

    async def chunks(deltas: AsyncIterator[tuple[Choice, RequestOutput]]) -> AsyncIterator[str]:
        started: set[int] = set()
        async for choice, out in deltas:
            chunk = make_chunk(choice, out, choice.index not in started)
            started.add(choice.index)
            if chunk is not None:
                yield f"data: {chunk.model_dump_json()}\n\n"
        if usage_chunk is not None:
            yield f"data: {usage_chunk(gen.usage()).model_dump_json()}\n\n"

    def error(message: str) -> str:
        return f"data: {json.dumps(APIError(500, message).body())}\n\n"

    return event_stream(gen, chunks, error, done="data: [DONE]\n\n")


def named_event(kind: str, fields: dict[str, Any]) -> str:
    """A server-sent event as the Responses and Anthropic APIs send them: its type as ``event:`` and in the data."""
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, ensure_ascii=False)}\n\n"


def event_stream(gen: Generation, render: Callable[[AsyncIterator[tuple[Choice, RequestOutput]]], AsyncIterator[str]],
                 error: Callable[[str], str], done: str = "") -> StreamingResponse:
    """A server-sent event stream of ``gen``: ``render`` turns its deltas into events (each API has
    its own); a failure after the 200 is reported in-band as ``error(message)``, then ``done``.
    A client disconnect cancels the body, which closes the generation and aborts its engine requests."""

    async def deltas(events: AsyncIterator[tuple[Choice, RequestOutput]]) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        async for choice, out in events:
            if out.finish_reason == "error":
                raise RuntimeError(out.error)
            yield choice, out

    async def body() -> AsyncIterator[str]:
        try:
            async with contextlib.aclosing(gen.events()) as events:
                async for text in render(deltas(events)):
                    yield text
        except Exception as exc:  # the 200 is already sent: report in-band, as OpenAI does
            logger.exception("%s failed", gen.id)
            yield error(f"generation failed: {exc}")
        if done:
            yield done

    # The background close covers a client that left before the body generator ever started.
    return StreamingResponse(body(), media_type="text/event-stream", background=BackgroundTask(gen.close),
                             headers=gen.headers)
