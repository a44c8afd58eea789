"""pyengine's quantizers against llm-compressor's GPTQ and HQQ on the same model, calibration,
held-out text and machine.

SmolLM2-135M (the embedded model, float32), 16 x 512 calibration tokens from pyengine's offline
corpus (one tensor, given to every engine that takes calibration), group 64 asymmetric at each
of ``--bits`` (default 4), the decoder layers' linears quantized, the head and embeddings dense
in all. Engines (``--engines``, in this order in every round):

* ``pyengine``: GPTQ (no activation order, damping 0.01);
* ``pyengine-rotated``: GPTQ with Recipe.rotate (merged rotations and the MLPs' online
  Walsh-Hadamard transform; ``--rotated`` adds it);
* ``pyengine-rtn``: RTN with the clip search and refit, each input's errors weighed by its
  mean square on the calibration tokens;
* ``pyengine-rtn-plain``: the same RTN without calibration data (plain weight error);
* ``llm-compressor``: its GPTQModifier (sequential pipeline, no activation order, damping 0.01);
* ``hqq``: HQQ (half-quadratic, no calibration; axis 1, its default optimiser), each layer
  replaced by HQQ's dequantized weight, so its quality is measured apart from its kernels.

Rounds alternate the engines (each on a fresh copy of the model, in one process); the table
reports the median seconds and the held-out perplexity (pyengine.perplexity on every model,
8 windows of 512 tokens of the offline evaluation split).

llm-compressor and HQQ are not dependencies: run this with a Python that has them (e.g. a
virtual environment made with ``--system-site-packages`` plus ``pip install llmcompressor hqq``)::

    PYTHONPATH=. /path/to/venv/bin/python benchmarks/bench_gptq_peers.py --engines \
        pyengine,pyengine-rtn,llm-compressor,hqq --bits 4,3,2

Mixed plans: a ``--bits`` entry ``4/2@4.0`` is a per-layer plan from ``pyengine.plan`` (LIM
importance measured on the dense model with the same calibration tensor, bit choices 4 and 2,
an average of 4.0 bits per weight with float16 scales and zeros counted). Every engine then
quantizes each decoder layer at the plan's bits for that layer: the plan is shared, the
quantizers differ. Such rows name the plan, its per-layer bits and the average it achieved.
"""

from __future__ import annotations

import argparse
import copy
import functools
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

import common  # noqa: E402  (benchmarks/ is the script's directory)


def run_pyengine(model, calib: torch.Tensor, layer_bits: List[int], group_size: int,
                 rotate: bool = False, method: str = "gptq", calibrated: bool = True) -> None:
    """pyengine.compress with decoder layer i's linears at ``layer_bits[i]`` bits
    (``calibrated=False``: without the calibration data)."""
    import pyengine
    from pyengine.quant.recipe import QuantConfig, Recipe
    quant = {re.escape(f"model.layers.{i}.") + ".*": QuantConfig(bits, group_size, method=method)
             for i, bits in enumerate(layer_bits)}
    quant["_default"] = QuantConfig(max(layer_bits), group_size, method=method)
    recipe = Recipe(quant=quant, embeddings=None, rotate=rotate)
    pyengine.compress(model, recipe, calib if calibrated else None, dtype=torch.float32,
                      show_progress=False)


@torch.no_grad()
def run_hqq(model, calib: torch.Tensor, layer_bits: List[int], group_size: int) -> None:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    for layer, bits in zip(model.model.layers, layer_bits):
        config = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)
        for linear in layer.modules():
            if isinstance(linear, torch.nn.Linear):
                quantized = HQQLinear(linear, quant_config=config, compute_dtype=torch.float32,
                                      device="cpu", del_orig=False)
                linear.weight.copy_(quantized.dequantize().reshape(linear.weight.shape))


