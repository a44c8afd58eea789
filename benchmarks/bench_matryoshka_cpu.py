"""CPU benchmark of the Matryoshka plane kernel: matryoshka_matmul at r = 8, 4, 2 on the C++
plane-layout kernel against the canonical quantized kernel (pyengine.ops.dequant_matmul on a
pyengine.quantize(...) weight) at the same bits, fp32 activations.

Both run on the ``cpu`` backend of pyengine._C in the same process, timed round-robin (medians of
``--reps`` rounds after warm-up). The Matryoshka weight is one int8 parent in bit planes served at
each precision (an r-bit call reads 3/8 of the parent's code bytes for r = 2, 5/8 for r = 4, all
of them for r = 8); the canonical weight is a separate r-bit weight. Shapes: SmolLM2-135M's MLP
(1536 x 576, 576 x 1536) and 4096 x 4096, M = 1 (decode) and 16. Writes
benchmarks/results/matryoshka_cpu.json (--json to choose the file) and prints a table.

    OMP_NUM_THREADS=2 python benchmarks/bench_matryoshka_cpu.py [--shapes 1536x576,...] [--m 1,16]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import pyengine  # noqa: E402
from pyengine import MatryoshkaWeight  # noqa: E402
from pyengine.ops import backend_for, matryoshka_matmul  # noqa: E402

DEFAULT_SHAPES = "1536x576,576x1536,4096x4096"


def _worktree_dirty() -> bool:
    """Whether the measured code differs from the commit in the metadata (tracked files changed)."""
    try:
        return subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=common.ROOT,
                              timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="NxK list, comma separated")
    parser.add_argument("--m", default="1,16", help="batch sizes M, comma separated")
    parser.add_argument("--bits", default="8,4,2")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--json", type=Path, default=common.RESULTS / "matryoshka_cpu.json")
    args = parser.parse_args(argv)

    probe = MatryoshkaWeight.from_codes(torch.zeros(1, 32, dtype=torch.int64), torch.ones(1, 1),
                                        None, group_size=32, shape=(1, 32))
    if backend_for(torch.zeros(1, 32), probe.at(4)) != "cpu":
        print(f"the C++ plane kernel is not available: {pyengine.build_info()}")
        return 1
    torch.manual_seed(0)
    meta = common.metadata("cpu")
    meta.update(threads=torch.get_num_threads(), group_size=args.group_size,
                activations="float32", timing=f"median of {args.reps} interleaved rounds",
                uncommitted_changes=_worktree_dirty())
    print(f"{meta['device']}, kernels: {meta['cpu_isa']}, torch {meta['torch']}, "
          f"commit {meta['commit'][:12]}")

    bits_list = [int(b) for b in args.bits.split(",")]
    rows = []
    print(f"{'N x K':>11} {'M':>3} {'bits':>4} {'matryoshka ms':>14} {'canonical ms':>13} "
          f"{'ratio':>6} {'plane bytes':>12}")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        w = torch.randn(n, k) * 0.02
        parent = MatryoshkaWeight.from_quantized(
            pyengine.quantize(w, 8, args.group_size, clip_search=False))
        canonical = {bits: pyengine.quantize(w, bits, args.group_size, clip_search=False)
                     for bits in bits_list}
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k)
            fns = {}
            for bits in bits_list:
                fns[("mat", bits)] = (lambda r=bits: matryoshka_matmul(x, parent, r,
                                                                       backend="cpu"))
                fns[("can", bits)] = (lambda qw=canonical[bits]:
                                      pyengine.ops.dequant_matmul(x, qw, backend="cpu"))
            times = common.time_interleaved(fns, rounds=args.reps)
            for bits in bits_list:
                mat_ms, can_ms = times[("mat", bits)], times[("can", bits)]
                read = parent.code_bytes_read(bits)
                base = dict(backend="cpu", bits=bits, group_size=args.group_size, M=m, N=n, K=k)
                rows.append(dict(op="matryoshka_matmul", matryoshka=True, ms=mat_ms,
                                 code_bytes_read=read, **base))
                rows.append(dict(op="dequant_matmul", matryoshka=False, ms=can_ms,
                                 code_bytes_read=canonical[bits].qweight.numel() * 4, **base))
                print(f"{shape:>11} {m:>3} {bits:>4} {mat_ms:14.3f} {can_ms:13.3f} "
                      f"{mat_ms / can_ms:6.2f} {read:>12}")
    common.write_results(args.json, meta, rows)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
