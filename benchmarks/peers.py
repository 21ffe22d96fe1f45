"""kvserve beside llama.cpp's llama-server on the same GGUF files, the same machine, one client, one run.

    python benchmarks/peers.py [--formats bf16 q8_0 q4_0 smollm2] [--out benchmarks/results/peers.json]

What it does, caching what it can under --cache (default ~/.cache/kvserve-peers):
1. builds llama-server and llama-quantize from the pinned llama-cpp-python source distribution
   (``pip download --no-binary :all: llama-cpp-python==0.3.36``; its vendored llama.cpp, cmake, ~7-9 min
   on 2 cores, once);
2. makes bench-135m (SmolLM2-135M's shape, seeded random weights) as an HF folder with SmolLM2's own
   tokenizer (taken from the embedded GGUF file, so the converter recognises it) and converts it with the
   tree's convert_hf_to_gguf.py to BF16 and Q8_0, and with llama-quantize to Q4_0;
3. for each file (and the real SmolLM2-135M-Instruct Q4_1 file): serves it with llama-server (16 slots,
   continuous batching, 2 threads), then with kvserve in its default configuration and its best one,
   one server at a time, and runs W1 and W2 (DESIGN.md) against each with benchmarks/serving.py;
4. prints one table with kvserve / llama.cpp ratios and writes every report to --out as it goes.
Nothing else may run on the machine meanwhile: two loads on two cores void the figures. The converter
needs ``pip install sentencepiece`` (it tries SentencePiece before falling back to the BPE tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_model import make_bench_model  # noqa: E402
from serving import WORKLOADS  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"
PORT = 8099
# kvserve's configurations: the default (what `kvserve serve FILE` does) and the best found here; for
# Q8_0 files "int8" also requantizes per channel (one int8 kernel call instead of the exact two int4
# planes: faster, at the documented rounding error)
KVSERVE_CONFIGS = {"default": [], "best": ["--dtype", "bfloat16"],
                   "int8": ["--dtype", "bfloat16", "--quantization", "int8"]}
FORMAT_SERVERS = {"q8_0": ["llama.cpp", "kvserve default", "kvserve best", "kvserve int8"]}


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def build_llama_cpp(cache: Path) -> Path:
    """The vendored llama.cpp tree with bin/llama-server and bin/llama-quantize built (once)."""
    tree = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (tree / "build" / "bin" / "llama-server").exists():
        return tree
    sdist = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", str(cache),
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}"])
    with tarfile.open(sdist) as archive:
        archive.extractall(cache, filter="data")
    run(["cmake", "-S", str(tree), "-B", str(tree / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
         "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
         *ggml_isa_flags()], stdout=subprocess.DEVNULL)
    run(["cmake", "--build", str(tree / "build"), "-j", str(os.cpu_count()), "--target", "llama-server",
         "llama-quantize"], stdout=subprocess.DEVNULL)
    return tree


# /proc/cpuinfo flag -> ggml's CMake option. Not -march=native: on AMX machines it compiles ggml's AMX
# kernels, and the repacked Q4_0 / Q8_0 weights they read crashed llama-server at load here (SIGILL,
# SIGSEGV; BF16 ran, and --no-repack ran). Every other instruction set this CPU has is used.
GGML_ISA = {"sse4_2": "SSE42", "f16c": "F16C", "fma": "FMA", "bmi2": "BMI2", "avx": "AVX", "avx2": "AVX2",
            "avx_vnni": "AVX_VNNI", "avx512bw": "AVX512", "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI",
            "avx512_bf16": "AVX512_BF16"}


def ggml_isa_flags() -> list[str]:
    flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    return ["-DGGML_NATIVE=OFF", *(f"-DGGML_{option}={'ON' if flag in flags else 'OFF'}"
                                   for flag, option in GGML_ISA.items())]


def bench_gguf_files(tree: Path, cache: Path, smollm2: str) -> dict[str, Path]:
    """bench-135m as BF16, Q8_0 and Q4_0 GGUF files, converted by llama.cpp's own tools."""
    from engine.models.gguf import load_gguf_tokenizer

    folder = cache / "bench-135m-hf"
    if not (folder / "tokenizer.json").exists():
        make_bench_model(folder, weights=True)
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)  # the GPT-2 tokenizer's 50257 tokens exceed the 49152 rows
        load_gguf_tokenizer(smollm2).save_pretrained(folder)
    files = {name: cache / f"bench-135m-{name}.gguf" for name in ("bf16", "q8_0", "q4_0")}
    env = dict(os.environ, PYTHONPATH=str(tree / "gguf-py"))
    for outtype in ("bf16", "q8_0"):
        if not files[outtype].exists():
            run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(folder), "--outtype", outtype,
                 "--outfile", str(files[outtype])], env=env, stdout=subprocess.DEVNULL)
    if not files["q4_0"].exists():
        run([str(tree / "build" / "bin" / "llama-quantize"), str(files["bf16"]), str(files["q4_0"]), "Q4_0"],
            stdout=subprocess.DEVNULL)
    return files


def wait_healthy(proc: subprocess.Popen, timeout: float = 600) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server not healthy in time")


