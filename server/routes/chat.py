"""POST /v1/chat/completions: messages through the chat template, then the shared generation core."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine import RequestOutput, TokenLogprob
from engine.structured import StructuredOutputParams
from server.chat_template import content_bytes
from server.errors import APIError
from server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    FunctionCallDelta,
    FunctionCallOut,
    ToolCallDelta,
    ToolCallOut,
    TopLogprob,
    generation_responses,
)
from server.serving import Choice, ChoiceResult, Generation, ServerState, collect, stream
from server.tool_calls import ParserDelta, ToolCallParser, ToolRequest, finish_reason

router = APIRouter()


def chat_logprobs(token_bytes: list[bytes], token_ids: list[int], logprobs: list[TokenLogprob]) -> ChatLogprobs:
    """Each token with its raw bytes; a token that is part of a character (a byte of an emoji) gets
    its bytes escaped in ``token`` ("\\xf0"), as OpenAI does, and its real bytes in ``bytes``."""
    def entry(token_id: int, logprob: float) -> TopLogprob:
        raw = token_bytes[token_id]
        return TopLogprob(token=raw.decode("utf-8", errors="backslashreplace"), logprob=logprob, bytes=list(raw))

    content = []
    for token_id, lp in zip(token_ids, logprobs):
        top = sorted(lp.top.items(), key=lambda item: -item[1])
        content.append(ChatTokenLogprob(**entry(token_id, lp.logprob).model_dump(),
                                        top_logprobs=[entry(t, v) for t, v in top]))
    return ChatLogprobs(content=content)


def _check_unsupported(body: ChatCompletionRequest) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")


def _constraint(state: ServerState, body: ChatCompletionRequest,
                tools: ToolRequest | None) -> tuple[StructuredOutputParams | None, str | None]:
    """The grammar for this request: its response_format (or the like), or its tool calls."""
    structured, field = body.structured_output()
    if tools is None:
        return structured, field
    if structured is not None:
        raise APIError(400, f"{field} cannot be combined with tools unless tool_choice is none", field)
    return StructuredOutputParams(structural_tag=tools.structural_tag(state.tool_syntax), unenforced=tools.unenforced), "tools"


def _call_deltas(delta: ParserDelta) -> list[ToolCallDelta] | None:
    return [ToolCallDelta(index=c.index, id=c.id, type="function" if c.id else None,
                          function=FunctionCallDelta(name=c.name, arguments=c.arguments))
            for c in delta.calls] or None


def _count_unfinished_calls(state: ServerState, parser: ToolCallParser) -> None:
    unfinished = sum(not call.complete for call in parser.calls)
    if unfinished:
        state.metrics.labels(state.metrics.tool_call_parse_failures).inc(unfinished)


@dataclass
class ChatRun:
    """A chat generation admitted and compiled: what /v1/chat/completions, /v1/responses and
    /v1/messages share. ``tools`` is None when no call is possible (no tools, or tool_choice none)."""

    gen: Generation
    choices: list[Choice]
    tools: ToolRequest | None
    token_bytes: list[bytes]
    parsers: dict[int, ToolCallParser] = field(default_factory=dict)  # choice index -> its streaming parser

    def message(self, state: ServerState, result: ChoiceResult) -> tuple[str | None, list[ToolCallOut], str | None]:
        """A finished choice's text, its tool calls (parsed from the text) and finish reason."""
        if self.tools is None:
            return result.text, [], result.finish_reason
        parser = ToolCallParser(state.tool_syntax, self.tools.calls_only)
        parser.feed(result.text, final=True)
        _count_unfinished_calls(state, parser)
        calls = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in parser.calls]
        return parser.content or (None if calls else ""), calls, finish_reason(result.finish_reason, parser.calls)

    def delta(self, state: ServerState, choice: Choice, out: RequestOutput) -> tuple[ParserDelta, str | None]:
        """A streamed delta's text and tool-call pieces, and the choice's finish reason ("tool_calls"
        when it made calls); the parser of each choice is kept across its deltas."""
        if self.tools is None:
            return ParserDelta(content=out.new_text), out.finish_reason
        parser = self.parsers.setdefault(choice.index, ToolCallParser(state.tool_syntax, self.tools.calls_only))
        parsed = parser.feed(out.new_text, final=out.finished)
        if out.finished:
            _count_unfinished_calls(state, parser)
        return parsed, finish_reason(out.finish_reason, parser.calls)


