#!/usr/bin/env bash
# One prepared check for a lent GPU machine, planned as one device call of at most 8 minutes. Stages,
# in order, each under its own timeout (worst case 460 s in all):
#   imports  (60 s)  every module of the GPU path imported (after the carried wheels' install); one
#                    grammar-constrained generation on the CPU (xgrammar's native code loads)
#   tests   (200 s)  the `-m gpu` tests: Triton kernels compiled for CUDA vs naive / reference / SDPA,
#                    KV write, stories260K end to end, CUDA graphs vs eager (and with LoRA adapters
#                    against peft), KV cache sized by --gpu-memory-utilization
#   kernels  (40 s)  benchmarks/attention_kernels.py: prefill vs SDPA flash, decode vs gather + SDPA
#   decode  (160 s)  benchmarks/gpu_decode.py: a Llama-3.2-1B-shaped model, W1/W2 eager vs CUDA graphs,
#                    the bandwidth roofline, a 135M-shaped draft
# $OUT/gpu_check.json is rewritten after every stage (and the benchmarks write their JSON as they go),
# so a call cut short still brings back what finished. GPU_CHECK_STAGES="decode" (say) reruns a subset.
#
# It needs only the image's python3: what the image lacks comes from benchmarks/.gpu_carry (filled
# here by benchmarks/gpu_wheels.sh, named in the call's carry), installed with --no-index into $SITE.
#
#   OUT=/tmp/gpu-out bash benchmarks/gpu_check.sh    # on the device machine, OUT is set already
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/kvserve-gpu-check}"
SITE="${KVSERVE_GPU_SITE:-/tmp/kvserve-gpu-site}"
CARRY=benchmarks/.gpu_carry
STAGES=" ${GPU_CHECK_STAGES:-imports tests kernels decode} "
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the kernels must compile for the GPU, not run in the interpreter
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d "$CARRY/shared/models" ]; then
    export KVSERVE_SHARED="${KVSERVE_SHARED:-$PWD/$CARRY/shared}"
fi

summarize() {
    OUT="$OUT" python3 - <<'EOF'
"""gpu_check.json from whatever the stages left so far: exit status and seconds of each, the tests'
outcomes (from the junit report, or from the verbose log when pytest was cut short), the benchmarks' JSON."""
import json, os, pathlib, re, xml.etree.ElementTree as ET
out = pathlib.Path(os.environ["OUT"])
report = {"stages": {}}
for stage in ("imports", "tests", "kernels", "decode"):
    if (out / f"{stage}.status").exists():
        rc, seconds = map(int, (out / f"{stage}.status").read_text().split())
        report["stages"][stage] = {"rc": rc, "seconds": seconds, "timed_out": rc in (124, 137)}
if (out / "imports.log").exists():  # the versions as one JSON line, or the error's last lines
    lines = (out / "imports.log").read_text().strip().splitlines() or [""]
    try:
        report["imports"] = json.loads(lines[-1])
    except ValueError:
        report["imports"] = lines[-12:]
try:
    suite = ET.parse(out / "gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    report["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    report["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
except (OSError, ET.ParseError):
    if (out / "tests.log").exists():
        log = (out / "tests.log").read_text()
        outcomes = re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)", log, re.M)
        report["tests"] = {"finished": len(outcomes), **{o.lower(): sum(1 for _, x in outcomes if x == o)
                                                          for o in ("PASSED", "FAILED", "ERROR", "SKIPPED")}}
        report["failed"] = [t for t, o in outcomes if o in ("FAILED", "ERROR")]
        if re.fullmatch(r"\S+::\S+", log.strip().splitlines()[-1] if log.strip() else ""):
            report["cut_during"] = log.strip().splitlines()[-1]  # the test that was running when time ran out
for name in ("attention_kernels", "gpu_decode"):
    try:
        report[name] = json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        pass
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
EOF
}

stage() {  # NAME SECONDS COMMAND...: output in $OUT/NAME.log, "exit-status seconds" in $OUT/NAME.status
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    [[ "$STAGES" == *" $name "* ]] || return 0
    echo "== $name (at most $limit s)"
    timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$? $((SECONDS - start))" > "$OUT/$name.status"
    tail -n 3 "$OUT/$name.log"
    summarize
}

# A rerun reports only itself.
rm -f "$OUT"/{imports,tests,kernels,decode}.{status,log} "$OUT"/{gpu_tests.xml,attention_kernels.json,gpu_decode.json}
nvidia-smi > "$OUT/nvidia-smi.log" 2>&1
if ls "$CARRY"/wheels/*.whl > /dev/null 2>&1; then  # every run, reruns of a subset too: a fresh machine has none
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$CARRY"/wheels/*.whl > "$OUT/install.log" 2>&1 || cat "$OUT/install.log"
fi
stage imports 60 python3 benchmarks/gpu_imports.py
stage tests 200 python3 -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu.py --junitxml="$OUT/gpu_tests.xml"
stage kernels 40 python3 benchmarks/attention_kernels.py --out "$OUT/attention_kernels.json"
stage decode 160 python3 benchmarks/gpu_decode.py --out "$OUT/gpu_decode.json"

# Success: every stage that ran exited 0, and the tests (if they ran) were not all skipped (no GPU seen).
OUT="$OUT" python3 - <<'EOF'
import json, os, pathlib
report = json.loads((pathlib.Path(os.environ["OUT"]) / "gpu_check.json").read_text())
shown = ("stages", "imports", "tests", "failed", "cut_during")
print(json.dumps({k: report[k] for k in shown if k in report}, indent=2))
tests = report.get("tests") or {}
ran = tests.get("tests", tests.get("finished", 0)) - tests.get("skipped", 0)
stages = report["stages"]
ok = stages and all(s["rc"] == 0 for s in stages.values()) and ("tests" not in stages or ran > 0)
raise SystemExit(0 if ok else 1)
EOF
