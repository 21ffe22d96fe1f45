"""Tool calling: each model family's call syntax, the grammar that keeps every call valid, and one
incremental parser that splits output into content and calls.

Every call is grammar-constrained, ``auto`` mode included: xgrammar's structural tags let text run
free until the call's start marker, then force a declared tool name and arguments valid for that
tool's schema. The parser therefore never meets a malformed call, only an unfinished one (output
cut by ``max_tokens``). Streamed and non-streamed responses run the same parser (non-streamed feeds
everything at once), so they always agree.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import xgrammar as xgr
from xgrammar.structural_tag import (
    ConstStringFormat,
    JSONSchemaFormat,
    OptionalFormat,
    OrFormat,
    SequenceFormat,
    StarFormat,
    StructuralTag,
    TagFormat,
    TagsWithSeparatorFormat,
    TriggeredTagsFormat,
)

from engine.errors import InvalidRequestError
from engine.schema_check import checked_schema, unenforced_keywords
from server.errors import APIError

logger = logging.getLogger(__name__)

MAX_TOOLS = 128  # OpenAI's own limit; each tool's schema is also bounded (engine.schema_check)


@dataclass(frozen=True)
class ToolSyntax:
    """How a model family writes calls. ``marker`` opens a call (hermes), a list of calls (mistral),
    or is the call's own first characters (llama3_json); after it come ``{"name": "...", "<args_key>": {...}``
    and the ``close`` pattern."""

    name: str
    marker: str
    args_key: str
    close: str
    marker_in_call: bool = False
    list_open: str | None = None  # calls form a JSON list after the marker: '[' ... ', ' ... ']'
    xgrammar_format: str | None = None  # xgrammar's builder for this syntax, where it has one

    def head(self) -> re.Pattern:
        return re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"' + self.args_key + r'"\s*:\s*')


SYNTAXES = {
    # Qwen2.5 / Hermes: <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>, one call per tag.
    "hermes": ToolSyntax("hermes", "<tool_call>", "arguments", r"\s*\}\s*</tool_call>", xgrammar_format="qwen_3"),
    # Llama 3.1+ JSON calls: {"name": ..., "parameters": {...}}
    "llama3_json": ToolSyntax("llama3_json", '{"name"', "parameters", r"\s*\}", marker_in_call=True,
                              xgrammar_format="llama"),
    # Mistral: [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
    "mistral": ToolSyntax("mistral", "[TOOL_CALLS]", "arguments", r"\s*\}", list_open=r"\s*\["),
}


def detect_syntax(chat_template: str | None) -> ToolSyntax:
    """The syntax a chat template teaches its model; hermes when it shows none."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        name = "mistral"
    elif "<|python_tag|>" in template or '"parameters": ' in template:
        name = "llama3_json"
    else:
        name = "hermes"
    logger.info("tool-call parser: %s (detected from the chat template)", name)
    return SYNTAXES[name]


