"""POST /v1/responses (and GET / DELETE of a stored one): OpenAI's Responses API over the chat core."""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine import RequestOutput
from server.errors import error_responses
from server.protocol import generation_responses
from server.responses import (
    RENAMES,
    FunctionCallItem,
    OutputItem,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    assistant_turn,
    chat_messages,
    chat_request,
    new_id,
    output_items,
    response_object,
)
from server.routes.chat import ChatRun, start_chat
from server.serving import Choice, ServerState, collect, event_stream, named_event

router = APIRouter()
STATUS = {"length": "incomplete", "abort": "failed"}  # by finish reason; any other completes


class ResponseEvents:
    """The Responses event stream of one generation: created and in_progress, then per output item
    added / deltas / done (items one after another: text, then each tool call), then completed."""

    def __init__(self, run: ChatRun, state: ServerState, start: ResponseObject):
        self.run, self.state, self.start = run, state, start
        self.sequence = 0
        self.items: list[OutputItem] = []
        self.open: OutputItem | None = None

    def event(self, kind: str, **fields: Any) -> str:
        self.sequence += 1
        return named_event(kind, {"sequence_number": self.sequence - 1, **fields})

    def error(self, message: str) -> str:
        return self.event("error", code="server_error", message=message, param=None)

    async def render(self, deltas: AsyncIterator[tuple[Choice, RequestOutput]],
                     finish: Callable[[list[OutputItem], str | None], ResponseObject]) -> AsyncIterator[str]:
        yield self.event("response.created", response=self.start.model_dump())
        yield self.event("response.in_progress", response=self.start.model_dump())
        reason = None
        async for choice, out in deltas:
            parsed, reason = self.run.delta(self.state, choice, out)
            if parsed.content:
                for text in self._text(parsed.content):
                    yield text
            for call in parsed.calls:
                for text in self._call(call.id, call.name, call.arguments):
                    yield text
        for text in self._close():
            yield text
        response = finish(self.items, reason)
        kind = {"incomplete": "response.incomplete", "failed": "response.failed"}.get(response.status, "response.completed")
        yield self.event(kind, response=response.model_dump())

    def _text(self, delta: str) -> list[str]:
        events = []
        if not isinstance(self.open, OutputMessage):
            events += self._close()
            self.open = OutputMessage(status="in_progress")
            events.append(self._added())
            self.open.content.append(OutputText(text=""))
            events.append(self.event("response.content_part.added", item_id=self.open.id, output_index=self._index(),
                                     content_index=0, part=self.open.content[0].model_dump()))
        self.open.content[0].text += delta
        events.append(self.event("response.output_text.delta", item_id=self.open.id, output_index=self._index(),
                                 content_index=0, delta=delta, logprobs=[]))
        return events

    def _call(self, call_id: str | None, name: str | None, arguments: str) -> list[str]:
        events = []
        if call_id is not None:  # a call's first delta
            events += self._close()
            self.open = FunctionCallItem(call_id=call_id, name=name or "", arguments="", status="in_progress")
            events.append(self._added())
        if arguments and isinstance(self.open, FunctionCallItem):
            self.open.arguments += arguments
            events.append(self.event("response.function_call_arguments.delta", item_id=self.open.id,
                                     output_index=self._index(), delta=arguments))
        return events

    def _added(self) -> str:
        self.items.append(self.open)
        return self.event("response.output_item.added", output_index=self._index(), item=self.open.model_dump())

    def _index(self) -> int:
        return len(self.items) - 1

    def _close(self) -> list[str]:
        item, self.open = self.open, None
        if item is None:
            return []
        item.status = "completed"
        if isinstance(item, OutputMessage):
            part = item.content[0]
            events = [self.event("response.output_text.done", item_id=item.id, output_index=self._index(),
                                 content_index=0, text=part.text, logprobs=[]),
                      self.event("response.content_part.done", item_id=item.id, output_index=self._index(),
                                 content_index=0, part=part.model_dump())]
        else:
            events = [self.event("response.function_call_arguments.done", item_id=item.id, output_index=self._index(),
                                 name=item.name, arguments=item.arguments)]
        return events + [self.event("response.output_item.done", output_index=self._index(), item=item.model_dump())]


@router.post("/v1/responses", responses=generation_responses(ResponseObject, ResponseObject))
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    state: ServerState = request.app.state.kvserve
    history = state.responses.history(body.previous_response_id)
    messages = chat_messages(body.input)
    chat = chat_request(body, history, messages)
    run = await start_chat(state, chat, RENAMES)
    response_id = new_id("resp")

    def finish(output: list[OutputItem], reason: str | None) -> ResponseObject:
        usage = run.gen.usage()
        response = response_object(body, response_id, run.gen.created, run.gen.model.name, output,
                                   STATUS.get(reason or "", "completed"), ResponseUsage(
                                       input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                                       total_tokens=usage.total_tokens))
        if reason == "abort":
            response.error = {"code": "server_error", "message": "the server shut down before the response finished"}
        if body.store:
            state.responses.put(response, history + messages + assistant_turn(output))
        return response

    if body.stream:
        start = response_object(body, response_id, run.gen.created, run.gen.model.name, [], "in_progress")
        events = ResponseEvents(run, state, start)
        return event_stream(run.gen, lambda deltas: events.render(deltas, finish), events.error)
    result = (await collect(request, run.gen))[0]
    content, calls, reason = run.message(state, result)
    return Response(finish(output_items(content, calls), reason).model_dump_json(), media_type="application/json",
                    headers=run.gen.headers)


@router.get("/v1/responses/{response_id}", responses=error_responses(401, 404))
async def get_response(response_id: str, request: Request) -> ResponseObject:
    return request.app.state.kvserve.responses.get(response_id)


@router.delete("/v1/responses/{response_id}", responses=error_responses(401, 404))
async def delete_response(response_id: str, request: Request) -> dict:
    request.app.state.kvserve.responses.delete(response_id)
    return {"id": response_id, "object": "response", "deleted": True}
