"""The GPU check's first stage (benchmarks/gpu_check.sh): every module the GPU path imports, imported
under the machine's own packages plus the carried wheels, and one grammar-constrained generation on
the CPU, so a missing wheel or a native library that will not load costs seconds, not the run.
Prints the versions as one JSON line."""

from __future__ import annotations

import importlib
import json
import sys
from importlib import metadata
from pathlib import Path

import torch
import triton
import transformers

BENCHMARKS = Path(__file__).resolve().parent
MODULES = ["engine", "engine.llm_engine", "engine.structured", "engine.models.loader", "engine.cuda_graphs",
           "engine.gpu_memory", "engine.attention.triton_kernels", "xgrammar", "gguf",
           "attention_kernels", "gpu_decode"]


def main() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    for name in MODULES:
        importlib.import_module(name)
    from bench_model import SHARED_MODELS
    from engine import LLM, SamplingParams
    from engine.structured import StructuredOutputParams

    llm = LLM(str(SHARED_MODELS / "stories260K"), dtype="float32", device="cpu", kv_cache_memory="8MiB")
    params = SamplingParams(max_tokens=8, temperature=0, structured_output=StructuredOutputParams(choice=["yes", "no"]))
    text = llm.generate(prompt_token_ids=[[1]], sampling_params=params)[0].text
    assert text in ("yes", "no"), text
    print(json.dumps({"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                      "triton": triton.__version__, "transformers": transformers.__version__,
                      **{name: metadata.version(name) for name in ("xgrammar", "pydantic", "gguf")},
                      "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"}))


if __name__ == "__main__":
    main()
