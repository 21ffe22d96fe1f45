"""create_app(engine, settings): the FastAPI app, its middleware, error handlers and lifespan."""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from engine import AsyncEngine
from server.errors import APIError
from server.metrics import HTTPMetrics
from server.routes import chat, completions, health, models, tokenize
from server.serving import ServerState, Settings

logger = logging.getLogger("kvserve.server")

ROUTE_MODULES = (completions, chat, models, health, tokenize)
OPEN_PATHS = {"/health", "/version", "/metrics"}  # probes and scrapers work without the key


class RequestIdAndAuth:
    """Pure ASGI (no BaseHTTPMiddleware, which would break streaming and disconnect detection):
    echoes or assigns ``X-Request-Id`` and, with an API key set, refuses requests without it."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id") or uuid.uuid4().hex.encode()
        if (self.expected is not None and scope["path"] not in OPEN_PATHS
                and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected)):
            error = APIError(401, "missing or invalid API key (send Authorization: Bearer KEY)",
                             code="invalid_api_key", headers={"X-Request-Id": request_id.decode("latin-1")})
            return await error.response()(scope, receive, send)

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 as OpenAI's 400: the first problem, ``param`` the dotted field path."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
    path = []
    for part in first.get("loc", ())[1:]:  # loc starts with "body"; union members add type tags
        if not (isinstance(part, int) or (part.isidentifier() and part not in _TYPE_TAGS)):
            break
        path.append(str(part))
    param = ".".join(path) or None
    return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def create_app(engine: AsyncEngine, settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        logger.info("serving %s as %s", settings.model_path, ", ".join(settings.served_model_names))
        yield
        # uvicorn has already drained in-flight requests (or hit its graceful-shutdown timeout).
        engine.shutdown()
        logger.info("engine stopped")

    app = FastAPI(title="kvserve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.kvserve = ServerState(engine, settings)
    app.state.started = int(time.time())
    for module in ROUTE_MODULES:
        app.include_router(module.router)
    app.add_middleware(RequestIdAndAuth, api_key=settings.api_key)
    state = app.state.kvserve
    paths = {route.path for module in ROUTE_MODULES for route in module.router.routes}
    app.add_middleware(HTTPMetrics, metrics=state.metrics, routes=paths)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        logger.exception("unhandled error in %s", request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()

    return app