async def start_chat(state: ServerState, body: ChatCompletionRequest, renames: dict[str, str] | None = None) -> ChatRun:
    """Validate, render the prompt, build the grammar (response_format or tool calls), admit.
    ``renames`` maps chat's parameter names onto the caller's API's for error messages."""
    renames = renames or {}
    model = state.resolve_model(body.model)
    state.check_n(body.n)
    _check_unsupported(body)
    tools = await asyncio.to_thread(ToolRequest.from_body, body.tools, body.tool_choice, body.parallel_tool_calls)
    structured, grammar_field = _constraint(state, body, tools)
    # tool_choice none: the tools are left out of the prompt too, so no call is possible.
    state.check_fits(content_bytes(body.messages), renames.get("messages", "messages"))
    prompt_ids = await asyncio.to_thread(state.chat.render, body.messages, body.tools if tools else None,
                                         body.add_generation_prompt)
    keep_marker = tools is not None and state.tool_marker_is_special
    max_tokens_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    sent = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    room = max(1, state.max_model_len - len(prompt_ids))  # up to the context, or the model's recommendation
    max_tokens = sent if sent is not None else min(room, state.default_sampling.get("max_tokens", room))
    renames = {"prompt": "messages", "max_tokens": max_tokens_param, "logprobs": "top_logprobs"} | renames
    choices = [Choice(i, 0, prompt_ids, body.sampling_params(
        state.default_sampling, renames, max_tokens=max_tokens, logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        seed=None if body.seed is None else body.seed + i, structured_output=structured,
        skip_special_tokens=False if keep_marker else body.skip_special_tokens)) for i in range(body.n)]
    token_bytes = await state.token_bytes() if body.logprobs else []
    gen = await Generation.create(state, "chatcmpl", model, choices, renames, renames.get(grammar_field, grammar_field))
    return ChatRun(gen, choices, tools, token_bytes)


@router.post("/v1/chat/completions", responses=generation_responses(ChatCompletionResponse, ChatCompletionChunk))
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state: ServerState = request.app.state.kvserve
    run = await start_chat(state, body)
    gen, token_bytes = run.gen, run.token_bytes

    if body.stream:

        def chunk(choice: Choice, out: RequestOutput, first: bool) -> ChatCompletionChunk | None:
            parsed, reason = run.delta(state, choice, out)
            content, calls = parsed.content, _call_deltas(parsed)
            if not (first or content or calls or out.new_logprobs or out.finished):
                return None
            delta = ChatDelta(role="assistant" if first else None, content=content or ("" if first else None),
                              tool_calls=calls)
            logprobs = chat_logprobs(token_bytes, out.new_token_ids, out.new_logprobs) if out.new_logprobs else None
            return ChatCompletionChunk(id=gen.id, created=gen.created, model=gen.model.name, choices=[
                ChatChunkChoice(index=choice.index, delta=delta, logprobs=logprobs,
                                finish_reason=reason, stop_reason=out.stop_reason)])

        def usage_chunk(usage) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=gen.id, created=gen.created, model=gen.model.name, choices=[], usage=usage)

        return stream(gen, chunk, usage_chunk if body.include_usage else None)

    results = await collect(request, gen)
    messages = [run.message(state, r) for r in results]
    response = ChatCompletionResponse(id=gen.id, created=gen.created, model=gen.model.name, usage=gen.usage(), choices=[
        ChatChoice(index=r.choice.index, message=ChatMessageOut(content=content, tool_calls=calls or None),
                   finish_reason=reason, stop_reason=r.stop_reason,
                   logprobs=chat_logprobs(token_bytes, r.token_ids, r.logprobs) if body.logprobs else None)
        for r, (content, calls, reason) in zip(results, messages)])
    return Response(response.model_dump_json(), media_type="application/json", headers=gen.headers)
