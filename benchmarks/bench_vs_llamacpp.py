"""Decode speed of SmolLM2-135M on the CPU: pyengine's compressed models against llama.cpp's
quantized files of the same GGUF, timed in one run, alternating engines (A B A B ...), medians.

llama.cpp: its ``llama-bench`` and ``llama-quantize`` are built once from the vendored tree of
the ``llama-cpp-python`` sdist (no prebuilt binary is on the package registry; server, examples
and tests off) into ``$PYENGINE_CACHE/llama.cpp/<version>-<isa>`` and reused; ``--isa native``
lets ggml use every instruction set of this CPU, ``--isa avx2`` builds without AVX-512 (the
CPUs people have without it), ``--isa generic`` with x86-64's baseline only (SSE2). The embedded GGUF (Q4_1 weights) is requantized to each llama.cpp
type once (cached next to the build); F32 is the same weights dequantized, which is what
pyengine's dense model holds.

pyengine: the model loaded from the same GGUF (pyengine.model.smollm2), compressed by RTN
(group 128) per config with the tied output head at 8 bits (as llama.cpp keeps its output
matrix at 8 bits in its 4- and 2-bit types), decoded through pyengine.Decoder (the lean loop,
static KV cache) as benchmarks/bench_decode.py does, batch 1. The ``*_a8`` configs run every
linear, head included, on int8 activations (as llama.cpp's quantized types do with their Q8
activations): on the AVX2 / AVX-512 builds (the generic build: 2-, 4- and 8-bit weights)
through a copy of their weights with rows interleaved by eights, whose size the rows report as ``prepared_bytes``; ``int4_a8_nocopy``
decodes the int4_a8 model without that copy (``Decoder(layout_copy=False)``: the model's bytes
only, on its canonical rows).

Both engines decode ``--new-tokens`` tokens after a short prompt; each round runs every
engine/config once per thread count; the JSON keeps every round's tokens/s and the medians.

    python benchmarks/bench_vs_llamacpp.py --build-only            # build (about 10 min on 2 cores)
    python benchmarks/bench_vs_llamacpp.py --threads 1,2 --rounds 3
    python benchmarks/bench_vs_llamacpp.py --isa avx2 --json benchmarks/results/vs_llamacpp_avx2.json
    python benchmarks/bench_vs_llamacpp.py --competing-load 2 --configs int4_a8 --llama-types Q4_0 \
        --json benchmarks/results/vs_llamacpp_busy.json     # a busy machine: 1 vs 2 threads
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import pyengine  # noqa: E402
from pyengine import QuantConfig, Recipe  # noqa: E402

LLAMA_TYPES = ("F32", "Q8_0", "Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K")
PYENGINE_CONFIGS = ("dense", "int8", "int4", "int8_a8", "int4_a8", "int3_a8", "int2_a8",
                    "int4_a8_nocopy")
NO_COPY = "_nocopy"  # the config's model, decoded without layout copies (Decoder(layout_copy=False))
TOOLS = ("llama-bench", "llama-quantize", "llama-perplexity")
ISA_FLAGS = {
    "native": ["-DGGML_NATIVE=ON"],
    "avx2": ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
             "-DGGML_F16C=ON", "-DGGML_AVX512=OFF", "-DGGML_AVX512_VNNI=OFF",
             "-DGGML_AVX512_BF16=OFF", "-DGGML_AVX_VNNI=OFF"],
    # x86-64's baseline (SSE2): no SSE4.2, AVX, FMA, F16C or BMI2, as pyengine's generic build
    "generic": ["-DGGML_NATIVE=OFF", "-DGGML_SSE42=OFF", "-DGGML_AVX=OFF", "-DGGML_AVX2=OFF",
                "-DGGML_BMI2=OFF", "-DGGML_FMA=OFF", "-DGGML_F16C=OFF", "-DGGML_AVX512=OFF",
                "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX512_BF16=OFF", "-DGGML_AVX_VNNI=OFF"],
}


def cache_root() -> Path:
    return Path(os.environ.get("PYENGINE_CACHE", Path.home() / ".cache" / "pyengine")) / "llama.cpp"


# ---- llama.cpp: build once, quantize once ------------------------------------------------------

def _download_sdist(into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if found:
        return found[-1]
    # the sdist of llama-cpp-python only: ":all:" would also build its build dependencies
    # (cmake among them) from source to prepare the sdist's metadata
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                    "llama-cpp-python", "--dest", str(into), "llama-cpp-python"], check=True)
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise SystemExit("bench_vs_llamacpp: pip downloaded no llama-cpp-python sdist")
    return found[-1]


def llama_tools(isa: str, jobs: int, needed: Sequence[str] = TOOLS) -> Path:
    """The directory holding llama-bench, llama-quantize and llama-perplexity for ``isa``,
    built (all three) when one of ``needed`` is missing."""
    root = cache_root()
    sdist = _download_sdist(root / "sdist")
    version = sdist.name[len("llama_cpp_python-"):-len(".tar.gz")]
    bin_dir = root / f"{version}-{isa}" / "bin"
    if all((bin_dir / t).exists() for t in needed):
        return bin_dir
    if shutil.which("cmake") is None:
        raise SystemExit("bench_vs_llamacpp: building llama.cpp needs cmake")
    work = Path(tempfile.mkdtemp(prefix="llama-build-"))
    try:
        with tarfile.open(sdist) as tar:
            tar.extractall(work)
        source = next(work.glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        build = work / "build"
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                        *ISA_FLAGS[isa]], check=True)
        subprocess.run(["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs),
                        "--target", *TOOLS], check=True)
        bin_dir.mkdir(parents=True, exist_ok=True)
        for tool in TOOLS:
            shutil.copy2(build / "bin" / tool, bin_dir / tool)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return bin_dir


def llama_model(bin_dir: Path, source: Path, qtype: str) -> Path:
    """The embedded GGUF requantized to ``qtype`` (cached beside the tools)."""
    out = bin_dir.parent / f"{source.stem}.{qtype}.gguf"
    if not out.exists():
        tmp = out.with_suffix(".partial")
        subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(source),
                        str(tmp), qtype], check=True, capture_output=True)
        tmp.rename(out)
    return out


def llama_tokens_per_s(bin_dir: Path, model: Path, threads: int, new_tokens: int) -> float:
    run = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(model), "-p", "0", "-n",
                          str(new_tokens), "-r", "1", "-t", str(threads), "-o", "json"],
                         check=True, capture_output=True, text=True)
    results = json.loads(run.stdout)
    return float(results[0]["avg_ts"])


# ---- pyengine ----------------------------------------------------------------------------------

def pyengine_model(config: str) -> torch.nn.Module:
    from pyengine.model.smollm2 import load_smollm2
    model, _ = load_smollm2()
    # the head at 8 bits; the *_a8 configs (int8 activations, as llama.cpp's Q8_0 activations)
    # run it on int8 activations too
    head, head_a8 = QuantConfig(8, 128), QuantConfig(8, 128, act_bits=8)
    recipes = {
        "int8": Recipe({"lm_head": head, "_default": QuantConfig(8, 128)}),
        "int4": Recipe({"lm_head": head, "_default": QuantConfig(4, 128)}),
        "int3": Recipe({"lm_head": head, "_default": QuantConfig(3, 128)}),
        "int8_a8": Recipe({"lm_head": head_a8, "_default": QuantConfig(8, 128, act_bits=8)}),
        "int4_a8": Recipe({"lm_head": head_a8, "_default": QuantConfig(4, 128, act_bits=8)}),
        "int3_a8": Recipe({"lm_head": head_a8, "_default": QuantConfig(3, 128, act_bits=8)}),
        "int2_a8": Recipe({"lm_head": head_a8, "_default": QuantConfig(2, 128, act_bits=8)}),
    }
    if config != "dense":
        pyengine.compress(model, recipes[config.removesuffix(NO_COPY)], show_progress=False)
    return model.eval()


def pyengine_tokens_per_s(model: torch.nn.Module, threads: int, new_tokens: int,
                          layout_copy: bool = True) -> float:
    from bench_decode import measure_decoder
    torch.set_num_threads(threads)
    m = measure_decoder(model, batch=1, prompt_len=8, new_tokens=new_tokens,
                        layout_copy=layout_copy)
    return 1e3 / m["ms_per_step"]


def _rounds(args, llama: Dict[str, Path], bin_dir: Path, models: Dict[str, torch.nn.Module],
            runs: Dict[tuple, List[float]], copy_gbps: Dict[tuple, List[float]]) -> None:
    """The timed rounds: per round and thread count, a copy's bandwidth (in ordinary memory and,
    where the OS has them, in the huge pages that hold the decoder's weight copies), then every
    llama.cpp file and every pyengine model once, in turn."""
    for r in range(args.rounds):
        for threads in args.threads:
            torch.set_num_threads(threads)
            copy_gbps.setdefault((threads, False), []).append(common.copy_bandwidth_gbps("cpu"))
            huge = common.huge_page_copy_bandwidth_gbps("cpu")
            if huge is not None:
                copy_gbps.setdefault((threads, True), []).append(huge)
            for t, path in llama.items():
                runs.setdefault(("llama.cpp", t, threads), []).append(
                    llama_tokens_per_s(bin_dir, path, threads, args.new_tokens))
            for c, model in models.items():
                runs.setdefault(("pyengine", c, threads), []).append(
                    pyengine_tokens_per_s(model, threads, args.new_tokens,
                                          layout_copy=not c.endswith(NO_COPY)))
        print(f"round {r + 1}/{args.rounds} done", flush=True)


def _int_list(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isa", choices=sorted(ISA_FLAGS), default="native",
                        help="instruction sets of both engines: llama.cpp's build, and for "
                             "pyengine its kernels of that set (avx2: the AVX2 build even on a "
                             "CPU with AVX-512; native: the widest this CPU runs)")
    parser.add_argument("--threads", type=_int_list, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--llama-types", default=",".join(LLAMA_TYPES))
    parser.add_argument("--configs", default=",".join(PYENGINE_CONFIGS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="build jobs")
    parser.add_argument("--competing-load", type=int, default=0, metavar="N",
                        help="run N busy-loop processes during the timed rounds (a machine that "
                             "is also running other work); the JSON says so")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--json", type=Path, default=None,
                        help="default benchmarks/results/vs_llamacpp_<isa>.json")
    args = parser.parse_args(argv)
    from pyengine.model.smollm2 import gguf_path
    from pyengine.backends import get_backend
    # pyengine's kernels of the same instruction set
    why_not = common.use_cpu_isa(args.isa) if args.isa != "native" else None
    if why_not:
        print(why_not)
        return 1
    pyengine_isa = get_backend("cpu").selected_isa()

    bin_dir = llama_tools(args.isa, args.jobs, needed=("llama-bench", "llama-quantize"))
    source = gguf_path()
    llama = {t: llama_model(bin_dir, source, t) for t in args.llama_types.split(",") if t}
    if args.build_only:
        print(f"llama.cpp tools in {bin_dir}; models: {', '.join(p.name for p in llama.values())}")
        return 0
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(PYENGINE_CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {PYENGINE_CONFIGS}")
    models = {c: pyengine_model(c) for c in configs}
    params = sum(p.numel() for p in pyengine_model("dense").parameters())
    sizes = {("llama.cpp", t): p.stat().st_size for t, p in llama.items()}
    sizes.update({("pyengine", c): pyengine.storage_bytes(m) for c, m in models.items()})
    # weight copies the decoder prepares (the CPU row-interleaved layout of int8-activation
    # layers), held while it decodes
    prepared = {c: pyengine.Decoder(m, max_len=8, layout_copy=not c.endswith(NO_COPY))
                .prepared_bytes for c, m in models.items()}

    runs: Dict[tuple, List[float]] = {}
    # a copy's bandwidth (read + write) per thread count and memory (True: huge pages)
    copy_gbps: Dict[tuple, List[float]] = {}
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.competing_load)]
    try:
        _rounds(args, llama, bin_dir, models, runs, copy_gbps)
    finally:
        for proc in load:
            proc.kill()
            proc.wait()

    rows = []
    # the roofline's bandwidth: the faster memory's (a harder reference than the slower one)
    medians = {key: statistics.median(v) for key, v in copy_gbps.items()}
    bandwidth = {t: max(v for (tt, _), v in medians.items() if tt == t) for t, _ in medians}
    for (engine, config, threads), values in runs.items():
        size = sizes[(engine, config)]
        tokens_per_s = statistics.median(values)
        # the roofline: every byte of the model read once per token (a lower bound of the
        # traffic: activations, the KV cache and the embedding row are left out)
        weight_gbps = size * tokens_per_s / 1e9
        rows.append(dict(op="decode_vs_llamacpp", engine=engine, config=config, threads=threads,
                         batch=1, tokens_per_s=round(tokens_per_s, 2),
                         runs=[round(v, 2) for v in values], bytes=size,
                         bits_per_weight=round(8 * size / params, 2),
                         prepared_bytes=prepared.get(config, 0) if engine == "pyengine" else 0,
                         weight_gbps=round(weight_gbps, 2),
                         pct_of_copy_bw=round(100 * weight_gbps / bandwidth[threads], 1)))
    for row in rows:
        print(f"{row['engine']:>9} {row['config']:>8} t={row['threads']}: "
              f"{row['tokens_per_s']:8.1f} tok/s  {row['bits_per_weight']:5.2f} bits/weight")
    meta = common.metadata("cpu")
    meta.update(llama_cpp_isa=args.isa, pyengine_cpu_isa=pyengine_isa,
                llama_cpp_tools=str(bin_dir), rounds=args.rounds, new_tokens=args.new_tokens,
                params=params,
                copy_gbps_by_threads={t: round(v, 1) for t, v in bandwidth.items()},
                copy_gbps_ordinary_memory={t: round(v, 1) for (t, h), v in medians.items()
                                           if not h},
                copy_gbps_huge_pages={t: round(v, 1) for (t, h), v in medians.items() if h},
                competing_load=args.competing_load)
    out = args.json or common.RESULTS / f"vs_llamacpp_{args.isa}.json"
    common.write_results(out, meta, rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
