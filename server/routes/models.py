"""GET /v1/models: the served model names and LoRA adapters (what clients pass as ``model``)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.errors import APIError, error_responses
from server.protocol import ModelCard, ModelList
from server.serving import ServerState

router = APIRouter()


def model_cards(request: Request) -> list[ModelCard]:
    state: ServerState = request.app.state.kvserve
    served = [(name, state.settings.model_path, None) for name in state.settings.served_model_names]
    served += [(name, lora.lora_path, state.model_name) for name, lora in state.adapters.items()]
    return [ModelCard(id=name, created=request.app.state.started, owned_by="kvserve", root=root, parent=parent,
                      max_model_len=state.max_model_len) for name, root, parent in served]


@router.get("/v1/models", responses=error_responses(401))
async def list_models(request: Request) -> ModelList:
    return ModelList(data=model_cards(request))


@router.get("/v1/models/{model_id:path}", responses=error_responses(401, 404))
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    """One served model (``client.models.retrieve``); an unknown id is OpenAI's 404."""
    for card in model_cards(request):
        if card.id == model_id:
            return card
    raise APIError(404, f"the model {model_id!r} does not exist", "model", code="model_not_found")