def serve(engine: str, model: Path, tree: Path, extra: list[str]) -> subprocess.Popen:
    if engine == "llama.cpp":
        cmd = [str(tree / "build" / "bin" / "llama-server"), "-m", str(model), "--port", str(PORT), "--host",
               "127.0.0.1", "-t", str(os.cpu_count()), "--parallel", "16", "-c", str(16 * 512), "--no-webui"]
    else:
        cmd = [sys.executable, "-m", "server.cli", "serve", str(model), "--port", str(PORT), "--host", "127.0.0.1",
               "--disable-uvicorn-access-log", "--log-level", "warning", *extra]
    print("+", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE.parent,
                            start_new_session=True)


def measure(engine: str, model: Path, tree: Path, extra: list[str], workloads: list[str]) -> dict:
    proc = serve(engine, model, tree, extra)
    try:
        try:
            row = {"startup_s": wait_healthy(proc)}
        except RuntimeError as exc:  # recorded, and the run goes on to the next server
            return {"error": str(exc)}
        for workload in workloads:
            out = HERE / "results" / f"_peer_{workload}.json"
            run([sys.executable, str(HERE / "serving.py"), "--base-url", f"http://127.0.0.1:{PORT}", "--workload",
                 workload, "--out", str(out)], stdout=subprocess.DEVNULL)
            row[workload] = json.loads(out.read_text())
            out.unlink()
        return row
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def read_bandwidth(gib: int = 2) -> float:
    """This machine's memory read bandwidth in GB/s: the best of 5 sums over a tensor far larger than cache."""
    import torch

    data = torch.ones(gib * 2**28)  # float32
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def roofline(results: dict, bandwidth: float, files: dict[str, Path]) -> str:
    """W1 decode speed (1 / TPOT p50) against bytes per token / bandwidth, taking the file's size as the
    bytes a token reads (every weight once; the tied head is the embedding)."""
    lines = [f"read bandwidth {bandwidth:.1f} GB/s"]
    for fmt, rows in results.items():
        limit = bandwidth * 1e9 / files[fmt].stat().st_size
        for server, row in rows.items():
            if row.get("w1") and fmt in files:
                speed = 1000 / row["w1"]["tpot_ms"]["p50"]
                lines.append(f"{fmt} {server}: decode {speed:.0f} tok/s = {speed / limit:.0%} of the roofline "
                             f"{limit:.0f} tok/s ({files[fmt].stat().st_size / 1e6:.0f} MB per token)")
    return "\n".join(lines)


def table(results: dict) -> str:
    lines = ["| model | server | W1 tok/s | W1 TTFT p50 / p99 | W1 TPOT p50 | W2 tok/s | W2 TTFT p50 / p99 | W2 TPOT p50 "
             "| vs llama.cpp (W1, W2) |", "|---|---|---|---|---|---|---|---|---|"]
    for fmt, rows in results.items():
        peer = rows.get("llama.cpp", {})
        for server, row in rows.items():
            cells, ratios = [], []
            for w in ("w1", "w2"):
                r = row.get(w)
                if not r:
                    cells += ["", "", ""]
                    continue
                cells += [f"{r['output_token_throughput']:.1f}",
                          f"{r['ttft_ms'].get('p50', 0):.0f} / {r['ttft_ms'].get('p99', 0):.0f} ms",
                          f"{r['tpot_ms'].get('p50', 0):.1f} ms"]
                if peer.get(w) and server != "llama.cpp":
                    ratios.append(f"{r['output_token_throughput'] / peer[w]['output_token_throughput']:.2f}x")
            lines.append(f"| {fmt} | {server} | " + " | ".join(cells) + f" | {', '.join(ratios)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", nargs="+", default=["bf16", "q8_0", "q4_0", "smollm2"])
    parser.add_argument("--servers", nargs="+", help="default: llama.cpp, kvserve default and best (and int8 for "
                        "q8_0)")
    parser.add_argument("--workloads", nargs="+", default=["w1", "w2"], choices=list(WORKLOADS))
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "kvserve-peers"))
    parser.add_argument("--out", default=str(HERE / "results" / "peers.json"))
    parser.add_argument("--resume", action="store_true", help="keep --out's rows and measure only the rest")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from server.cli import embedded_model

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    (HERE / "results").mkdir(exist_ok=True)
    tree = build_llama_cpp(cache)
    smollm2 = embedded_model()
    files = bench_gguf_files(tree, cache, smollm2) | {"smollm2": Path(smollm2)}
    results: dict[str, dict] = json.loads(Path(args.out).read_text())["results"] if args.resume else {}
    bandwidth = read_bandwidth()
    for fmt in args.formats:
        results.setdefault(fmt, {})
        for server in args.servers or FORMAT_SERVERS.get(fmt, ["llama.cpp", "kvserve default", "kvserve best"]):
            if server in results[fmt] and "error" not in results[fmt][server]:
                continue
            extra = KVSERVE_CONFIGS[server.split()[1]] if server.startswith("kvserve") else []
            results[fmt][server] = measure(server.split()[0], files[fmt], tree, extra, args.workloads)
            Path(args.out).write_text(json.dumps({"machine": os.uname().machine, "cpus": os.cpu_count(),
                                                  "read_bandwidth_gbs": bandwidth, "kvserve_configs": KVSERVE_CONFIGS,
                                                  "results": results}, indent=2))
            print(table(results), flush=True)
    print(table(results))
    print(roofline(results, bandwidth, files))


if __name__ == "__main__":
    main()
