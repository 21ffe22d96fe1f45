"""create_app(engine, settings): the FastAPI app, its middleware, error handlers and lifespan."""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import AsyncEngine
from server.errors import APIError, field_path
from server.metrics import HTTPMetrics
from server.protocol import STREAMED_CHUNKS
from server.routes import chat, completions, health, lora, messages, models, responses, tokenize
from server.serving import ServerState, Settings

logger = logging.getLogger("kvserve.server")

ROUTE_MODULES = (completions, chat, responses, messages, models, lora, health, tokenize)
OPEN_PATHS = {"/health", "/version", "/metrics"}  # probes and scrapers work without the key
MAX_REQUEST_ID = 128
ANTHROPIC_PATH = "/v1/messages"  # it and the paths under it answer errors in Anthropic's shape


def error_response(error: APIError, path: str) -> JSONResponse:
    """``error`` in the body shape of the API that ``path`` belongs to."""
    return error.response(anthropic=path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/"))


def request_id_of(sent: bytes | None) -> bytes:
    """The client's ``X-Request-Id`` if it is a sane token (1-128 visible ASCII characters, safe to echo
    and to log), else a fresh id."""
    if sent and len(sent) <= MAX_REQUEST_ID and all(0x21 <= byte <= 0x7E for byte in sent):
        return sent
    return uuid.uuid4().hex.encode()


class RequestIdAndAuth:
    """Pure ASGI (no BaseHTTPMiddleware, which would break streaming and disconnect detection):
    echoes or assigns ``X-Request-Id`` and, with an API key set, refuses requests without it: sent as
    ``Authorization: Bearer KEY`` (OpenAI's clients) or ``x-api-key: KEY`` (Anthropic's)."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.api_key = api_key.encode() if api_key else None

    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        """``Bearer KEY``, the scheme in any case (RFC 9110 11.1), or ``x-api-key``; keys compared in constant time."""
        scheme, _, key = headers.get(b"authorization", b"").partition(b" ")
        bearer = scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(b" "), self.api_key)
        return bearer or hmac.compare_digest(headers.get(b"x-api-key", b"").strip(b" "), self.api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        request_id = request_id_of(headers.get(b"x-request-id"))
        if (self.api_key is not None and scope["path"] not in OPEN_PATHS
                and not self.authorized(headers)):
            error = APIError(401, "missing or invalid API key (send Authorization: Bearer KEY or x-api-key: KEY)",
                             code="invalid_api_key", headers={"X-Request-Id": request_id.decode("latin-1")})
            return await error_response(error, scope["path"])(scope, receive, send)

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimit:
    """Pure ASGI: a request body over ``limit`` bytes is a 413, refused by its Content-Length before the
    app runs or, sent chunked, as soon as the bytes received pass the limit; so no more than the limit
    (plus the one chunk that crossed it) is ever held."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    def message(self) -> str:
        return f"request body is larger than {self.limit} bytes (--max-request-bytes)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await error_response(APIError(413, self.message()), scope["path"])(scope, receive, send)
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # FastAPI passes an HTTPException from the body read on to http_error
                raise HTTPException(413, self.message())
            return message

        await self.app(scope, counting_receive, send)


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 as OpenAI's 400: the first problem, ``param`` the dotted field path."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
    param = field_path(first.get("loc", ())[1:])  # loc starts with "body"
    return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param)


def openapi_document(app: FastAPI) -> dict:
    """FastAPI's document less the 422 it gives every route with a body (invalid input is a 400 with
    OpenAI's error body here, declared by each route with the other statuses it answers), plus the
    streamed chunks' schemas."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for operations in document["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        schemas = document["components"]["schemas"]
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        for model in STREAMED_CHUNKS:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
            for name, definition in {**schema.pop("$defs", {}), model.__name__: schema}.items():
                schemas.setdefault(name, definition)
        app.openapi_schema = document
    return app.openapi_schema


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
    app.openapi = lambda: openapi_document(app)
    app.state.kvserve = ServerState(engine, settings)
    app.state.started = int(time.time())
    for module in ROUTE_MODULES:
        app.include_router(module.router)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(RequestIdAndAuth, api_key=settings.api_key)
    state = app.state.kvserve
    paths = {route.path for module in ROUTE_MODULES for route in module.router.routes}
    app.add_middleware(HTTPMetrics, metrics=state.metrics, routes=paths)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return error_response(validation_error(exc), request.url.path)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        headers = exc.headers
        if exc.status_code == 405:  # Starlette's Allow names one route's methods; a path may have several routes
            allowed = {method for route in app.routes if route.matches(request.scope)[0] == Match.PARTIAL
                       for method in getattr(route, "methods", None) or ()}
            headers = {**(headers or {}), "Allow": ", ".join(sorted(allowed))}
        return error_response(APIError(exc.status_code, str(exc.detail), headers=headers), request.url.path)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        logger.exception("unhandled error in %s", request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}"), request.url.path)

    return app
