"""The AVX-512 build's int8-activation decode with and without vpdpbusd (AVX512_VNNI), in one run.

For each shape and width, at M = 1 with group 128: the kernels on the canonical rows
(``ops.qlinear(..., act_bits=8)``) and on the decoder's row-interleaved copy, each timed with
``PYENGINE_CPU_VNNI=1`` (vpdpbusd) and ``=0`` (vpmaddubsw pair sums), alternating
(pyengine.benchmarking.time_interleaved: medians), weights in rotated copies beyond the
last-level cache as in bench_cpu_kernels.py. Both paths give the same bits
(tests/backends/test_cpu_interleave.py); this measures only their speed. Needs a CPU with
AVX512_VNNI.

    python benchmarks/bench_cpu_vnni.py [--shapes 14336x4096,4096x14336] [--bits 8]

On the canonical rows the kernels take vpdpbusd for 8-bit codes only (act8_kernels.cpp:
dpbusd): the other widths' canonical rows ignore the switch (they show the noise of two
identical paths). The interleaved copy takes it for every width.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cpu_kernels as kernels  # noqa: E402
import common  # noqa: E402

import pyengine  # noqa: E402

VARIABLE = "PYENGINE_CPU_VNNI"


def _with_vnni(enabled: bool, call: Callable[[], object]) -> Callable[[], object]:
    """call() with the VNNI switch set for it (the kernels read it at every call)."""
    value = "1" if enabled else "0"

    def run():
        os.environ[VARIABLE] = value
        return call()
    return run


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="14336x4096,4096x14336")
    parser.add_argument("--bits", default="8")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--rotate-mb", type=int, default=common.default_rotate_mb())
    parser.add_argument("--json", type=Path, default=common.RESULTS / "cpu_vnni_ab.json")
    args = parser.parse_args(argv)
    info = pyengine.build_info()
    if info.get("cpu_isa_selected") != "avx512" or not info.get("cpu_vnni"):
        print("needs the avx512 build on a CPU with AVX512_VNNI "
              f"(selected {info.get('cpu_isa_selected')}, cpu_vnni {info.get('cpu_vnni')})")
        return 1
    saved = os.environ.get(VARIABLE)
    torch.manual_seed(0)
    meta = common.metadata("cpu")
    rows: List[Dict[str, object]] = []
    try:
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.lower().split("x"))
            w = torch.randn(n, k) * 0.02
            x = torch.randn(1, k)
            for bits in (int(b) for b in args.bits.split(",")):
                qw = pyengine.quantize(w, bits, 128, clip_search=False)
                copies = kernels._copies(qw, qw.nbytes, args.rotate_mb, kernels._copy_qweight)
                calls = {"canonical": (qw.nbytes, common.rotating(
                    copies, lambda q: pyengine.ops.qlinear(x, q, act_bits=8, backend="cpu")))}
                rows8 = kernels.rows8_kernel(copies, x, n, k)
                if rows8 is not None:
                    calls["rows8"] = (rows8.nbytes, rows8.call)
                fns = {f"{layout} {path}": _with_vnni(path == "vnni", call)
                       for layout, (_, call) in calls.items() for path in ("vnni", "pairs")}
                times = common.time_interleaved(fns, rounds=args.rounds)
                for layout, (nbytes, _) in calls.items():
                    vnni, pairs = times[f"{layout} vnni"], times[f"{layout} pairs"]
                    rows.append(dict(op="dequant_matmul", backend="cpu", layout=layout, bits=bits,
                                     group_size=128, M=1, N=n, K=k, activations="int8",
                                     ms_vnni=vnni, ms_pairs=pairs,
                                     gbps_vnni=nbytes / (vnni * 1e-3) / 1e9,
                                     speedup_vnni=pairs / vnni))
                    print(f"{shape:>12} int{bits} {layout:>9}: vpdpbusd {vnni:.3f} ms, "
                          f"pair sums {pairs:.3f} ms, {pairs / vnni:.3f}x", flush=True)
                del copies
    finally:
        if saved is None:
            os.environ.pop(VARIABLE, None)
        else:
            os.environ[VARIABLE] = saved
    common.write_results(args.json, meta, rows)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
