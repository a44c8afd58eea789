"""What the commands share: device and dtype options, loading a model spec, calibration,
planning and compressing with the recipe options, and one-line reports."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..model import sources
from ..model.sources import LoadedModel
from ..format.qweight import FLOAT_DTYPES
from .args import DATASET_NAMES
from .checks import UsageError


def check_device(device: str) -> None:
    """UsageError when ``device`` is cuda and torch sees no CUDA device."""
    if device == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise UsageError(f"--device cuda: torch {torch.__version__} ({build}) sees no CUDA "
                         f"device; use --device cpu")


def load_model(spec: str, device: str = "cpu", dtype: Optional[torch.dtype] = None) -> LoadedModel:
    """pyengine.model.sources.load_model, its ModelSourceError as UsageError."""
    try:
        return sources.load_model(spec, device, dtype)
    except sources.ModelSourceError as exc:
        raise UsageError(str(exc)) from None


def dtype_of(name: Optional[str]) -> Optional[torch.dtype]:
    return None if name is None else FLOAT_DTYPES[name]


def require_tokenizer(loaded: LoadedModel, why: str) -> Any:
    if loaded.tokenizer is None:
        raise UsageError(f"{loaded.name} has no tokenizer, which {why} needs (save one next to "
                         f"the model: tokenizer.save_pretrained(DIR))")
    return loaded.tokenizer


def require_supported(model: nn.Module) -> None:
    from ..model.adapters import UnsupportedModelError, get_adapter
    try:
        get_adapter(model)
    except UnsupportedModelError as exc:
        raise UsageError(str(exc)) from None


def text_source(spec: str) -> Dict[str, Optional[str]]:
    """calibration_data / perplexity keyword for a --calib or --ppl value."""
    if spec not in DATASET_NAMES and not os.path.isfile(spec):
        raise UsageError(f"{spec}: neither a dataset ({', '.join(DATASET_NAMES)}) nor a text file")
    return {"dataset": spec}


def calibration(tokenizer: Any, source: str, n_samples: int, seqlen: int) -> torch.Tensor:
    """Calibration token ids [n_samples, seqlen]; UsageError when the text cannot serve."""
    from ..pipeline.data import calibration_data
    try:
        return calibration_data(tokenizer, n_samples=n_samples, seqlen=seqlen,
                                **text_source(source))
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"calibration text {source!r}: {exc}") from None


def plan_recipe(model: nn.Module, calib: torch.Tensor, args: argparse.Namespace,
                layer_scores: Optional[Dict[str, List[float]]] = None):
    """pyengine.plan from the recipe options of ``args``, plus the optional head config."""
    from ..pipeline.plan import plan
    from ..quant.recipe import QuantConfig
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
            from ..model.adapters import get_adapter
            head = re.escape(get_adapter(model).head)
            recipe = dataclasses.replace(
                recipe, info=info,
                quant={head: QuantConfig(args.quantize_head, args.group_size, method="rtn"),
                       **recipe.quant})
    return recipe


def method_options(args) -> Optional[Dict[str, Any]]:
    """The quantizers' options the command line sets ({method: options}), or None."""
    if not getattr(args, "integer_zeros", False):
        return None
    from ..quant.methods import GPTQOptions, RTNOptions
    return {"rtn": RTNOptions(integer_zeros=True), "gptq": GPTQOptions(integer_zeros=True)}


def compress_model(model: nn.Module, recipe, calib: torch.Tensor,
                   options: Optional[Dict[str, Any]] = None) -> nn.Module:
    """pyengine.compress (``options``: {method: options}); recipes the model cannot take
    become UsageError."""
    from ..pipeline.compress import compress
    try:
        return compress(model, recipe, calib, options=options)
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
    if any(getattr(q, "act_bits", 0) == 8 for q in recipe.quant.values()):
        parts.append("int8 activations")
    return ", ".join(parts)


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def perplexity_of(model: nn.Module, tokenizer: Any, source: str, seqlen: int,
                  max_windows: int) -> float:
    from ..evaluate import perplexity
    try:
        return perplexity(model, tokenizer, seqlen=seqlen, max_windows=max_windows,
                          **text_source(source))
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"evaluation text {source!r}: {exc}") from None


def status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

