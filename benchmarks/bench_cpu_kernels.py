"""CPU kernel benchmark: the ``cpu`` backend's quantized matmul against fp32 F.linear.

Measures, in one run, the machine's copy bandwidth, the fp32 dense baseline and the quantized
kernels at each bit width, and prints the ratios (the issue's floors at M = 1, 14336 x 4096,
group 128: int8 >= 2x, int4 >= 3x, int2 >= 4x faster than fp32) with the achieved fraction of
the copy bandwidth. Writes JSON rows to benchmarks/results/ (--json to choose the file).

    python benchmarks/bench_cpu_kernels.py [--shapes 14336x4096,4096x4096] [--m 1,8,123]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import pyengine  # noqa: E402

FLOORS_M1 = {8: 2.0, 4: 3.0, 2: 4.0}  # speedup over fp32 F.linear at M = 1, 14336 x 4096, g128


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="14336x4096", help="NxK list, comma separated")
    parser.add_argument("--m", default="1,8,123", help="batch sizes M, comma separated")
    parser.add_argument("--bits", default="8,4,3,2")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--json", type=Path, default=common.RESULTS / "cpu_kernels.json")
    args = parser.parse_args(argv)

    if "cpu" not in pyengine.available_backends():
        print(f"the cpu backend is not available: {pyengine.build_info()['extension_error']}")
        return 1
    torch.manual_seed(0)
    copy_bw = common.copy_bandwidth_gbps("cpu")
    meta = common.metadata("cpu")
    meta["copy_bandwidth_gbps"] = round(copy_bw, 2)
    print(f"{meta['device']}, kernels: {meta['cpu_isa']}; copy bandwidth {copy_bw:.1f} GB/s")

    rows = []
    failures = []
    header = f"{'N x K':>12} {'M':>4} {'kernel':>10} {'ms':>8} {'GB/s':>7} {'%copy':>6} {'vs fp32':>8}"
    print(header)
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        w = torch.randn(n, k) * 0.02
        bits_list = [int(b) for b in args.bits.split(",")]
        qweights = {bits: pyengine.quantize(w, bits, args.group_size, clip_search=False)
                    for bits in bits_list}
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k)
            act_bytes = (m * k + m * n) * 4
            fns = {"fp32": lambda: F.linear(x, w)}
            for bits, qw in qweights.items():
                fns[f"int{bits}"] = (lambda qw=qw: pyengine.ops.dequant_matmul(x, qw, backend="cpu"))
            times = common.time_interleaved(fns, rounds=args.reps)
            base_ms = times["fp32"]
            for name, ms in times.items():
                bits = 32 if name == "fp32" else int(name[3:])
                nbytes = w.numel() * 4 if name == "fp32" else qweights[bits].nbytes
                gbps = (nbytes + act_bytes) / (ms * 1e-3) / 1e9
                speedup = base_ms / ms
                rows.append(dict(op="linear" if name == "fp32" else "dequant_matmul",
                                 backend="torch" if name == "fp32" else "cpu", bits=bits,
                                 group_size=0 if name == "fp32" else args.group_size, M=m, N=n,
                                 K=k, ms=ms, gbps=gbps, pct_copy_bw=100 * gbps / copy_bw,
                                 speedup_vs_fp32=speedup))
                print(f"{shape:>12} {m:>4} {name:>10} {ms:8.3f} {gbps:7.1f} "
                      f"{100 * gbps / copy_bw:6.1f} {speedup:8.2f}")
                if m == 1 and (n, k) == (14336, 4096) and args.group_size == 128:
                    floor = FLOORS_M1.get(bits)
                    if floor and speedup < floor:
                        failures.append(f"{name}: {speedup:.2f}x < {floor}x")
    common.write_results(args.json, meta, rows)
    print(f"wrote {args.json}")
    if failures:
        print("below the floors: " + "; ".join(failures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
