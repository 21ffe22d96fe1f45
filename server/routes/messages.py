"""POST /v1/messages: Anthropic's Messages API, run by the chat core (server/anthropic.py translates)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine import RequestOutput
from server.anthropic import (
    CHAT_NAMES,
    BlockEvents,
    MessageResponse,
    MessagesRequest,
    anthropic_names,
    content_blocks,
    error_event,
    event,
    message_id,
    message_responses,
    message_usage,
    stop_reason,
    to_chat,
)
from server.errors import APIError
from server.routes.chat import ChatRun, start_chat
from server.serving import Choice, ServerState, collect, event_stream

router = APIRouter()


@router.post("/v1/messages", responses=message_responses())
async def create_message(body: MessagesRequest, request: Request) -> Response:
    state: ServerState = request.app.state.kvserve
    try:
        run = await start_chat(state, to_chat(body), CHAT_NAMES)
    except APIError as exc:
        raise anthropic_names(exc) from None

    if body.stream:
        return event_stream(run.gen, lambda deltas: stream_events(state, run, deltas), error_event)

    result = (await collect(request, run.gen))[0]
    text, calls, finish = run.message(state, result)
    reason, sequence = stop_reason(finish, result.stop_reason)
    message = MessageResponse(id=message_id(run.gen.id), content=content_blocks(text, calls), model=run.gen.model.name,
                              stop_reason=reason, stop_sequence=sequence, usage=message_usage(run.gen.usage()))
    return Response(message.model_dump_json(), media_type="application/json")


async def stream_events(state: ServerState, run: ChatRun,
                        deltas: AsyncIterator[tuple[Choice, RequestOutput]]) -> AsyncIterator[str]:
    """message_start, the content blocks' events as the deltas come, message_delta (stop_reason,
    usage) and message_stop; a shutdown's abort ends it with an overloaded_error event instead."""
    start = MessageResponse(id=message_id(run.gen.id), content=[], model=run.gen.model.name, stop_reason=None,
                            usage=message_usage(run.gen.usage()))
    yield event("message_start", message=start.model_dump())
    blocks = BlockEvents()
    async for choice, out in deltas:
        if out.finish_reason == "abort":
            yield error_event(state.shutting_down().message, 503)
            return
        parsed, finish = run.delta(state, choice, out)
        for text in blocks.feed(parsed):
            yield text
        if out.finished:
            for text in blocks.close():
                yield text
            reason, sequence = stop_reason(finish, out.stop_reason)
            yield event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                        usage=message_usage(run.gen.usage()).model_dump())
            yield event("message_stop")
