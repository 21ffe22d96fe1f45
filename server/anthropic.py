"""Anthropic's Messages API as a translation onto the chat core: its request models, the request as
a ``ChatCompletionRequest``, and chat's results in its shapes (content blocks, stop_reason, events).

Nothing here generates, parses calls or builds grammars: system -> a system message, tool_use /
tool_result blocks -> assistant ``tool_calls`` / ``tool`` messages, ``input_schema`` -> function
``parameters``, tool_choice auto / any / tool / none -> auto / required / named / none; then
``start_chat`` runs it exactly as a chat completion, so the chat template, the tool-call grammar and
``ToolCallParser`` are chat's own and tool inputs are grammar-constrained as chat's arguments are.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StrictBool, ValidationError, WithJsonSchema

from server.errors import AnthropicErrorResponse, APIError, error_responses, field_path
from server.protocol import ChatCompletionRequest, Request, ToolCallOut, Usage, documented
from server.serving import named_event
from server.tool_calls import ParserDelta


# --- request -----------------------------------------------------------------------------------
class TextBlock(Request):
    type: Literal["text"]
    text: str


class ToolUseBlock(Request):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


_TEXT_LIST = {"type": "array", "items": TextBlock.model_json_schema()}
TextBlocks = Annotated[list[dict[str, Any]], WithJsonSchema(_TEXT_LIST)]


class ToolResultBlock(Request):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | TextBlocks = ""
    is_error: StrictBool = False  # accepted; the result's text reaches the template as sent


class CustomTool(Request):
    type: Literal["custom"] = "custom"
    name: str
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(Request):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, description="the tool to call, with type tool")
    disable_parallel_tool_use: StrictBool = False


BLOCKS: dict[str, type[Request]] = {"text": TextBlock, "tool_use": ToolUseBlock, "tool_result": ToolResultBlock}
ROLE_BLOCKS = {"user": {"text", "tool_result"}, "assistant": {"text", "tool_use"}}
# Blocks and tools are dispatched by hand on their ``type`` (parse_block), so an unknown type is a 400
# that names it rather than pydantic's errors for every member of a union; these document their shapes.
_CONTENT = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"oneOf": [
    model.model_json_schema() for model in BLOCKS.values()]}}]}
Content = Annotated[str | list[dict[str, Any]], WithJsonSchema(_CONTENT)]
System = Annotated[str | list[dict[str, Any]], WithJsonSchema({"anyOf": [{"type": "string"}, _TEXT_LIST]})]
CustomTools = Annotated[list[dict[str, Any]], WithJsonSchema({"type": "array", "items": CustomTool.model_json_schema()})]


class InputMessage(Request):
    role: Literal["user", "assistant"]
    content: Content


class MessagesRequest(Request):
    """``POST /v1/messages``: Anthropic's fields; unknown ones (metadata, thinking...) are ignored."""

    model: str | None = None
    max_tokens: int = documented(..., minimum=1)
    messages: list[InputMessage] = Field(min_length=1)
    system: System | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = documented(minimum=0)
    top_p: float | None = documented(exclusiveMinimum=0, maximum=1)
    top_k: int | None = documented(minimum=0)
    stream: StrictBool = False
    tools: CustomTools | None = None
    tool_choice: ToolChoice | None = None


