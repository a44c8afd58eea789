"""Turns benchmark JSON into PNGs.

* Kernel rows (bench_gpu_kernels.py, bench_cpu_kernels.py, `pyengine bench --json`): a roofline
  view, achieved GB/s of each (op, backend) against bits, one panel per M, with the device's
  copy bandwidth measured in the same run as a horizontal line.
* Decode rows (bench_decode.py): tokens/s bars per model variant and batch, annotated with the
  percentage of the memory roofline reached.

    python benchmarks/plot_results.py benchmarks/results/cpu_kernels.json
    python benchmarks/plot_results.py benchmarks/results/decode_cuda.json --out decode.png

Each PNG is written next to its JSON (same name, .png) unless --out is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional


def load(path: Path) -> Dict[str, object]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "rows" not in data:
        raise ValueError(f"{path}: not a benchmark result file (no 'rows')")
    return data


def kind_of(rows: List[Dict[str, object]]) -> str:
    """'decode' for end-to-end decode rows, 'kernel' for op rows with bytes/s."""
    ops = {r.get("op") for r in rows}
    if "decode" in ops:
        return "decode"
    if any("gbps" in r and "M" in r for r in rows):
        return "kernel"
    raise ValueError(f"no plottable rows (ops: {sorted(map(str, ops))})")


def plot_kernels(data: Dict[str, object], out: Path) -> Path:
    """Achieved GB/s against bits, one panel per M, one line per (op, backend[, activations]); the
    measured copy bandwidth as the roofline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    meta = data.get("meta", {})
    rows = [r for r in data["rows"] if "gbps" in r and "M" in r and r.get("gbps") is not None]
    ms = sorted({int(r["M"]) for r in rows})
    fig, axes = plt.subplots(1, len(ms), figsize=(4.2 * len(ms), 3.8), sharey=True, squeeze=False)
    bandwidth = meta.get("copy_bandwidth_gbps")
    for ax, m in zip(axes[0], ms):
        series: Dict[str, Dict[int, List[float]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if int(r["M"]) == m:
                label = f"{r['op']} / {r['backend']}"
                if "activations" in r:  # e.g. the CPU peers' bf16 rows beside fp32 ones
                    label += f" / {r['activations']}"
                series[label][int(r["bits"])].append(float(r["gbps"]))
        for label, by_bits in sorted(series.items()):
            bits = sorted(by_bits)
            # several shapes per point: plot their median
            gbps = [sorted(by_bits[b])[len(by_bits[b]) // 2] for b in bits]
            ax.plot(bits, gbps, marker="o", label=label)
        if bandwidth:
            ax.axhline(float(bandwidth), color="black", linestyle="--", linewidth=1,
                       label=f"copy bandwidth {float(bandwidth):.0f} GB/s")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("weight bits")
        ax.set_title(f"M = {m}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("achieved GB/s (median over shapes)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{meta.get('device', '?')} ({meta.get('date', '?')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_decode(data: Dict[str, object], out: Path) -> Path:
    """Tokens/s per model variant, one bar group per batch size, labelled with % of roofline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    meta = data.get("meta", {})
    rows = [r for r in data["rows"] if r.get("op") == "decode"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    batches = sorted({int(r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.8), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        by_model = {r["model"]: r for r in rows if int(r["batch"]) == batch}
        names = [m for m in models if m in by_model]
        values = [float(by_model[m]["tokens_per_s"]) for m in names]
        bars = ax.bar(range(len(names)), values, color="tab:blue")
        for bar, m in zip(bars, names):
            ax.annotate(f"{by_model[m]['pct_roofline']:.0f}%", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"batch {batch} (labels: % of memory roofline)", fontsize=9)
        ax.set_ylabel("decode tokens/s")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{meta.get('shape', '?')} on {meta.get('device', '?')} ({meta.get('date', '?')})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot(path: Path, out: Optional[Path] = None) -> Path:
    """Plots one result file; returns the PNG's path."""
    data = load(path)
    out = out or path.with_suffix(".png")
    kind = kind_of(data["rows"])
    return plot_kernels(data, out) if kind == "kernel" else plot_decode(data, out)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, nargs="+", help="benchmark result files")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (one input only)")
    args = parser.parse_args(argv)
    if args.out is not None and len(args.json) > 1:
        parser.error("--out takes one input file")
    for path in args.json:
        try:
            print(f"wrote {plot(path, args.out)}")
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
