"""Chat messages -> prompt token ids, with the model's own chat template (or ``--chat-template``).

The template is the model author's contract for how turns, system prompts and tools are laid out;
we only normalise what OpenAI allows and templates do not expect (text-part lists, ``developer``).
A template that ignores ``tools`` (SmolLM2's, for one) gets them as a Hermes-style system prompt,
calls and results as ``<tool_call>`` / ``<tool_response>`` text: the syntax the hermes parser and
its grammar expect, so such models can still call tools.
"""

from __future__ import annotations

import json

from server.errors import APIError
from server.protocol import ChatMessage


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the plain dicts templates index into; text parts joined, other parts refused.

    Assistant ``tool_calls`` carry their arguments as a JSON string (OpenAI's shape); templates
    print them with ``| tojson``, so they get the parsed object, as Hugging Face's templates expect."""
    rendered = []
    for i, message in enumerate(messages):
        if message.role == "tool" and message.tool_call_id is None:
            raise APIError(400, f"messages[{i}]: a tool message needs the tool_call_id it answers",
                           f"messages.{i}.tool_call_id")
        item = message.model_dump(exclude_none=True)
        for call in item.get("tool_calls", []):
            try:
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
            except json.JSONDecodeError:
                pass  # not JSON: the template shows the text as sent
        if isinstance(message.content, list):
            kinds = {part.type for part in message.content} - {"text"}
            if kinds:
                raise APIError(400, f"messages[{i}]: only text content parts are supported, got {sorted(kinds)}",
                               f"messages.{i}.content")
            item["content"] = "\n".join(part.text or "" for part in message.content)
        if message.role == "developer":  # OpenAI's newer name for the system turn
            item["role"] = "system"
        item.setdefault("content", "")  # an assistant turn of only tool calls: templates index its content
        rendered.append(item)
    return rendered


def content_bytes(messages: list[ChatMessage]) -> int:
    """UTF-8 bytes of the messages' text: what the template renders of them at the least."""
    texts = [m.content if isinstance(m.content, str) else "".join(p.text or "" for p in m.content or [])
             for m in messages]
    return sum(len(text.encode()) for text in texts)


HERMES_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def hermes_tool_turns(conversation: list[dict], tools: list[dict]) -> list[dict]:
    """The conversation with tools (if any), calls and results written out as Hermes-style text."""
    turns = [dict(turn) for turn in conversation]
    if tools:
        prompt = HERMES_TOOLS_PROMPT.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))
        if turns and turns[0]["role"] == "system":
            turns[0]["content"] = f"{turns[0].get('content') or ''}\n\n{prompt}".lstrip()
        else:
            turns.insert(0, {"role": "system", "content": prompt})
    for turn in turns:
        calls = turn.pop("tool_calls", None)
        if calls:
            written = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                  ensure_ascii=False) for c in calls]
            turn["content"] = "\n".join([turn.get("content") or "", *(f"<tool_call>\n{w}\n</tool_call>" for w in written)]).lstrip()
        if turn["role"] == "tool":
            turn.update(role="user", content=f"<tool_response>\n{turn.get('content') or ''}\n</tool_response>")
            turn.pop("tool_call_id", None)
    return turns


class ChatRenderer:
    """Renders conversations with one template; knows whether that template shows ``tools``."""

    PROBE_TOOL = {"type": "function", "function": {"name": "kvserve_probe_tool", "parameters": {"type": "object"}}}

    def __init__(self, tokenizer, chat_template: str | None):
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self.available = chat_template is not None or bool(getattr(tokenizer, "chat_template", None))
        try:
            self.renders_tools = self.available and "kvserve_probe_tool" in self._text(
                [{"role": "user", "content": "hi"}], [self.PROBE_TOOL], True)
        except Exception:  # a template that cannot even render the probe shows no tools either
            self.renders_tools = False

    def render(self, messages: list[ChatMessage], tools: list[dict] | None = None,
               add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation; the template brings its own special tokens (BOS...)."""
        if not self.available:
            raise APIError(400, "this model's tokenizer has no chat template; restart the server with "
                                "--chat-template PATH or use /v1/completions", "messages")
        conversation = template_messages(messages)
        tool_turns = any(turn.get("tool_calls") or turn["role"] == "tool" for turn in conversation)
        if (tools or tool_turns) and not self.renders_tools:  # earlier calls stay in view with tool_choice none too
            conversation, tools = hermes_tool_turns(conversation, tools or []), None
        try:
            text = self._text(conversation, tools, add_generation_prompt)
        except Exception as exc:  # templates raise jinja errors for conversations they refuse (e.g. role order)
            raise APIError(400, f"the chat template rejected these messages: {exc}", "messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _text(self, conversation: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False, chat_template=self.chat_template,
                                                  add_generation_prompt=add_generation_prompt)
