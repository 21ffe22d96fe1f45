"""The engine on a GPU: a Llama-3.2-1B-shaped model with dummy bf16 weights, W1 and W2 eager vs
CUDA graphs, single-stream decode against the bandwidth roofline; then speculative decoding with a
SmolLM2-135M-shaped draft. Needs CUDA; installs and downloads nothing. Writes one JSON object.

    python benchmarks/gpu_decode.py --out report.json

Roofline: a decode step at batch 1 reads every weight once, so it cannot beat (weight bytes) /
(HBM bandwidth); the bandwidth is measured here with a device-to-device copy. The time per output
token (TPOT) follows from W1's numbers: each request is one prefill plus 127 decode steps.

Random weights make a random draft useless (acceptance ~0), so the speculative rows measure what
drafting costs on this GPU: a 135M-shaped draft step against a 1B target step, the verify step of
k + 1 tokens, and from them the acceptance rate at which k drafts per step break even. The adaptive
policy should notice that this draft never pays and turn it off.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
from pathlib import Path

import torch
from triton.testing import do_bench

from bench_model import SHARED_MODELS
from offline import WORKLOADS, prompts, run_kvserve
from speculative import compare

from engine import SamplingParams

LLAMA_3_2_1B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=8192,
    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
    tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001, initializer_range=0.02)
DTYPE = "bfloat16"
ENGINE = dict(device="cuda", load_format="dummy", kv_cache_memory="16GiB", max_model_len=4096, max_num_seqs=16)


def model_folder(root: Path, name: str, config: dict) -> Path:
    """A config plus a tokenizer whose vocabulary covers every id (Qwen2.5's 151k >= 128256)."""
    out = root / name
    shutil.copytree(SHARED_MODELS / "qwen2.5-tokenizer", out)
    (out / "config.json").write_text(json.dumps(config))
    return out


def hbm_bandwidth() -> float:
    """Bytes/s of a 4 GiB device-to-device copy (read plus write)."""
    src = torch.empty(2**31, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    seconds = do_bench(lambda: dst.copy_(src)) / 1000
    del src, dst
    return 2 * 2**32 / seconds


def weight_bytes(config: dict) -> int:
    h, i, layers, vocab = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i + 2 * h
    return 2 * (layers * per_layer + vocab * h + h)  # bf16; tied embeddings: the head is the table


def w1_w2(model: Path, workloads: tuple[str, ...] = ("w1", "w2"), **engine_args) -> dict:
    rows = {}
    for name in workloads:
        work = WORKLOADS[name]
        all_prompts = prompts(work["num_requests"], work["input_len"], LLAMA_3_2_1B["vocab_size"])
        batches = [[p] for p in all_prompts] if work["concurrency"] == 1 else [all_prompts]
        rows[name] = run_kvserve(model, DTYPE, work, batches, **{**ENGINE, **engine_args})
        gc.collect()
        torch.cuda.empty_cache()
    w1 = rows["w1"]
    w1["tpot_ms"] = (1000 * WORKLOADS["w1"]["output_len"] / w1["kvserve_out_tok_s"] - w1["kvserve_prefill_ms_p50"]) / (
        WORKLOADS["w1"]["output_len"] - 1)
    return rows


def speculative(target: Path, draft: Path, k: int) -> dict:
    """Plain, always k drafts and adaptive, on four W1 requests one at a time; from the adaptive
    policy's own measurements (plain step, draft forward, verify step at batch size 1) the cost of
    a speculative step in plain steps and the acceptance rate at which it breaks even."""
    configs = {f"135M-shaped draft, {'adaptive' if adaptive else 'always k'}": dict(
        method="draft", draft_model=str(draft), num_speculative_tokens=k, adaptive=adaptive) for adaptive in (False, True)}
    work = WORKLOADS["w1"]
    rows = compare(str(target), {**ENGINE, "dtype": DTYPE, "max_num_seqs": 1}, configs, prompts(4, work["input_len"], LLAMA_3_2_1B["vocab_size"], seed=2),
                   SamplingParams(max_tokens=work["output_len"], temperature=0, ignore_eos=True), 1, {"concurrency": 1})
    costs = rows[-1]["measured_ms"].get("batch<2", {})
    if not (costs.get("plain") and costs.get("draft_forward") and k in costs.get("verify", {})):
        return {"rows": rows, "k": k}
    cost = (k * costs["draft_forward"] + costs["verify"][k]) / costs["plain"]  # a speculative step, in plain steps
    # Break-even: the expected tokens per step, 1 + a + ... + a^k at acceptance a, equal that cost.
    break_even = next((a / 100 for a in range(101) if sum((a / 100) ** j for j in range(k + 1)) >= cost), None)
    return {"rows": rows, "k": k, "step_cost_in_plain_steps": cost, "break_even_acceptance": break_even}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/gpu_decode.json")
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--skip-speculative", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kvserve-gpu-"))
    target = model_folder(root, "llama-3.2-1b-shaped", LLAMA_3_2_1B)
    smollm = json.loads((SHARED_MODELS / "smollm2-135m-config" / "config.json").read_text())
    draft = model_folder(root, "smollm2-135m-shaped", {**smollm, "vocab_size": LLAMA_3_2_1B["vocab_size"],
                                                         "max_position_embeddings": LLAMA_3_2_1B["max_position_embeddings"]})
    bandwidth = hbm_bandwidth()
    roofline_tok_s = bandwidth / weight_bytes(LLAMA_3_2_1B)
    report = {"device": torch.cuda.get_device_name(), "hbm_bytes_per_s": bandwidth,
              "weight_bytes": weight_bytes(LLAMA_3_2_1B), "roofline_tok_s": roofline_tok_s, "dtype": DTYPE, "engine": ENGINE}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for mode, eager in (("eager", True), ("cuda_graphs", False)):
        report[mode] = w1_w2(target, enforce_eager=eager)
        report[mode]["w1"]["roofline_fraction"] = 1000 / report[mode]["w1"]["tpot_ms"] / roofline_tok_s
        print(mode, json.dumps(report[mode]), flush=True)
        out.write_text(json.dumps(report, indent=2))  # after every section: a run cut short keeps what finished
    for name in WORKLOADS:
        report[f"{name}_graphs_speedup"] = (report["cuda_graphs"][name]["kvserve_out_tok_s"]
                                            / report["eager"][name]["kvserve_out_tok_s"])
    out.write_text(json.dumps(report, indent=2))
    if not args.skip_speculative:
        report["speculative"] = speculative(target, draft, args.k)
        out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "speculative"}, indent=2))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
