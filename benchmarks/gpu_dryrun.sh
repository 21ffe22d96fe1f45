#!/usr/bin/env bash
# The GPU check's dry run on a CPU machine, so that a missing wheel or an API the GPU image's versions
# lack fails here, not in the device minutes. A clean Python 3.12 venv holds only the image's packages
# at its versions (torch 2.11.0's PyPI build is the image's CUDA 13 one and runs without a GPU) and
# none of the packages benchmarks/.gpu_carry brings. With `python3` being the venv's, it runs
# gpu_check.sh's imports stage (the carried wheels installed with --no-index, every GPU-path module
# imported, one grammar-constrained generation), the Triton kernels' tests under TRITON_INTERPRET=1
# (with an older numpy, see below) and the collection of the `-m gpu` tests (skipped without CUDA).
# Not part of CI: the first run downloads about 3 GB (the venv is kept for later runs); then 1.5 min.
#
#   benchmarks/gpu_wheels.sh && benchmarks/gpu_dryrun.sh    # PY312=... names the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DRYRUN_VENV:-/tmp/kvserve-gpu-dryrun}"
CARRY=benchmarks/.gpu_carry
IMAGE_PACKAGES="torch==2.11.0 triton==3.6.0 transformers==5.17.0 safetensors==0.8.0 tokenizers==0.23.2
numpy==2.5.2 huggingface-hub==1.33.0 sentencepiece==0.2.2 tiktoken==0.14.0 prometheus-client pytest httpx
ninja jinja2 requests pyyaml tqdm"
ABSENT_FROM_IMAGE="fastapi uvicorn openai jsonschema"

python312() {
    local py pyenv_312
    pyenv_312=$(ls -d "$(pyenv root 2> /dev/null)"/versions/3.12*/bin/python3 2> /dev/null | tail -n 1)
    for py in "${PY312:-}" python3.12 "$pyenv_312"; do
        if [ -n "$py" ] && "$py" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2> /dev/null; then
            echo "$py"
            return
        fi
    done
    echo "no Python 3.12 found: set PY312" >&2
    return 1
}

ls "$CARRY"/wheels/*.whl > /dev/null || { echo "no carried wheels: run benchmarks/gpu_wheels.sh first" >&2; exit 1; }
if [ "$(cat "$VENV/.image-packages" 2> /dev/null)" != "$IMAGE_PACKAGES" ]; then
    rm -rf "$VENV"
    "$(python312)" -m venv "$VENV"
    # shellcheck disable=SC2086  # the list is meant to split
    "$VENV/bin/python3" -m pip install -q --no-cache-dir $IMAGE_PACKAGES
    echo "$IMAGE_PACKAGES" > "$VENV/.image-packages"
fi
if [ ! -d "$VENV/interpreter-numpy/numpy" ]; then  # for the interpreter tests alone (see below)
    "$VENV/bin/python3" -m pip install -q --no-cache-dir --target "$VENV/interpreter-numpy" "numpy<2.4"
fi
# What the carry brings must come from it alone (a newer typer pulls pydantic in; the image has neither).
carried=$(for w in "$CARRY"/wheels/*.whl; do basename "$w" | cut -d- -f1; done)
# shellcheck disable=SC2086
"$VENV/bin/python3" -m pip uninstall -q -y $carried $ABSENT_FROM_IMAGE 2>&1 | grep -v "not installed" || true

export PATH="$VENV/bin:$PATH"
OUT="$(mktemp -d)"
export KVSERVE_GPU_SITE="$OUT/site"
echo "python3 is $(command -v python3): $(python3 --version); reports in $OUT"
OUT="$OUT" GPU_CHECK_STAGES=imports bash benchmarks/gpu_check.sh
export PYTHONPATH="$KVSERVE_GPU_SITE:$PWD" KVSERVE_SHARED="$PWD/$CARRY/shared" HF_HUB_OFFLINE=1
# Triton 3.6's interpreter takes int() of one-element arrays, which numpy >= 2.4 refuses (Triton 3.9
# squeezes them first): the image's numpy 2.5 cannot run the interpreter, so these tests get numpy 2.3.
# The GPU run compiles the kernels and never enters the interpreter.
PYTHONPATH="$VENV/interpreter-numpy:$PYTHONPATH" TRITON_INTERPRET=1 \
    python3 -m pytest -q -p no:cacheprovider tests/test_triton_attention.py
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
echo "dry run passed"
