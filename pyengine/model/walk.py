"""The one walk over a model's linear layers, under the names recipes use.

A sliced (or rotated) block's output projection is a ResidualProjection holding the linear as
``proj``: the linear goes by the projection's name (``model.layers.0.self_attn.o_proj``, not
``...o_proj.proj``), and it is replaced at ``(projection, "proj")``.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Tuple

from torch import nn


class LinearSite(NamedTuple):
    """A linear layer of a model: its recipe-style ``name``, the module (nn.Linear, QuantLinear
    or MatryoshkaLinear) and where it sits (``parent.attr``)."""

    name: str
    linear: nn.Module
    parent: nn.Module
    attr: str


def _is_linear(module: nn.Module) -> bool:
    from ..nn.quant_linear import QuantLinear
    return isinstance(module, (nn.Linear, QuantLinear))


def linear_sites(model: nn.Module) -> Iterator[LinearSite]:
    """Every linear layer of ``model`` (dense or quantized), in module order."""
    from ..nn.sliced import ResidualProjection
    for name, module in model.named_modules():
        if isinstance(module, ResidualProjection):
            yield LinearSite(name, module.proj, module, "proj")
        elif _is_linear(module):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if not isinstance(parent, ResidualProjection):  # reported under its holder above
                yield LinearSite(name, module, parent, attr)


def linear_holder(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    """(parent module, attribute) where the linear named ``name`` (as :func:`linear_sites`
    names it) sits."""
    from ..nn.sliced import ResidualProjection
    module = model.get_submodule(name)
    if isinstance(module, ResidualProjection):
        return module, "proj"
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr
