"""LoRA serving cost: W2's shape (64 requests of 256 prompt + 128 output tokens, 16 at a time) spread
evenly over 1, 4 and 16 distinct rank-16 adapters on all seven projections, beside the base model
alone, in one run on bench-135m (dummy weights); and what a cold adapter costs (reading and checking
its folder, then its first request over the base model's).

    python benchmarks/lora.py [--adapters 1 4 16] [--dtype auto] [--num-requests 64] [--rounds 3] [--out FILE]

Every request is forced to its full output length (ignore_eos); output tokens/s include prefill. The
base model runs in an engine without LoRA; each round runs every config once, and the report gives
per config the median tok/s and the median of its per-round ratio to the base.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bench_model import make_bench_model  # noqa: E402
from offline import WORKLOADS, prompts  # noqa: E402

PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def make_adapter(model_dir: Path, out: Path, rank: int, seed: int) -> Path:
    """A random rank-``rank`` adapter on every projection of every layer, as peft's save_pretrained writes it."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, inner, head_dim = config["hidden_size"], config["intermediate_size"], config["hidden_size"] // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}  # (in, out)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for block, names in PROJECTIONS.items():
            for name in names:
                fan_in, fan_out = shapes[name]
                key = f"base_model.model.model.layers.{layer}.{block}.{name}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) / rank
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": [n for v in PROJECTIONS.values() for n in v],
        "bias": "none", "use_rslora": False, "use_dora": False}))
    return out


def throughput(llm, batch: list[list[int]], loras: list | None, output_len: int) -> float:
    from engine import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=batch, sampling_params=params, lora_request=loras)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)


def cold_load(llm, adapters: list, unseen: list[list[int]]) -> dict:
    """Per fresh adapter: reading and checking its folder, and its first one-token request's time over
    the base model's, each on an unseen prompt (no prefix-cache hit for either)."""
    from engine import SamplingParams

    one = SamplingParams(max_tokens=1, ignore_eos=True)
    fresh = iter(unseen)

    def request_s(lora) -> float:
        start = time.perf_counter()
        llm.generate(prompt_token_ids=[next(fresh)], sampling_params=one, lora_request=lora)
        return time.perf_counter() - start

    read_ms, extra_ms = [], []
    for lora in adapters:
        start = time.perf_counter()
        llm.engine.lora_adapter(lora)
        read_ms.append(1000 * (time.perf_counter() - start))
        llm.engine.remove_lora(lora.lora_int_id)  # so the request below reads it again, cold
        extra_ms.append(1000 * (request_s(lora) - request_s(None)))
    return {"read_and_check_ms_p50": statistics.median(read_ms), "first_request_extra_ms_p50": statistics.median(extra_ms)}


def main() -> None:
    from engine import LLM, LoRARequest

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="auto", help="auto: float32 on CPU")
    parser.add_argument("--num-requests", type=int, default=WORKLOADS["w2"]["num_requests"])
    parser.add_argument("--rounds", type=int, default=3, help="each config once per round; medians over rounds")
    parser.add_argument("--model-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "kvserve", "bench-135m"))
    parser.add_argument("--out", default="benchmarks/results/lora.json")
    args = parser.parse_args()

    work = WORKLOADS["w2"]
    model_dir = make_bench_model(args.model_dir)
    adapter_root = Path(args.model_dir).parent / f"bench-135m-lora-r{args.rank}"
    most = max(args.adapters)
    loras = [LoRARequest(f"a{i}", i + 1, str(make_adapter(model_dir, adapter_root / f"a{i}", args.rank, seed=i)))
             for i in range(most + 5)]  # the last five stay cold for the load measurement
    engine = dict(dtype=args.dtype, load_format="dummy", kv_cache_memory="2GiB", max_num_seqs=work["concurrency"])
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    seeds = iter(range(1_000_000))

    def batch() -> list[list[int]]:  # unseen prompts for every run: no prefix-cache hit from an earlier one
        return prompts(args.num_requests, work["input_len"], vocab, seed=next(seeds))
    report = {"machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
              "dtype": args.dtype, "rank": args.rank, "workload": {**work, "num_requests": args.num_requests}, "results": {}}

    base = LLM(str(model_dir), **engine)
    llm = LLM(str(model_dir), **engine, enable_lora=True, max_loras=most, max_lora_rank=args.rank)
    report["adapter_slot_bytes"] = llm.engine.lora.nbytes // most
    report["base_weight_bytes"] = sum(p.numel() * p.element_size() for p in llm.engine.model.parameters())
    spreads = {f"{n}_adapters": [loras[i % n] for i in range(args.num_requests)] for n in args.adapters}
    throughput(base, batch()[:2], None, 4)  # warm-up
    for spread in spreads.values():
        throughput(llm, batch()[:len(set(spread))], spread[:len(set(spread))], 4)  # every adapter read and in a slot
    rounds: list[dict[str, float]] = []
    for _ in range(args.rounds):  # interleaved, so a drifting machine moves base and adapters alike
        row = {"base": throughput(base, batch(), None, work["output_len"])}
        row.update({name: throughput(llm, batch(), spread, work["output_len"]) for name, spread in spreads.items()})
        rounds.append(row)
        print(json.dumps({name: round(v, 1) for name, v in row.items()}), flush=True)
    report["rounds"] = rounds
    report["results"] = {name: {"out_tok_s_p50": statistics.median(r[name] for r in rounds),
                                "vs_base_p50": statistics.median(r[name] / r["base"] for r in rounds)} for name in rounds[0]}
    report["cold_load"] = cold_load(llm, loras[most:], batch()[:10])
    print("cold load", report["cold_load"], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
