"""The ``pyengine`` command line: ``compress``, ``eval``, ``inspect``, ``bench`` and ``demo``.

Every command has ``--help``. Mistakes of the user (a missing model path, recipe values out of
range, ``--device cuda`` without a GPU, matplotlib missing for a plot, an output path that
cannot be written, a corrupt checkpoint, ...) end with one line on stderr and exit code 2; output
paths are checked before any work starts (pyengine.cli_checks). Set ``PYENGINE_DEBUG=1`` to see
the traceback instead. Long steps show progress bars on stderr (``--no-progress`` or
``PYENGINE_NO_PROGRESS=1`` turns them off).
"""

from __future__ import annotations

import argparse
import dataclasses
import copy
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .cli_checks import (UsageError, check_output_dir, check_output_file, check_plot_file,
                         int_at_least, positive_int_list, write_text)

EXIT_USAGE = 2
SMOLLM2 = "smollm2"
DATASET_NAMES = ("offline", "wikitext2", "c4", "ptb")
DEMO_PROMPT = "What is the capital of France?"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---- argument parsing -------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _bit_choices(text: str) -> List[int]:
    from .packing import SUPPORTED_BITS
    values = _int_list(text)
    bad = [v for v in values if v not in SUPPORTED_BITS]
    if bad:
        raise argparse.ArgumentTypeError(f"bits must be among {list(SUPPORTED_BITS)}, got {bad}")
    return sorted(set(values), reverse=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _slice_fraction(text: str) -> Optional[float]:
    from .plan import MAX_SLICE
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction, got {text!r}") from None
    if not 0.0 <= value < MAX_SLICE:
        raise argparse.ArgumentTypeError(f"the slice fraction must be in [0, {MAX_SLICE}), got "
                                         f"{value}")
    return value or None  # 0 means no slicing


def _avg_bits(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bits, got {text!r}") from None
    if not 1.0 <= value <= 16.0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"average bits must be in [1, 16], got {value}")
    return value


def _group_size(text: str) -> int:
    from .qweight import SUPPORTED_GROUP_SIZES
    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in SUPPORTED_GROUP_SIZES:
        raise argparse.ArgumentTypeError(f"group size must be one of "
                                         f"{list(SUPPORTED_GROUP_SIZES)}, got {text!r}")
    return value


def _add_runner(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runner", choices=("auto", "decoder", "transformers"), default="auto",
                        help="decode loop of the speed measurements: pyengine.Decoder (the lean "
                             "loop), transformers' generate, or auto: the decoder where it runs "
                             "the model (default)")


def _add_device(parser: argparse.ArgumentParser,
                dtype_default: str = "the model's own, float32 for the embedded default") -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the model runs (default: cpu)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help=f"activation and dense weight dtype (default: {dtype_default})")


