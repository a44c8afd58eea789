"""The decoder's interleaved weight copies in huge pages against the same copies in 4 KiB
pages, in one run: the int8-activation decode kernel at M = 1 on both, alternating.

For each shape, width and thread count: CpuBackend.bind's prepared call made twice from the same
weight, once as it is (the copy in huge-page memory, pyengine.backends.huge_pages) and once
with ``PYENGINE_HUGE_PAGES=0`` (the copy in memory advised ``MADV_NOHUGEPAGE``), each in
enough copies to stream ``--rotate-mb`` MB per pass (past the last-level cache), timed
round-robin (pyengine.benchmarking.time_interleaved: medians). Both give the same bits
(tests/backends/test_huge_pages.py); this measures only their speed. Also the copy bandwidth of both memories.

    python benchmarks/bench_huge_pages.py [--isa avx2] [--bits 2,3,4,8] [--threads 1,2]

Needs Linux with transparent huge pages set to ``always`` or ``madvise``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import pyengine  # noqa: E402
from pyengine.backends import CpuBackend, huge_pages  # noqa: E402
from pyengine.backends.base import PackedOperand  # noqa: E402


def _bound_copies(qw, n: int, k: int, backend: CpuBackend, count: int, huge: bool) -> list:
    """``count`` prepared int8-activation calls of qw, each on a copy of its own, with the
    interleaved copies in huge pages (huge) or in small pages."""
    saved = os.environ.get(huge_pages.VARIABLE)
    os.environ[huge_pages.VARIABLE] = "1" if huge else "0"
    try:
        calls = []
        for _ in range(count):
            op = PackedOperand(qw.qweight.clone(), qw.scales, qw.zeros, qw.bits,
                               qw.effective_group_size)
            call = backend.bind(op, n, k, None, act_bits=8)
            assert bool(huge_pages.huge_pages_eligible(call.keep[2][0])) == huge
            calls.append(call)
        return calls
    finally:
        if saved is None:
            os.environ.pop(huge_pages.VARIABLE, None)
        else:
            os.environ[huge_pages.VARIABLE] = saved


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="14336x4096,4096x14336")
    parser.add_argument("--bits", default="2,3,4,8")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--isa", default="", help="the cpu backend's build (default: the best)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--rotate-mb", type=int, default=common.default_rotate_mb())
    parser.add_argument("--json", type=Path, default=None,
                        help="default: benchmarks/results/cpu_huge_pages_ab[_ISA].json")
    args = parser.parse_args(argv)
    why = huge_pages.unavailable_reason()
    if why is not None:
        print(f"bench_huge_pages: {why}")
        return 1
    backend = CpuBackend(isa=args.isa)
    if backend.unavailable_reason() is not None:
        print(f"the cpu backend is not available: {backend.unavailable_reason()}")
        return 1
    if backend.selected_isa() not in ("avx2", "avx512"):
        print(f"the {backend.selected_isa()} build makes no interleaved copies")
        return 1
    torch.manual_seed(0)
    meta = common.metadata("cpu")
    meta.update(cpu_isa=backend.selected_isa(), rotate_mb=args.rotate_mb, group_size=128)
    rows: List[Dict[str, object]] = []
    threads_list = [int(t) for t in args.threads.split(",")]
    for threads in threads_list:
        torch.set_num_threads(threads)
        ordinary = common.copy_bandwidth_gbps("cpu")
        huge = common.copy_bandwidth_gbps("cpu", huge_pages=True)
        meta[f"copy_gbps_{threads}_threads"] = {"ordinary": round(ordinary, 1),
                                                "huge_pages": round(huge, 1)}
        print(f"{threads} threads: copy {ordinary:.1f} GB/s, in huge pages {huge:.1f} GB/s")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        w = torch.randn(n, k) * 0.02
        x = torch.randn(1, k)
        out = torch.empty(1, n)
        for bits in (int(b) for b in args.bits.split(",")):
            qw = pyengine.quantize(w, bits, 128, clip_search=False)
            count = max(2, -(-args.rotate_mb * 10**6 // qw.nbytes))
            calls = {"huge": _bound_copies(qw, n, k, backend, count, True),
                     "ordinary": _bound_copies(qw, n, k, backend, count, False)}
            first = {}
            for name, cs in calls.items():
                first[name] = torch.full((1, n), float("nan"))
                cs[0](x, first[name], False)
            assert torch.equal(first["huge"], first["ordinary"])
            nbytes = calls["huge"][0].prepared_bytes
            for threads in threads_list:
                fns = {name: common.rotating(cs, lambda c, t=threads: c(x, out, False, t))
                       for name, cs in calls.items()}
                times = common.time_interleaved(fns, rounds=args.rounds)
                ms_huge, ms_ordinary = times["huge"], times["ordinary"]
                rows.append(dict(op="dequant_matmul", backend="cpu rows8", bits=bits,
                                 group_size=128, M=1, N=n, K=k, activations="int8",
                                 threads=threads, ms_huge_pages=ms_huge,
                                 ms_ordinary=ms_ordinary,
                                 gbps_huge_pages=nbytes / (ms_huge * 1e-3) / 1e9,
                                 gbps_ordinary=nbytes / (ms_ordinary * 1e-3) / 1e9,
                                 speedup_huge_pages=ms_ordinary / ms_huge))
                print(f"{shape:>12} int{bits} t={threads}: huge pages {ms_huge:.3f} ms, "
                      f"ordinary {ms_ordinary:.3f} ms, {ms_ordinary / ms_huge:.2f}x", flush=True)
            del calls
    suffix = "" if backend.selected_isa() == "avx512" else f"_{backend.selected_isa()}"
    out_path = args.json or common.RESULTS / f"cpu_huge_pages_ab{suffix}.json"
    common.write_results(out_path, meta, rows)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
