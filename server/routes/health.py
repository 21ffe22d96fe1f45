"""Liveness, version, and the engine's own counters (for operators and tests; behind the API key)."""

from __future__ import annotations

import dataclasses
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.serving import ServerState

router = APIRouter()


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request) -> Response:
    """200 "ok"; 503 once the engine thread has died ("engine stopped") or while a step runs past
    --engine-stall-timeout ("engine stalled"), so orchestrators restart us, and from SIGTERM on
    ("draining"), so load balancers send new work elsewhere while in-flight requests finish."""
    state: ServerState = request.app.state.kvserve
    engine = state.engine
    status = ("engine stopped" if not engine.is_running else "engine stalled" if engine.stalled
              else "draining" if state.draining else "ok")
    return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)


@router.get("/version")
async def server_version() -> dict:
    try:
        return {"version": version("kvserve")}
    except PackageNotFoundError:
        return {"version": "unknown"}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus exposition of this server's registry (see server/metrics.py)."""
    registry = request.app.state.kvserve.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/internal/stats")
async def stats(request: Request) -> dict:
    state: ServerState = request.app.state.kvserve
    return {**dataclasses.asdict(state.engine.stats()), "num_sequences_admitted": state.num_sequences,
            "num_unfinished": state.engine.num_unfinished}
