"""LLMEngine.step(): schedule -> run -> sample -> update requests -> output deltas.

Synchronous and deterministic: tests drive it directly; AsyncEngine runs it in a thread.
"""

from __future__ import annotations

import copy
import logging
import threading
import time

import torch
from transformers import GenerationConfig

from engine.attention import get_backend
from engine import gpu_memory
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache import KVCacheManager, kv_block_bytes
from engine.lora import LoRAAdapter, LoRAManager, LoRARequest
from engine.model_runner import ModelRunner
from engine.models.loader import load_config, load_draft_config, load_model, load_tokenizer
from engine.outputs import EngineStats, RequestOutput, ScheduledRequest, SchedulerOutput, SpecStats
from engine.errors import InvalidRequestError
from engine.request import Request, SamplingParams
from engine.grammar_worker import CompileLimits
from engine.sampler import Sampler, token_logprobs
from engine.scheduler import Scheduler
from engine.speculative import DraftModelProposer, NgramProposer, Speculator
from engine.structured import StructuredOutputs

logger = logging.getLogger(__name__)


def generation_config(folder: str) -> GenerationConfig | None:
    """The folder's generation_config.json, if it has one."""
    try:
        return GenerationConfig.from_pretrained(folder)
    except OSError:
        return None


def eos_token_ids(generation: GenerationConfig | None, tokenizer, hf_config) -> set[int]:
    """EOS ids from generation_config.json (may be a list), else the config's, else the tokenizer's."""
    ids = generation.eos_token_id if generation is not None else None
    if ids is None:
        ids = getattr(hf_config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, (list, tuple)) else {ids}


# The generation_config.json fields that become default sampling parameters (vLLM's --generation-config
# auto), besides max_new_tokens (max_tokens).
SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(generation: GenerationConfig | None) -> dict:
    """What the model's creator recommends: the sampling fields a generation_config.json sets (none
    without one)."""
    given = generation.to_diff_dict() if generation is not None else {}  # only what the file sets
    defaults = {name: given[name] for name in SAMPLING_DEFAULTS if given.get(name) is not None}
    if given.get("max_new_tokens") is not None:  # a chat request that sends no max_tokens stops here
        defaults["max_tokens"] = given["max_new_tokens"]
    return defaults


