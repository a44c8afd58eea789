"""Table of a pytest-benchmark JSON written by benchmarks/test_bench_ops.py.

One row per benchmark: op, backend, bits, M, N, K, the median time in microseconds, the
interquartile range as a share of the median (how noisy the row is), the fastest round, achieved
GB/s (weights + activations + output bytes per second), the share of the device's copy bandwidth
measured in the same run, the speedup over the dense F.linear row of the same op, shape and M
(``dense``: fp32 on a CPU, fp16 on a GPU), and the cores other processes kept busy while the row
was timed (a CPU row timed beside a busy process is not to be trusted). Prints the table;
``--markdown FILE`` also writes it as markdown with the run's device, versions, settings and
machine load.

    python benchmarks/summarize_ops_bench.py benchmarks/results/ops_bench_cpu.json \\
        --markdown benchmarks/results/ops_bench_cpu.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

OP_ORDER = ("dequant_matmul", "sliced_matmul", "shortcut_matmul")
DENSE = "dense"
COLUMNS = ("op", "backend", "bits", "M", "N", "K", "median µs", "IQR %", "min µs", "GB/s",
           "% copy BW", "vs dense", "other load")
NUMERIC = set(COLUMNS[2:])


def load_rows(data: dict) -> List[dict]:
    """The benchmarks of ``data`` that carry the suite's extra_info, as flat rows with the
    median and IQR in seconds; the speedup over the dense row of the same op, shape and M."""
    rows = []
    for bench in data.get("benchmarks", []):
        info, stats = bench.get("extra_info", {}), bench.get("stats", {})
        if not {"op", "backend", "M", "N", "K", "bytes_moved"} <= info.keys() or not stats:
            continue
        rows.append(dict(info, median_s=stats["median"], iqr_s=stats["iqr"], min_s=stats["min"],
                         rounds=stats.get("rounds"), name=bench.get("name")))
    dense: Dict[Tuple, float] = {(r["op"], r["N"], r["K"], r.get("R", 0), r["M"]): r["median_s"]
                                 for r in rows if r["backend"] == DENSE}
    for r in rows:
        base = dense.get((r["op"], r["N"], r["K"], r.get("R", 0), r["M"]))
        r["speedup_vs_dense"] = None if base is None else base / r["median_s"]
    return rows


def sort_rows(rows: List[dict]) -> List[dict]:
    """By op, shape (in the order the run measured them), M, the dense row first, bits from
    high to low, backend."""
    shape_order: Dict[Tuple, int] = {}
    for r in rows:
        shape_order.setdefault((r["op"], r["N"], r["K"]), len(shape_order))
    op_rank = {op: i for i, op in enumerate(OP_ORDER)}

    def key(r: dict):
        return (op_rank.get(r["op"], len(op_rank)), r["op"], shape_order[(r["op"], r["N"], r["K"])],
                r["M"], r["backend"] != DENSE, -int(r.get("bits", 0)), r["backend"])

    return sorted(rows, key=key)


def table_cells(rows: Sequence[dict], copy_bw_gbps: Optional[float]) -> List[List[str]]:
    cells = []
    for r in rows:
        gbps = r["bytes_moved"] / r["median_s"] / 1e9
        pct = "-" if not copy_bw_gbps else f"{100 * gbps / copy_bw_gbps:.1f}"
        speedup = r["speedup_vs_dense"]
        cells.append([
            r["op"], r["backend"], str(r.get("bits", "")), str(r["M"]), str(r["N"]), str(r["K"]),
            f"{r['median_s'] * 1e6:.1f}", f"{100 * r['iqr_s'] / r['median_s']:.0f}",
            f"{r['min_s'] * 1e6:.1f}", f"{gbps:.2f}", pct, "-" if speedup is None else f"{speedup:.2f}x",
            "-" if r.get("other_load_cores") is None else f"{r['other_load_cores']:.2f}",
        ])
    return cells


def format_text(cells: List[List[str]]) -> str:
    widths = [max(len(c) for c in col) for col in zip(COLUMNS, *cells)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if name in NUMERIC else v.ljust(w)
                         for v, w, name in zip(values, widths, COLUMNS)).rstrip()

    return "\n".join([line(COLUMNS), line(["-" * w for w in widths])] + [line(c) for c in cells])


def format_markdown(cells: List[List[str]]) -> str:
    align = ["---:" if name in NUMERIC else ":---" for name in COLUMNS]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)


def describe_run(data: dict, source: str) -> List[str]:
    """Markdown bullet lines: device, versions, commit, settings and load of the run."""
    machine = data.get("machine_info", {})
    meta, run = machine.get("pyengine", {}), machine.get("ops_bench", {})
    lines = [f"* source: `{source}` (pytest-benchmark {data.get('version', '?')}, "
             f"{data.get('datetime', meta.get('date', '?'))})"]
    device = meta.get("device") or machine.get("cpu", {}).get("brand_raw", "?")
    versions = f"torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}"
    if meta.get("cuda"):
        versions += f", CUDA {meta['cuda']}, driver {meta.get('driver', '?')}"
    commit = str(meta.get("commit") or data.get("commit_info", {}).get("id", "?"))[:12]
    lines.append(f"* device: {device}; {versions}; pyengine {meta.get('pyengine', '?')}, "
                 f"commit {commit}"
                 + (f", CPU kernels {meta['cpu_isa']}" if meta.get("cpu_isa") else ""))
    if run:
        lines.append(
            f"* profile {run.get('profile')}, {run.get('activation_dtype')} activations, "
            f"backends {', '.join(run.get('backends', []))} + dense F.linear; "
            f"{run.get('seconds_per_benchmark')} s timed per row; operand rotation "
            f"{(run.get('rotate_bytes') or 0) / 2**20:.0f} MiB; torch threads "
            f"{run.get('torch_threads')} (OMP_NUM_THREADS={run.get('omp_num_threads')})")
        lines.append(f"* copy bandwidth measured in the run: {run.get('copy_bandwidth_gbps')} GB/s;"
                     f" load average (1, 5, 15 min) at start {run.get('loadavg_start')}, at end "
                     f"{run.get('loadavg_end')}; run took {run.get('wall_s')} s")
        for name, why in (run.get("not_timed") or {}).items():
            lines.append(f"* not timed: {name}: {why}")
        if run.get("note"):
            lines.append(f"* note: {run['note']}")
    lines.append("* median of the rounds (each round: the mean of its calls); IQR % = "
                 "interquartile range / median; min = the fastest round; GB/s = (weight block + "
                 "shortcut + activations + output bytes) / median; vs dense = median of the dense "
                 "F.linear row of the same op, shape and M / this median; other load = cores "
                 "kept busy by other processes while the row was timed")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--markdown", type=Path, default=None, metavar="FILE",
                        help="also write the table as markdown to FILE")
    parser.add_argument("--title", default=None, help="markdown title (default: from the run)")
    args = parser.parse_args(argv)

    try:
        data = json.loads(args.json.read_text())
    except (OSError, ValueError) as exc:
        print(f"summarize_ops_bench: cannot read {args.json}: {exc}", file=sys.stderr)
        return 2
    rows = load_rows(data)
    if not rows:
        print(f"summarize_ops_bench: {args.json} has no benchmark rows of "
              "benchmarks/test_bench_ops.py", file=sys.stderr)
        return 2
    run = data.get("machine_info", {}).get("ops_bench", {})
    cells = table_cells(sort_rows(rows), run.get("copy_bandwidth_gbps"))
    print(format_text(cells))

    if args.markdown is not None:
        device = data.get("machine_info", {}).get("pyengine", {}).get("device", "")
        title = args.title or f"pyengine ops benchmark{': ' + device if device else ''}"
        text = "\n".join([f"# {title}", ""] + describe_run(data, args.json.name)
                         + ["", format_markdown(cells), ""])
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