def _add_recipe(parser: argparse.ArgumentParser, avg_bits: Optional[float], bit_choices: str,
                method: str, slice_default: Optional[float], n_samples: int,
                seqlen: int, head_default: Optional[int] = None, act_bits: int = 0,
                rotate: bool = False, group_size: int = 128) -> None:
    g = parser.add_argument_group("recipe (pyengine.plan)")
    g.add_argument("--avg-bits", type=_avg_bits, default=avg_bits,
                   help="target average bits per weight of the decoder's linear layers, scales "
                        "and zeros counted (default: " + (f"{avg_bits:g}" if avg_bits else
                                                          "every layer at the highest bit "
                                                          "choice") + ")")
    g.add_argument("--bit-choices", type=_bit_choices, default=_bit_choices(bit_choices),
                   metavar="B,B", help=f"bit widths layers are assigned from (default: "
                                       f"{bit_choices})")
    g.add_argument("--importance", choices=("lim", "zd", "random"), default="lim",
                   help="layer order of the bit allocation (default: lim)")
    g.add_argument("--method", choices=("gptq", "rtn"), default=method,
                   help=f"quantizer (default: {method})")
    g.add_argument("--group-size", type=_group_size, default=group_size,
                   help="weights per scale: 32, 64, 128 or -1 per channel (default: "
                        f"{group_size})")
    g.add_argument("--act-bits", type=int, choices=(0, 8), default=act_bits,
                   help="8: int8 activations (per block of 32) for the quantized layers, "
                        "which the CPU kernels multiply as integers: faster decoding, slightly "
                        f"less accurate (default: {act_bits})")
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
    g.add_argument("--slice", type=_slice_fraction, default=slice_default, metavar="FRACTION",
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
    c.add_argument("--n-samples", type=_positive_int, default=n_samples,
                   help=f"calibration windows (default: {n_samples})")
    c.add_argument("--seqlen", type=int_at_least(2), default=seqlen,
                   help=f"tokens per calibration window (default: {seqlen})")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pyengine`` and its subcommands."""
    parser = _Parser(prog="pyengine", description="Compressed LLM inference on custom kernels: "
                     "compress a Hugging Face model, evaluate, inspect and benchmark it.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"pyengine {__version__}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="CPU threads torch and the kernels use (default: torch's choice)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
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
    _add_recipe(p, avg_bits=None, bit_choices="4,2", method="gptq", slice_default=None,
                n_samples=32, seqlen=512)
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="read, compress and write one decoder layer at a time (memory: one "
                        "layer, the calibration activations, embeddings and head; an "
                        "interrupted run resumes) instead of loading the whole model; the "
                        "checkpoint is the same (default: on for a local directory of "
                        "safetensors files when the recipe neither slices nor rotates)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the layers are compressed (with --sequential: one layer at a "
                        "time is moved there) (default: cpu)")
    p.set_defaults(handler=cmd_compress)

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
    p.add_argument("--max-windows", type=_positive_int, default=8,
                   help="windows evaluated at most (default: 8)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    _add_device(p)
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
    p.add_argument("--bits", type=_bit_choices, default=None, metavar="B,B",
                   help="bits of the default shapes or of an uncompressed model's layers "
                        "(default: 8,4 on cpu; 8,4,3,2 on cuda)")
    p.add_argument("--group-size", type=_group_size, default=128,
                   help="group size of the default shapes (default: 128)")
    p.add_argument("--shapes", default=None, metavar="NxK,NxK",
                   help="layer shapes to time instead of the defaults (ignored with a model)")
    p.add_argument("--max-shapes", type=_positive_int, default=None,
                   help="time at most this many distinct layer shapes, largest first")
    p.add_argument("--reps", type=_positive_int, default=None,
                   help="timed repetitions per kernel (default: 15 on cpu, 50 on cuda)")
    p.add_argument("--backends", default=None, metavar="NAME,NAME",
                   help="backends to time (default: every native backend serving the device)")
    p.add_argument("--prompt-len", type=_positive_int, default=None,
                   help="prefill tokens (default: 64 on cpu, 512 on cuda)")
    p.add_argument("--new-tokens", type=_positive_int, default=None,
                   help="decoded tokens (default: 16 on cpu, 64 on cuda)")
    p.add_argument("--no-end-to-end", action="store_true", help="kernel rows only")
    p.add_argument("--no-dense", action="store_true",
                   help="skip the end-to-end row of the dequantized (dense) model")
    _add_runner(p)
    _add_device(p, "float16 on cuda, float32 on cpu")
    p.set_defaults(handler=cmd_bench)

    p = sub.add_parser("demo", help="compress SmolLM2-135M and compare it with the original",
                       description="Loads the embedded default model, SmolLM2-135M, compresses "
                                   "it with a recipe planned from its own measurements (4.5 bits "
                                   "per weight with scales: 8 or 4 bits per layer by LIM, GPTQ "
                                   "groups of 64 after random rotations, 8-bit head), and "
                                   "prints perplexity, weight "
                                   "size and decode speed before and after, and a sample "
                                   "generation. A few minutes on a 2-core CPU.")
    _add_device(p)
    _add_recipe(p, avg_bits=4.5, bit_choices="8,4", method="gptq", slice_default=None,
                n_samples=32, seqlen=512, head_default=8, rotate=True, group_size=64)
    p.add_argument("--eval-seqlen", type=int_at_least(2), default=512,
                   help="tokens per perplexity window (default: 512)")
    p.add_argument("--max-windows", type=_positive_int, default=4,
                   help="perplexity windows (default: 4)")
    p.add_argument("--new-tokens", type=_positive_int, default=32,
                   help="tokens generated per decode measurement (default: 32)")
    p.add_argument("--decode-rounds", type=_positive_int, default=2,
                   help="decode measurements per model, alternating (default: 2)")
    p.add_argument("--prompt", default=DEMO_PROMPT,
                   help="prompt of the sample generation, sent through the model's chat "
                        "template (default: %(default)r)")
    _add_runner(p)
    p.add_argument("--save", type=Path, metavar="DIR", help="also save the compressed model")
    p.set_defaults(handler=cmd_demo)
    return parser


# ---- models ------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A model with its tokenizer (None when the source has none)."""

    model: nn.Module
    tokenizer: Any
    name: str
    compressed: bool  # a checkpoint written by pyengine.save


def check_device(device: str) -> None:
    """UsageError when ``device`` is cuda and torch sees no CUDA device."""
    if device == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise UsageError(f"--device cuda: torch {torch.__version__} ({build}) sees no CUDA "
                         f"device; use --device cpu")


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    from .benchmarking import DTYPES
    return None if name is None else DTYPES[name]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _is_checkpoint(path: Path) -> bool:
    """Whether directory ``path`` holds a pyengine checkpoint (its quantization_config, or the
    guard pyengine.save writes, so that a checkpoint with damaged metadata is still read, and
    reported on, by pyengine.load rather than by transformers)."""
    from .checkpoint import TRANSFORMERS_GUARD
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    qcfg = config.get("quantization_config")
    return ((isinstance(qcfg, dict) and qcfg.get("quant_method") == "pyengine")
            or config.get("transformers_weights") == TRANSFORMERS_GUARD)


def _tokenizer_or_none(source: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception:  # noqa: BLE001 - a model without tokenizer files is still a model
        return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse
    try:
        from huggingface_hub import constants
        if constants.HF_HUB_OFFLINE:
            return False
        endpoint = constants.ENDPOINT
    except Exception:  # noqa: BLE001
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_model(spec: str, device: str = "cpu", dtype: Optional[torch.dtype] = None) -> LoadedModel:
    """Loads MODEL as the commands take it: a pyengine checkpoint directory, a Hugging Face
    directory, a .gguf file, ``smollm2`` or a hub id. Problems the user can fix raise UsageError."""
    from transformers import AutoModelForCausalLM
    if spec == SMOLLM2:
        from .models.smollm2 import ModelNotAvailableError, load_smollm2
        try:
            model, tokenizer = load_smollm2(dtype=dtype or torch.float32)
        except ModelNotAvailableError as exc:
            raise UsageError(str(exc)) from None
        return LoadedModel(model.to(device), tokenizer, "SmolLM2-135M-Instruct", False)

    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UsageError(f"{spec}: a directory without config.json (not a Hugging Face "
                             f"model nor a pyengine checkpoint)")
        if _is_checkpoint(path):
            from . import CheckpointError, load
            try:
                model = load(path, device=device, dtype=dtype)
            except CheckpointError as exc:
                raise UsageError(str(exc)) from None
            return LoadedModel(model, _tokenizer_or_none(str(path)), path.name, True)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto")
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"cannot load {spec}: {_first_line(exc)}") from None
        return LoadedModel(model.to(device).eval(), _tokenizer_or_none(str(path)), path.name, False)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(f"{spec}: a file, but not a .gguf; MODEL is a Hugging Face "
                             f"directory, a .gguf file, 'smollm2' or a hub id")
        import importlib.util
        if importlib.util.find_spec("gguf") is None:
            raise UsageError("reading a .gguf file needs the gguf package (pip install gguf)")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=torch.float32)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise UsageError(f"cannot load {spec}: {_first_line(exc)}") from None
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # the weights are dense now; drop the GGUF loading state
            quantizer.remove_quantization_config(model)
        tokenizer = _tokenizer_or_none(str(path.parent), gguf_file=path.name)
        return LoadedModel(model.to(device=device, dtype=dtype or torch.float32).eval(),
                           tokenizer, path.stem, False)
    if not _HUB_ID.match(spec) or spec.startswith((".", "~")):
        raise UsageError(f"{spec}: no such file or directory (MODEL is a Hugging Face directory, "
                         f"a .gguf file, 'smollm2' or a hub id)")
    return _load_from_hub(spec, device, dtype)


