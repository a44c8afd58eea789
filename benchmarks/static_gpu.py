"""Static performance figures of the GPU decode kernels for an H200 (sm_90), without a GPU.

    python benchmarks/static_gpu.py [--json FILE] [--triton-path DIR ...] [--skip-cuda]

For every CUDA kernel of csrc/cuda (nvcc -cubin for sm_90a with -Xptxas -v -lineinfo, the
build's flags otherwise) and the Triton decode kernels (compiled ahead of time for
GPUTarget("cuda", 90, 32) by pyengine.kernels.aot, on the installed triton and on each
--triton-path, e.g. a folder holding triton 3.6.0, the version of the lent GPU machines) it
reports registers, stack, spill bytes and local-memory instructions; for the decode kernels also
the SASS instructions one iteration of the steady-state loop issues (pyengine/kernels/sass.py:
the loop that streams the weight, on its path with no optional work), the weight bytes that
iteration consumes, and the issue-bound ceiling those give:

    issue rate  = 132 SMs x 4 schedulers x 1.98 GHz = 1.045e12 warp instructions / s
    ceiling     = issue rate / (warp instructions per weight byte)        [weight bytes / s]
    vs copy     = ceiling / 4.3e12 (the H200's HBM bandwidth)

A kernel whose ceiling is under 1x cannot reach the copy bandwidth whatever its memory system
does: it runs out of instruction issue first. The ceiling leaves out the work outside the loop
(prologue, activation staging, reductions, epilogue), latencies and the activation and scale
bytes, so it is an upper bound, not a prediction. **No figure here is measured on a GPU.**

Weight bytes per iteration follow from each kernel's work split: a Triton decode program
streams BLOCK_N x BLOCK_K codes per iteration with num_warps warps; a CUDA decode GEMV warp
streams kRows rows x 32 lanes x one 32-code packing block (decode_gemv.cuh); a warp of the CUDA
tensor-core decode kernel (decode_mma.cuh) streams 32 lanes x words_per_lane words per
iteration (csrc/mma_frag.h), two iterations per loop trip (counted from its weight loads, which
are never predicated). The weight loads found on the path are checked against that figure
(their bytes must cover it). The tensor-core decode kernel is compiled once per activation
dtype, token tiles (M <= 8, M <= 16) and units per iteration (which the group size sets); the
rows at group 128 carry M (1 or 16), the others the M range they serve.

Writes benchmarks/results/static_gpu.json (rows + meta) and prints a table.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyengine.backends.cuda_layout import WORDS, mma_units  # noqa: E402
from pyengine.kernels import sass  # noqa: E402

# H200 (SXM): the issue model of the ceiling and the bandwidth it is compared with.
SMS, SCHEDULERS, CLOCK_HZ = 132, 4, 1.98e9
ISSUE_RATE = SMS * SCHEDULERS * CLOCK_HZ          # warp instructions per second
COPY_BANDWIDTH = 4.3e12                            # bytes per second
TARGET_RATIO = 1.3                                 # the design target: ceiling >= 1.3x copy

SHAPE = (14336, 4096)           # N x K of the kernel benchmark (Llama-3-8B gate/up)
DECODE_MS = (1, 16)
CUDA_SOURCES = ("qmatmul_decode.cu", "plane_matmul.cu", "qmatmul_tc.cu", "qmatmul_simple.cu",
                "qmatmul_mma.cu")
# The tensor-core decode kernel (csrc/cuda/decode_mma.cuh) takes its layout's sizes from
# pyengine/backends/cuda_layout.py: a warp streams 32 lanes x WORDS[bits] words per iteration,
# and the instantiation serving SHAPE's group size 128 has mma_units(bits, 128, K) units.
CUDA_ARCH = "90a"


def ceiling(instructions_per_iteration: float, weight_bytes_per_iteration: float,
            reads: int = 1) -> Dict[str, float]:
    """Issue-bound figures of a loop that issues ``instructions_per_iteration`` warp
    instructions for ``weight_bytes_per_iteration`` bytes of weights, the weight being streamed
    ``reads`` times per call (CUDA decode M tiles)."""
    per_byte = instructions_per_iteration * reads / weight_bytes_per_iteration
    tbps = ISSUE_RATE / per_byte / 1e12
    return dict(warp_instructions_per_weight_byte=round(per_byte, 4),
                warp_instructions_per_512B=round(per_byte * 512, 1),
                issue_bound_tbps=round(tbps, 3),
                ceiling_vs_copy=round(tbps * 1e12 / COPY_BANDWIDTH, 3))


# ---- CUDA ---------------------------------------------------------------------------------------

def _cuda_constant(name: str) -> int:
    text = (ROOT / "csrc" / "cuda" / "decode_gemv.cuh").read_text()
    m = re.search(rf"constexpr int {name} = (\d+);", text)
    if not m:
        raise RuntimeError(f"{name} not found in decode_gemv.cuh")
    return int(m.group(1))


def cuda_block_bytes(source: str, width: int) -> int:
    """Bytes of one 32-code packing block of one row that a CUDA decode lane loads:
    PackedSource<b>: b words; PlaneSource<R>: plane_hi (3 words) + plane_mid (2, R >= 3) +
    plane_lo (3, R >= 6)."""
    if source == "PackedSource":
        return 4 * width
    return 4 * (3 + (2 if width >= 3 else 0) + (3 if width >= 6 else 0))


def cuda_max_tile(source: str) -> int:
    """Src::kMaxTileM of a weight source (weight_sources.cuh): the most activation rows one
    decode block takes; decode_gemv.cuh's kMaxTileM for a source that sets none."""
    text = (ROOT / "csrc" / "cuda" / "weight_sources.cuh").read_text()
    struct = re.search(rf"struct {source} {{(.*?)\n}};", text, re.S)
    m = re.search(r"kMaxTileM = (\d+);", struct.group(1)) if struct else None
    return int(m.group(1)) if m else _cuda_constant("kMaxTileM")


