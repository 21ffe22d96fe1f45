"""LLM: the offline, vLLM-shaped entry point (``LLM(model).generate(prompts, params)``)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from engine.config import EngineConfig, SpeculativeConfig
from engine.llm_engine import LLMEngine
from engine.lora import LoRARequest
from engine.outputs import GenerationOutput, RequestOutput
from engine.request import SamplingParams


class LLM:
    def __init__(self, model: str, speculative_config: SpeculativeConfig | dict | None = None, **engine_args):
        """``engine_args``: any ``EngineConfig`` field (dtype, max_num_seqs, kv_cache_memory, ...).
        ``speculative_config``: e.g. ``{"method": "draft", "draft_model": PATH, "num_speculative_tokens": 4}``
        or ``{"method": "ngram"}`` (see ``SpeculativeConfig``)."""
        if isinstance(speculative_config, dict):
            speculative_config = SpeculativeConfig(**speculative_config)
        self.engine = LLMEngine(EngineConfig(model=model, speculative=speculative_config, **engine_args))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: str | Sequence[str] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[GenerationOutput]:
        """Run every prompt to completion in one continuous batch; outputs come back in input order.
        ``lora_request``: the adapter of every prompt, or one per prompt (None: the base model)."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts and prompt_token_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        texts: list[str | None] = list(prompts) if prompts is not None else [None] * len(prompt_token_ids)
        token_ids = [self.tokenizer.encode(p) for p in prompts] if prompts is not None else [list(p) for p in prompt_token_ids]
        params = sampling_params or SamplingParams(**self.engine.default_sampling)  # the model's recommendation
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(token_ids)
        if len(params_list) != len(token_ids):
            raise ValueError(f"sampling_params: got {len(params_list)} for {len(token_ids)} prompts")
        loras = list(lora_request) if isinstance(lora_request, Sequence) else [lora_request] * len(token_ids)
        if len(loras) != len(token_ids):
            raise ValueError(f"lora_request: got {len(loras)} for {len(token_ids)} prompts")
        for ids, p, lora in zip(token_ids, params_list, loras):  # reject bad input before anything runs
            self.engine.validate(ids, p)
            if p.structured_output is not None:
                self.engine.structured.compile(p.structured_output)
            if lora is not None:
                self.engine.lora_adapter(lora)
        request_ids = [f"llm-{next(self._ids)}" for _ in token_ids]
        for rid, ids, p, lora in zip(request_ids, token_ids, params_list, loras):
            self.engine.add_request(rid, ids, p, lora_request=lora)
        deltas: dict[str, list[RequestOutput]] = {rid: [] for rid in request_ids}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                deltas[out.request_id].append(out)
        return [merge_deltas(rid, text, ids, deltas[rid]) for rid, text, ids in zip(request_ids, texts, token_ids)]


def merge_deltas(request_id: str, prompt: str | None, prompt_ids: list[int], deltas: list[RequestOutput]) -> GenerationOutput:
    last = deltas[-1]
    logprobs = [lp for d in deltas for lp in (d.new_logprobs or [])]
    return GenerationOutput(
        request_id=request_id, prompt=prompt, prompt_token_ids=prompt_ids,
        text="".join(d.new_text for d in deltas), token_ids=[t for d in deltas for t in d.new_token_ids],
        finish_reason=last.finish_reason, stop_reason=last.stop_reason,
        logprobs=logprobs if any(d.new_logprobs for d in deltas) else None,
        prompt_logprobs=deltas[0].prompt_logprobs,
        cumulative_logprob=last.cumulative_logprob, num_cached_tokens=last.num_cached_tokens)
