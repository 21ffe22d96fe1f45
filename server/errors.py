"""One exception type for every error a client sees, rendered in OpenAI's error body.

Routes raise ``APIError`` (engine ``InvalidRequestError``s become one through ``bad_request``);
``app.py`` turns it, and FastAPI's validation errors, into ``{"error": {"message", "type", "param", "code"}}`` so clients written
against OpenAI parse every failure the same way.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          503: "server_overloaded"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind,
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(exc: ValueError, renames: dict[str, str] | None = None) -> APIError:
    """An engine ``InvalidRequestError`` as a 400 pointing at the field the client sent.

    ``renames`` maps the engine's parameter name to the one the client sent (e.g. ``prompt`` ->
    ``messages`` for chat, ``max_tokens`` -> ``max_completion_tokens``).
    """
    param = getattr(exc, "param", None)
    param = {"prompt_token_ids": "prompt"}.get(param, param)
    return APIError(400, str(exc), (renames or {}).get(param, param))
