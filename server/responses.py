"""OpenAI's Responses API as a translation onto chat: a request's ``input`` items become chat messages
(with the stored conversation of ``previous_response_id`` before them), its function tools and
``text.format`` the same grammar-constrained tools and structured output chat has; a finished
generation becomes a ``Response`` of output items. Shapes follow openai/openai-openapi."""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from typing import Any, Literal

from pydantic import BaseModel, Field, StrictBool, ValidationError

from server.errors import APIError
from server.protocol import ChatCompletionRequest, OmitsNone, Request, ToolCallOut, documented

STORED_RESPONSES = 1024  # conversations kept for previous_response_id (oldest dropped first)
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(Request):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: StrictBool = True
    text: dict[str, Any] | None = None
    temperature: float | None = documented(minimum=0, maximum=2)
    top_p: float | None = documented(exclusiveMinimum=0, maximum=1)
    top_k: int | None = documented(minimum=-1)  # vLLM's extra
    max_output_tokens: int | None = documented(minimum=1)
    stream: StrictBool = False
    store: StrictBool = True
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None

    def format(self) -> dict[str, Any]:
        fmt = (self.text or {}).get("format") or {"type": "text"}
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise APIError(400, "text.format.type must be text, json_object or json_schema", "text.format")
        return fmt


# --- output ------------------------------------------------------------------------------------
class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str = Field(default_factory=lambda: new_id("msg"))
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = Field(default_factory=list)


class FunctionCallItem(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str = Field(default_factory=lambda: new_id("fc"))
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


OutputItem = OutputMessage | FunctionCallItem


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(OmitsNone):
    omitted_when_none = ("user", "usage")

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "failed", "in_progress", "incomplete"]
    completed_at: int | None = None
    error: dict[str, str] | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: None = None
    store: bool
    temperature: float | None
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_p: float | None
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def output_items(content: str | None, calls: list[ToolCallOut]) -> list[OutputItem]:
    items: list[OutputItem] = [OutputMessage(content=[OutputText(text=content)])] if content or not calls else []
    return items + [FunctionCallItem(call_id=c.id, name=c.function.name, arguments=c.function.arguments) for c in calls]


def response_object(body: ResponsesRequest, response_id: str, created: int, model: str, output: list[OutputItem],
                    status: str, usage: ResponseUsage | None = None) -> ResponseObject:
    """The Response as OpenAI returns it, echoing the request's settings (function tools with
    ``strict`` true where not given: kvserve constrains every call to its schema)."""
    return ResponseObject(
        id=response_id, created_at=created, status=status, completed_at=int(time.time()) if status == "completed" else None,
        incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
        instructions=body.instructions, max_output_tokens=body.max_output_tokens, model=model, output=output,
        parallel_tool_calls=body.parallel_tool_calls, previous_response_id=body.previous_response_id,
        store=body.store, temperature=body.temperature, text={"format": body.format()}, tool_choice=body.tool_choice,
        tools=[{"strict": True, "parameters": None, **tool} for tool in body.tools], top_p=body.top_p, usage=usage, user=body.user, metadata=body.metadata)


# --- input -------------------------------------------------------------------------------------
def chat_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``input`` as chat messages: messages with text parts, function calls (consecutive ones in one
    assistant message) and their outputs as tool messages. A bad item is a 400 naming its path."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            call = {"id": _text(item, "call_id", where), "type": "function",
                    "function": {"name": _text(item, "name", where), "arguments": _text(item, "arguments", where)}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": _text(item, "call_id", where),
                             "content": _text(item, "output", where)})
        else:
            raise APIError(400, f"{where}: item type {kind!r} is not supported (message, function_call, "
                                "function_call_output)", f"{where}.type")
    return messages


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = ROLES.get(item.get("role"))
    if role is None:
        raise APIError(400, f"{where}.role must be user, assistant, system or developer", f"{where}.role")
    content = item.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                raise APIError(400, f"{where}.content[{j}]: part type {kind!r} is not supported (input_text, "
                                    "output_text)", f"{where}.content[{j}]")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise APIError(400, f"{where}.content must be a string or a list of text parts", f"{where}.content")
    return {"role": role, "content": content}


def _text(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise APIError(400, f"{where}.{key} must be a string", f"{where}.{key}")
    return value


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Function tools in chat's nesting; any other tool type (web search, file search, ...) is a 400."""
    converted = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise APIError(400, f"tools[{i}]: tool type {kind!r} is not supported; only function tools are",
                           f"tools[{i}].type")
        converted.append({"type": "function", "function": {
            key: tool[key] for key in ("name", "description", "parameters", "strict") if key in tool}})
    return converted or None


def chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    if isinstance(choice, str):
        return choice
    raise APIError(400, "tool_choice must be none, auto, required or {type: function, name}", "tool_choice")


def chat_request(body: ResponsesRequest, history: list[dict[str, Any]], messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat completion that produces this response."""
    fmt = body.format()
    response_format = {"type": fmt["type"]}
    if fmt["type"] == "json_schema":
        response_format["json_schema"] = {"name": fmt.get("name", "output"), "schema": fmt.get("schema"),
                                          **({"strict": fmt["strict"]} if "strict" in fmt else {})}
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    fields = dict(model=body.model, messages=system + history + messages, tools=chat_tools(body.tools),
                  tool_choice=chat_tool_choice(body.tool_choice) if body.tools or body.tool_choice != "auto" else None,
                  parallel_tool_calls=body.parallel_tool_calls,
                  response_format=response_format, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                  max_tokens=body.max_output_tokens, user=body.user)
    if not fields["messages"]:
        raise APIError(400, "input holds no message", "input")
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:  # what the items held, once in chat's form
        error = exc.errors()[0]
        raise APIError(400, f"input: {error['msg']}", "input") from None


RENAMES = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}


def assistant_turn(output: list[OutputItem]) -> list[dict[str, Any]]:
    """A response's output as the chat messages a later turn replays."""
    text = "".join(part.text for item in output if isinstance(item, OutputMessage) for part in item.content)
    calls = [{"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
             for item in output if isinstance(item, FunctionCallItem)]
    return [{"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})}]


class ResponseStore:
    """Stored responses (``store``, the default) for retrieval and ``previous_response_id``: each with
    the conversation up to and including it, instructions left out (they are not carried over)."""

    def __init__(self, capacity: int = STORED_RESPONSES):
        self.capacity = capacity
        self.entries: OrderedDict[str, tuple[ResponseObject, list[dict[str, Any]]]] = OrderedDict()

    def history(self, response_id: str | None) -> list[dict[str, Any]]:
        if response_id is None:
            return []
        if response_id not in self.entries:
            raise APIError(400, f"previous response {response_id!r} not found (not stored, or expired)",
                           "previous_response_id")
        return self.entries[response_id][1]

    def put(self, response: ResponseObject, conversation: list[dict[str, Any]]) -> None:
        self.entries[response.id] = (response, conversation)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def get(self, response_id: str) -> ResponseObject:
        if response_id not in self.entries:
            raise APIError(404, f"response {response_id!r} not found", "response_id")
        return self.entries[response_id][0]

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        del self.entries[response_id]
