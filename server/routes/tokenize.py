"""POST /tokenize and /detokenize (vLLM's shapes): what the server's tokenizer makes of a text or chat."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.errors import APIError
from server.protocol import DetokenizeRequest, TokenizeRequest
from server.serving import ServerState

router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    state: ServerState = request.app.state.kvserve
    state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send exactly one of prompt and messages", "prompt")
    if body.messages is not None:
        tokens = state.chat.render(body.messages, body.tools, body.add_generation_prompt)
    else:
        tokens = state.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return {"count": len(tokens), "max_model_len": state.max_model_len, "tokens": tokens}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    state: ServerState = request.app.state.kvserve
    state.check_model(body.model)
    vocab = state.engine.engine.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"tokens outside the vocabulary [0, {vocab}): {bad[:5]}", "tokens")
    return {"prompt": state.tokenizer.decode(body.tokens)}
