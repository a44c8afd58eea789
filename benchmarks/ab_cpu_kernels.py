"""Same-run A/B of the CPU kernels (the canonical quantized matmul qmatmul_cpu and the
Matryoshka plane matmul plane_matmul_cpu): this checkout's pyengine._C against another build of
the module (e.g. the previous commit's, built into a folder of its own), on the same
weights and activations, timed round-robin so that drifts of a shared machine hit both alike.

Build the other side first, for example:

    git worktree add /tmp/base HEAD~1
    cmake -S /tmp/base -B /tmp/base-build -DPYENGINE_NO_CUDA=ON \\
        -Dpybind11_DIR=$(python -m pybind11 --cmakedir) -DPYENGINE_OUTPUT_DIR=/tmp/base-build/out
    cmake --build /tmp/base-build
    python benchmarks/ab_cpu_kernels.py /tmp/base-build/out/_C*.so --json ab.json

Both results are checked against the dequantized weight (relative error <= 1e-5) before timing.
Rows: {op, N, K, bits, group_size, M, threads, base_us, this_us, speedup} (speedup = base /
this; op "qmatmul" or "plane_matmul", whose bits is the Matryoshka precision r of an int8
parent).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import pyengine  # noqa: E402
from pyengine import MatryoshkaWeight  # noqa: E402
from pyengine._ext import DTYPE_CODES, extension  # noqa: E402
from pyengine.matryoshka import PLANES_READ  # noqa: E402
from pyengine.ops.act_quant import quantize_activations  # noqa: E402

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


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _qmatmul_call(w, bits, group_size, x, out, threads, isa="", act_bits=0, copies=1):
    """(call(ext), dense reference weight) of the canonical kernel on an int-`bits` weight.
    copies > 1: the calls cycle through that many copies of the weight's codes and scales (in
    memory of their own), so that a call reads them from DRAM rather than from the caches."""
    qw = pyengine.quantize(w, bits, group_size, clip_search=False, scale_dtype=torch.float16)
    m, k = x.shape
    n = w.shape[0]
    stored = [(qw.qweight, qw.scales, qw.zeros)] + [
        (qw.qweight.clone(), qw.scales.clone(), None if qw.zeros is None else qw.zeros.clone())
        for _ in range(copies - 1)]
    turn = [0]

    def call(ext):
        qweight, scales, zeros = stored[turn[0] % len(stored)]
        turn[0] += 1
        ext.qmatmul_cpu(x.data_ptr(), 0, x.stride(0), qweight.data_ptr(), qweight.stride(0),
                        scales.data_ptr(), _ptr(zeros), DTYPE_CODES[scales.dtype],
                        scales.stride(0), 0, 0, out.data_ptr(), 0, out.stride(0), False, m, n,
                        k, bits, qw.effective_group_size, threads, isa, act_bits)
    return call, qw.dequantize(torch.float32)


def _plane_call(parent, r, x, out, threads, isa=""):
    """(call(ext), dense reference weight) of the plane kernel on the r-bit slice of parent."""
    planes = [getattr(parent, name) if name in PLANES_READ[r] else None
              for name in ("plane_hi", "plane_mid", "plane_lo")]
    m, k = x.shape
    n = parent.shape[0]

    def call(ext):
        ext.plane_matmul_cpu(
            x.data_ptr(), 0, x.stride(0), *[v for t in planes for v in
                                            (_ptr(t), 0 if t is None else t.stride(0))],
            parent.scales.data_ptr(), _ptr(parent.zeros), DTYPE_CODES[parent.scales.dtype],
            parent.scales.stride(0), 0, 0, out.data_ptr(), 0, out.stride(0), m, n, k, r,
            parent.effective_group_size, threads, isa)
    return call, parent.dequantize(r, torch.float32)


def ab_rows(base, shapes, bits_list, group_sizes, ms, threads, rounds,
            ops=("qmatmul", "plane_matmul"), isa: str = "", act_bits: int = 0,
            stream_mb: float = 0.0) -> List[Dict[str, object]]:
    this = extension()
    rows: List[Dict[str, object]] = []
    gen = torch.Generator().manual_seed(0)
    for (n, k) in shapes:
        for group_size in group_sizes:
            w = torch.randn(n, k, generator=gen) * 0.02
            parent = None
            if "plane_matmul" in ops:
                parent = MatryoshkaWeight.from_quantized(pyengine.quantize(
                    w, 8, group_size, clip_search=False, scale_dtype=torch.float16))
            for op, bits, m in itertools.product(ops, bits_list, ms):
                if op == "plane_matmul" and bits not in PLANES_READ:
                    continue
                x = torch.randn(m, k, generator=gen)
                out = torch.empty(m, n)
                weight_bytes = n * k * bits / 8 + n * -(-k // group_size) * 4
                copies = max(1, int(stream_mb * 2**20 // weight_bytes) + 1) if stream_mb else 1
                call, dense = (_qmatmul_call(w, bits, group_size, x, out, threads, isa,
                                             act_bits, copies)
                               if op == "qmatmul"
                               else _plane_call(parent, bits, x, out, threads, isa))
                xq = quantize_activations(x) if act_bits and op == "qmatmul" else x
                ref = xq @ dense.T
                for name, ext in (("base", base), ("this", this)):
                    call(ext)
                    err = ((out - ref).norm() / ref.norm()).item()
                    if not err <= 1e-5:
                        raise SystemExit(f"ab_cpu_kernels: {name} build is wrong on {op} "
                                         f"{n}x{k} {bits}-bit g{group_size} M={m}: {err:.2e}")
                reps = max(3, int(2e7 / (n * k)), copies)

                def timed(ext, call=call, reps=reps):
                    return lambda: [call(ext) for _ in range(reps)]

                ms_by = common.time_interleaved({"base": timed(base), "this": timed(this)},
                                                rounds=rounds)
                base_us, this_us = (ms_by[side] * 1e3 / reps for side in ("base", "this"))
                rows.append(dict(op=op, N=n, K=k, bits=bits, group_size=group_size, M=m,
                                 threads=threads, act_bits=act_bits if op == "qmatmul" else 0,
                                 weight_copies=copies,
                                 gbps_this=round(weight_bytes / this_us / 1e3, 2),
                                 base_us=round(base_us, 3),
                                 this_us=round(this_us, 3), speedup=round(base_us / this_us, 3)))
                print(f"{op:<12} {n:>6}x{k:<5} {bits}-bit g{group_size:<4} M={m}: base "
                      f"{base_us:9.1f} us  this {this_us:9.1f} us  x{base_us / this_us:.2f}"
                      f"  ({weight_bytes / this_us / 1e3:.1f} GB/s)",
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
    parser.add_argument("--ops", default="qmatmul,plane_matmul",
                        help="kernels to compare: qmatmul, plane_matmul (comma separated)")
    parser.add_argument("--isa", default="",
                        help="instruction-set build to run on both sides (avx512, avx2, generic; "
                             "default: each module's own choice)")
    parser.add_argument("--base-label", default="",
                        help="what the base build is (e.g. 'commit abc1234'), kept in the meta")
    parser.add_argument("--act-bits", type=int, choices=(0, 8), default=0,
                        help="8: int8 activations (qmatmul only; the reference product is on "
                             "the quantized activations)")
    parser.add_argument("--stream-mb", type=float, default=0.0,
                        help="cycle each qmatmul case through copies of its weight totalling "
                             "more than this many MiB, so that weights stream from DRAM (e.g. "
                             "96 with a 32 MiB L3); 0: one copy, cache-resident at small sizes")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if not args.base.is_file():
        parser.error(f"{args.base} is not a file")
    if extension() is None:
        print("ab_cpu_kernels: this checkout's pyengine._C is not built", file=sys.stderr)
        return 2
    base = _load_module(args.base)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    ops = [op for op in args.ops.split(",") if op]
    bad = [op for op in ops if op not in ("qmatmul", "plane_matmul")]
    if bad:
        parser.error(f"--ops: unknown {bad}")
    rows = ab_rows(base, shapes, args.bits, args.group_sizes, args.m, args.threads, args.rounds,
                   ops, args.isa, args.act_bits, args.stream_mb)
    if args.json:
        meta = common.metadata("cpu")
        meta.update(base=str(args.base), base_label=args.base_label, isa=args.isa or "default",
                    scale_dtype="float16",
                    activations="int8 (act_bits=8)" if args.act_bits else "float32",
                    stream_mb=args.stream_mb,
                    plane_matmul_parent="int8 RTN parent, bits = the slice precision r",
                    timing="median of round-robin rounds, each `reps` calls of one build")
        common.write_results(args.json, meta, rows)
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