# --- requests --------------------------------------------------------------------------------
@dataclass
class ToolRequest:
    """A chat request's tools, checked; ``None`` from ``from_body`` when no call is possible."""

    tools: list[dict]
    choice: str | dict  # "auto", "required" or {"type": "function", "function": {"name": ...}}
    parallel: bool
    unenforced: list[str] = field(default_factory=list)  # keywords of strict: false tools the grammar ignores

    @classmethod
    def from_body(cls, tools: list[dict] | None, tool_choice: str | dict | None, parallel: bool | None) -> ToolRequest | None:
        if tool_choice is not None and not tools:
            raise APIError(400, "tool_choice needs tools: declare the functions the model may call", "tool_choice")
        if not tools:
            return None
        if len(tools) > MAX_TOOLS:
            raise APIError(400, f"tools: {len(tools)} tools, over the limit of {MAX_TOOLS}", "tools")
        tools = [check_tool(i, tool) for i, tool in enumerate(tools)]
        unenforced = [f"tools.{i}.function.parameters{pointer}" for i, tool in enumerate(tools)
                      for pointer in unenforced_keywords(tool["function"]["parameters"])]
        names = [tool["function"]["name"] for tool in tools]
        choice = "auto" if tool_choice is None else tool_choice
        if isinstance(choice, str):
            if choice not in ("none", "auto", "required"):
                raise APIError(400, f"tool_choice must be none, auto, required or a named function, got {choice!r}",
                               "tool_choice")
        else:
            name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
            if not isinstance(name, str):
                raise APIError(400, 'a named tool_choice is {"type": "function", "function": {"name": ...}}', "tool_choice")
            if name not in names:
                raise APIError(400, f"tool_choice names {name!r}, which is not among the declared tools {names}",
                               "tool_choice")
        if choice == "none":
            return None
        return cls(tools, choice, True if parallel is None else parallel, unenforced)

    def structural_tag(self, syntax: ToolSyntax) -> StructuralTag:
        if syntax.xgrammar_format is None:
            return self._list_tag(syntax)
        tag = xgr.get_model_structural_tag(syntax.xgrammar_format, tools=self.tools, tool_choice=self.choice,
                                           reasoning="disabled", parallel_tool_calls=self.parallel)
        if self.choice != "required":
            return tag
        # xgrammar's "required" lets free text run before and between calls, and a small model then
        # talks until max_tokens; required means calls only, as OpenAI and vLLM do it. After each call
        # the model may end, with or without a newline: a separator that had to be followed by another
        # call made models that like a newline there (SmolLM2) repeat their call.
        tags = tag.format.tags
        call = tags[0] if len(tags) == 1 else OrFormat(elements=tags)
        if self.parallel:
            call = SequenceFormat(elements=[call, StarFormat(content=SequenceFormat(
                elements=[ConstStringFormat(value="\n"), call]))])
        return StructuralTag(format=SequenceFormat(elements=[call, OptionalFormat(content=ConstStringFormat(value="\n"))]))

    @property
    def calls_only(self) -> bool:
        """required or a named function: the grammar admits nothing but calls (and blanks)."""
        return self.choice != "auto"

    def _list_tag(self, syntax: ToolSyntax) -> StructuralTag:
        """For list syntaxes (mistral), which xgrammar has no builder for: marker, '[', calls, ']'."""
        named = self.choice if isinstance(self.choice, dict) else None
        tools = [t["function"] for t in self.tools if named is None or t["function"]["name"] == named["function"]["name"]]
        calls = [TagFormat(begin=f'{{"name": {json.dumps(f["name"])}, "{syntax.args_key}": ',
                           content=JSONSchemaFormat(json_schema=f.get("parameters") or {"type": "object"}),
                           end="}") for f in tools]
        listed = TagFormat(begin=syntax.marker + "[", end="]", content=TagsWithSeparatorFormat(
            tags=calls, separator=", ", at_least_one=True, stop_after_first=named is not None or not self.parallel))
        if self.choice == "auto":
            return StructuralTag(format=TriggeredTagsFormat(triggers=[syntax.marker], tags=[listed], stop_after_first=True))
        return StructuralTag(format=listed)


def check_tool(index: int, tool: Any) -> dict:
    """A declared tool with its parameters' schema as it will be compiled (engine.schema_check), or a
    400 naming what is wrong with it."""
    param = f"tools.{index}"
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
        raise APIError(400, f'{param}: a tool is {{"type": "function", "function": {{"name", "parameters"}}}}', param)
    name = function.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
        raise APIError(400, f"{param}.function.name: 1-64 letters, digits, '_', '.' or '-', got {name!r}",
                       f"{param}.function.name")
    parameters = function.get("parameters", {"type": "object"})
    where = f"{param}.function.parameters"
    try:
        if not isinstance(parameters, dict):
            raise jsonschema.SchemaError("parameters must be a JSON Schema object")
        jsonschema.validators.validator_for(parameters).check_schema(parameters)
        parameters = checked_schema(parameters, where, best_effort=function.get("strict") is False)
    except jsonschema.SchemaError as exc:
        raise APIError(400, f"{where} is not a valid JSON Schema: {exc.message}", where) from None
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), where) from None
    return {**tool, "function": {**function, "parameters": parameters}}


# --- parsing ---------------------------------------------------------------------------------
@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str  # the JSON text so far; whole once the call is complete
    complete: bool = False