class _Attempt:
    """What running a scheduled request consumes before the step commits, saved so that a failed
    attempt can be undone: the draft model's progress and the drafts (they are proposed again), and
    a seeded request's generator (so the retry draws the numbers the first attempt drew)."""

    def __init__(self, item: ScheduledRequest):
        self.item = item
        self.draft_num_computed = item.request.draft_num_computed
        generator = item.request.generator
        self.generator_state = generator.get_state() if generator is not None else None

    def undo(self) -> None:
        req = self.item.request
        req.draft_num_computed = self.draft_num_computed
        if self.generator_state is not None:
            req.generator.set_state(self.generator_state)
        self.item.spec_token_ids, self.item.draft_probs = [], None


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        torch.manual_seed(config.seed)
        self.hf_config = load_config(config.model)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        model_generation = generation_config(config.model)
        self.eos_token_ids = eos_token_ids(model_generation, self.tokenizer, self.hf_config)
        self.default_sampling = {} if config.generation_config == "vllm" else sampling_defaults(
            model_generation if config.generation_config == "auto" else generation_config(config.generation_config))
        if self.default_sampling:
            SamplingParams(**self.default_sampling)  # a bad file is a startup error, not every request's
            logger.info("default sampling parameters from generation_config.json: %s (requests override them; "
                        "--generation-config vllm ignores the file)", self.default_sampling)
        self.vocab_size = self.hf_config.vocab_size
        backend = get_backend(config.attention_backend, config.torch_device)
        self.model = load_model(config.model, backend, config.torch_dtype, config.torch_device, config.load_format,
                                config.seed, self.hf_config, config.quantization, config.max_num_batched_tokens)
        # Before the memory profile, so that the GPU's plan counts the adapter slots.
        self.lora = LoRAManager(self.model, config.max_loras, config.max_lora_rank, config.max_cpu_loras,
                                config.torch_dtype) if config.enable_lora else None
        spec = config.speculative
        draft = spec is not None and spec.method == "draft"
        self.draft_config = load_draft_config(spec.draft_model, self.hf_config, self.tokenizer) if draft else None
        self.draft_model = load_model(spec.draft_model, backend, config.torch_dtype, config.torch_device,
                                      config.load_format, config.seed, self.draft_config, config.quantization,
                                      config.max_num_batched_tokens) if draft else None
        dtype_bytes = torch.finfo(config.torch_dtype).bits // 8
        block_bytes = sum(kv_block_bytes(c, config.block_size, dtype_bytes) for c in (self.hf_config, self.draft_config) if c)
        if config.kv_cache_bytes is None:
            num_blocks = gpu_memory.plan_num_blocks(self._profile_memory(backend), config.gpu_memory_utilization,
                                                    block_bytes)
        else:
            num_blocks = config.kv_cache_bytes // block_bytes
        capacity = num_blocks * config.block_size
        self.max_model_len = config.max_model_len or self.hf_config.max_position_embeddings
        if self.max_model_len > self.hf_config.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                             f"{self.hf_config.max_position_embeddings}")
        if capacity < self.max_model_len:
            if config.max_model_len:
                raise ValueError(f"kv_cache_memory holds {capacity} tokens, fewer than max_model_len "
                                 f"{self.max_model_len}; raise kv_cache_memory or lower max_model_len")
            self.max_model_len = capacity
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, config.max_loras)
        self.runner = ModelRunner(self.model, backend, num_blocks, config.block_size, config.torch_dtype,
                                  config.torch_device, compile_decode=config.compile, lora=self.lora)
        self.sampler = Sampler(config.seed)
        self._structured: StructuredOutputs | None = None
        self._structured_lock = threading.Lock()
        self.speculator = self._build_speculator(backend, num_blocks) if spec else None
        self.requests: dict[str, Request] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.jump_forward_tokens_total = 0
        self.num_steps = 0
        self.step_request_ids: list[str] = []  # the step in progress (or the last): what a watchdog reports
        if config.compile:
            self._warm_up_decode()
        if backend.supports_cuda_graphs and not config.enforce_eager:
            for runner in self.runners:
                runner.capture_decode_graphs(config.max_num_seqs, self.max_model_len)
        if self.lora is not None:
            logger.info("LoRA: %d slots of rank %d (%.1f MiB), %d adapters kept on the host", config.max_loras,
                        config.max_lora_rank, self.lora.nbytes / 2**20, config.max_cpu_loras)
        logger.info("KV cache: %d blocks of %d tokens = %d tokens at once (%.1f sequences of max_model_len %d); "
                    "dtype %s; device %s", num_blocks, config.block_size, capacity, capacity / self.max_model_len,
                    self.max_model_len, config.torch_dtype, config.torch_device)

    def _profile_memory(self, backend) -> gpu_memory.MemoryProfile:
        """Run the largest step the scheduler can produce on each loaded model, with a KV cache just
        large enough for it, and measure the GPU's memory (engine.gpu_memory): max_num_batched_tokens
        tokens over up to max_num_seqs sequences, all asking for prompt logprobs (logits and their
        log-softmax for every row), then the sampler's softmax and sort over the most rows a step
        samples (1 + k per sequence with k speculative drafts)."""
        config = self.config
        tokens = config.max_num_batched_tokens
        per_seq = min(-(-tokens // min(config.max_num_seqs, tokens)),
                      config.max_model_len or self.hf_config.max_position_embeddings)
        lengths = [min(per_seq, tokens - start) for start in range(0, tokens, per_seq)]
        blocks_per_seq = -(-per_seq // config.block_size)
        reqs = []
        for i, n in enumerate(lengths):
            reqs.append(Request(f"profile-{i}", [0] * n, SamplingParams(prompt_logprobs=1), set()))
            reqs[-1].block_table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
        sched = SchedulerOutput([ScheduledRequest(req, len(req.token_ids)) for req in reqs])
        runners = [ModelRunner(model, backend, len(reqs) * blocks_per_seq, config.block_size, config.torch_dtype,
                               config.torch_device) for model in (self.model, self.draft_model) if model is not None]
        k = config.speculative.num_speculative_tokens if config.speculative else 0
        sampled_rows = min(tokens, config.max_num_seqs * (1 + k))

        def largest_step() -> None:
            for runner in runners:
                out = runner.execute(sched)
                prompt_logprobs = [torch.log_softmax(logits, dim=-1) for _, logits in out.prompt_logits.values()]
                del out, prompt_logprobs
            logits = torch.zeros(sampled_rows, self.vocab_size, device=config.torch_device)
            torch.sort(torch.softmax(logits, dim=-1), dim=-1)  # the sampler's top-p pass

        return gpu_memory.profile(largest_step, config.torch_device)

    def _build_speculator(self, backend, num_blocks: int) -> Speculator:
        spec, config = self.config.speculative, self.config
        if spec.method == "ngram":
            proposer = NgramProposer(spec.ngram_min, spec.ngram_max)
        else:
            if self.draft_config.max_position_embeddings < self.max_model_len:
                raise ValueError(f"draft model: max_position_embeddings {self.draft_config.max_position_embeddings} is "
                                 f"below max_model_len {self.max_model_len}")
            runner = ModelRunner(self.draft_model, backend, num_blocks, config.block_size, config.torch_dtype,
                                 config.torch_device, compile_decode=config.compile)
            proposer = DraftModelProposer(runner, self.sampler, lambda: self.structured)
        logger.info("speculative decoding: %s, up to %d tokens per step%s", spec.method, spec.num_speculative_tokens,
                    " (adaptive)" if spec.adaptive else "")
        return Speculator(spec, proposer, self.sampler, lambda: self.structured)

    def _warm_up_decode(self) -> None:
        """Compile the decode graphs (batch 1, which torch specialises, and batch > 1) of the model and
        of a draft model before serving. The context spans two blocks so that no block-count dimension
        is specialised to 1 either."""
        logger.info("compiling the decode step (torch.compile); this takes a minute or two on CPU")
        context = self.config.block_size + 1
        for batch in (1, 2):
            reqs = [Request(f"warm-up-{i}", [0] * context, SamplingParams(), set()) for i in range(batch)]
            for req in reqs:
                self.kv.allocate(req.block_table, context)
                req.num_computed_tokens = context - 1
            for runner in self.runners:
                runner.execute(SchedulerOutput([ScheduledRequest(req, 1) for req in reqs]))
            for req in reqs:
                self.kv.free_blocks(req.block_table)

    @property
    def runners(self) -> list[ModelRunner]:
        """The target's runner, and the draft model's when speculative decoding uses one."""
        proposer = self.speculator.proposer if self.speculator else None
        return [self.runner] + ([proposer.runner] if isinstance(proposer, DraftModelProposer) else [])

    @property
    def structured(self) -> StructuredOutputs:
        """Built on first use: xgrammar's tokenizer info takes a moment for a large vocabulary. The
        server's worker threads (grammar compiles, logprob bytes) may ask at the same time as the step."""
        with self._structured_lock:
            if self._structured is None:
                self._structured = StructuredOutputs(
                    self.tokenizer, self.vocab_size, self.eos_token_ids, self.config.structured_output_workers,
                    CompileLimits(timeout_s=self.config.structured_output_compile_timeout))
        return self._structured

    # --- requests -------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming the parameter for anything this engine cannot serve."""
        if not prompt_token_ids:
            raise InvalidRequestError("prompt", "prompt must not be empty")
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError("prompt_token_ids", f"prompt_token_ids contains ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError("prompt", f"prompt is {len(prompt_token_ids)} tokens, the context (max_model_len) is "
                             f"{self.max_model_len}; shorten the prompt")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError("max_tokens", f"max_tokens: prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) "
                             f"exceeds the context (max_model_len) of {self.max_model_len} tokens")
        bad_bias = [t for t in params.logit_bias if not 0 <= t < self.vocab_size]
        if bad_bias:
            raise InvalidRequestError("logit_bias", f"logit_bias has token ids outside the vocabulary: {bad_bias[:5]}")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival: float | None = None, lora_request: LoRARequest | None = None) -> None:
        """``lora_request``: the adapter the request runs with (None: the base model)."""
        if request_id in self.requests:
            raise InvalidRequestError("request_id", f"request_id {request_id!r} is already in use")
        self.validate(prompt_token_ids, params)
        adapter = self.lora_adapter(lora_request) if lora_request is not None else None
        req = Request(request_id, prompt_token_ids, params, self.eos_token_ids, arrival)
        req.lora = adapter
        if params.structured_output is not None:
            req.matcher = self.structured.matcher(params.structured_output)
        self.requests[request_id] = req
        self.detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
        self.scheduler.add(req)
        self.prompt_tokens_total += len(prompt_token_ids)

    def lora_adapter(self, lora_request: LoRARequest) -> LoRAAdapter:
        """The adapter, loaded (read from its folder unless the host pool has it); InvalidRequestError
        naming what is wrong with it."""
        if self.lora is None:
            raise InvalidRequestError("model", f"LoRA adapter {lora_request.lora_name!r} requested but LoRA is not "
                                               "enabled (start with --enable-lora, or LLM(..., enable_lora=True))")
        return self.lora.get(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        """Drop an adapter from the host pool; its requests in flight finish with it."""
        return self.lora is not None and self.lora.remove(lora_int_id)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks now; unknown ids are ignored."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        return self._finish(req, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        lookahead = self.speculator.lookahead(len(self.scheduler.running)) if self.speculator else None
        sched = self.scheduler.schedule(lookahead)
        if not sched.scheduled:
            return []
        started = time.perf_counter()
        now = time.monotonic()
        for item in sched.scheduled:
            if item.request.times.first_scheduled is None:
                item.request.times.first_scheduled = now
        self.num_steps += 1
        self.step_request_ids = [item.request.request_id for item in sched.scheduled]
        outputs = self._run_isolated(sched.scheduled)
        if self.speculator and all(item.num_new_tokens == 1 for item in sched.scheduled):
            self.speculator.observe_step(sched.scheduled, time.perf_counter() - started)
        return outputs

    def _run_isolated(self, items: list[ScheduledRequest]) -> list[RequestOutput]:
        """``_run(items)``; if it raises, nothing was committed: undo what the attempt consumed and run
        each half again, so a failure one request's parameters cause ends that request alone and its
        batch-mates go on with the tokens they would have had (a failure of every request, a broken
        device say, still ends all of them, after about 2n attempts)."""
        attempts = [_Attempt(item) for item in items]
        try:
            return self._run(items)
        except Exception as exc:
            failure = exc
        for attempt in attempts:
            attempt.undo()
        if len(items) == 1:
            logger.error("request %s failed in an engine step", items[0].request.request_id, exc_info=failure)
            return [self._finish(items[0].request, "error", error=f"engine step failed: {failure}")]
        logger.warning("an engine step of %d requests failed (%s: %s); retrying them in halves to find the request "
                       "that causes it", len(items), type(failure).__name__, failure)
        half = len(items) // 2
        return self._run_isolated(items[:half]) + self._run_isolated(items[half:])

    def _run(self, items: list[ScheduledRequest]) -> list[RequestOutput]:
        """Draft, forward and sample ``items``, then commit: what can fail for the whole batch comes
        before ``scheduler.update``, so a failed attempt can be run again; after it, failures are per
        request."""
        sched = SchedulerOutput(items)
        if self.speculator:
            self.speculator.propose(sched)
        result = self.runner.execute(sched)
        for item in items:
            if item.request.request_id in result.prompt_logits:
                self._record_prompt_logprobs(item.request, *result.prompt_logits[item.request.request_id])
        sampling = [item for item in items if item.samples]
        new_tokens = self._sample(result.logits, sampling) if sampling else []
        self.scheduler.update(sched)
        if any(item.spec_token_ids for item in sampling):
            self.speculator.record(sampling, [len(tokens) - 1 for tokens, _ in new_tokens])
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        for item, (tokens, logprobs) in zip(sampling, new_tokens):
            try:
                outputs.append(self._append_tokens(item.request, tokens, logprobs, now))
            except Exception as exc:  # one request's failure stays that request's
                logger.exception("request %s failed", item.request.request_id)
                outputs.append(self._finish(item.request, "error", error=str(exc)))
            if item.num_lookahead and not item.request.finished:
                self._settle_speculation(item, len(tokens) - 1)
        return outputs

    def _sample(self, logits: torch.Tensor, items: list[ScheduledRequest]) -> list[tuple[list[int], list]]:
        """Per sampling request, the tokens this step adds and their logprobs: one sampled token, or
        (speculative decoding) the accepted drafts and the target's own token."""
        if any(item.spec_token_ids for item in items):
            return [(v.token_ids, v.logprobs) for v in self.speculator.verify(logits, items)]
        reqs = [item.request for item in items]
        bitmask = self.structured.bitmask(reqs) if any(r.matcher is not None for r in reqs) else None
        sampled = self.sampler(logits, reqs, bitmask)
        return [([token], [logprob]) for token, logprob in zip(sampled.token_ids, sampled.logprobs)]

    def _settle_speculation(self, item: ScheduledRequest, num_accepted: int) -> None:
        """The accepted drafts' KV is valid (the rejected ones' slots get overwritten later); the
        draft model keeps only what matches the request; unused lookahead blocks go back."""
        req = item.request
        req.num_computed_tokens += num_accepted
        req.draft_num_computed = min(req.draft_num_computed, req.num_computed_tokens)
        self.kv.free_tail(req.block_table, req.num_tokens)

    @staticmethod
    def _record_prompt_logprobs(req: Request, first: int, logits: torch.Tensor) -> None:
        """Logits at positions first.. score prompt tokens first+1..; recomputes after preemption overwrite."""
        targets = torch.tensor(req.token_ids[first + 1:first + 1 + len(logits)], device=logits.device)
        rows = token_logprobs(logits.log_softmax(dim=-1), targets, [req.params.prompt_logprobs] * len(logits))
        req.prompt_logprobs[first + 1:first + 1 + len(rows)] = rows

    def _append_tokens(self, req: Request, tokens: list[int], logprobs: list, now: float) -> RequestOutput:
        """Append this step's tokens up to the first that ends the request, then any tokens the grammar
        forces next (jump-forward: they are computed with the next step's forward instead of one step each)."""
        if req.times.first_token is None:
            req.times.first_token = now
        req.times.last_token = now
        new_tokens: list[int] = []
        reason = stop_reason = None
        for token, logprob in zip(tokens, logprobs):
            if logprob is not None:
                req.cumulative_logprob += logprob.logprob
            new_tokens.append(token)
            reason, stop_reason = self._accept(req, token)
            if reason is not None:
                break
        kept_logprobs = logprobs[:len(new_tokens)] if logprobs[0] is not None else None
        if reason is None and req.matcher is not None and self.config.enable_jump_forward and req.params.logprobs is None:
            forced_from = len(new_tokens)
            budget = min(req.params.max_tokens - req.num_output_tokens, self.max_model_len - req.num_tokens)
            for forced in self.structured.jump_forward_tokens(req.matcher, req.output_token_ids, budget):
                if not req.matcher.accept_token(forced):
                    break
                new_tokens.append(forced)
                reason, stop_reason = self._accept(req, forced, grammar_accepted=True)
                if reason is not None:
                    break
            self.jump_forward_tokens_total += len(new_tokens) - forced_from
        if reason is not None:
            return self._finish(req, reason, stop_reason, new_tokens, kept_logprobs)
        return self._output(req, new_tokens, self.detokenizers[req.request_id].take(False), kept_logprobs)

    def _accept(self, req: Request, token: int, grammar_accepted: bool = False) -> tuple[str | None, str | int | None]:
        """Add one output token; returns (finish reason, stop reason) if it ends the request."""
        req.token_ids.append(token)
        self.generation_tokens_total += 1
        if req.matcher is not None and not grammar_accepted and not req.matcher.accept_token(token):
            raise RuntimeError(f"the grammar rejected token {token}")
        if token in req.stop_token_ids or (req.matcher is not None and req.matcher.is_terminated()):
            return "stop", token
        detok = self.detokenizers[req.request_id]
        detok.add_token(token)
        if detok.stop_string is not None:
            return "stop", detok.stop_string
        if req.matcher is not None and self.structured.only_stop_allowed(req.matcher):
            return "stop", None  # the structure is complete: no need to spend a step sampling EOS
        if req.num_output_tokens >= req.params.max_tokens or req.num_tokens >= self.max_model_len:
            return "length", None
        return None, None

    def _finish(self, req: Request, reason: str, stop_reason=None, new_tokens: list[int] | None = None,
                new_logprobs=None, error: str | None = None) -> RequestOutput:
        self.scheduler.finish(req)
        req.finish_reason = reason
        req.times.finished = time.monotonic()
        detok = self.detokenizers.pop(req.request_id)
        del self.requests[req.request_id]
        out = self._output(req, new_tokens or [], detok.take(True), new_logprobs)
        out.finished, out.finish_reason, out.stop_reason, out.error = True, reason, stop_reason, error
        return out

    @staticmethod
    def _output(req: Request, tokens: list[int], text: str, logprobs) -> RequestOutput:
        first = req.num_output_tokens <= len(tokens)
        return RequestOutput(request_id=req.request_id, new_token_ids=tokens, new_text=text, finished=False,
                             new_logprobs=logprobs, prompt_logprobs=req.prompt_logprobs if first else None,
                             num_prompt_tokens=req.num_prompt_tokens,
                             num_cached_tokens=req.num_cached_tokens, num_output_tokens=req.num_output_tokens,
                             cumulative_logprob=req.cumulative_logprob, times=req.times)

    def stats(self) -> EngineStats:
        running, waiting = (sorted({req.lora.request.lora_name for req in queue if req.lora is not None})
                            for queue in (list(self.scheduler.running), list(self.scheduler.waiting)))
        return EngineStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                           num_free_blocks=self.kv.num_free_blocks, num_blocks=self.kv.num_blocks,
                           kv_cache_usage=self.kv.usage, prefix_cache_queries=self.kv.prefix_queries,
                           prefix_cache_hits=self.kv.prefix_hits, num_preemptions=self.scheduler.num_preemptions,
                           prompt_tokens=self.prompt_tokens_total, generation_tokens=self.generation_tokens_total,
                           jump_forward_tokens=self.jump_forward_tokens_total,
                           spec=copy.deepcopy(self.speculator.stats) if self.speculator else SpecStats(),
                           max_loras=self.config.max_loras if self.lora else 0,
                           running_loras=running, waiting_loras=[name for name in waiting if name not in running])
