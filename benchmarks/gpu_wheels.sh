#!/usr/bin/env bash
# Fills benchmarks/.gpu_carry (ignored by git), the one folder a GPU check's device call carries:
# the GPU machine reaches no registry and its image lacks what the engine imports at module level,
# and the ../shared beside a checkout does not travel with it. Run here, where PyPI is reachable:
#
#   benchmarks/gpu_wheels.sh    # then benchmarks/gpu_dryrun.sh, then the device call (README, GPU)
#
#   wheels/         CPython 3.12 manylinux x86-64 wheels of what the image lacks: gguf (engine/models/
#                   gguf.py, imported by the loader) and xgrammar (engine/structured.py) with the
#                   packages xgrammar needs that the image lacks (apache-tvm-ffi, pydantic's stack), and
#                   peft (the LoRA test's reference; its own dependencies are the image's).
#                   The image has torch, triton, transformers, numpy, pyyaml, tqdm, requests and
#                   typing-extensions; carrying one of those would shadow the image's build.
#   shared/models/  the tokenizers and stories260K the GPU tests and benchmarks read (KVSERVE_SHARED).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=benchmarks/.gpu_carry
SHARED="${KVSERVE_SHARED:-../shared}"
WHEELS=(xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 pydantic==2.13.4 pydantic-core==2.46.4
        annotated-types==0.7.0 typing-inspection==0.4.2 gguf==0.19.0 peft==0.22.0)
MODELS=(stories260K qwen2.5-tokenizer smollm2-135m-config)

rm -rf "$CARRY"
mkdir -p "$CARRY/wheels" "$CARRY/shared/models"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$CARRY/wheels" "${WHEELS[@]}"
for model in "${MODELS[@]}"; do
    cp -r "$SHARED/models/$model" "$CARRY/shared/models/"
done
ls "$CARRY/wheels"
du -sh "$CARRY"/*
du -sh "$CARRY"  # the device call carries at most 64 MiB, the working tree included
