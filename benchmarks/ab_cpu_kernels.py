"""Same-run A/B of the CPU quantized matmul kernel: this checkout's pyengine._C against another
build of the module (e.g. the previous commit's, built into a folder of its own), on the same
weights and activations, timed round-robin so that drifts of a shared machine hit both alike.

Build the other side first, for example:

    git worktree add /tmp/base HEAD~1
    cmake -S /tmp/base -B /tmp/base-build -DPYENGINE_NO_CUDA=ON \\
        -Dpybind11_DIR=$(python -m pybind11 --cmakedir) -DPYENGINE_OUTPUT_DIR=/tmp/base-build/out
    cmake --build /tmp/base-build
    python benchmarks/ab_cpu_kernels.py /tmp/base-build/out/_C*.so --json ab.json

Both results are checked against the dequantized weight (relative error <= 1e-5) before timing.
Rows: {N, K, bits, group_size, M, threads, base_us, this_us, speedup} (speedup = base / this).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import pyengine  # noqa: E402
from pyengine._ext import DTYPE_CODES, extension  # noqa: E402

DEFAULT_SHAPES = "576x576,1536x576,576x1536,4096x4096,14336x4096"  # N x K


def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location("_C", str(path))
    if spec is None or spec.loader is None:
        raise SystemExit(f"ab_cpu_kernels: cannot load a module from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _int_list(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v]


def ab_rows(base, shapes, bits_list, group_sizes, ms, threads, rounds) -> List[Dict[str, object]]:
    this = extension()
    rows: List[Dict[str, object]] = []
    gen = torch.Generator().manual_seed(0)
    for (n, k) in shapes:
        for bits in bits_list:
            for group_size in group_sizes:
                w = torch.randn(n, k, generator=gen) * 0.02
                qw = pyengine.quantize(w, bits, group_size, clip_search=False,
                                       scale_dtype=torch.float16)
                dense = qw.dequantize(torch.float32)
                for m in ms:
                    x = torch.randn(m, k, generator=gen)
                    out = torch.empty(m, n)

                    def call(ext, x=x, out=out, m=m):
                        ext.qmatmul_cpu(
                            x.data_ptr(), 0, x.stride(0), qw.qweight.data_ptr(),
                            qw.qweight.stride(0), qw.scales.data_ptr(), qw.zeros.data_ptr(),
                            DTYPE_CODES[qw.scales.dtype], qw.scales.stride(0), 0, 0,
                            out.data_ptr(), 0, out.stride(0), False, m, n, k, bits,
                            qw.effective_group_size, threads, "")

                    ref = x @ dense.T
                    for name, ext in (("base", base), ("this", this)):
                        call(ext)
                        err = ((out - ref).norm() / ref.norm()).item()
                        if not err <= 1e-5:
                            raise SystemExit(f"ab_cpu_kernels: {name} build is wrong on "
                                             f"{n}x{k} int{bits} g{group_size} M={m}: {err:.2e}")
                    reps = max(3, int(2e7 / (n * k)))

                    def timed(ext):
                        return lambda: [call(ext) for _ in range(reps)]

                    ms_by = common.time_interleaved({"base": timed(base), "this": timed(this)},
                                                    rounds=rounds)
                    base_us, this_us = (ms_by[s] * 1e3 / reps for s in ("base", "this"))
                    rows.append(dict(N=n, K=k, bits=bits, group_size=group_size, M=m,
                                     threads=threads, base_us=round(base_us, 3),
                                     this_us=round(this_us, 3),
                                     speedup=round(base_us / this_us, 3)))
                    print(f"{n:>6}x{k:<5} int{bits} g{group_size:<4} M={m}: base "
                          f"{base_us:9.1f} us  this {this_us:9.1f} us  x{base_us / this_us:.2f}",
                          flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path, help="the other build's _C module file")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="N x K list, comma separated")
    parser.add_argument("--bits", type=_int_list, default=[4, 2, 3, 8])
    parser.add_argument("--group-sizes", type=_int_list, default=[64, 128])
    parser.add_argument("--m", type=_int_list, default=[1, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if not args.base.is_file():
        parser.error(f"{args.base} is not a file")
    if extension() is None:
        print("ab_cpu_kernels: this checkout's pyengine._C is not built", file=sys.stderr)
        return 2
    base = _load_module(args.base)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    rows = ab_rows(base, shapes, args.bits, args.group_sizes, args.m, args.threads, args.rounds)
    if args.json:
        meta = common.metadata("cpu")
        meta.update(base=str(args.base), scale_dtype="float16", activations="float32",
                    timing="median of round-robin rounds, each `reps` calls of one build")
        common.write_results(args.json, meta, rows)
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
