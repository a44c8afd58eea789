"""Planning a compression: per-layer bits from layer importance, per-layer widths from layer
redundancy.

Bit allocation. Layers are demoted from the highest bit choice to the next one, least important
first; with three or more choices a second pass demotes them again in the same order. Of all the
allocations along that path, the one whose average bits per weight (over the decoder's linear
layers, scales and zeros included, on the unsliced shapes) is closest to ``avg_bits`` wins.

Dynamic slicing. ``slicing`` is the mean fraction of residual dimensions deleted per layer.
With r the layer-redundancy scores min-max normalised to [0, 1], layer i deletes
``s_i = base + (mean - base) * r_i / mean(r)`` of its dimensions, so the mean of s is exactly
``slicing`` and redundant layers lose more. Fractions are then clamped to [0, MAX_SLICE]
(re-spreading what the clamp removed over the other layers) and the kept widths
``D * (1 - s_i)`` rounded to multiples of WIDTH_MULTIPLE (32, the kernels' packing block) with
the total width kept (largest remainders), so the mean kept width is the target up to one
multiple over the whole model. ``slice_schedule="constant"`` is SliceGPT's uniform slicing.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .compress import default_dtype, quantizable_linears
from ..model.adapters import get_adapter
from ..format.qweight import padded_in_features
from ..quant.recipe import QuantConfig, Recipe
from .scores import importance as importance_values
from .scores import scores as compute_scores

WIDTH_MULTIPLE = 32
MAX_SLICE = 0.9


def _layer_linears(model: nn.Module) -> Dict[int, List[Tuple[int, int]]]:
    """{layer index: [(out_features, in_features), ...]} of the decoder's linear layers."""
    adapter = get_adapter(model)
    shapes: Dict[int, List[Tuple[int, int]]] = {}
    for name, linear, _, _ in quantizable_linears(model):
        index = adapter.layer_index(name)
        if index is not None:
            shapes.setdefault(index, []).append((linear.out_features, linear.in_features))
    return shapes


def quantized_bits(shapes: Sequence[Tuple[int, int]], bits: int, group_size: int,
                   symmetric: bool, scale_bytes: int) -> Tuple[int, int]:
    """(stored bits, weights) of linear layers of ``shapes`` under one QuantConfig."""
    stored, weights = 0, 0
    for n, k in shapes:
        kp = padded_in_features(k, group_size)
        groups = 1 if group_size == -1 else kp // group_size
        stored += n * kp * bits + n * groups * 8 * scale_bytes * (1 if symmetric else 2)
        weights += n * k
    return stored, weights


def allocate_bits(importance: Sequence[float], layer_cost, choices: Sequence[int],
                  avg_bits: float) -> Tuple[List[int], float]:
    """Per-layer bits and the achieved average (see the module docstring).

    Args:
        importance: per layer, higher = more important.
        layer_cost: layer_cost(index, bits) -> (stored bits, weights) of that layer.
        choices: bit widths, any order.
        avg_bits: the target average bits per weight.
    """
    levels_desc = sorted(set(int(c) for c in choices), reverse=True)
    n = len(importance)
    order = sorted(range(n), key=lambda i: (importance[i], i))  # least important first
    level = [0] * n
    path = [list(level)]
    for step in range(len(levels_desc) - 1):
        for i in order:
            if level[i] == step:
                level[i] = step + 1
                path.append(list(level))

    def average(levels):
        stored = weights = 0
        for i, lv in enumerate(levels):
            s, w = layer_cost(i, levels_desc[lv])
            stored, weights = stored + s, weights + w
        return stored / weights

    averages = [average(p) for p in path]
    lo, hi = min(averages), max(averages)
    if not lo - 0.5 <= avg_bits <= hi + 0.5:
        raise ValueError(f"avg_bits={avg_bits} is out of reach with bit choices {levels_desc}: "
                         f"achievable averages span {lo:.3f} .. {hi:.3f} bits per weight "
                         f"(scales and zeros included)")
    best = min(range(len(path)), key=lambda j: (abs(averages[j] - avg_bits), j))
    return [levels_desc[lv] for lv in path[best]], averages[best]