def _load_from_hub(spec: str, device: str, dtype: Optional[torch.dtype]) -> LoadedModel:
    from transformers import AutoModelForCausalLM
    kwargs: Dict[str, Any] = dict(dtype=dtype or "auto")
    try:  # the local Hugging Face cache first: no network needed
        model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True, **kwargs)
        return LoadedModel(model.to(device).eval(),
                           _tokenizer_or_none(spec, local_files_only=True), spec, False)
    except Exception:  # noqa: BLE001 - not cached: try the hub below
        pass
    if not _hub_reachable():
        raise UsageError(f"{spec}: not a local path, not in the Hugging Face cache, and the hub "
                         f"is unreachable (offline?); give a local Hugging Face directory, a "
                         f".gguf file or 'smollm2'")
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise UsageError(f"cannot load {spec} from the Hugging Face hub: "
                         f"{_first_line(exc)}") from None
    return LoadedModel(model.to(device).eval(), _tokenizer_or_none(spec), spec, False)


def _require_tokenizer(loaded: LoadedModel, why: str) -> Any:
    if loaded.tokenizer is None:
        raise UsageError(f"{loaded.name} has no tokenizer, which {why} needs (save one next to "
                         f"the model: tokenizer.save_pretrained(DIR))")
    return loaded.tokenizer


