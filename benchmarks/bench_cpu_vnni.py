"""The int8-activation decode with each of its run-time switches on and off, in one run:
vpdpbusd (AVX512_VNNI) or not, 512-bit or 256-bit vectors on the interleaved copy (AVX-512
build), the interleaved copy's octets in pairs of vectors or in one, and its weight streams
prefetched ahead or not (AVX2, AVX-512 and, on x86-64, generic builds).

For each shape and width, at M = 1 with group 128, each kernel timed with its switch on and
off, alternating (pyengine.benchmarking.time_interleaved: medians), weights in rotated copies
beyond the last-level cache as in bench_cpu_kernels.py:

* ``--switch vnni`` (default): the kernels on the canonical rows (``ops.qlinear(...,
  act_bits=8)``) and on the decoder's row-interleaved copy, with ``PYENGINE_CPU_VNNI=1``
  (vpdpbusd) and ``=0`` (vpmaddubsw pair sums); needs a CPU with AVX512_VNNI
  (``cpu_vnni_ab.json``). On the canonical rows the kernels take vpdpbusd for 8-bit codes only
  (act8_kernels.cpp: dpbusd): the other widths' canonical rows ignore the switch (they show the
  noise of two identical paths). The interleaved copy takes it for every width.
* ``--switch zmm``: the interleaved copy with ``PYENGINE_CPU_ZMM=1`` (two octets of rows per
  512-bit vector) and ``=0`` (one per 256-bit vector) (``cpu_zmm_ab.json``).
* ``--switch pairs``: the interleaved copy with ``PYENGINE_CPU_VECTOR_PAIRS=1`` (a pair of
  vectors, two weight streams in flight: two octets of rows in 256-bit vectors, four in
  512-bit ones; in the generic build two octets of 8-bit codes) and ``=0`` (one vector)
  (``cpu_pairs_ab.json``; with ``--isa avx2`` the AVX2 build's, ``cpu_pairs_ab_avx2.json``,
  and so on).
* ``--switch prefetch``: the interleaved copy with ``PYENGINE_CPU_PREFETCH=1`` (the 256-bit
  vectors' and the generic build's weight streams prefetched ahead of their loads) and ``=0``
  (``cpu_prefetch_ab.json``, ``cpu_prefetch_ab_avx2.json`` with ``--isa avx2``, and so on); in
  the AVX-512 build only its 256-bit vectors prefetch (run it with ``PYENGINE_CPU_ZMM=0`` and
  ``--json``, the path of CPUs without full-width 512-bit units).

Both settings of each switch give the same bits (tests/backends/test_cpu_interleave.py); this
measures only their speed.

    python benchmarks/bench_cpu_vnni.py [--switch zmm|pairs|prefetch] [--isa avx2] \\
        [--shapes 14336x4096,4096x14336] [--bits 8]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cpu_kernels as kernels  # noqa: E402
import common  # noqa: E402

import pyengine  # noqa: E402

class Switch(NamedTuple):
    """One run-time switch of the cpu backend, as this benchmark times it."""
    variable: str  # its environment variable (a key of pyengine.backends.cpu.SWITCH_VARIABLES)
    paths: Tuple[str, str]  # the names of its paths on and off
    layouts: Tuple[str, ...]  # the layouts it changes ("canonical", "rows8")
    builds: Tuple[str, ...]  # the cpu builds that have both paths


SWITCHES = {"vnni": Switch("PYENGINE_CPU_VNNI", ("vnni", "pairs"), ("canonical", "rows8"),
                           ("avx512",)),
            "zmm": Switch("PYENGINE_CPU_ZMM", ("zmm", "ymm"), ("rows8",), ("avx512",)),
            "pairs": Switch("PYENGINE_CPU_VECTOR_PAIRS", ("pairs", "single"), ("rows8",),
                            ("avx512", "avx2", "generic")),
            "prefetch": Switch("PYENGINE_CPU_PREFETCH", ("prefetch", "noprefetch"), ("rows8",),
                               ("avx512", "avx2", "generic"))}


def _with_switch(variable: str, enabled: bool, call: Callable[[], object]) -> Callable[[], object]:
    """call() with the switch ``variable`` set for it (the kernels read it at every call)."""
    value = "1" if enabled else "0"

    def run():
        os.environ[variable] = value
        return call()
    return run


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--switch", choices=sorted(SWITCHES), default="vnni")
    parser.add_argument("--shapes", default="14336x4096,4096x14336")
    parser.add_argument("--bits", default="8")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--rotate-mb", type=int, default=common.default_rotate_mb())
    parser.add_argument("--isa", default="",
                        help="the cpu backend's instruction-set build (default: the best here)")
    parser.add_argument("--json", type=Path, default=None,
                        help="default benchmarks/results/cpu_<switch>_ab[_<isa>].json")
    args = parser.parse_args(argv)
    switch = SWITCHES[args.switch]
    variable, (on, off), layouts = switch.variable, switch.paths, switch.layouts
    info = pyengine.build_info()
    isa = args.isa or info.get("cpu_isa_selected")
    why_not = common.use_cpu_isa(args.isa) if args.isa else None
    if why_not:
        print(why_not)
        return 1
    if isa not in switch.builds or (args.switch == "vnni" and not info.get("cpu_vnni")):
        print(f"--switch {args.switch} needs the {' or '.join(switch.builds)} build (and for "
              f"vnni a CPU with AVX512_VNNI): build {isa}, cpu_vnni {info.get('cpu_vnni')}")
        return 1
    saved = os.environ.get(variable)
    torch.manual_seed(0)
    meta = common.metadata("cpu")
    meta["cpu_isa"] = isa
    # meta["cpu_switches"]: the switches as the run found them (the one timed is set per call)
    rows: List[Dict[str, object]] = []
    try:
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.lower().split("x"))
            w = torch.randn(n, k) * 0.02
            x = torch.randn(1, k)
            for bits in (int(b) for b in args.bits.split(",")):
                qw = pyengine.quantize(w, bits, 128, clip_search=False)
                copies = kernels._copies(qw, qw.nbytes, args.rotate_mb, kernels._copy_qweight)
                calls = {}
                if "canonical" in layouts:
                    calls["canonical"] = (qw.nbytes, common.rotating(
                        copies, lambda q: pyengine.ops.qlinear(x, q, act_bits=8, backend="cpu")))
                rows8 = kernels.rows8_kernel(copies, x, n, k)
                if rows8 is not None:
                    calls["rows8"] = (rows8.nbytes, rows8.call)
                fns = {f"{layout} {path}": _with_switch(variable, path == on, call)
                       for layout, (_, call) in calls.items() for path in (on, off)}
                times = common.time_interleaved(fns, rounds=args.rounds)
                for layout, (nbytes, _) in calls.items():
                    ms_on, ms_off = times[f"{layout} {on}"], times[f"{layout} {off}"]
                    rows.append({"op": "dequant_matmul", "backend": "cpu", "layout": layout,
                                 "bits": bits, "group_size": 128, "M": 1, "N": n, "K": k,
                                 "activations": "int8", f"ms_{on}": ms_on, f"ms_{off}": ms_off,
                                 f"gbps_{on}": nbytes / (ms_on * 1e-3) / 1e9,
                                 f"speedup_{on}": ms_off / ms_on})
                    print(f"{shape:>12} int{bits} {layout:>9}: {on} {ms_on:.3f} ms, "
                          f"{off} {ms_off:.3f} ms, {ms_off / ms_on:.3f}x", flush=True)
                del copies
    finally:
        if saved is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = saved
    suffix = f"_{args.isa}" if args.isa else ""
    out = args.json or common.RESULTS / f"cpu_{args.switch}_ab{suffix}.json"
    common.write_results(out, meta, rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
