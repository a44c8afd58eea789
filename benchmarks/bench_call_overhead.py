"""Per-call cost of small layers at M = 1 on the CPU: ``pyengine.ops.qlinear`` on an int4 g128
weight (float32 activations: the exact kernel; ``act_bits=8``: the integer path) against fp32
``F.linear`` on the dense weight, and the prepared kernel call (``pyengine.ops.bind_linear``)
that a decode loop makes, which shows how much of a call is the kernel itself.

Small layers are where a per-call cost shows: at 256 x 512 an int4 weight is 64 KiB, so a call's
arguments, checks and allocation weigh as much as its arithmetic. The weights stay in the
caches (every function calls the same weight), as a small model's do between tokens. Each
sample times ``--inner`` back-to-back calls; the functions are sampled round-robin
(``pyengine.benchmarking.time_interleaved``) and medians reported, per thread count.

    python benchmarks/bench_call_overhead.py [--shapes 256x512,576x576,1536x576] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import pyengine  # noqa: E402
from pyengine import ops  # noqa: E402
from pyengine.benchmarking import metadata, time_interleaved, write_json  # noqa: E402


def _repeated(fn: Callable[[], object], inner: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(inner):
            fn()
    return run


def _functions(n: int, k: int, gen: torch.Generator) -> Dict[str, Callable[[], object]]:
    """The timed calls for one [n, k] layer at M = 1, each checked against the dense product
    of its weight first."""
    dense = torch.randn(n, k, generator=gen) * 0.05
    qw = pyengine.quantize(dense, 4, 128, clip_search=False)
    x = torch.randn(1, k, generator=gen)
    out = torch.empty(1, n)
    bound = ops.bind_linear(qw)
    bound_a8 = ops.bind_linear(qw, act_bits=8)
    want = F.linear(x, qw.dequantize(torch.float32))
    scale = want.abs().max().item()
    for name, got, tol in (("qlinear", ops.qlinear(x, qw), 1e-4),
                           ("qlinear a8", ops.qlinear(x, qw, act_bits=8), 2e-2)):
        err = (got - want).abs().max().item() / scale
        if err > tol:
            raise SystemExit(f"{name} {n}x{k}: relative error {err:.2e} > {tol:.0e}")
    return {
        "F.linear fp32": lambda: F.linear(x, dense),
        "qlinear int4": lambda: ops.qlinear(x, qw),
        "qlinear int4 a8": lambda: ops.qlinear(x, qw, act_bits=8),
        "prepared int4": lambda: bound(x, out, False),
        "prepared int4 a8": lambda: bound_a8(x, out, False),
    }


def main(argv: "List[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="256x512,576x576,1536x576",
                        help="NxK list, comma separated")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--inner", type=int, default=200, help="calls per timed sample")
    parser.add_argument("--rounds", type=int, default=15, help="samples per function")
    parser.add_argument("--json", type=Path, default=common.RESULTS / "call_overhead.json")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    rows: List[Dict[str, object]] = []
    print(f"{'shape':>10} {'threads':>7} " + " ".join(f"{name:>17}" for name in (
        "F.linear fp32", "qlinear int4", "qlinear int4 a8", "prepared int4",
        "prepared int4 a8")) + "   (us per call)")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        fns = _functions(n, k, gen)
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            ms = time_interleaved({name: _repeated(fn, args.inner) for name, fn in fns.items()},
                                  rounds=args.rounds)
            us = {name: v * 1e3 / args.inner for name, v in ms.items()}
            print(f"{shape:>10} {threads:>7} " + " ".join(f"{v:>17.2f}" for v in us.values()))
            rows += [{"shape": shape, "N": n, "K": k, "M": 1, "threads": threads, "call": name,
                      "us": round(v, 3)} for name, v in us.items()]
    write_json(args.json, {**metadata("cpu"), "inner": args.inner, "rounds": args.rounds,
                           "weight": "int4 g128 asymmetric, float32 scales"}, rows)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
