"""Shared pieces of pyengine's benchmark scripts: where results go, and the package's timing,
bandwidth and metadata helpers (pyengine.benchmarking, also used by `pyengine bench`).

Every result file is JSON: {"meta": {...device, versions, commit, date...}, "rows": [...]}.
Rows carry at least: op, backend, bits, group_size, M, N, K, ms, gbps, pct_copy_bw and a
speedup against the dense baseline measured in the same run.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Dict, List, Optional

from pyengine.benchmarking import (copy_bandwidth_gbps, cpu_streaming_bytes,  # noqa: F401
                                   device_name, last_level_cache_bytes, metadata, synchronize,
                                   time_cpu, time_cuda, time_interleaved, write_json)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def default_rotate_mb() -> int:
    """MB of weight copies a kernel benchmark streams per pass: 256, or three times the CPU's
    last-level cache where that is larger (each call then reads a copy the caches no longer
    hold)."""
    return max(256, 3 * (last_level_cache_bytes() or 0) // 10**6)


def huge_page_copy_bandwidth_gbps(device: str) -> Optional[float]:
    """:func:`copy_bandwidth_gbps` in the huge-page memory of the decoder's weight copies, on a
    CPU whose OS has huge pages (pyengine.backends.huge_pages); None elsewhere."""
    from pyengine.backends import huge_pages
    if device != "cpu" or huge_pages.unavailable_reason() is not None:
        return None
    return copy_bandwidth_gbps(device, huge_pages=True)


def write_results(path: Path, meta: Dict[str, object], rows: List[Dict[str, object]]) -> None:
    write_json(path, meta, rows)


def add_report_args(parser: argparse.ArgumentParser, name: str) -> None:
    """The options of a script whose results are NAME.json, .md and .png: --out (their path
    without the suffix, default benchmarks/results/NAME) and --report-only (rewrite the
    markdown and the plot from the JSON, measure nothing)."""
    parser.add_argument("--out", type=Path, default=RESULTS / name)
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the markdown and the plot from the JSON, measure nothing")


def use_cpu_isa(isa: str) -> Optional[str]:
    """Make the cpu backend run its ``isa`` build (``"avx2"``, ``"avx512"``, ``"generic"``) for
    the rest of the process, so one CPU times the builds other CPUs get. Returns None, or why this
    CPU cannot run that build (nothing is changed then)."""
    import pyengine
    from pyengine.backends import CpuBackend, register_backend
    usable = pyengine.build_info()["cpu_isas_usable"]
    if isa not in usable:
        return f"this CPU cannot run the {isa!r} build (it runs {usable})"
    register_backend(CpuBackend(isa=isa))
    return None


def rotating(items: list, fn: Callable) -> Callable[[], object]:
    """A call that applies fn to the next of items each time (round robin): each call of a timed
    kernel takes the next copy of its weight, so that together they stream past the caches."""
    state = {"i": 0}

    def call():
        item = items[state["i"]]
        state["i"] = (state["i"] + 1) % len(items)
        return fn(item)
    return call
