"""Switching the precision Matryoshka layers serve (Mix'n'Match): pyengine.set_precision.

Names are the ones recipes use (``model.layers.3.mlp.down_proj``; in sliced models the name of
the residual projection that holds the layer). Switching only sets each layer's ``precision``
int: instant, no re-quantization, no copy of any weight.
"""

from __future__ import annotations

import re
from typing import Dict, Mapping, Union

from torch import nn

from ..model.walk import linear_sites
from .weight import PRECISIONS, check_precision

DEFAULT_KEY = "_default"


def matryoshka_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """{name: MatryoshkaLinear} of the model, in module order."""
    from ..nn.matryoshka_linear import MatryoshkaLinear
    return {site.name: site.linear for site in linear_sites(model)
            if isinstance(site.linear, MatryoshkaLinear)}


def get_precision(model: nn.Module) -> Dict[str, int]:
    """{name: precision served} of every Matryoshka layer of ``model``."""
    return {name: m.precision for name, m in matryoshka_layers(model).items()}


def set_precision(model: nn.Module, bits: Union[int, Mapping[str, int]]) -> Dict[str, int]:
    """Chooses which slice every Matryoshka layer serves; returns the resulting
    {name: precision} of all of them.

    Args:
        model: a model with MatryoshkaLinear layers (pyengine.compress with
            QuantConfig(bits=8, matryoshka=True)).
        bits: one precision for every Matryoshka layer, or {regex: precision}: patterns are
            tried in order with ``re.fullmatch`` on layer names, the first match wins, the key
            "_default" covers the rest; layers no pattern matches keep their precision.
            Precisions are 8, 6, 4, 3 or 2.
    Raises:
        ValueError: a precision outside (8, 6, 4, 3, 2); a model without Matryoshka layers; a
            pattern that matches no Matryoshka layer (e.g. it names a layer quantized at a
            fixed bit width, or a dense one). Nothing is changed when an error is raised.
    """
    layers = matryoshka_layers(model)
    if not layers:
        raise ValueError("the model has no Matryoshka layers (compress it with "
                         "QuantConfig(bits=8, matryoshka=True))")
    if not isinstance(bits, Mapping):
        r = check_precision(bits)
        for layer in layers.values():
            layer.set_precision(r)
        return get_precision(model)

    patterns = []
    for key, value in bits.items():
        if not isinstance(key, str):
            raise ValueError(f"set_precision keys must be regexes (str), got {key!r}")
        r = check_precision(value)
        if key == DEFAULT_KEY:
            continue
        try:
            patterns.append((key, re.compile(key), r))
        except re.error as exc:
            raise ValueError(f"set_precision pattern {key!r} is not a valid regex: {exc}") from None
    for key, pattern, _ in patterns:
        if not any(pattern.fullmatch(name) for name in layers):
            others = [site.name for site in linear_sites(model) if pattern.fullmatch(site.name)]
            why = (f"it names {others[:3]}{'...' if len(others) > 3 else ''}, which "
                   f"{'is' if len(others) == 1 else 'are'} not Matryoshka (fixed bit width or "
                   f"dense)") if others else "it matches no layer"
            raise ValueError(f"set_precision: pattern {key!r} matches no Matryoshka layer: {why}")
    default = bits.get(DEFAULT_KEY)
    plan: Dict[str, int] = {}
    for name in layers:
        for _key, pattern, r in patterns:
            if pattern.fullmatch(name):
                plan[name] = r
                break
        else:
            if default is not None:
                plan[name] = int(default)
    for name, r in plan.items():
        layers[name].set_precision(r)
    return get_precision(model)


__all__ = ["PRECISIONS", "get_precision", "matryoshka_layers", "set_precision"]
