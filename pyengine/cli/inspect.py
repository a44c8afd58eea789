"""``pyengine inspect DIR``: the per-layer table and plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

from torch import nn

from .checks import check_output_file, check_plot_file, write_text
from .common import describe_recipe, load_model, mib, require_supported
from .eval import bits_per_weight_or_none, describe_bits


def layer_table(model: nn.Module) -> List[Dict[str, Any]]:
    """One row per decoder layer: index, scores (when the recipe holds them), bits (weighted
    mean over the layer's linears), the bit widths present, kept widths and bytes."""
    from ..pipeline.compress import RECIPE_ATTR, layer_report
    from ..model.adapters import get_adapter
    from ..nn.sliced import ResidualProjection
    from ..slicing.structure import describe_structure
    adapter = get_adapter(model)
    n_layers = len(adapter.decoder_layers(model))
    hidden = model.config.hidden_size
    recipe = getattr(model, RECIPE_ATTR, None)
    info = dict(recipe.info) if recipe is not None else {}
    scores = info.get("scores") or {}
    structure = describe_structure(model)
    prefix = adapter.layers + "."
    rows = [dict(layer=i, bits=0.0, bit_widths=[], attn_width=hidden, mlp_width=hidden,
                 bytes=0, weights=0) for i in range(n_layers)]
    for entry in layer_report(model):
        index = adapter.layer_index(entry["name"])
        if index is None:
            continue
        row = rows[index]
        n, k = entry["shape"]
        row["bits"] += entry["bits"] * n * k
        row["weights"] += n * k
        row["bytes"] += entry["bytes"]
        if entry["bits"] not in row["bit_widths"]:
            row["bit_widths"].append(entry["bits"])
    for name, module in model.named_modules():
        if isinstance(module, ResidualProjection) and module.shortcut is not None \
                and name.startswith(prefix):
            rows[adapter.layer_index(name)]["bytes"] += \
                module.shortcut.numel() * module.shortcut.element_size()
    if structure:
        for row, desc in zip(rows, structure["layers"]):
            row["attn_width"], row["mlp_width"] = desc["attn_width"], desc["mlp_width"]
    for i, row in enumerate(rows):
        row["bits"] = row["bits"] / row["weights"] if row["weights"] else float("nan")
        row["bit_widths"] = sorted(row["bit_widths"], reverse=True)
        for key in ("lim", "zd", "lr"):
            values = scores.get(key)
            if values is not None and i < len(values):
                row[key] = values[i]
        del row["weights"]
    return rows


def plot_layers(rows: Sequence[Dict[str, Any]], hidden: int, path: Path, title: str) -> None:
    """A PNG: bits per layer, kept widths per layer, and the scores when present."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    has_scores = any("lim" in r for r in rows)
    n_axes = 3 if has_scores else 2
    fig, axes = plt.subplots(n_axes, 1, sharex=True,
                             figsize=(max(6.0, 0.22 * len(rows) + 3), 2.3 * n_axes + 0.8))
    layers = [r["layer"] for r in rows]
    axes[0].bar(layers, [r["bits"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("bits per weight")
    axes[0].set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)
    offset = 0.2
    axes[1].bar([i - offset for i in layers], [r["attn_width"] for r in rows], width=0.4,
                label="attention input", color="tab:orange")
    axes[1].bar([i + offset for i in layers], [r["mlp_width"] for r in rows], width=0.4,
                label="MLP input", color="tab:green")
    axes[1].axhline(hidden, color="grey", linewidth=0.8, linestyle="--",
                    label=f"hidden size {hidden}")
    axes[1].set_ylim(0, hidden * 1.4)
    axes[1].set_ylabel("kept width")
    axes[1].legend(fontsize=7, loc="upper right", ncol=3)
    if has_scores:
        axes[2].plot(layers, [r.get("lim") for r in rows], marker=".", label="LIM (importance)")
        axes[2].plot(layers, [r.get("lr") for r in rows], marker=".", label="LR (redundancy)")
        axes[2].set_ylabel("score")
        axes[2].legend(fontsize=7)
    axes[-1].set_xlabel("decoder layer")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_inspect(args: argparse.Namespace) -> int:
    """``pyengine inspect DIR``: per-layer table and an optional plot."""
    from ..pipeline.compress import RECIPE_ATTR, layer_report, predicted_bytes, storage_bytes
    from ..model.adapters import get_adapter
    args.plot = check_plot_file(args.plot, "--plot")
    args.json = check_output_file(args.json, "--json")
    loaded = load_model(args.model)
    model = loaded.model
    require_supported(model)
    rows = layer_table(model)
    has_scores = any("lim" in r for r in rows)
    header = f"{'layer':>5} " + (f"{'LIM':>8} {'ZD':>7} {'LR':>8} " if has_scores else "") + \
        f"{'bits':>6} {'attn_w':>7} {'mlp_w':>7} {'bytes':>11}"
    print(header)
    for r in rows:
        scores = (f"{r['lim']:8.4f} {r['zd']:7.4f} {r['lr']:8.4f} " if has_scores and "lim" in r
                  else (" " * 26 if has_scores else ""))
        bits = "/".join(str(b) for b in r["bit_widths"])
        print(f"{r['layer']:>5} {scores}{bits:>6} {r['attn_width']:>7} {r['mlp_width']:>7} "
              f"{r['bytes']:>11}")
    adapter = get_adapter(model)
    other = [e for e in layer_report(model) if not e["name"].startswith(adapter.layers + ".")]
    for e in other:
        kind = f"int{e['bits']}" if e["kind"] == "quantized" else f"dense {e['bits']}-bit"
        tied = f" (shares {e['tied_to']}'s table)" if e.get("tied_to") else ""
        print(f"{e['name']}: {kind}, {e['shape'][0]}x{e['shape'][1]}, {e['bytes']} bytes{tied}")
    total, predicted = storage_bytes(model), predicted_bytes(model)
    recipe = getattr(model, RECIPE_ATTR, None)
    if recipe is not None and recipe.info:
        print(f"recipe: {describe_recipe(recipe)}")
    print(f"total weight bytes: {total} ({mib(total)} held, {mib(predicted)} predicted)")
    bits = bits_per_weight_or_none(model)
    print(describe_bits(bits))
    if args.json:
        write_text(args.json, json.dumps({"model": str(args.model), "layers": rows,
                                          "other": other, "weight_bytes": total,
                                          "predicted_bytes": predicted,
                                          "bits_per_weight": bits}, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot is not None:
        title = f"{loaded.name}: " + (describe_recipe(recipe) if recipe is not None and recipe.info
                                      else "bits and kept widths per layer")
        plot_layers(rows, model.config.hidden_size, args.plot, title)
        print(f"wrote {args.plot}")
    return 0

