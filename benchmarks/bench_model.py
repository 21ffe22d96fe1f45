"""The bench-135m model folder: SmolLM2-135M's config with the GPT-2 tokenizer (DESIGN.md, Benchmarks).

    python benchmarks/bench_model.py OUT_DIR [--weights]

Without --weights the folder holds config and tokenizer only (serve it with --load-format dummy);
with --weights it also gets seeded random safetensors, so kvserve and Hugging Face can run the very
same weights side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

SHARED_MODELS = Path(os.environ.get("KVSERVE_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "models"


def make_bench_model(out_dir: str | Path, weights: bool = False, seed: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((SHARED_MODELS / "smollm2-135m-config" / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(SHARED_MODELS / "gpt2-tokenizer" / name, out / name)
    if weights and not (out / "model.safetensors").exists():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.bfloat16)
        model.save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--weights", action="store_true", help="also write seeded random weights")
    args = parser.parse_args()
    print(make_bench_model(args.out_dir, args.weights))
