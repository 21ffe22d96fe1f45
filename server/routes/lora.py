"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes and bodies): serve a LoRA
adapter under a new model name at run time, or stop serving one. Off unless --allow-runtime-lora-updating."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from server.errors import APIError, error_responses
from server.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from server.serving import ServerState

router = APIRouter()


def runtime_updating(request: Request) -> ServerState:
    state: ServerState = request.app.state.kvserve
    if not state.settings.allow_runtime_lora_updating:
        raise APIError(404, "loading and unloading LoRA adapters at run time is off: start the server with "
                            "--enable-lora --allow-runtime-lora-updating", code="runtime_lora_updating_disabled")
    return state


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=error_responses(400, 401, 404))
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> str:
    """Read and check the adapter first (a 400 names the problem); from then on ``lora_name`` is a model."""
    lora = await runtime_updating(request).load_adapter(body.lora_name, body.lora_path)
    return f"Success: LoRA adapter '{lora.lora_name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=error_responses(400, 401, 404))
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> str:
    """New requests for it get 404 at once; requests already running finish with it."""
    await runtime_updating(request).unload_adapter(body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
