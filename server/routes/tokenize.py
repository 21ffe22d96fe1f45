"""POST /tokenize and /detokenize (vLLM's shapes): what the server's tokenizer makes of a text or chat."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from server.errors import APIError
from server.errors import error_responses
from server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.serving import ServerState

router = APIRouter()


@router.post("/tokenize", responses=error_responses(400, 401, 404, 413))
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state: ServerState = request.app.state.kvserve
    state.resolve_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send exactly one of prompt and messages", "prompt")
    if body.messages is not None:
        tokens = await asyncio.to_thread(state.chat.render, body.messages, body.tools, body.add_generation_prompt)
    else:
        tokens = await asyncio.to_thread(state.tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(count=len(tokens), max_model_len=state.max_model_len, tokens=tokens)


@router.post("/detokenize", responses=error_responses(400, 401, 404, 413))
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state: ServerState = request.app.state.kvserve
    state.resolve_model(body.model)
    vocab = state.engine.engine.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"tokens outside the vocabulary [0, {vocab}): {bad[:5]}", "tokens")
    return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))
