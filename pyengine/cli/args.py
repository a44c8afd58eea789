"""Argument types and the option groups the commands share: each parse error is one line with
exit code 2 (Parser)."""

from __future__ import annotations

import argparse
import math
from typing import List, Optional

from .checks import int_at_least

EXIT_USAGE = 2
DATASET_NAMES = ("offline", "wikitext2", "c4", "ptb")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def parse_bit_choices(text: str) -> List[int]:
    from ..format.packing import SUPPORTED_BITS
    values = parse_int_list(text)
    bad = [v for v in values if v not in SUPPORTED_BITS]
    if bad:
        raise argparse.ArgumentTypeError(f"bits must be among {list(SUPPORTED_BITS)}, got {bad}")
    return sorted(set(values), reverse=True)


def parse_positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_slice_fraction(text: str) -> Optional[float]:
    from ..pipeline.plan import MAX_SLICE
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction, got {text!r}") from None
    if not 0.0 <= value < MAX_SLICE:
        raise argparse.ArgumentTypeError(f"the slice fraction must be in [0, {MAX_SLICE}), got "
                                         f"{value}")
    return value or None  # 0 means no slicing


def parse_avg_bits(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bits, got {text!r}") from None
    if not 1.0 <= value <= 16.0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"average bits must be in [1, 16], got {value}")
    return value


def parse_group_size(text: str) -> int:
    from ..format.qweight import SUPPORTED_GROUP_SIZES
    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in SUPPORTED_GROUP_SIZES:
        raise argparse.ArgumentTypeError(f"group size must be one of "
                                         f"{list(SUPPORTED_GROUP_SIZES)}, got {text!r}")
    return value


def add_runner(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runner", choices=("auto", "decoder", "transformers"), default="auto",
                        help="decode loop of the speed measurements: pyengine.Decoder (the lean "
                             "loop), transformers' generate, or auto: the decoder where it runs "
                             "the model (default)")


def add_device(parser: argparse.ArgumentParser,
               dtype_default: str = "the model's own, float32 for the embedded default") -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the model runs (default: cpu)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help=f"activation and dense weight dtype (default: {dtype_default})")


def add_recipe(parser: argparse.ArgumentParser, avg_bits: Optional[float], bit_choices: str,
               method: str, slice_default: Optional[float], n_samples: int,
               seqlen: int, head_default: Optional[int] = None,
               act_bits: Optional[int] = 0, rotate: bool = False,
               group_size: int = 128) -> None:
    g = parser.add_argument_group("recipe (pyengine.plan)")
    g.add_argument("--avg-bits", type=parse_avg_bits, default=avg_bits,
                   help="target average bits per weight of the decoder's linear layers, scales "
                        "and zeros counted (default: " + (f"{avg_bits:g}" if avg_bits else
                                                          "every layer at the highest bit "
                                                          "choice") + ")")
    g.add_argument("--bit-choices", type=parse_bit_choices, default=parse_bit_choices(bit_choices),
                   metavar="B,B", help=f"bit widths layers are assigned from (default: "
                                       f"{bit_choices})")
    g.add_argument("--importance", choices=("lim", "zd", "random"), default="lim",
                   help="layer order of the bit allocation (default: lim)")
    g.add_argument("--method", choices=("gptq", "rtn"), default=method,
                   help=f"quantizer (default: {method})")
    g.add_argument("--group-size", type=parse_group_size, default=group_size,
                   help="weights per scale: 32, 64, 128 or -1 per channel (default: "
                        f"{group_size})")
    g.add_argument("--act-bits", type=int, choices=(0, 8), default=act_bits,
                   help="8: int8 activations (per block of 32) for the quantized layers, "
                        "which the CPU kernels multiply as integers: faster decoding, slightly "
                        "less accurate; 0: float activations (default: " +
                        ("8 on a CPU, 0 on a GPU" if act_bits is None else str(act_bits)) + ")")
    g.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=rotate,
                   help="random orthogonal rotations of the residual stream and the attention "
                        "values before quantizing, merged into the weights (same function; "
                        "GPTQ keeps more quality at 4 and 3 bits) (default: "
                        f"{'on' if rotate else 'off'})")
    g.add_argument("--online-hadamard", action=argparse.BooleanOptionalAction, default=True,
                   help="with --rotate, also rotate each MLP's inner activation: a random "
                        "permutation and signs merged into gate/up, a block Walsh-Hadamard "
                        "transform applied online before down_proj (a few microseconds per "
                        "layer and token; much better 3- and 2-bit GPTQ) (default: on)")
    g.add_argument("--slice", type=parse_slice_fraction, default=slice_default, metavar="FRACTION",
                   help="mean fraction of the residual width deleted per layer, 0 for none "
                        f"(default: {slice_default or 0:g})")
    g.add_argument("--slice-schedule", choices=("dynamic", "constant"), default="dynamic",
                   help="per-layer widths from layer redundancy, or uniform (default: dynamic)")
    g.add_argument("--quantize-head", type=int, choices=(0, 8, 4), default=head_default,
                   metavar="BITS", help="bits of the output head (RTN, 8 or 4; a tied head at 8 "
                                        "bits shares the token embedding's table); 0 keeps the "
                                        "head and the token embedding dense (default: " +
                                        (f"{head_default}" if head_default else
                                         "8, the head and the table quantized alike") + ")")
    c = parser.add_argument_group("calibration")
    c.add_argument("--calib", default="offline", metavar="offline|wikitext2|c4|ptb|FILE",
                   help="calibration text (default: offline, the calibration split of the "
                        "corpus shipped with Python)")
    c.add_argument("--n-samples", type=parse_positive_int, default=n_samples,
                   help=f"calibration windows (default: {n_samples})")
    c.add_argument("--seqlen", type=int_at_least(2), default=seqlen,
                   help=f"tokens per calibration window (default: {seqlen})")