def _require_supported(model: nn.Module) -> None:
    from .models.adapters import UnsupportedModelError, get_adapter
    try:
        get_adapter(model)
    except UnsupportedModelError as exc:
        raise UsageError(str(exc)) from None


def _text_source(spec: str) -> Dict[str, Optional[str]]:
    """calibration_data / perplexity keyword for a --calib or --ppl value."""
    if spec not in DATASET_NAMES and not os.path.isfile(spec):
        raise UsageError(f"{spec}: neither a dataset ({', '.join(DATASET_NAMES)}) nor a text file")
    return {"dataset": spec}


# ---- shared steps -------------------------------------------------------------------------------

def calibration(tokenizer: Any, source: str, n_samples: int, seqlen: int) -> torch.Tensor:
    """Calibration token ids [n_samples, seqlen]; UsageError when the text cannot serve."""
    from .data import calibration_data
    try:
        return calibration_data(tokenizer, n_samples=n_samples, seqlen=seqlen,
                                **_text_source(source))
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"calibration text {source!r}: {exc}") from None


def plan_recipe(model: nn.Module, calib: torch.Tensor, args: argparse.Namespace,
                layer_scores: Optional[Dict[str, List[float]]] = None):
    """pyengine.plan from the recipe options of ``args``, plus the optional head config."""
    from .plan import plan
    from .recipe import QuantConfig
    try:
        recipe = plan(model, calib, avg_bits=args.avg_bits, bit_choices=tuple(args.bit_choices),
                      importance=args.importance, method=args.method,
                      group_size=args.group_size, slicing=args.slice,
                      slice_schedule=args.slice_schedule, act_bits=args.act_bits,
                      rotate=args.rotate, layer_scores=layer_scores)
    except ValueError as exc:
        raise UsageError(f"recipe: {exc}") from None
    if not args.online_hadamard:
        recipe = dataclasses.replace(recipe, online_hadamard=False)
    if args.quantize_head == 0:
        recipe = dataclasses.replace(recipe, info={**recipe.info, "head_bits": 0},
                                     embeddings=None)
    elif args.quantize_head:
        info = {**recipe.info, "head_bits": args.quantize_head}
        if recipe.embeddings is not None and args.quantize_head == recipe.embeddings.bits:
            # the head follows Recipe.embeddings: a tied head keeps sharing the table
            recipe = dataclasses.replace(recipe, info=info)
        else:
            from .models.adapters import get_adapter
            head = re.escape(get_adapter(model).head)
            recipe = dataclasses.replace(
                recipe, info=info,
                quant={head: QuantConfig(args.quantize_head, args.group_size, method="rtn"),
                       **recipe.quant})
    return recipe


def compress_model(model: nn.Module, recipe, calib: torch.Tensor) -> nn.Module:
    """pyengine.compress; recipes the model cannot take become UsageError."""
    from .compress import compress
    try:
        return compress(model, recipe, calib)
    except ValueError as exc:
        raise UsageError(f"cannot compress with this recipe: {exc}") from None


def describe_recipe(recipe) -> str:
    """One line: average bits, bit choices and slicing of a planned recipe."""
    info = recipe.info or {}
    bits = info.get("layer_bits") or []
    parts = []
    if bits:
        counts = {b: bits.count(b) for b in sorted(set(bits), reverse=True)}
        mix = ", ".join(f"{n} layers at {b}" for b, n in counts.items())
        parts.append(f"{info.get('achieved_avg_bits', float('nan')):.2f} bits/weight with "
                     f"scales ({mix})")
    parts.append(f"{info.get('method', '?')} g{info.get('group_size', '?')}")
    if recipe.slicing:
        mean_slice = 100 * info.get("achieved_mean_slice", 0.0)
        parts.append(f"{info.get('slice_schedule', '')} slicing {mean_slice:.1f}% "
                     f"(widths {min(recipe.slicing)}..{max(recipe.slicing)})")
    if getattr(recipe, "rotate", False):
        online = ", online Walsh-Hadamard in the MLPs" if recipe.online_hadamard else ""
        parts.append(f"rotated (seed {recipe.rotation_seed}{online})")
    if info.get("head_bits"):
        parts.append(f"head int{info['head_bits']}")
    return ", ".join(parts)


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _perplexity(model: nn.Module, tokenizer: Any, source: str, seqlen: int,
                max_windows: int) -> float:
    from .evaluate import perplexity
    try:
        return perplexity(model, tokenizer, seqlen=seqlen, max_windows=max_windows,
                          **_text_source(source))
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"evaluation text {source!r}: {exc}") from None


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- compress ----------------------------------------------------------------------------------