def slice_fractions(redundancy: Sequence[float], target: float, schedule: str = "dynamic",
                    base: Optional[float] = None) -> List[float]:
    """Per-layer fractions of the residual width to delete, with mean ``target``."""
    n = len(redundancy)
    if not 0.0 <= target < MAX_SLICE:
        raise ValueError(f"slicing must be a fraction in [0, {MAX_SLICE}), got {target}")
    if schedule == "constant":
        return [float(target)] * n
    if schedule != "dynamic":
        raise ValueError(f"slice_schedule must be 'dynamic' or 'constant', got {schedule!r}")
    base = target / 2 if base is None else float(base)
    if not 0.0 <= base <= target:
        raise ValueError(f"slice_base must be in [0, slicing={target}], got {base}")
    r = torch.tensor(list(redundancy), dtype=torch.float64)
    span = float(r.max() - r.min())
    if span == 0.0:
        return [float(target)] * n
    r = (r - r.min()) / span
    s = base + (target - base) * r / r.mean()
    # clamp to [0, MAX_SLICE] and re-spread what the clamp removed over the unclamped layers
    for _ in range(n):
        over = s > MAX_SLICE
        if not bool(over.any()):
            break
        excess = float((s[over] - MAX_SLICE).sum())
        s[over] = MAX_SLICE
        free = ~over & (s < MAX_SLICE)
        s[free] += excess / int(free.sum())
    return s.tolist()


def kept_widths(fractions: Sequence[float], hidden: int, multiple: int = WIDTH_MULTIPLE) -> List[int]:
    """Widths D * (1 - s_i) rounded to ``multiple`` with the total kept (largest remainders),
    each at least one multiple and at most ``hidden``."""
    exact = [hidden * (1.0 - f) for f in fractions]
    units = [e / multiple for e in exact]
    floor = [max(1, math.floor(u)) for u in units]
    target_units = max(len(units), round(sum(units)))
    max_units = hidden // multiple
    remainders = sorted(range(len(units)), key=lambda i: units[i] - math.floor(units[i]), reverse=True)
    extra = target_units - sum(floor)
    for i in remainders:
        if extra <= 0:
            break
        if floor[i] < max_units:
            floor[i] += 1
            extra -= 1
    widths = [min(hidden, u * multiple) for u in floor]
    return widths


def _check_plan_arguments(model: nn.Module, avg_bits, bit_choices, method, group_size, slicing,
                          slice_schedule) -> None:
    """ValueError on arguments plan cannot use, before any measurement is made."""
    from .compress import compressed_reason
    from ..format.packing import SUPPORTED_BITS
    from ..format.qweight import SUPPORTED_GROUP_SIZES
    from ..slicing.structure import is_folded, layer_widths
    from ..utils import is_int
    already = compressed_reason(model)
    if already:
        raise ValueError(f"plan measures the original model, and this one is already compressed "
                         f"({already}); plan on the dense model")
    if is_folded(model):
        raise ValueError(f"plan measures the original model, and this one is already sliced "
                         f"(kept widths {layer_widths(model)}); plan on the unsliced model")
    if isinstance(bit_choices, (str, bytes)) or not isinstance(bit_choices, Sequence):
        raise ValueError(f"bit_choices must be a sequence of bit widths such as (4, 2), got "
                         f"{bit_choices!r}")
    if not bit_choices:
        raise ValueError(f"bit_choices is empty: give at least one of {SUPPORTED_BITS}")
    bad = [b for b in bit_choices if not is_int(b) or b not in SUPPORTED_BITS]
    if bad:
        raise ValueError(f"bit_choices must be integers among {SUPPORTED_BITS}, got {bad}")
    if avg_bits is not None and (isinstance(avg_bits, bool)
                                 or not isinstance(avg_bits, (int, float))
                                 or not math.isfinite(avg_bits) or avg_bits <= 0):
        raise ValueError(f"avg_bits must be a positive number or None, got {avg_bits!r}")
    if method not in ("gptq", "rtn"):
        raise ValueError(f"method must be 'gptq' or 'rtn', got {method!r}")
    if not is_int(group_size) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size!r}")
    if slicing is not None:
        if isinstance(slicing, bool) or not isinstance(slicing, (int, float)) \
                or not 0.0 <= slicing < MAX_SLICE:
            raise ValueError(f"slicing must be a fraction in [0, {MAX_SLICE}) or None, got "
                             f"{slicing!r}")
        if slice_schedule not in ("dynamic", "constant"):
            raise ValueError(f"slice_schedule must be 'dynamic' or 'constant', got "
                             f"{slice_schedule!r}")


