"""The argument parser of ``pyengine`` and its subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import (Parser, add_device, add_recipe, add_runner, parse_bit_choices,
                   parse_group_size, parse_positive_int)
from .bench import cmd_bench
from .checks import int_at_least, positive_int_list
from .compress import cmd_compress
from .demo import DEMO_PROMPT, cmd_demo
from .eval import cmd_eval
from .export import cmd_export
from .inspect import cmd_inspect


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pyengine`` and its subcommands."""
    parser = Parser(prog="pyengine", description="Compressed LLM inference on custom kernels: "
                    "compress a Hugging Face model, evaluate, inspect and benchmark it.")
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"pyengine {__version__}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=parse_positive_int, default=None,
                        help="CPU threads torch and the kernels use (default: torch's choice)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    model_help = ("a local Hugging Face directory, a .gguf file, 'smollm2' (the embedded "
                  "default, SmolLM2-135M) or a hub id (needs the hub)")

    p = sub.add_parser("compress", help="plan and compress a model, save it to a directory",
                       description="Measure a model on calibration text, plan per-layer bits "
                                   "and widths (pyengine.plan), compress it (pyengine.compress) "
                                   "and save it with its tokenizer (pyengine.save).")
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="directory to write the compressed checkpoint to")
    add_recipe(p, avg_bits=None, bit_choices="4,2", method="gptq", slice_default=None,
               n_samples=32, seqlen=512)
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="read, compress and write one decoder layer at a time (memory: one "
                        "layer, the calibration activations, embeddings and head; an "
                        "interrupted run resumes) instead of loading the whole model; the "
                        "checkpoint is the same (default: on for a local directory of "
                        "safetensors files or a .gguf file when the recipe neither slices nor "
                        "rotates)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the layers are compressed (with --sequential: one layer at a "
                        "time is moved there) (default: cpu)")
    p.add_argument("--integer-zeros", action="store_true",
                   help="integer zero points, as GPTQ and compressed-tensors checkpoints hold "
                        "them: 'pyengine export' then writes the weights exactly (default: "
                        "fractional zero points, more accurate; see the README's export "
                        "table)")
    p.set_defaults(handler=cmd_compress)

    p = sub.add_parser("export", help="write a checkpoint in a format stock engines read",
                       description="Write a checkpoint of 'pyengine compress' as "
                                   "compressed-tensors (pack-quantized) or GPTQ (GPTQModel's "
                                   "layout, per-module overrides for mixed bits), which vLLM "
                                   "and other engines load with their own kernels. Layers "
                                   "whose zero points are not integers are fitted to integer "
                                   "ones (the summary says how far they moved; compress with "
                                   "--integer-zeros for an exact export). Sliced, rotated and "
                                   "Matryoshka checkpoints are refused: serve those with "
                                   "pyengine's vLLM plugin.")
    p.add_argument("checkpoint", metavar="DIR", type=Path,
                   help="a checkpoint written by 'pyengine compress' or pyengine.save")
    p.add_argument("out", metavar="OUT", type=Path, help="a new (or empty) directory")
    p.add_argument("--format", required=True, choices=("compressed-tensors", "gptq"),
                   help="compressed-tensors: any bits and group size, asymmetric or "
                        "symmetric; gptq: inputs a multiple of the group size")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("eval", help="perplexity and weight bytes of a model",
                       description="Perplexity on held-out text (pyengine.perplexity) and the "
                                   "bytes the weights hold and the format predicts.")
    p.add_argument("model", metavar="DIR|MODEL", help="a checkpoint written by 'pyengine "
                                                      "compress', or " + model_help)
    p.add_argument("--ppl", nargs="?", const="offline", default="offline",
                   metavar="offline|wikitext2|c4|ptb|FILE",
                   help="evaluation text (default: offline, the held-out split)")
    p.add_argument("--no-ppl", action="store_true", help="only report the weight bytes")
    p.add_argument("--seqlen", type=int_at_least(2), default=512,
                   help="tokens per window, at least 2 (default: 512)")
    p.add_argument("--max-windows", type=parse_positive_int, default=8,
                   help="windows evaluated at most (default: 8)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    add_device(p)
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("inspect", help="per-layer table (scores, bits, widths, bytes) and plot",
                       description="One row per decoder layer: the scores the plan measured "
                                   "(when the checkpoint's recipe holds them), bits, kept "
                                   "widths and bytes; optionally a PNG plot of the plan.")
    p.add_argument("model", metavar="DIR|MODEL", help="a checkpoint written by 'pyengine "
                                                      "compress', or " + model_help)
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="write a plot of bits and kept widths per layer (needs matplotlib)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the table as JSON")
    p.set_defaults(handler=cmd_inspect)

    p = sub.add_parser("bench", help="kernel and end-to-end benchmarks",
                       description="Kernel rows (quantized matmul of the model's layer shapes, "
                                   "or of default shapes without a model, against a dense fp16 "
                                   "F.linear measured in the same run) and, with a model, "
                                   "end-to-end rows (prefill and decode tokens/s, peak memory).")
    p.add_argument("model", nargs="?", metavar="DIR", help="a checkpoint written by 'pyengine "
                                                           "compress' (or another model)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the rows as JSON")
    p.add_argument("--m", type=positive_int_list, default=None, metavar="M,M",
                   help="activation rows per kernel call (default: 1,16 on cpu; 1,16,256 on "
                        "cuda)")
    p.add_argument("--bits", type=parse_bit_choices, default=None, metavar="B,B",
                   help="bits of the default shapes or of an uncompressed model's layers "
                        "(default: 8,4 on cpu; 8,4,3,2 on cuda)")
    p.add_argument("--group-size", type=parse_group_size, default=128,
                   help="group size of the default shapes (default: 128)")
    p.add_argument("--shapes", default=None, metavar="NxK,NxK",
                   help="layer shapes to time instead of the defaults (ignored with a model)")
    p.add_argument("--max-shapes", type=parse_positive_int, default=None,
                   help="time at most this many distinct layer shapes, largest first")
    p.add_argument("--reps", type=parse_positive_int, default=None,
                   help="timed repetitions per kernel (default: 15 on cpu, 50 on cuda)")
    p.add_argument("--backends", default=None, metavar="NAME,NAME",
                   help="backends to time (default: every native backend serving the device)")
    p.add_argument("--prompt-len", type=parse_positive_int, default=None,
                   help="prefill tokens (default: 64 on cpu, 512 on cuda)")
    p.add_argument("--new-tokens", type=parse_positive_int, default=None,
                   help="decoded tokens (default: 16 on cpu, 64 on cuda)")
    p.add_argument("--no-end-to-end", action="store_true", help="kernel rows only")
    p.add_argument("--no-dense", action="store_true",
                   help="skip the end-to-end row of the dequantized (dense) model")
    add_runner(p)
    add_device(p, "float16 on cuda, float32 on cpu")
    p.set_defaults(handler=cmd_bench)

    p = sub.add_parser("demo", help="compress SmolLM2-135M and compare it with the original",
                       description="Loads the embedded default model, SmolLM2-135M, compresses "
                                   "it with a recipe planned from its own measurements (4.5 bits "
                                   "per weight with scales: 8 or 4 bits per layer by LIM, GPTQ "
                                   "groups of 64 after random rotations, 8-bit head; on a CPU "
                                   "int8 activations, as llama.cpp's quantized types), and "
                                   "prints perplexity, weight "
                                   "size and decode speed before and after, and a sample "
                                   "generation. A few minutes on a 2-core CPU.")
    add_device(p)
    add_recipe(p, avg_bits=4.5, bit_choices="8,4", method="gptq", slice_default=None,
               n_samples=32, seqlen=512, head_default=8, rotate=True, group_size=64,
               act_bits=None)
    p.add_argument("--eval-seqlen", type=int_at_least(2), default=512,
                   help="tokens per perplexity window (default: 512)")
    p.add_argument("--max-windows", type=parse_positive_int, default=4,
                   help="perplexity windows (default: 4)")
    p.add_argument("--new-tokens", type=parse_positive_int, default=32,
                   help="tokens generated per decode measurement (default: 32)")
    p.add_argument("--decode-rounds", type=parse_positive_int, default=2,
                   help="decode measurements per model, alternating (default: 2)")
    p.add_argument("--prompt", default=DEMO_PROMPT,
                   help="prompt of the sample generation, sent through the model's chat "
                        "template (default: %(default)r)")
    add_runner(p)
    p.add_argument("--save", type=Path, metavar="DIR", help="also save the compressed model")
    p.set_defaults(handler=cmd_demo)
    return parser

