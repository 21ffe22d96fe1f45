"""POST /v1/chat/completions: messages through the chat template, then the shared generation core."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine import RequestOutput, TokenLogprob
from server.chat_template import render_chat
from server.errors import APIError
from server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    TopLogprob,
)
from server.serving import Choice, Generation, ServerState, collect, stream

router = APIRouter()


def chat_logprobs(state: ServerState, token_ids: list[int], logprobs: list[TokenLogprob]) -> ChatLogprobs:
    def entry(token_id: int, logprob: float) -> TopLogprob:
        text = state.token_text(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    content = []
    for token_id, lp in zip(token_ids, logprobs):
        top = sorted(lp.top.items(), key=lambda item: -item[1])
        content.append(ChatTokenLogprob(**entry(token_id, lp.logprob).model_dump(),
                                        top_logprobs=[entry(t, v) for t, v in top]))
    return ChatLogprobs(content=content)


def _check_unsupported(body: ChatCompletionRequest) -> None:
    if body.tool_choice not in (None, "none", "auto"):
        raise APIError(400, "only tool_choice 'none' and 'auto' are supported yet", "tool_choice")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state: ServerState = request.app.state.kvserve
    state.check_model(body.model)
    state.check_n(body.n)
    _check_unsupported(body)
    prompt_ids = render_chat(state.tokenizer, body.messages, state.settings.chat_template, body.tools,
                             body.add_generation_prompt)
    max_tokens_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    sent = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = sent if sent is not None else max(1, state.max_model_len - len(prompt_ids))  # up to the context
    renames = {"prompt": "messages", "max_tokens": max_tokens_param, "logprobs": "top_logprobs"}
    choices = [Choice(i, 0, prompt_ids, body.sampling_params(
        renames, max_tokens=max_tokens, logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        seed=None if body.seed is None else body.seed + i)) for i in range(body.n)]
    gen = await Generation.create(state, "chatcmpl", choices, renames, body.structured_output()[1])

    if body.stream:
        def chunk(choice: Choice, out: RequestOutput, first: bool) -> ChatCompletionChunk | None:
            if not (first or out.new_text or out.new_logprobs or out.finished):
                return None
            delta = ChatDelta(role="assistant" if first else None, content=out.new_text or ("" if first else None))
            logprobs = chat_logprobs(state, out.new_token_ids, out.new_logprobs) if out.new_logprobs else None
            return ChatCompletionChunk(id=gen.id, created=gen.created, model=state.model_name, choices=[
                ChatChunkChoice(index=choice.index, delta=delta, logprobs=logprobs,
                                finish_reason=out.finish_reason, stop_reason=out.stop_reason)])

        def usage_chunk(usage) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=gen.id, created=gen.created, model=state.model_name, choices=[], usage=usage)

        return stream(gen, chunk, usage_chunk if body.include_usage else None)

    results = await collect(request, gen)
    response = ChatCompletionResponse(id=gen.id, created=gen.created, model=state.model_name, usage=gen.usage(), choices=[
        ChatChoice(index=r.choice.index, message=ChatMessageOut(content=r.text),
                   logprobs=chat_logprobs(state, r.token_ids, r.logprobs) if body.logprobs else None,
                   finish_reason=r.finish_reason, stop_reason=r.stop_reason) for r in results])
    return Response(response.model_dump_json(), media_type="application/json")
