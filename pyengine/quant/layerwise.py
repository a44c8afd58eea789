"""What the calibrated quantizers (GPTQ, MatQuant, calibrated RTN) share: grouping the named
linears by decoder layer, collecting each linear's input Hessian sum(x^T x) (or its diagonal)
while the layer runs, and finding where a named linear sits so it can be replaced."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, Mapping, Optional, Tuple, TypeVar

import torch
from torch import nn

from ..pipeline.calibrate import LayerInputs, run_layer
from ..model.adapters import get_adapter
from ..nn.sliced import ResidualProjection

T = TypeVar("T")


def group_by_layer(model: nn.Module, configs: Mapping[str, T], method: str) -> Dict[int, Dict[str, T]]:
    """{decoder layer index: {module name: config}}; ValueError for a name outside the layers."""
    adapter = get_adapter(model)
    by_layer: Dict[int, Dict[str, T]] = {}
    for name, cfg in configs.items():
        index = adapter.layer_index(name)
        if index is None:
            raise ValueError(f"{method} runs on decoder layers; {name!r} is outside them "
                             f"(use method='rtn')")
        by_layer.setdefault(index, {})[name] = cfg
    return by_layer


def _linear_input(module: nn.Module, args: tuple, out) -> torch.Tensor:
    """What a hooked linear reads: its input, or for a ResidualProjection its output (the
    projection's input after its online transform, if any)."""
    return out if isinstance(module, ResidualProjection) else args[0]


class _InputsSeen(Exception):
    """Raised by input_hessians' hooks once every named linear has read its input."""


def input_hessians(model: nn.Module, layer: nn.Module, inputs: LayerInputs, names: Iterable[str],
                   compute_device) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """Runs ``layer`` on ``inputs`` and returns, per named linear, sum(x^T x) [K, K] (fp32) over
    its input rows x [tokens, K], and the number of rows.

    The hook sits on the named module: for a sliced block's output projection that is the
    ResidualProjection, whose forward returns the projection's input (after its online
    transform, if any) even when the layer then runs the projection fused with its shortcut
    (never calling the linear itself).

    Linears that read the very same input tensor (q/k/v, gate/up) share one product per
    batch, and, when they shared it in every batch, one returned tensor.

    A batch stops as soon as every named linear has read its input: the rest of the layer
    (typically the MLP's down projection and the residual add) does not run, since only the
    inputs are wanted. Plain linears are hooked before their forward, so the last one's own
    product is skipped too.
    """
    names = list(names)
    hessians: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}
    shares_with: Dict[str, Optional[str]] = {}  # name -> the name whose product it took
    last: Dict[str, object] = {}  # the input the latest product was computed for, and it
    seen: set = set()  # the names whose input this batch has given
    handles = []

    def record(name: str, x_in: torch.Tensor) -> None:
        if last.get("input") is x_in:  # the same tensor as the previous linear's input
            h, leader = last["h"], last["name"]
        else:
            h, leader = _upper_gram(x_in.reshape(-1, x_in.shape[-1]).to(torch.float32)), None
            last.update(input=x_in, h=h, name=name)
        hessians[name] = h if name not in hessians else hessians[name] + h
        counts[name] = counts.get(name, 0) + x_in.reshape(-1, x_in.shape[-1]).shape[0]
        if shares_with.get(name, leader) != leader:
            leader = None  # shared in one batch, not in another: keep its own sum
        shares_with[name] = leader
        seen.add(name)
        if len(seen) == len(names):
            raise _InputsSeen

    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, ResidualProjection):  # what it reads is its output
            handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name: record(name, out)))
        else:
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: record(name, args[0])))
    try:
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
            seen.clear()
            last.clear()
            try:
                run_layer(layer, LayerInputs([hidden], [kwargs]), compute_device)
            except _InputsSeen:
                pass
    finally:
        for handle in handles:
            handle.remove()
        last.clear()
    for name, leader in shares_with.items():
        if leader is not None and shares_with.get(leader) is None:
            hessians[name] = hessians[leader]  # equal sums of the same products: one tensor
    full: Dict[int, torch.Tensor] = {}  # each summed tensor made symmetric once
    for name, h in hessians.items():
        if id(h) not in full:
            full[id(h)] = torch.triu(h) + torch.triu(h, diagonal=1).T
        hessians[name] = full[id(h)]
    return hessians, counts


# Column blocks of _upper_gram: the products above the diagonal blocks are skipped.
_GRAM_BLOCKS = 4


def _upper_gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x [K, K] for x [tokens, K], computed on and above the diagonal blocks only (a
    quarter fewer multiply-adds with 4 blocks); below them the result holds zeros. The sums of
    such products are made symmetric at the end of input_hessians (from their upper
    triangle)."""
    k = x.shape[1]
    block = max(64, -(-k // _GRAM_BLOCKS))
    h = torch.zeros(k, k, dtype=x.dtype, device=x.device)
    for i in range(0, k, block):
        h[i:i + block, i:].addmm_(x[:, i:i + block].T, x[:, i:])
    return h


@contextlib.contextmanager
def recording_input_mean_squares(model: nn.Module,
                                 names: Iterable[str]) -> Iterator[Dict[str, torch.Tensor]]:
    """While the block runs, records the inputs of the named linears; on leaving it, the dict
    it yields holds, per linear that ran, the mean over its input rows x [tokens, K] of x * x:
    fp32 [K], the diagonal of :func:`input_hessians`' product divided by the number of rows
    (what an error in each input costs the output, to first order: calibrated RTN's input
    weights). Hooks as in :func:`input_hessians`."""
    sums: Dict[str, torch.Tensor] = {}
    rows: Dict[str, int] = {}
    handles = []
    for name in names:
        def hook(mod, args, out, name=name):
            x_in = _linear_input(mod, args, out)
            x = x_in.reshape(-1, x_in.shape[-1]).to(torch.float32)
            square_sum = x.square().sum(dim=0)
            sums[name] = square_sum if name not in sums else sums[name] + square_sum
            rows[name] = rows.get(name, 0) + x.shape[0]

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    means: Dict[str, torch.Tensor] = {}
    try:
        yield means
    finally:
        for handle in handles:
            handle.remove()
    means.update({name: sums[name] / max(rows[name], 1) for name in sums})


def input_mean_squares(model: nn.Module, layer: nn.Module, inputs: LayerInputs,
                       names: Iterable[str], compute_device) -> Dict[str, torch.Tensor]:
    """Runs ``layer`` on ``inputs`` and returns what :func:`recording_input_mean_squares`
    records of the named linears."""
    names = list(names)
    with recording_input_mean_squares(model, names) as means:
        if names:
            run_layer(layer, inputs, compute_device)
    return means