def plan(model: nn.Module, calibration: Optional[torch.Tensor] = None,
         avg_bits: Optional[float] = None, bit_choices: Sequence[int] = (4, 2),
         importance: Union[str, Sequence[float]] = "lim", method: str = "gptq",
         group_size: int = 128, slicing: Optional[float] = None, slice_schedule: str = "dynamic",
         slice_base: Optional[float] = None, symmetric: bool = False, seed: int = 0,
         layer_scores: Optional[Dict[str, List[float]]] = None, show_progress: bool = True,
         act_bits: int = 0, rotate: bool = False,
         scale_dtype: Optional[torch.dtype] = None) -> Recipe:
    """A Recipe from measurements of ``model`` on ``calibration``.

    Args:
        avg_bits: target average bits per weight of the decoder's linear layers (scales and
            zeros included); None puts every layer at the highest choice.
        bit_choices: bit widths layers are assigned from (e.g. (4, 2) or (8, 4, 2)).
        importance: "lim", "zd", "random" or per-layer floats (higher = keeps more bits).
        method: "gptq" or "rtn" for every quantized layer.
        slicing: mean fraction of residual dimensions to delete (e.g. 0.25), or None.
        slice_schedule: "dynamic" (per-layer widths from redundancy) or "constant".
        slice_base: the smallest per-layer fraction of dynamic slicing (default slicing / 2).
        layer_scores: precomputed pyengine.scores(...) output (skips the calibration pass).
        act_bits: 8 gives every quantized layer int8 activations (QuantConfig.act_bits: the
            CPU kernels' integer path, for 2, 3, 4 and 8 bits); 0 (default) keeps every
            layer's input as it is.
        rotate: Recipe.rotate (random orthogonal rotations before quantizing; the scores are
            measured on the model as it is: LIM and slicing's redundancy do not change under
            them).
        scale_dtype: the dtype the scales and zeros will be stored in, counted in every
            layer's bits; default what pyengine.compress stores them in by default
            (compress.default_dtype: float16 unless the model is bfloat16).
    Returns:
        A Recipe; its ``info`` holds the scores, the importance used, per-layer bits and widths,
        and the achieved average bits.
    Raises:
        ValueError: on arguments out of range (checked before any measurement), on a model that
            is already compressed or sliced (plan measures the original model), on calibration
            that is not token ids of the model's vocabulary, or an ``avg_bits`` out of reach.
    """
    adapter = get_adapter(model)
    _check_plan_arguments(model, avg_bits, bit_choices, method, group_size, slicing,
                          slice_schedule)
    from ..ops.act_quant import check_act_bits
    check_act_bits(act_bits, "plan: act_bits")
    if not isinstance(rotate, bool):
        raise ValueError(f"plan: rotate must be True or False, got {rotate!r}")
    if calibration is not None:
        from .calibrate import check_calibration
        check_calibration(model, calibration)
    n_layers = len(adapter.decoder_layers(model))
    needs_scores = (avg_bits is not None and isinstance(importance, str)
                    and importance in ("lim", "zd")) or (slicing is not None
                                                         and slice_schedule == "dynamic")
    if layer_scores is None and needs_scores:
        if calibration is None:
            raise ValueError("planning from scores needs calibration data "
                             "(pyengine.calibration_data)")
        layer_scores = compute_scores(model, calibration, show_progress=show_progress)

    scale_bytes = torch.empty(0, dtype=scale_dtype or default_dtype(model)).element_size()
    shapes = _layer_linears(model)

    def cost(index, bits):
        return quantized_bits(shapes[index], bits, group_size, symmetric, scale_bytes)

    info: Dict[str, Any] = {"scores": layer_scores, "group_size": group_size, "method": method}
    if avg_bits is None:
        bits = [max(bit_choices)] * n_layers
        stored = sum(cost(i, b)[0] for i, b in enumerate(bits))
        weights = sum(cost(i, b)[1] for i, b in enumerate(bits))
        achieved = stored / weights
    else:
        values = importance_values(importance, layer_scores, n_layers, seed)
        bits, achieved = allocate_bits(values, cost, bit_choices, avg_bits)
        info["importance"] = values if not isinstance(importance, str) else importance
        info["importance_values"] = values
    info["layer_bits"] = bits
    info["achieved_avg_bits"] = achieved

    def config(b: int) -> QuantConfig:
        return QuantConfig(b, group_size, symmetric, method, act_bits=act_bits)

    quant: Dict[str, Optional[QuantConfig]] = {}
    for i, b in enumerate(bits):
        quant[re.escape(f"{adapter.layers}.{i}.") + ".*"] = config(b)
    quant["_default"] = config(max(bits))
    if act_bits:
        info["act_bits"] = act_bits

    widths = None
    if slicing is not None:
        redundancy = layer_scores["lr"] if slice_schedule == "dynamic" else [0.0] * n_layers
        fractions = slice_fractions(redundancy, slicing, slice_schedule, slice_base)
        widths = kept_widths(fractions, model.config.hidden_size)
        info["slice_fractions"] = fractions
        info["slice_schedule"] = slice_schedule
        info["slice_base"] = (slicing / 2 if slice_base is None else slice_base) \
            if slice_schedule == "dynamic" else None
        info["achieved_mean_slice"] = 1.0 - sum(widths) / (n_layers * model.config.hidden_size)
    return Recipe(quant=quant, slicing=widths, info=info, rotate=rotate)
