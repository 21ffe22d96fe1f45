"""GET /v1/models: the served model names (what clients pass as ``model``)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.serving import ServerState

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    state: ServerState = request.app.state.kvserve
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": request.app.state.started, "owned_by": "kvserve",
         "root": state.settings.model_path, "max_model_len": state.max_model_len}
        for name in state.settings.served_model_names]}