@dataclass
class CallDelta:
    """What is new about call ``index``: id and name on its first delta, then argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParserDelta:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)


class ToolCallParser:
    """Feed output text as it comes; each ``feed`` returns only what is new. Content is the text
    outside calls (blanks next to a call dropped, partial markers held back until they resolve)."""

    def __init__(self, syntax: ToolSyntax, calls_only: bool = False):
        self.syntax = syntax
        self.calls_only = calls_only  # the grammar allows calls only: no text is content (a cut marker included)
        self._head = syntax.head()
        self._close = re.compile(syntax.close)
        self._list_open = re.compile(syntax.list_open) if syntax.list_open else None
        self._text = ""
        # Text before _settled[0] is final (its content segments and complete calls never change),
        # so each feed scans only from there: linear work per delta, not the whole output again.
        self._settled: tuple[int, list[str], list[ParsedCall]] = (0, [], [])
        self._sent_content = 0
        self._sent_args: list[int] = []
        self._ids: list[str] = []
        self.calls: list[ParsedCall] = []
        self.content = ""

    def feed(self, text: str, final: bool = False) -> ParserDelta:
        self._text += text
        content, calls = self._scan(final)
        delta = ParserDelta(content=content[self._sent_content:])
        self._sent_content = len(content)
        for index, call in enumerate(calls):
            if index == len(self._sent_args):
                self._sent_args.append(0)
                delta.calls.append(CallDelta(index, id=call.id, name=call.name))
            new = call.arguments[self._sent_args[index]:]
            if new:
                if delta.calls and delta.calls[-1].index == index:
                    delta.calls[-1].arguments = new
                else:
                    delta.calls.append(CallDelta(index, arguments=new))
                self._sent_args[index] = len(call.arguments)
        self.calls, self.content = calls, content
        return delta

    def finish(self) -> ParserDelta:
        return self.feed("", final=True)

    def _call_id(self, index: int) -> str:
        while len(self._ids) <= index:
            self._ids.append(f"call_{uuid.uuid4().hex[:24]}")
        return self._ids[index]

    def _scan(self, final: bool) -> tuple[str, list[ParsedCall]]:
        """Content and calls of all text so far (content only as far as it can no longer change)."""
        pos, settled_segments, settled_calls = self._settled
        text, segments, calls = self._text, list(settled_segments), list(settled_calls)
        while True:
            start = text.find(self.syntax.marker, pos)
            if start < 0:
                tail = text[pos:]
                if not final:
                    tail = _without_partial_marker(tail, self.syntax.marker).rstrip()
                segments.append(tail.lstrip() if calls else tail)
                break
            segments.append(text[pos:start].lstrip() if calls else text[pos:start])
            segments[-1] = segments[-1].rstrip()
            body = start if self.syntax.marker_in_call else start + len(self.syntax.marker)
            if self._list_open is not None:
                opened = self._list_open.match(text, body)
                if opened is None:
                    break
                body = opened.end()
            pos = self._scan_calls(text, body, calls)
            if pos is None:  # a call still being written
                break
            self._settled = (pos, list(segments), list(calls))
        content = "" if self.calls_only else "\n".join(s for s in segments if s)
        return content, calls

    def _scan_calls(self, text: str, pos: int, calls: list[ParsedCall]) -> int | None:
        """Parse the call(s) at ``pos``; the position after them, or None while one is unfinished."""
        decoder = json.JSONDecoder(strict=False)  # raw control characters are escaped below
        while True:
            head = self._head.match(text, pos)
            if head is None or head.end() == len(text):
                return None
            index = len(calls)
            name = json.loads(f'"{head.group(1)}"')
            try:
                _, end = decoder.raw_decode(text, head.end())
            except json.JSONDecodeError:
                calls.append(ParsedCall(self._call_id(index), name, _escape_raw_controls(text[head.end():])))
                return None
            call = ParsedCall(self._call_id(index), name, _escape_raw_controls(text[head.end():end]))
            calls.append(call)
            close = self._close.match(text, end)
            if close is None:
                return None
            call.complete = True
            pos = close.end()
            if self._list_open is None:
                return pos
            more = re.compile(r"\s*(,|\])").match(text, pos)
            if more is None:
                return None
            if more.group(1) == "]":
                return more.end()
            pos = more.end()


def _without_partial_marker(text: str, marker: str) -> str:
    """Drop a tail that may be the start of ``marker`` (held back until the next text decides)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return text[:-size]
    return text


_RAW_CONTROL = re.compile(r"[\x00-\x1f]")


def _escape_raw_controls(arguments: str) -> str:
    """xgrammar's JSON grammars admit raw control characters inside strings (its issue #286), which
    strict JSON parsers reject: escape them. Each character's output depends only on what precedes
    it, so streamed fragments stay prefixes of the final text."""
    if not _RAW_CONTROL.search(arguments):
        return arguments
    out, in_string, escaped = [], False, False
    for ch in arguments:
        if in_string and not escaped and ch < " ":
            ch = f"\\u{ord(ch):04x}"
        elif in_string:
            in_string = escaped or ch != '"'
            escaped = not escaped and ch == "\\"
        else:
            in_string = ch == '"'
        out.append(ch)
    return "".join(out)


def finish_reason(engine_reason: str | None, calls: list[ParsedCall]) -> str | None:
    """OpenAI's ``tool_calls`` when the model stopped after writing complete calls."""
    return "tool_calls" if engine_reason == "stop" and any(c.complete for c in calls) else engine_reason