def parse(model: type[Request], value: Any, where: str) -> Any:
    """``value`` as ``model``, or a 400 naming the field inside it that is wrong."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(filter(None, [where, field_path(first["loc"])]))
        raise APIError(400, f"{param}: {first['msg']}", param) from None


def parse_block(block: Any, where: str, allowed: set[str]) -> TextBlock | ToolUseBlock | ToolResultBlock:
    """One content block; a type this server does not take, or one out of place, is a 400 naming it."""
    kind = block.get("type") if isinstance(block, dict) else None
    if not isinstance(kind, str) or kind not in BLOCKS:
        raise APIError(400, f"{where}.type: content blocks of type {kind!r} are not supported here; "
                            f"send {', '.join(sorted(allowed))} blocks", f"{where}.type")
    if kind not in allowed:
        raise APIError(400, f"{where}.type: a {kind} block cannot be sent here (allowed: {', '.join(sorted(allowed))})",
                       f"{where}.type")
    return parse(BLOCKS[kind], block, where)


def text_of(content: str | list[dict[str, Any]], where: str) -> str:
    """A string or a list of text blocks as one text (blocks joined by newlines, as chat joins text parts)."""
    if isinstance(content, str):
        return content
    return "\n".join(parse_block(block, f"{where}.{i}", {"text"}).text for i, block in enumerate(content))


def chat_messages(body: MessagesRequest) -> list[dict[str, Any]]:
    """The conversation as chat messages (the system prompt first)."""
    chat = [{"role": "system", "content": text_of(body.system, "system")}] if body.system else []
    for i, message in enumerate(body.messages):
        where = f"messages.{i}.content"
        if isinstance(message.content, str):
            blocks = [TextBlock(type="text", text=message.content)]
        elif not message.content:
            raise APIError(400, f"{where}: a message's content holds at least one block", where)
        else:
            allowed = ROLE_BLOCKS[message.role]
            blocks = [parse_block(block, f"{where}.{j}", allowed) for j, block in enumerate(message.content)]
        chat += [assistant_message(blocks)] if message.role == "assistant" else user_messages(blocks, where)
    if body.messages[-1].role == "assistant":
        last = len(body.messages) - 1
        raise APIError(400, f"messages.{last}: a final assistant message (prefill) is not supported; "
                            "end with a user message", f"messages.{last}")
    return chat


def assistant_message(blocks: list) -> dict[str, Any]:
    """An assistant turn: its text blocks as text parts, its tool_use blocks as ``tool_calls``."""
    texts = [{"type": "text", "text": b.text} for b in blocks if isinstance(b, TextBlock)]
    calls = [{"id": b.id, "type": "function",
              "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}}
             for b in blocks if isinstance(b, ToolUseBlock)]
    return {"role": "assistant", "content": texts or None, "tool_calls": calls or None}


def user_messages(blocks: list, where: str) -> list[dict[str, Any]]:
    """A user turn: each tool_result its own ``tool`` message, each run of text blocks one user message."""
    messages: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        if isinstance(block, ToolResultBlock):
            messages.append({"role": "tool", "tool_call_id": block.tool_use_id,
                             "content": text_of(block.content, f"{where}.{j}.content")})
        elif messages and messages[-1]["role"] == "user":
            messages[-1]["content"].append({"type": "text", "text": block.text})
        else:
            messages.append({"role": "user", "content": [{"type": "text", "text": block.text}]})
    return messages


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Custom tools as function tools; a server tool (web_search, bash, ...) is a 400 naming its type."""
    if tools is None:
        return None
    functions = []
    for i, tool in enumerate(tools):
        kind = tool.get("type", "custom")
        if kind != "custom":
            raise APIError(400, f"tools.{i}.type: {kind!r} is a server tool, which this server does not run; "
                                "only custom tools (name, description, input_schema) are supported", f"tools.{i}.type")
        custom = parse(CustomTool, tool, f"tools.{i}")
        function = {"name": custom.name, "parameters": custom.input_schema}
        functions.append({"type": "function", "function": function | (
            {"description": custom.description} if custom.description is not None else {})})
    return functions


def chat_tool_choice(choice: ToolChoice | None) -> str | dict[str, Any] | None:
    if choice is None:
        return None
    if choice.type != "tool":
        return {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    if choice.name is None:
        raise APIError(400, "tool_choice.name: a tool_choice of type tool names the tool to call", "tool_choice.name")
    return {"type": "function", "function": {"name": choice.name}}


def to_chat(body: MessagesRequest) -> ChatCompletionRequest:
    """The chat completion this request is, for ``start_chat`` (with ``CHAT_NAMES`` for its errors)."""
    return ChatCompletionRequest.model_validate({
        "model": body.model, "messages": chat_messages(body), "max_tokens": body.max_tokens,
        "stop": body.stop_sequences, "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
        "tools": chat_tools(body.tools), "tool_choice": chat_tool_choice(body.tool_choice),
        "parallel_tool_calls": False if body.tool_choice and body.tool_choice.disable_parallel_tool_use else None})


CHAT_NAMES = {"messages": "messages", "stop": "stop_sequences"}  # start_chat's renames: chat's names -> these
_TOOL_FIELDS = re.compile(r"\b(tools\.\d+)\.function\.(parameters|name)\b")


def anthropic_names(error: APIError) -> APIError:
    """A chat-side error about a tool (``tools.0.function.parameters``) in this API's names
    (``tools.0.input_schema``)."""
    def rename(text: str) -> str:
        return _TOOL_FIELDS.sub(lambda m: f"{m[1]}.{'input_schema' if m[2] == 'parameters' else 'name'}", text)

    error.message, error.param = rename(error.message), error.param and rename(error.param)
    return error


# --- response ----------------------------------------------------------------------------------
class MessageUsage(BaseModel):
    input_tokens: int
    output_tokens: int


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[TextBlock | ToolUseBlock]
    model: str
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None = None
    usage: MessageUsage


def message_usage(usage: Usage) -> MessageUsage:
    return MessageUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens)