def run_llmcompressor(model, calib: torch.Tensor, layer_bits: List[int], group_size: int) -> None:
    """llm-compressor's GPTQModifier with one config group per bit width, each targeting the
    projections of the decoder layers at that width (regexes over module names)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    groups = {}
    for bits in sorted(set(layer_bits)):
        layers = "|".join(str(i) for i, b in enumerate(layer_bits) if b == bits)
        groups[f"group_int{bits}"] = {
            "targets": [rf"re:model\.layers\.({layers})\..*_proj$"],
            "weights": {"num_bits": bits, "type": "int", "symmetric": False,
                        "strategy": "group", "group_size": group_size}}
    modifier = GPTQModifier(config_groups=groups, ignore=["lm_head"], actorder=None,
                            dampening_frac=0.01)
    data = Dataset.from_dict({"input_ids": calib.tolist(),
                              "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(model=model, dataset=data, recipe=modifier, num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1], pipeline="sequential")


def layer_plan(spec: str, model, calib: torch.Tensor, group_size: int
               ) -> Tuple[str, List[int], Optional[float]]:
    """(config name, per-layer bits, achieved average bits or None) of one ``--bits`` entry:
    ``"4"`` is every layer at 4 bits; ``"4/2@4.0"`` a LIM plan from pyengine.plan (bit
    choices 4 and 2, 4.0 bits per weight on average, float16 scales and zeros counted)."""
    n_layers = len(model.model.layers)
    if "@" not in spec:
        return f"int{int(spec)} g{group_size}", [int(spec)] * n_layers, None
    choices, avg = spec.split("@")
    import pyengine
    recipe = pyengine.plan(model, calib, avg_bits=float(avg),
                           bit_choices=tuple(int(b) for b in choices.split("/")),
                           importance="lim", group_size=group_size, show_progress=False,
                           scale_dtype=torch.float16)
    layer_bits = list(recipe.info["layer_bits"])
    counts = ", ".join(f"{layer_bits.count(b)} x int{b}"
                       for b in sorted(set(layer_bits), reverse=True))
    return (f"mixed {choices} LIM ({counts}) g{group_size}", layer_bits,
            float(recipe.info["achieved_avg_bits"]))


# engine name: (run function, the method as the table names it)
ENGINES = {
    "pyengine": (run_pyengine, "GPTQ"),
    "pyengine-rotated": (functools.partial(run_pyengine, rotate=True), "GPTQ, rotated"),
    "pyengine-rtn": (functools.partial(run_pyengine, method="rtn"), "RTN, calibrated"),
    "pyengine-rtn-plain": (functools.partial(run_pyengine, method="rtn", calibrated=False),
                           "RTN, no calibration"),
    "llm-compressor": (run_llmcompressor, "GPTQ"),
    "hqq": (run_hqq, "HQQ, no calibration"),
}


def _version(engine: str) -> str:
    """The engine's package version (ImportError when the peer is not installed)."""
    if engine == "llm-compressor":
        import llmcompressor
        return llmcompressor.__version__
    if engine == "hqq":
        from importlib.metadata import version
        import hqq  # noqa: F401  (fails early when missing)
        return version("hqq")
    import pyengine
    return pyengine.__version__


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bits", default="4",
                        help="comma separated: bit widths (4) or mixed plans (4/2@4.0: LIM, "
                             "bit choices 4 and 2, 4.0 bits per weight with scales)")
    parser.add_argument("--engines", default="pyengine,llm-compressor",
                        help=f"comma separated, from {','.join(ENGINES)}")
    parser.add_argument("--rotated", action="store_true",
                        help="also pyengine with Recipe.rotate (engine pyengine-rotated)")
    parser.add_argument("--shared-machine", default="",
                        help="a note for the table when other jobs ran alongside (the seconds "
                             "are then indicative only)")
    parser.add_argument("--group-size", type=int, default=64,
                        help="64 by default: llm-compressor refuses 128 on SmolLM2 (576 and 1536 columns are not multiples of it)")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "quant_peers.json")
    args = parser.parse_args(argv)

    import pyengine
    from pyengine.model.smollm2 import load_smollm2
    base, tokenizer = load_smollm2(dtype=torch.float32)
    calib = pyengine.calibration_data(tokenizer, n_samples=16, seqlen=512)
    source_ppl = pyengine.perplexity(base, tokenizer, seqlen=512, max_windows=8)
    names = [e for e in args.engines.split(",") if e]
    if args.rotated and "pyengine-rotated" not in names:
        names.append("pyengine-rotated")
    unknown = sorted(set(names) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {list(ENGINES)}")
    engines = {name: ENGINES[name][0] for name in names}
    versions = {name: _version(name) for name in names}
    rows = []
    for spec in (b for b in args.bits.split(",") if b):
        config, layer_bits, avg_bits = layer_plan(spec, base, calib, args.group_size)
        seconds: Dict[str, List[float]] = {name: [] for name in engines}
        ppl: Dict[str, float] = {}
        for round_ in range(args.rounds):
            for name, run in engines.items():
                model = copy.deepcopy(base)
                t0 = time.perf_counter()
                run(model, calib, layer_bits, args.group_size)
                seconds[name].append(time.perf_counter() - t0)
                if round_ == 0:
                    ppl[name] = pyengine.perplexity(model, tokenizer, seqlen=512, max_windows=8)
                print(f"{config} round {round_ + 1} {name}: {seconds[name][-1]:.1f} s, "
                      f"perplexity {ppl[name]:.2f}", flush=True)
                del model
        plan_fields = ({} if avg_bits is None
                       else dict(layer_bits=layer_bits, plan_avg_bits=avg_bits))
        rows += [dict(engine=name, config=f"{config} {ENGINES[name][1]}",
                      seconds=statistics.median(seconds[name]), all_seconds=seconds[name],
                      perplexity=ppl[name], source_perplexity=source_ppl,
                      version=versions[name], **plan_fields)
                 for name in engines]
    for row in rows:
        print(row)
    meta = common.metadata("cpu")
    meta.update(threads=torch.get_num_threads(), calib="16 x 512 offline calibration split",
                eval="8 x 512 offline evaluation split", rounds=args.rounds)
    if args.shared_machine:
        meta["shared_machine"] = args.shared_machine
    common.write_results(args.out, meta, rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
