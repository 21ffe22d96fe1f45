"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes and bodies): serve a LoRA
adapter under a new model name at run time, or stop serving one. Off unless --allow-runtime-lora-updating."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from server.errors import APIError, error_responses
from server.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from server.serving import ServerState

router = APIRouter()
# vLLM answers these in plain text; their errors are OpenAI's JSON bodies.
RESPONSES = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **error_responses(400, 401, 404)}


def runtime_updating(request: Request) -> ServerState:
    state: ServerState = request.app.state.kvserve
    if not state.settings.allow_runtime_lora_updating:
        raise APIError(404, "loading and unloading LoRA adapters at run time is off: start the server with "
                            "--enable-lora --allow-runtime-lora-updating", code="runtime_lora_updating_disabled")
    return state


@router.post("/v1/load_lora_adapter", responses=RESPONSES)
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    """Read and check the adapter first (a 400 names the problem); from then on ``lora_name`` is a model."""
    lora = await runtime_updating(request).load_adapter(body.lora_name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{lora.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", responses=RESPONSES)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    """New requests for it get 404 at once; requests already running finish with it."""
    await runtime_updating(request).unload_adapter(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