def cuda_tiles(M: int, max_tile: int) -> tuple:
    """(activation rows per tile MT, tiles) the host heuristic of decode_gemv.cuh picks for a
    layer as wide as SHAPE (large N: no further M split), e.g. M = 16 -> (8, 2) with 8-row
    tiles, (4, 4) with 4-row tiles."""
    tiles = -(-M // max_tile)
    need = -(-M // tiles)
    mt = next(t for t in (1, 2, 3, 4, 6, 8) if t <= max_tile and need <= t)
    return mt, -(-M // mt)


def compile_cuda(source: str, out_dir: Path) -> dict:
    """nvcc -cubin of one csrc/cuda source for sm_90a; returns cubin path and ptxas report."""
    nvcc = shutil.which("nvcc")
    cubin = out_dir / (Path(source).stem + ".cubin")
    cmd = [nvcc, "-cubin", "-O3", "--expt-relaxed-constexpr", "-std=c++17", "-lineinfo",
           f"-gencode=arch=compute_{CUDA_ARCH},code=sm_{CUDA_ARCH}", "-Xptxas", "-v",
           "-I", str(ROOT / "csrc"), str(ROOT / "csrc" / "cuda" / source), "-o", str(cubin)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source}:\n{proc.stderr[-4000:]}")
    return dict(source=source, cubin=cubin, ptxas=proc.stderr)


_PTXAS = re.compile(r"Function properties for (\S+)\n\s+(\d+) bytes stack frame, (\d+) bytes "
                    r"spill stores, (\d+) bytes spill loads\n(?:.*\n)*?ptxas info\s+: Used "
                    r"(\d+) registers")


def ptxas_resources(text: str) -> Dict[str, dict]:
    """mangled name -> registers, stack, spill store / load bytes (ptxas -v)."""
    out = {}
    for m in _PTXAS.finditer(text):
        out[m.group(1)] = dict(registers=int(m.group(5)), stack_bytes=int(m.group(2)),
                               spill_store_bytes=int(m.group(3)),
                               spill_load_bytes=int(m.group(4)))
    return out


def demangle(names: Sequence[str]) -> Dict[str, str]:
    proc = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, proc.stdout.splitlines()))


_MMA_NAME = re.compile(r"decode_mma_kernel<(\d), (true|false), (\d), (\d)>")
_DECODE_NAME = re.compile(r"decode_gemv_kernel<pyengine::cuda::(PackedSource|PlaneSource)<(\d)>,"
                          r" (\d)>")


def cuda_rows(jobs: int) -> List[dict]:
    k_rows = _cuda_constant("kRows")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, futures.ThreadPoolExecutor(jobs) as pool:
        built = list(pool.map(lambda s: compile_cuda(s, Path(tmp)), CUDA_SOURCES))
        for b in built:
            resources = ptxas_resources(b["ptxas"])
            funcs = sass.parse(sass.disassemble(b["cubin"].read_bytes()))
            names = demangle(list(resources))
            for mangled, res in sorted(resources.items(), key=lambda kv: names[kv[0]]):
                pretty = names[mangled]
                func = funcs.get(mangled)
                short = re.sub(r"pyengine::cuda::|\(.*$|^void ", "", pretty)
                row = dict(backend="cuda", source=b["source"], kernel=short, **res,
                           local_memory_instructions=(
                               sass.local_memory_instructions(func) if func else None))
                mma = _MMA_NAME.search(pretty)
                if mma and func is not None:
                    bits, bf16, nt, units = (int(mma.group(1)), mma.group(2) == "true",
                                             int(mma.group(3)), int(mma.group(4)))
                    row.update(weight=f"int{bits}", dtype="bfloat16" if bf16 else "float16",
                               token_tiles=nt, units=units,
                               group_sizes="group >= iteration" if units == 1 else
                               f"group = iteration / {units}")
                    st = sass.steady_state(func)
                    # The loop is unrolled: a trip streams as many iterations as its path has
                    # 16-byte weight loads per WORDS / 4 (the loads are never predicated).
                    trips = max(1, (st.weight_loads if st else 0) // (WORDS[bits] // 4))
                    per_warp = trips * 32 * WORDS[bits] * 4
                    row.update(_loop_fields(st, per_warp, threads=32), iterations_per_trip=trips)
                    if st is not None and units == mma_units(bits, 128, SHAPE[1]):
                        row["M"] = 1 if nt == 1 else 16
                        row.update(ceiling(st.instructions, per_warp))
                    elif st is not None:
                        row.update({"M (not at group 128)": "1..8" if nt == 1 else "9..16"},
                                   **ceiling(st.instructions, per_warp))
                m = _DECODE_NAME.search(pretty)
                if m and func is not None:
                    src, width, mt = m.group(1), int(m.group(2)), int(m.group(3))
                    row.update(weight=(f"int{width}" if src == "PackedSource"
                                       else f"planes-r{width}"), tile_m=mt)
                    st = sass.steady_state(func)
                    per_warp = k_rows * 32 * cuda_block_bytes(src, width)
                    row.update(_loop_fields(st, per_warp, threads=32))
                    max_tile = cuda_max_tile(src)
                    ms = [M for M in DECODE_MS if cuda_tiles(M, max_tile)[0] == mt]
                    if st is not None and ms:
                        M = ms[0]
                        row["M"] = M
                        row["tiles"] = cuda_tiles(M, max_tile)[1]
                        row.update(ceiling(st.instructions, per_warp, reads=row["tiles"]))
                rows.append(row)
    return rows


def _loop_fields(st: Optional[sass.SteadyState], weight_bytes: int, threads: int) -> dict:
    """Steady-state fields of a row; weight_bytes per iteration for the unit of ``threads``."""
    if st is None:
        return dict(loop_instructions=None, weight_bytes_per_iteration=weight_bytes,
                    loop_error="no loop holds a marked weight load")
    covered = st.weight_load_bytes * threads
    return dict(loop_instructions=st.instructions, weight_bytes_per_iteration=weight_bytes,
                loop_weight_load_instructions=st.weight_loads,
                loop_weight_load_bytes=covered, loop_other_global_loads=st.other_global_loads,
                loop_shared_loads=st.shared_loads, loop_local_memory=st.local_memory,
                loop_error=None if covered >= weight_bytes else (
                    f"the path's weight loads name {covered} bytes, fewer than the "
                    f"{weight_bytes} one iteration consumes"))


# ---- Triton -------------------------------------------------------------------------------------

def triton_cases():
    """The decode calls of the kernel benchmark: packed 2/3/4/8 bits and Matryoshka slices,
    group 128, asymmetric, fp16 and bf16 activations, M = 1 and 16, on SHAPE."""
    from pyengine.kernels.aot import Case
    from pyengine.matryoshka.weight import PRECISIONS
    n, k = SHAPE
    for kind, widths in (("packed", (2, 3, 4, 8)), ("planes", PRECISIONS)):
        for width in widths:
            for dtype in ("float16", "bfloat16"):
                for M in DECODE_MS:
                    yield Case(kind, width, 128, dtype, M, n, k)


def triton_weight_bits(kind: str, width: int) -> int:
    """Stored bits per weight an instance streams: packed b; planes: the planes it reads
    (r = 2: 3; 3, 4: 5; 6, 8: 8)."""
    if kind == "packed":
        return width
    return 3 + (2 if width >= 3 else 0) + (3 if width >= 6 else 0)


def _ptxas_spills(ptx: str, arch: str) -> dict:
    """Registers and spill bytes of a Triton kernel's PTX by ptxas -v (Triton's bundled
    ptxas, the one that built its cubin)."""
    import triton.backends.nvidia as nv
    ptxas = Path(nv.__file__).parent / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{arch}", str(src), "-o",
                               str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    res = ptxas_resources(proc.stderr)
    return next(iter(res.values())) if res else {}


def triton_rows() -> List[dict]:
    """Compiles and analyses the Triton decode kernels with the triton importable now."""
    import triton

    from pyengine.kernels import aot
    aot._quiet_triton_warnings()
    rows = []
    for case in triton_cases():
        for index, launch in enumerate(aot.case_launches(case, 90)):
            if launch.name not in ("_decode_kernel", "_plane_decode_kernel"):
                continue
            _, compiled = aot._bind(launch, 90, compile_now=True)
            func = next(iter(sass.parse(sass.disassemble(compiled.asm["cubin"])).values()))
            kw = launch.kwargs
            row = dict(backend="triton", triton=triton.__version__, kernel=launch.name,
                       weight=(f"int{case.bits}" if case.kind == "packed"
                               else f"planes-r{case.bits}"), dtype=case.dtype, M=case.M,
                       config=f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} "
                              f"w{kw['num_warps']} s{kw['num_stages']}",
                       **_ptxas_spills(compiled.asm["ptx"], "90a"),
                       local_memory_instructions=sass.local_memory_instructions(func))
            st = sass.steady_state(func)
            per_program = (kw["BLOCK_N"] * kw["BLOCK_K"]
                           * triton_weight_bits(case.kind, case.bits) // 8)
            row.update(_loop_fields(st, per_program, threads=32 * kw["num_warps"]))
            if st is not None:
                row.update(ceiling(st.instructions * kw["num_warps"], per_program))
            rows.append(row)
    return rows


def triton_rows_in(path: Optional[Path]) -> List[dict]:
    """triton_rows() under the triton in ``path`` (first on sys.path), in a subprocess."""
    if path is None:
        return triton_rows()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(path), str(ROOT)])
    with tempfile.TemporaryDirectory() as tmp:
        env.setdefault("TRITON_CACHE_DIR", str(Path(tmp) / "cache"))
        out = Path(tmp) / "rows.json"
        proc = subprocess.run([sys.executable, __file__, "--triton-only", "--rows-json",
                               str(out)], env=env, capture_output=True, text=True, cwd=tmp)
        if proc.returncode != 0:
            raise RuntimeError(f"triton analysis under {path} failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


# ---- report -------------------------------------------------------------------------------------

def meta() -> dict:
    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout.strip()
        except OSError:
            return None
    nvcc = shutil.which("nvcc")
    return dict(
        what="static (compile-only) figures of the GPU decode kernels; no GPU measurement",
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        commit=run(["git", "rev-parse", "--short", "HEAD"]), host=platform.node(),
        nvcc=run([nvcc, "--version"]).splitlines()[-1] if nvcc else None,
        target=dict(gpu="H200 (sm_90)", sms=SMS, schedulers=SCHEDULERS,
                    clock_ghz=CLOCK_HZ / 1e9, issue_rate_warp_instr_per_s=ISSUE_RATE,
                    copy_bandwidth_bytes_per_s=COPY_BANDWIDTH, target_ratio=TARGET_RATIO),
        shape=dict(N=SHAPE[0], K=SHAPE[1], group_size=128))


def table(rows: List[dict]) -> str:
    lines = ["| backend | kernel | weight | dtype | M | regs | spill B | LDL/STL | loop instr | "
             "B/iter | instr/512B | ceiling TB/s | vs copy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("loop_instructions") is None and "weight" not in r:
            continue
        backend = r["backend"] + (f" {r['triton']}" if r.get("triton") else "")
        kernel = r["kernel"] if r["backend"] == "triton" else f"decode MT={r.get('tile_m')}"
        lines.append(
            f"| {backend} | {kernel} | {r.get('weight', '')} | {r.get('dtype', 'any')} | "
            f"{r.get('M', '')} | {r.get('registers', '')} | {r.get('spill_store_bytes', '')} | "
            f"{r.get('local_memory_instructions', '')} | {r.get('loop_instructions', '')} | "
            f"{r.get('weight_bytes_per_iteration', '')} | "
            f"{r.get('warp_instructions_per_512B', '')} | "
            f"{r.get('issue_bound_tbps', '')} | {r.get('ceiling_vs_copy', '')} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path,
                        default=ROOT / "benchmarks" / "results" / "static_gpu.json")
    parser.add_argument("--triton-path", type=Path, action="append", default=[],
                        help="a folder holding another triton (first on sys.path); repeatable")
    parser.add_argument("--skip-cuda", action="store_true")
    parser.add_argument("--skip-installed-triton", action="store_true")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--triton-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rows-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.triton_only:
        args.rows_json.write_text(json.dumps(triton_rows()))
        return 0
    rows: List[dict] = []
    if not args.skip_cuda:
        if shutil.which("nvcc") is None:
            print("nvcc not found: CUDA kernels skipped")
        else:
            rows += cuda_rows(args.jobs)
    tritons = ([] if args.skip_installed_triton else [None]) + list(args.triton_path)
    for path in tritons:
        rows += triton_rows_in(path)
    errors = [f"{r['kernel']} {r.get('weight')} M={r.get('M')}: {r['loop_error']}"
              for r in rows if r.get("loop_error")]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(meta=meta(), rows=rows), indent=1) + "\n")
    print(table([r for r in rows if "M" in r]))
    print(f"\n{len(rows)} kernels; written to {args.json}")
    for e in errors:
        print(f"ANALYSIS ERROR {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