def cmd_compress(args: argparse.Namespace) -> int:
    """``pyengine compress MODEL --out DIR``: plan, compress and save (with the tokenizer)."""
    from .checkpoint import save
    from .compress import storage_bytes
    out = check_output_dir(args.out, "--out")
    source = Path(args.model).expanduser()
    if source.exists() and out.exists() and out.resolve() == (source if source.is_dir()
                                                                 else source.parent).resolve():
        raise UsageError(f"--out {out}: that is where the original model is; choose another "
                         f"directory")
    if (out / "config.json").exists() and not _is_checkpoint(out):
        raise UsageError(f"--out {out}: holds another model (config.json); choose an empty "
                         f"directory")
    if source.is_dir() and _is_checkpoint(source):
        raise UsageError(f"{args.model} is already compressed by pyengine; compress the "
                         f"original model")
    check_device(args.device)
    readable = source.is_dir() and any(source.glob("*.safetensors"))
    sequential = args.sequential
    if sequential is None:
        sequential = readable and not args.rotate and not args.slice
    if sequential:
        if not readable:
            raise UsageError(f"--sequential reads a local Hugging Face directory of "
                             f"safetensors files; {args.model} is not one")
        if args.rotate or args.slice:
            raise UsageError("--sequential: slicing and rotation transform the whole model "
                             "and run in memory; drop --sequential")
        return _compress_sequential(args, source, out)
    _status(f"loading {args.model}")
    loaded = load_model(args.model, device=args.device)
    if loaded.compressed:
        raise UsageError(f"{args.model} is already compressed by pyengine; compress the "
                         f"original model")
    _require_supported(loaded.model)
    tokenizer = _require_tokenizer(loaded, "calibration")
    model = loaded.model
    calib = calibration(tokenizer, args.calib, args.n_samples, args.seqlen)
    dense_bytes = storage_bytes(model)
    t0 = time.perf_counter()
    recipe = plan_recipe(model, calib, args)
    _status(f"recipe: {describe_recipe(recipe)}")
    compress_model(model, recipe, calib)
    seconds = time.perf_counter() - t0
    save(model, out)
    tokenizer.save_pretrained(str(out))
    after = storage_bytes(model)
    print(f"compressed {loaded.name} in {seconds:.0f} s: {describe_recipe(recipe)}")
    print(f"weights: {_mib(dense_bytes)} -> {_mib(after)} ({dense_bytes / after:.2f}x smaller)")
    print(f"saved to {out}")
    return 0


def _compress_sequential(args: argparse.Namespace, source: Path, out: Path) -> int:
    """cmd_compress, one decoder layer at a time (pyengine.streaming)."""
    from .streaming import (SourceCheckpoint, StreamingError, compress_checkpoint,
                            stream_scores)
    try:
        src = SourceCheckpoint(source)
        skeleton = src.skeleton()
    except StreamingError as exc:
        raise UsageError(str(exc)) from None
    _require_supported(skeleton)
    tokenizer = _require_tokenizer(
        LoadedModel(skeleton, _tokenizer_or_none(str(source)), source.name, False), "calibration")
    calib = calibration(tokenizer, args.calib, args.n_samples, args.seqlen)
    _status(f"compressing {source.name} layer by layer ({len(src.stored)} tensors in "
            f"{src.dtype}, {_mib(src.nbytes)})")
    t0 = time.perf_counter()
    layer_scores = None
    if args.avg_bits is not None and args.importance in ("lim", "zd"):
        layer_scores = stream_scores(source, calib, device=args.device)
    recipe = plan_recipe(skeleton, calib, args, layer_scores=layer_scores)
    _status(f"recipe: {describe_recipe(recipe)}")
    try:
        compress_checkpoint(source, out, recipe, calib, device=args.device)
    except ValueError as exc:  # StreamingError included
        raise UsageError(f"cannot compress with this recipe: {exc}") from None
    seconds = time.perf_counter() - t0
    tokenizer.save_pretrained(str(out))
    after = SourceCheckpoint.tensor_bytes(out)
    print(f"compressed {source.name} in {seconds:.0f} s: {describe_recipe(recipe)}")
    print(f"weights: {_mib(src.nbytes)} -> {_mib(after)} ({src.nbytes / after:.2f}x smaller)")
    print(f"saved to {out}")
    return 0


# ---- eval --------------------------------------------------------------------------------------

