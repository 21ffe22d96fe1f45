"""One exception type for every error a client sees, rendered in OpenAI's error body.

Routes raise ``APIError`` (engine ``InvalidRequestError``s become one through ``bad_request``);
``app.py`` turns it, and FastAPI's validation errors, into ``{"error": {"message", "type", "param", "code"}}`` so clients written
against OpenAI parse every failure the same way; on Anthropic's routes (/v1/messages) into Anthropic's
``{"type": "error", "error": {"type", "message"}}``, which its clients parse.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          503: "server_overloaded"}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body: what every non-2xx answer carries."""

    error: ErrorInfo


# Anthropic's error types by status (its 529 "overloaded" is our 503).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


class AnthropicErrorInfo(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """Anthropic's error body: what every non-2xx answer on its routes carries."""

    type: Literal["error"] = "error"
    error: AnthropicErrorInfo


_MEANINGS = {400: "invalid request (the message, and OpenAI's `param`, name the field)", 401: "missing or invalid API key",
             404: "unknown model", 413: "request body larger than --max-request-bytes",
             500: "generation failed", 503: "at capacity (see Retry-After) or engine stopped"}


def error_responses(*statuses: int, body: type[BaseModel] = ErrorResponse) -> dict[int | str, dict]:
    """OpenAPI ``responses`` entries for a route: each status with its error body (OpenAI's unless told)."""
    return {status: {"model": body, "description": _MEANINGS[status]} for status in statuses}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return ErrorResponse(error=ErrorInfo(message=self.message, type=kind, param=self.param, code=self.code)).model_dump()

    def anthropic_body(self) -> dict:
        kind = _ANTHROPIC_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "api_error")
        return AnthropicErrorResponse(error=AnthropicErrorInfo(type=kind, message=self.message)).model_dump()

    def response(self, anthropic: bool = False) -> JSONResponse:
        """The error as a response, in Anthropic's body shape when ``anthropic``, else OpenAI's."""
        body = self.anthropic_body() if anthropic else self.body()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def bad_request(exc: ValueError, renames: dict[str, str] | None = None) -> APIError:
    """An engine ``InvalidRequestError`` as a 400 pointing at the field the client sent.

    ``renames`` maps the engine's parameter name to the one the client sent (e.g. ``prompt`` ->
    ``messages`` for chat, ``max_tokens`` -> ``max_completion_tokens``).
    """
    param = getattr(exc, "param", None)
    param = {"prompt_token_ids": "prompt"}.get(param, param)
    sent = (renames or {}).get(param, param)
    message = str(exc) if sent == param else re.sub(rf"\b{param}\b", sent, str(exc))  # the message names it too
    return APIError(400, message, sent)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def field_path(loc: Sequence[str | int]) -> str | None:
    """A pydantic error location as the dotted path of the field sent (``messages.0.content``), up to
    the first type tag a union member adds to it."""
    path = []
    for part in loc:
        if not (isinstance(part, int) or (part.isidentifier() and part not in _TYPE_TAGS)):
            break
        path.append(str(part))
    return ".".join(path) or None
