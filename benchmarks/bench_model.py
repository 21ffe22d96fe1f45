"""The bench-135m model folder: SmolLM2-135M's config with the GPT-2 tokenizer (DESIGN.md, Benchmarks).

    python benchmarks/bench_model.py OUT_DIR [--weights]
    python benchmarks/bench_model.py OUT_DIR --draft-of TARGET_DIR --draft-layers 2 --draft-noise 0.1

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


def make_draft_model(target_dir: str | Path, out_dir: str | Path, num_layers: int | None = None,
                     noise: float = 0.0, seed: int = 0) -> Path:
    """A draft for speculative decoding made from a target folder (safetensors weights): its first
    ``num_layers`` layers with the shared embeddings, norm and head, each tensor then perturbed by
    ``noise`` times its own standard deviation. Real draft/target pairs cannot be downloaded here; this
    gives drafts of controlled cost (layers) and acceptance (noise)."""
    import torch
    from safetensors.torch import load_file, save_file

    target, out = Path(target_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((target / "config.json").read_text())
    num_layers = num_layers or config["num_hidden_layers"]
    config["num_hidden_layers"] = num_layers
    if isinstance(config.get("layer_types"), list):  # per-layer settings follow the layers kept
        config["layer_types"] = config["layer_types"][:num_layers]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for path in target.iterdir():
        if path.suffix in (".txt", ".model") or (path.suffix == ".json" and path.name != "config.json"):
            shutil.copyfile(path, out / path.name)
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, tensor in load_file(target / "model.safetensors").items():
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= num_layers:
            continue
        if noise and tensor.numel() > 1 and not name.endswith("norm.weight"):
            tensor = tensor + noise * tensor.float().std() * torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
        weights[name] = tensor.contiguous()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def damp_layers(model_dir: str | Path, first: int, factor: float) -> Path:
    """Scale the output projections (attention o_proj, MLP down_proj) of layers ``first``.. by ``factor``,
    in place: those layers then barely move the residual stream, so a draft made of the first layers
    agrees with the whole model most of the time. This is how tests and benchmarks get a cheap draft
    with high, controlled acceptance from random weights."""
    from safetensors.torch import load_file, save_file

    path = Path(model_dir) / "model.safetensors"
    weights = load_file(path)
    for name in weights:
        if (name.startswith("model.layers.") and int(name.split(".")[2]) >= first
                and name.endswith(("o_proj.weight", "down_proj.weight"))):
            weights[name] = weights[name] * factor
    save_file(weights, path, metadata={"format": "pt"})
    return Path(model_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--weights", action="store_true", help="also write seeded random weights")
    parser.add_argument("--draft-of", help="make a draft model from this target folder instead")
    parser.add_argument("--draft-layers", type=int, help="layers the draft keeps (default: all)")
    parser.add_argument("--draft-noise", type=float, default=0.0, help="perturbation, in each tensor's std")
    args = parser.parse_args()
    if args.draft_of:
        print(make_draft_model(args.draft_of, args.out_dir, args.draft_layers, args.draft_noise))
    else:
        print(make_bench_model(args.out_dir, args.weights))
