"""Chat messages -> prompt token ids, with the model's own chat template (or ``--chat-template``).

The template is the model author's contract for how turns, system prompts and tools are laid out;
we only normalise what OpenAI allows and templates do not expect (text-part lists, ``developer``).
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
        rendered.append(item)
    return rendered


def render_chat(tokenizer, messages: list[ChatMessage], chat_template: str | None, tools: list[dict] | None = None,
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered conversation; the template brings its own special tokens (BOS...)."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; restart the server with "
                            "--chat-template PATH or use /v1/completions", "messages")
    conversation = template_messages(messages)
    try:
        text = tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             chat_template=chat_template)
    except Exception as exc:  # templates raise jinja errors for conversations they refuse (e.g. role order)
        raise APIError(400, f"the chat template rejected these messages: {exc}", "messages") from None
    return tokenizer.encode(text, add_special_tokens=False)
