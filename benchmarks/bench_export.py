"""What exporting to stock formats (pyengine.io.export) costs in quality, on SmolLM2-135M.

For each quantizer (GPTQ, calibrated RTN; int4 group 64, the table and head int8; float32
activations), held-out perplexity of:

* ``fractional``: pyengine's default (fractional zero points), run by pyengine;
* ``fractional, fitted``: the same model as the export writes it (each group fitted to
  integer zero points, ``pyengine.io.export.fitted_weight``; identical for compressed-tensors
  and GPTQ here: the scales are float16 already), run by pyengine's kernels;
* ``integer zeros``: compressed with ``integer_zeros`` (exported exactly), run by pyengine.

Plus the export itself: seconds, whether every layer was written exactly, and bytes on disk
of the pyengine checkpoint and of each export (the quantized table becomes dense there).

    python benchmarks/bench_export.py [--max-windows 8] [--json F]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

import common  # noqa: E402  (benchmarks/ is the script's directory)
import pyengine
from pyengine import QuantConfig, Recipe
from pyengine.io.export import export_checkpoint, fitted_weight
from pyengine.nn.quant_linear import QuantLinear
from pyengine.quant.methods import GPTQOptions, RTNOptions

GROUP = 64


def _directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _fit_in_place(model) -> float:
    """Replaces every quantized linear's weight by the one the export writes; returns the
    largest relative change of a layer."""
    worst = 0.0
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and not name.endswith("lm_head"):
            fitted, record = fitted_weight(module.quantized_weight, "compressed-tensors", name)
            state = module.state_dict()
            state.update(qweight=fitted.qweight, scales=fitted.scales)
            if fitted.zeros is not None:
                state["zeros"] = fitted.zeros
            module.load_state_dict(state)  # rebuilds the layer's weight view (and fusions)
            worst = max(worst, record.relative_change)
    return worst


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="gptq,rtn")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--json", type=Path, default=common.RESULTS / "export_smollm2.json")
    parser.add_argument("--shared-machine", default=None, metavar="WHAT",
                        help="other work that shared the machine during the run (recorded: "
                             "its seconds are then indicative only)")
    args = parser.parse_args(argv)

    from pyengine.model.smollm2 import load_smollm2
    torch.manual_seed(0)
    base, tokenizer = load_smollm2(dtype=torch.float32)
    calib = pyengine.calibration_data(tokenizer, n_samples=args.calib_samples, seqlen=512)
    eval_kwargs = dict(seqlen=args.seqlen, max_windows=args.max_windows, show_progress=False)
    rows: List[Dict[str, object]] = []
    source_ppl = pyengine.perplexity(base, tokenizer, **eval_kwargs)
    rows.append(dict(method="none", config="fp32 source", perplexity=round(source_ppl, 4)))
    print(rows[-1], flush=True)
    option_types = {"gptq": GPTQOptions, "rtn": RTNOptions}
    for method in [m for m in args.methods.split(",") if m]:
        recipe = Recipe(quant={"_default": QuantConfig(4, GROUP, method=method)})
        models = {}
        for zeros in ("fractional", "integer"):
            model = copy.deepcopy(base)
            options = {method: option_types[method](integer_zeros=zeros == "integer")}
            t0 = time.perf_counter()
            pyengine.compress(model, recipe, calib, show_progress=False,
                              scale_dtype=torch.float16, options=options)
            seconds = time.perf_counter() - t0
            models[zeros] = model
            ppl = pyengine.perplexity(model, tokenizer, **eval_kwargs)
            rows.append(dict(method=method, config=f"{zeros} zero points",
                             perplexity=round(ppl, 4), compress_s=round(seconds, 1)))
            print(rows[-1], flush=True)
        fitted = copy.deepcopy(models["fractional"])
        worst = _fit_in_place(fitted)
        ppl = pyengine.perplexity(fitted, tokenizer, **eval_kwargs)
        rows.append(dict(method=method, config="fractional zero points, fitted as exported",
                         perplexity=round(ppl, 4), worst_layer_change=round(worst, 5)))
        print(rows[-1], flush=True)
        with tempfile.TemporaryDirectory(prefix="pyengine-export-") as tmp:
            for zeros, model in models.items():
                src = Path(tmp) / zeros
                pyengine.save(model, src)
                for fmt in ("compressed-tensors", "gptq"):
                    t0 = time.perf_counter()
                    report = export_checkpoint(src, Path(tmp) / f"{zeros}-{fmt}", fmt)
                    seconds = time.perf_counter() - t0
                    rows.append(dict(method=method, config=f"export {fmt}, {zeros} zero points",
                                     export_s=round(seconds, 2), exact=report.exact,
                                     pyengine_bytes=_directory_bytes(src),
                                     export_bytes=_directory_bytes(Path(tmp) /
                                                                   f"{zeros}-{fmt}")))
                    print(rows[-1], flush=True)
    meta = common.metadata("cpu")
    meta.update(model="SmolLM2-135M", dataset="offline (held-out split)", seqlen=args.seqlen,
                max_windows=args.max_windows, calib_samples=args.calib_samples,
                group_size=GROUP, scale_dtype="float16",
                recipe="int4 g64 on every decoder linear, table and head int8 (default)",
                shared_machine=args.shared_machine)
    common.write_results(args.json, meta, rows)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
