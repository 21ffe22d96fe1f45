#!/usr/bin/env bash
# One prepared check for a lent GPU machine (within 8 minutes; installs nothing): the `-m gpu` tests
# (Triton kernels compiled for CUDA vs naive / reference / SDPA, KV write, stories260K end to end,
# CUDA graphs vs eager, KV cache sized by --gpu-memory-utilization), the attention-kernel
# micro-benchmark, and the engine on a Llama-3.2-1B-shaped model (W1/W2 eager vs CUDA graphs, the
# bandwidth roofline, a 135M-shaped draft). Everything lands under $OUT, summed up in gpu_check.json.
#
#   OUT=/tmp/gpu-out benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/kvserve-gpu-check}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET  # the kernels must compile for the GPU, not run in the interpreter

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" > "$OUT/versions.txt" 2>&1

start=$(date +%s)
timeout 200 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py --junitxml="$OUT/gpu_tests.xml" \
    > "$OUT/gpu_tests.log" 2>&1
tests_rc=$?
tests_s=$(( $(date +%s) - start ))

start=$(date +%s)
timeout 60 python benchmarks/attention_kernels.py --out "$OUT/attention_kernels.json" > "$OUT/attention_kernels.log" 2>&1
bench_rc=$?
timeout 200 python benchmarks/gpu_decode.py --out "$OUT/gpu_decode.json" > "$OUT/gpu_decode.log" 2>&1
decode_rc=$?
bench_s=$(( $(date +%s) - start ))

OUT="$OUT" TESTS_RC=$tests_rc TESTS_S=$tests_s BENCH_RC=$bench_rc DECODE_RC=$decode_rc BENCH_S=$bench_s python - <<'EOF'
import json, os, pathlib, xml.etree.ElementTree as ET
out = pathlib.Path(os.environ["OUT"])
report = {"tests_rc": int(os.environ["TESTS_RC"]), "tests_seconds": int(os.environ["TESTS_S"]),
          "bench_rc": int(os.environ["BENCH_RC"]), "decode_rc": int(os.environ["DECODE_RC"]),
          "bench_seconds": int(os.environ["BENCH_S"]),
          "versions": (out / "versions.txt").read_text().strip()}
try:
    suite = ET.parse(out / "gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    report["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    report["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
except (OSError, ET.ParseError) as e:
    report["tests"] = f"no junit report: {e}"
for name in ("attention_kernels", "gpu_decode"):
    try:
        report[name] = json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError) as e:
        report[name] = f"no benchmark report: {e}"
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
print(json.dumps({k: v for k, v in report.items() if k not in ("attention_kernels", "gpu_decode")}, indent=2))
counts = report["tests"] if isinstance(report["tests"], dict) else {}
ran = counts.get("tests", 0) - counts.get("skipped", 0)
ok = report["tests_rc"] == 0 and report["bench_rc"] == 0 and report["decode_rc"] == 0 and ran > 0  # all skipped: no GPU was seen
raise SystemExit(0 if ok else 1)
EOF