def message_id(generation_id: str) -> str:
    """``msg_`` and the hex of the generation's id, so a message is found by it in the request log."""
    return "msg_" + generation_id.rpartition("-")[2]


def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def stop_reason(finish_reason: str | None, matched: str | int | None) -> tuple[str | None, str | None]:
    """Chat's finish reason (and the stop string or token that ended it) as stop_reason and stop_sequence."""
    if finish_reason == "tool_calls":
        return "tool_use", None
    if finish_reason == "length":
        return "max_tokens", None
    if finish_reason == "stop":
        return ("stop_sequence", matched) if isinstance(matched, str) else ("end_turn", None)
    return None, None


def content_blocks(text: str | None, calls: list[ToolCallOut]) -> list[TextBlock | ToolUseBlock]:
    """A message's text and its complete calls as blocks; a call cut off by max_tokens has no whole
    input object, so it is left out (stop_reason says max_tokens)."""
    blocks: list[TextBlock | ToolUseBlock] = [TextBlock(type="text", text=text)] if text else []
    for call in calls:
        try:
            arguments = json.loads(call.function.arguments)
        except json.JSONDecodeError:
            continue
        blocks.append(ToolUseBlock(type="tool_use", id=tool_use_id(call.id), name=call.function.name, input=arguments))
    return blocks


def event(kind: str, **fields: Any) -> str:
    return named_event(kind, fields)


def error_event(message: str, status: int = 500) -> str:
    """A failure after the 200, in-band: ``event: error`` with Anthropic's error body."""
    return event("error", error=APIError(status, message).anthropic_body()["error"])


class BlockEvents:
    """Chat's streamed deltas as content-block events: a text block while text comes, a tool_use block
    per call (its input as input_json_delta pieces); a block is stopped when the next one starts or the
    message ends."""

    def __init__(self) -> None:
        self.index = -1  # the open block's index
        self.open: str | int | None = None  # "text", a call's index, or None

    def feed(self, delta: ParserDelta) -> list[str]:
        """The events of one delta. Its pieces go in text order: the rest of a call already open
        (calls end before the text after them settles), then text, then new calls."""
        events = [self._json(c.arguments) for c in delta.calls if c.id is None and c.arguments]
        if delta.content:
            if self.open != "text":
                events += self._start("text", TextBlock(type="text", text=""))
            events.append(self._delta({"type": "text_delta", "text": delta.content}))
        for call in delta.calls:
            if call.id is not None:
                events += self._start(call.index, ToolUseBlock(type="tool_use", id=tool_use_id(call.id),
                                                               name=call.name, input={}))
                if call.arguments:
                    events.append(self._json(call.arguments))
        return events

    def close(self) -> list[str]:
        events = [event("content_block_stop", index=self.index)] if self.open is not None else []
        self.open = None
        return events

    def _start(self, block: str | int, content: TextBlock | ToolUseBlock) -> list[str]:
        events = self.close()
        self.index, self.open = self.index + 1, block
        return [*events, event("content_block_start", index=self.index, content_block=content.model_dump())]

    def _json(self, partial: str) -> str:
        return self._delta({"type": "input_json_delta", "partial_json": partial})

    def _delta(self, delta: dict[str, str]) -> str:
        return event("content_block_delta", index=self.index, delta=delta)


STREAM_EVENTS = ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                 "message_delta", "message_stop", "error"]


def message_responses() -> dict[int | str, dict]:
    """OpenAPI ``responses`` of /v1/messages: the message as JSON or, with ``stream``, Anthropic's events;
    errors in Anthropic's body."""
    sse = {"type": "object", "required": ["event", "data"], "properties": {
        "event": {"enum": STREAM_EVENTS}, "data": {"type": "string", "contentMediaType": "application/json"}}}
    return {200: {"model": MessageResponse, "content": {"text/event-stream": {"schema": sse}}},
            **error_responses(400, 401, 404, 413, 500, 503, body=AnthropicErrorResponse)}
