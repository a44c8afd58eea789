"""GPTQ against llm-compressor's on the same model, calibration, held-out text and machine.

SmolLM2-135M (the embedded model, float32), 16 x 512 calibration tokens from pyengine's offline
corpus (one tensor, given to both), group 64 asymmetric at each of ``--bits`` (default 4), no
activation order, damping 0.01, the head and embeddings dense in both. Rounds alternate
pyengine, llm-compressor, pyengine, llm-compressor (each on a fresh copy of the model, in one
process); the table reports the median seconds and the held-out perplexity (pyengine.perplexity
on both models, 8 windows of 512 tokens of the offline evaluation split). ``--rotated`` adds
pyengine with Recipe.rotate (the merged rotations and the MLPs' online Walsh-Hadamard
transform), timed in the same rounds.

llm-compressor is not a dependency: run this with a Python that has it (e.g. a virtual
environment made with ``--system-site-packages`` plus ``pip install llmcompressor``)::

    PYTHONPATH=. /path/to/venv/bin/python benchmarks/bench_gptq_peers.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

import common  # noqa: E402  (benchmarks/ is the script's directory)


def run_pyengine(model, calib: torch.Tensor, bits: int, group_size: int,
                 rotate: bool = False) -> None:
    import pyengine
    from pyengine.recipe import QuantConfig, Recipe
    recipe = Recipe(quant={"_default": QuantConfig(bits, group_size, method="gptq")},
                    embeddings=None, rotate=rotate)
    pyengine.compress(model, recipe, calib, dtype=torch.float32, show_progress=False)


def run_pyengine_rotated(model, calib: torch.Tensor, bits: int, group_size: int) -> None:
    run_pyengine(model, calib, bits, group_size, rotate=True)


def run_llmcompressor(model, calib: torch.Tensor, bits: int, group_size: int) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    scheme = {"weights": {"num_bits": bits, "type": "int", "symmetric": False,
                          "strategy": "group", "group_size": group_size}}
    modifier = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], **scheme}},
                            ignore=["lm_head"], actorder=None, dampening_frac=0.01)
    data = Dataset.from_dict({"input_ids": calib.tolist(),
                              "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(model=model, dataset=data, recipe=modifier, num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1], pipeline="sequential")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bits", default="4", help="bit widths, comma separated")
    parser.add_argument("--rotated", action="store_true",
                        help="also pyengine with Recipe.rotate")
    parser.add_argument("--shared-machine", default="",
                        help="a note for the table when other jobs ran alongside (the seconds "
                             "are then indicative only)")
    parser.add_argument("--group-size", type=int, default=64,
                        help="64 by default: llm-compressor refuses 128 on SmolLM2 (576 and 1536 columns are not multiples of it)")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "gptq_peers.json")
    args = parser.parse_args(argv)

    import pyengine
    from pyengine.models.smollm2 import load_smollm2
    base, tokenizer = load_smollm2(dtype=torch.float32)
    calib = pyengine.calibration_data(tokenizer, n_samples=16, seqlen=512)
    source_ppl = pyengine.perplexity(base, tokenizer, seqlen=512, max_windows=8)
    engines = {"pyengine": run_pyengine, "llm-compressor": run_llmcompressor}
    if args.rotated:
        engines["pyengine rotated"] = run_pyengine_rotated
    import llmcompressor
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        seconds: Dict[str, List[float]] = {name: [] for name in engines}
        ppl: Dict[str, float] = {}
        for round_ in range(args.rounds):
            for name, run in engines.items():
                model = copy.deepcopy(base)
                t0 = time.perf_counter()
                run(model, calib, bits, args.group_size)
                seconds[name].append(time.perf_counter() - t0)
                if round_ == 0:
                    ppl[name] = pyengine.perplexity(model, tokenizer, seqlen=512, max_windows=8)
                print(f"int{bits} round {round_ + 1} {name}: {seconds[name][-1]:.1f} s, "
                      f"perplexity {ppl[name]:.2f}", flush=True)
                del model
        rows += [dict(engine=name, config=f"int{bits} g{args.group_size} GPTQ",
                      seconds=statistics.median(seconds[name]), all_seconds=seconds[name],
                      perplexity=ppl[name], source_perplexity=source_ppl,
                      version=(llmcompressor.__version__ if name == "llm-compressor"
                               else pyengine.__version__))
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
