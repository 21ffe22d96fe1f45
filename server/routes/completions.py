"""POST /v1/completions: prompts (text or token ids, one or many), n, best_of, echo, logprobs."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine import RequestOutput, TokenLogprob
from server.errors import APIError
from server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
    generation_responses,
)
from server.serving import Choice, ChoiceResult, Generation, ServerState, collect, stream

router = APIRouter()

Entries = list[tuple[int, TokenLogprob | None]]  # (token id, its logprob; None for the first prompt token)


def prompts_of(state: ServerState, prompt: str | list) -> list[tuple[str | None, list[int]]]:
    """The four prompt forms OpenAI allows -> (text if sent as text, token ids) per prompt. It tokenizes:
    call it off the event loop."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    for text in prompt:
        if isinstance(text, str):
            state.check_fits(len(text.encode()), "prompt")
    return [(p, state.tokenizer.encode(p)) if isinstance(p, str) else (None, p) for p in prompt]


class LogprobFormatter:
    """Completions' logprobs (tokens, token_logprobs, top_logprobs, text_offset), offsets running
    on across a choice's stream chunks."""

    def __init__(self, state: ServerState):
        self.state = state
        self.offsets: dict[int, int] = {}

    def __call__(self, index: int, entries: Entries) -> CompletionLogprobs:
        text = self.state.token_text
        offset = self.offsets.get(index, 0)
        result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for token_id, lp in entries:
            result.tokens.append(text(token_id))
            result.token_logprobs.append(None if lp is None else lp.logprob)
            result.top_logprobs.append(None if lp is None else {
                text(t): v for t, v in {**lp.top, token_id: lp.logprob}.items()})
            result.text_offset.append(offset)
            offset += len(result.tokens[-1])
        self.offsets[index] = offset
        return result


def _entries(token_ids: list[int], logprobs: list[TokenLogprob]) -> Entries:
    return list(zip(token_ids, logprobs))


def _echo(state: ServerState, prompt: tuple[str | None, list[int]], prompt_logprobs: list | None, text: str,
          entries: Entries) -> tuple[str, Entries]:
    """Prepend the prompt (as sent, or decoded) to a choice's text and, if asked for, its logprobs."""
    prompt_text, ids = prompt
    prompt_text = state.tokenizer.decode(ids) if prompt_text is None else prompt_text
    prompt_entries = list(zip(ids, prompt_logprobs)) if prompt_logprobs else []
    return prompt_text + text, prompt_entries + entries


@router.post("/v1/completions", responses=generation_responses(CompletionResponse, CompletionResponse))
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state: ServerState = request.app.state.kvserve
    model = state.resolve_model(body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported", "suffix")
    state.check_n(body.n)
    best_of = body.best_of or body.n
    state.check_n(best_of, "best_of")
    if best_of < body.n:
        raise APIError(400, f"best_of ({best_of}) must be >= n ({body.n})", "best_of")
    if body.stream and best_of > body.n:
        raise APIError(400, "best_of > n cannot be streamed", "best_of")
    # best_of ranks by cumulative logprob, which the engine tracks only when logprobs are on.
    logprobs = body.logprobs if body.logprobs is not None or best_of == body.n else 0
    prompts = await asyncio.to_thread(prompts_of, state, body.prompt)
    choices = []
    for p, (_, ids) in enumerate(prompts):
        for i in range(best_of):
            params = body.sampling_params(state.default_sampling, max_tokens=body.max_tokens, logprobs=logprobs,
                                          prompt_logprobs=body.logprobs if body.echo else None,
                                          seed=None if body.seed is None else body.seed + i)
            choices.append(Choice(p * best_of + i, p, ids, params))
    gen = await Generation.create(state, "cmpl", model, choices, grammar_field=body.structured_output()[1])
    fmt = LogprobFormatter(state)
    want_logprobs = body.logprobs is not None

    def envelope(choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=gen.id, created=gen.created, model=gen.model.name, choices=choices, usage=usage)

    if body.stream:
        def chunk(choice: Choice, out: RequestOutput, first: bool) -> CompletionResponse | None:
            text, entries = out.new_text, _entries(out.new_token_ids, out.new_logprobs or [])
            if first and body.echo:
                text, entries = _echo(state, prompts[choice.prompt_index], out.prompt_logprobs, text, entries)
            if not text and not entries and not out.finished:
                return None
            logprobs = fmt(choice.index, entries) if want_logprobs else None
            return envelope([CompletionChoice(index=choice.index, text=text, logprobs=logprobs,
                                              finish_reason=out.finish_reason, stop_reason=out.stop_reason)])

        return stream(gen, chunk, (lambda usage: envelope([], usage)) if body.include_usage else None)

    results = await collect(request, gen)
    kept = _best(results, body.n, best_of)
    out = []
    for result in kept:
        choice = result.choice
        text, entries = result.text, _entries(result.token_ids, result.logprobs)
        if body.echo:
            text, entries = _echo(state, prompts[choice.prompt_index], result.prompt_logprobs, text, entries)
        out.append(CompletionChoice(index=len(out), text=text, logprobs=fmt(choice.index, entries) if want_logprobs else None,
                                    finish_reason=result.finish_reason, stop_reason=result.stop_reason))
    return Response(envelope(out, gen.usage()).model_dump_json(), media_type="application/json", headers=gen.headers)


def _best(results: list[ChoiceResult], n: int, best_of: int) -> list[ChoiceResult]:
    """Per prompt, the n results with the highest cumulative logprob (all of them when best_of == n)."""
    if best_of == n:
        return results
    kept = []
    for start in range(0, len(results), best_of):
        group = results[start:start + best_of]
        kept += sorted(group, key=lambda r: r.cumulative_logprob, reverse=True)[:n]
    return kept