def cmd_eval(args: argparse.Namespace) -> int:
    """``pyengine eval DIR``: perplexity and weight bytes."""
    from .compress import predicted_bytes, storage_bytes
    check_device(args.device)
    args.json = check_output_file(args.json, "--json")
    source = None if args.no_ppl else _text_source(args.ppl)
    loaded = load_model(args.model, args.device, _dtype(args.dtype))
    result: Dict[str, Any] = {"model": str(args.model), "compressed": loaded.compressed,
                              "weight_bytes": storage_bytes(loaded.model),
                              "predicted_bytes": predicted_bytes(loaded.model),
                              "bits_per_weight": _bits_per_weight(loaded.model)}
    if source is not None:
        tokenizer = _require_tokenizer(loaded, "perplexity")
        result.update(dataset=args.ppl, seqlen=args.seqlen, max_windows=args.max_windows,
                      perplexity=_perplexity(loaded.model, tokenizer, args.ppl, args.seqlen,
                                             args.max_windows))
        print(f"perplexity: {result['perplexity']:.4f} ({args.ppl}, seqlen {args.seqlen}, "
              f"at most {args.max_windows} windows)")
    print(f"weight bytes: {result['weight_bytes']} ({_mib(result['weight_bytes'])} held, "
          f"{_mib(result['predicted_bytes'])} predicted by the format)")
    if result["bits_per_weight"] is not None:
        print(_describe_bits(result["bits_per_weight"]))
    if args.json:
        write_text(args.json, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _bits_per_weight(model: nn.Module) -> Optional[Dict[str, float]]:
    """pyengine.bits_per_weight, or None for a model of a family pyengine does not support."""
    from .compress import bits_per_weight
    from .models.adapters import UnsupportedModelError
    try:
        return {k: round(v, 4) for k, v in bits_per_weight(model).items()}
    except UnsupportedModelError:
        return None


def _describe_bits(bits: Dict[str, float]) -> str:
    return (f"bits per weight: {bits['model']:.2f} over the whole model, {bits['linears']:.2f} "
            f"over the decoder's linear layers (scales and zeros included)")


# ---- inspect -----------------------------------------------------------------------------------

def layer_table(model: nn.Module) -> List[Dict[str, Any]]:
    """One row per decoder layer: index, scores (when the recipe holds them), bits (weighted
    mean over the layer's linears), the bit widths present, kept widths and bytes."""
    from .compress import RECIPE_ATTR, layer_report
    from .models.adapters import get_adapter
    from .modules.sliced import ResidualProjection
    from .slicing.structure import describe_structure
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
    from .compress import RECIPE_ATTR, layer_report, predicted_bytes, storage_bytes
    from .models.adapters import get_adapter
    args.plot = check_plot_file(args.plot, "--plot")
    args.json = check_output_file(args.json, "--json")
    loaded = load_model(args.model)
    model = loaded.model
    _require_supported(model)
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
    print(f"total weight bytes: {total} ({_mib(total)} held, {_mib(predicted)} predicted)")
    bits = _bits_per_weight(model)
    print(_describe_bits(bits))
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


# ---- bench -------------------------------------------------------------------------------------

def _shapes(text: str) -> List[tuple]:
    shapes = []
    for part in text.split(","):
        try:
            n, k = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise UsageError(f"--shapes: expected NxK[,NxK...], got {part!r}") from None
        if n < 1 or k < 1:
            raise UsageError(f"--shapes: sizes must be positive, got {part!r}")
        shapes.append((n, k))
    return shapes


def _dense_linear_cases(model: nn.Module, bits: Sequence[int], group_size: int):
    """Kernel cases from an uncompressed model's decoder linear shapes, quantized at ``bits``."""
    from .benchmarking import KernelCase
    from .compress import quantizable_linears
    from .models.adapters import get_adapter
    from .quantize import quantize
    prefix = get_adapter(model).layers + "."
    seen, cases = set(), []
    for name, linear, _, _ in quantizable_linears(model):
        if not name.startswith(prefix) or not hasattr(linear, "weight"):
            continue
        n, k = linear.weight.shape
        for b in bits:
            case = KernelCase(n, k, b, group_size)
            if case not in seen:
                seen.add(case)
                cases.append((case, quantize(linear.weight.detach().float().cpu(), b,
                                             group_size, clip_search=False)))
    return cases


def cmd_bench(args: argparse.Namespace) -> int:
    """``pyengine bench [DIR]``: kernel rows and, with a model, end-to-end rows."""
    from . import benchmarking as bm
    from .backends import BackendError, available_backends, known_backends
    from .compress import dequantize_model
    check_device(args.device)
    args.json = check_output_file(args.json, "--json")
    device = args.device
    dtype = _dtype(args.dtype) or (torch.float16 if device == "cuda" else torch.float32)
    ms = args.m or bm.DEFAULT_M[device]
    bits = args.bits or bm.DEFAULT_BITS[device]
    reps = args.reps or (50 if device == "cuda" else 15)
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        if not backends:
            raise UsageError(f"--backends: expected backend names, got {args.backends!r}; "
                             f"available here: {available_backends()}")
        unknown = [b for b in backends if b not in known_backends()]
        missing = [b for b in backends if b in known_backends() and b not in available_backends()]
        if unknown or missing:
            raise UsageError(f"--backends: unknown {unknown}, unavailable {missing}; available "
                             f"here: {available_backends()}")
    else:
        backends = bm.kernel_backends(device, dtype)

    loaded = None
    if args.model:
        loaded = load_model(args.model, device, dtype)
        _require_supported(loaded.model)
        cases = bm.model_kernel_cases(loaded.model)
        if not cases:
            cases = _dense_linear_cases(loaded.model, bits, args.group_size)
    else:
        shapes = _shapes(args.shapes) if args.shapes else bm.DEFAULT_SHAPES[device]
        cases = bm.random_kernel_cases(shapes, bits, args.group_size)
    if args.max_shapes:
        keep = sorted({(c.n, c.k) for c, _ in cases}, key=lambda s: -s[0] * s[1])[:args.max_shapes]
        cases = [(c, qw) for c, qw in cases if (c.n, c.k) in keep]

    copy_bw = bm.copy_bandwidth_gbps(device)
    meta = bm.metadata(device)
    meta.update(copy_bandwidth_gbps=round(copy_bw, 2), backends=backends,
                activation_dtype=str(dtype).replace("torch.", ""), model=args.model, reps=reps)
    print(f"{meta['device']}; copy bandwidth {copy_bw:.1f} GB/s; backends {', '.join(backends)}; "
          f"activations {meta['activation_dtype']}")
    try:
        rows = bm.kernel_rows(cases, ms, device, dtype, backends, copy_bw, reps=reps)
    except BackendError as exc:  # a requested backend that cannot serve a case
        raise UsageError(f"--backends: {exc}") from None
    print(f"{'op':>15} {'backend':>7} {'bits':>4} {'N x K':>12} {'M':>5} {'ms':>9} {'GB/s':>8} "
          f"{'%copy':>6} {'vs fp16':>8}")
    for r in rows:
        shape = f"{r['N']}x{r['K']}"
        print(f"{r['op']:>15} {r['backend']:>7} {r['bits']:>4} {shape:>12} "
              f"{r['M']:>5} {r['ms']:9.4f} {r['gbps']:8.2f} {r['pct_copy_bw']:6.1f} "
              f"{r['speedup_vs_fp16']:8.2f}")

    e2e: List[Dict[str, Any]] = []
    if loaded is not None and not args.no_end_to_end:
        prompt_len = args.prompt_len or (512 if device == "cuda" else 64)
        new_tokens = args.new_tokens or (64 if device == "cuda" else 16)
        variants = [("compressed" if loaded.compressed else "model", loaded.model)]
        if loaded.compressed and not args.no_dense:
            variants.append(("dequantized (dense)", None))
        from .utils import progress
        for label, model in progress(variants, desc="end to end", unit="model"):
            model = model if model is not None else dequantize_model(loaded.model)
            try:
                row = bm.end_to_end_row(model, label, prompt_len, new_tokens,
                                        runner=args.runner)
            except ValueError as exc:  # --runner decoder on a model it does not run
                raise UsageError(f"--runner: {exc}") from None
            e2e.append(row)
        print(f"{'model':>20} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak MiB':>9} "
              f"{'weights':>10}  decode loop")
        for r in e2e:
            print(f"{r['model']:>20} {r['prefill_tokens_per_s']:14.1f} "
                  f"{r['decode_tokens_per_s']:13.2f} {r['peak_memory_mib']:9.1f} "
                  f"{_mib(r['weight_bytes']):>10}  {r['decode_runner']}")
        print(f"(batch 1, prompt {prompt_len} tokens, {new_tokens} greedy tokens; peak memory: "
              f"{e2e[0]['peak_memory_kind']})")
    if args.json:
        bm.write_json(args.json, meta, rows, end_to_end=e2e)
        print(f"wrote {args.json}")
    return 0


# ---- demo --------------------------------------------------------------------------------------

def sample_text(tokenizer: Any, model: nn.Module, ids: torch.Tensor) -> str:
    """The generated ``ids`` as text, up to the first end-of-sequence token."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    stops = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    tokens = ids.tolist()
    for i, token in enumerate(tokens):
        if token in stops:
            tokens = tokens[:i]
            break
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def prompt_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids [1, T] of ``text`` as a user turn of the tokenizer's chat template (plain text
    when it has none)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        return torch.as_tensor(ids).reshape(1, -1)
    return tokenizer(text, return_tensors="pt").input_ids


def cmd_demo(args: argparse.Namespace) -> int:
    """``pyengine demo``: SmolLM2-135M before and after compression, side by side."""
    from . import benchmarking as bm
    from .compress import storage_bytes
    from .utils import progress
    check_device(args.device)
    args.save = check_output_dir(args.save, "--save")
    t_start = time.perf_counter()
    _status("loading SmolLM2-135M (the embedded default model)")
    loaded = load_model(SMOLLM2, args.device, _dtype(args.dtype))
    model, tokenizer = loaded.model, loaded.tokenizer
    ppl_kwargs = dict(source="offline", seqlen=args.eval_seqlen, max_windows=args.max_windows)
    prompt = prompt_ids(tokenizer, args.prompt)

    _status("measuring the original model")
    before: Dict[str, Any] = dict(ppl=_perplexity(model, tokenizer, **ppl_kwargs),
                                  bytes=storage_bytes(model))
    original = copy.deepcopy(model)  # kept for the decode-speed comparison at the end
    _status("planning the recipe")
    calib = calibration(tokenizer, args.calib, args.n_samples, args.seqlen)
    t0 = time.perf_counter()
    recipe = plan_recipe(model, calib, args)
    _status(f"recipe: {describe_recipe(recipe)}")
    compress_model(model, recipe, calib)
    compress_s = time.perf_counter() - t0
    _status("measuring the compressed model")
    after: Dict[str, Any] = dict(ppl=_perplexity(model, tokenizer, **ppl_kwargs),
                                 bytes=storage_bytes(model))
    # decode speed: the two models alternate, so a load change on a shared machine hits both;
    # the best of the rounds is kept. Both run through the same decode loop.
    max_len = prompt.shape[1] + args.new_tokens
    try:
        runners = {bm.pick_runner(m, max_len, args.runner) for m in (original, model)}
    except ValueError as exc:  # --runner decoder on a model it does not run
        raise UsageError(f"--runner: {exc}") from None
    runner = runners.pop() if len(runners) == 1 else "transformers"
    for _ in progress(range(args.decode_rounds), desc="decode speed", unit="round"):
        for result, m in ((before, original), (after, model)):
            tps, out = bm.decode_tokens_per_s(m, prompt, args.new_tokens, runner=runner)
            result["tps"] = max(result.get("tps", 0.0), tps)
            result["text"] = sample_text(tokenizer, m, out[0, prompt.shape[1]:])
    del original
    if args.save:
        from .checkpoint import save
        save(model, args.save)
        tokenizer.save_pretrained(str(args.save))

    threads = f", {torch.get_num_threads()} threads" if args.device == "cpu" else ""
    lines = [
        f"pyengine demo: {loaded.name} on {args.device}{threads}",
        f"recipe: {describe_recipe(recipe)} (planned and compressed in {compress_s:.0f} s)",
        "",
        f"{'':<18} {'original':>12} {'compressed':>12}  change",
        f"{'perplexity':<18} {before['ppl']:12.3f} {after['ppl']:12.3f}  "
        f"{100 * (after['ppl'] / before['ppl'] - 1):+.1f}%",
        f"{'weight size':<18} {_mib(before['bytes']):>12} {_mib(after['bytes']):>12}  "
        f"{before['bytes'] / after['bytes']:.2f}x smaller",
        f"{'decode tokens/s':<18} {before['tps']:12.1f} {after['tps']:12.1f}  "
        f"{after['tps'] / before['tps']:.2f}x",
        "",
        f"perplexity: offline corpus, held-out split, {args.max_windows} windows of "
        f"{args.eval_seqlen} tokens; "
        f"decode: batch 1, greedy, {args.new_tokens} tokens after a warm-up, both models "
        f"through {'pyengine.Decoder' if runner == 'decoder' else 'transformers generate'}, "
        f"best of "
        f"{args.decode_rounds} alternating rounds",
        f"sample (compressed): {args.prompt!r} -> {after['text']!r}",
        f"sample (original):   {args.prompt!r} -> {before['text']!r}",
    ]
    if args.save:
        lines.append(f"saved the compressed model to {args.save}")
    lines.append(f"total time {time.perf_counter() - t_start:.0f} s")
    print("\n".join(lines))
    return 0


# ---- entry point -------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs ``pyengine`` with ``argv`` (default: sys.argv[1:]); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.no_progress:
        os.environ["PYENGINE_NO_PROGRESS"] = "1"
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        if os.environ.get("PYENGINE_NO_PROGRESS"):
            transformers.logging.disable_progress_bar()
    except ImportError:
        pass
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except UsageError as exc:
        if os.environ.get("PYENGINE_DEBUG"):
            raise
        print(f"pyengine {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"pyengine {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (e.g. `| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
