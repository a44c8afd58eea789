"""Fused projections: linear layers that read the same input (q/k/v, gate/up) served by one op.

A decoder layer calls ``q_proj(x)``, ``k_proj(x)`` and ``v_proj(x)`` on the same ``x``. When the
three are QuantLinear layers of one format (bits, group size, symmetry, scale dtype, bias or
not), :func:`fuse_projections` concatenates their packed rows into one weight and makes each
layer's buffers *views* of its rows (no second copy of anything). The first member called on an
input runs one ``dequant_matmul`` over all rows; the others take their columns of that output.
At decode this saves a kernel launch and a pass over ``x`` per member, and a wider N fills the
device better.

Nothing about the module tree changes: the members stay QuantLinear layers under their own
names, with their own (view) buffers, so recipes, reports, dequantize_model and checkpoints
(which store each member's rows under its own name) see the unfused model.

How the shared output is found: the group remembers the last input tensor (by identity and
in-place version counter, so an input modified in place is never served a stale product;
inference-mode tensors have no version counter, so there identity alone decides) and
forgets it as soon as every member has taken its columns. Under ``torch.compile`` each member
runs its own op on its row view (no Python-side state to trace): a compiled model computes what
the unfused one does, at the unfused cost.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from ..ops import qlinear
from ..format.qweight import QuantizedWeight
from .quant_linear import QuantLinear


class ProjectionGroup:
    """QuantLinear layers with one input, backed by one concatenated weight.

    Attributes:
        members: the layers, in output order.
        offsets: first output column of each member in the fused product.
        weight: the fused QuantizedWeight [sum of out_features, in_features]; None while unbound
            (after the members' buffers were replaced, e.g. by ``.to()``: rebound on next use).
    """

    def __init__(self, members: Sequence[QuantLinear]) -> None:
        if len(members) < 2:
            raise ValueError("a projection group needs at least two layers")
        problem = fusion_blocker(members)
        if problem:
            raise ValueError(f"cannot fuse these layers: {problem}")
        self.members: List[QuantLinear] = list(members)
        self.offsets: List[int] = []
        start = 0
        for m in self.members:
            self.offsets.append(start)
            start += m.out_features
        self.out_features = start
        self.weight: Optional[QuantizedWeight] = None
        self.bias: Optional[torch.Tensor] = None
        self._pending = None  # [input, input version, fused output, member indices still to serve]
        for index, m in enumerate(self.members):
            m._fusion = (self, index)
        self.bind()

    def bind(self) -> None:
        """Concatenates the members' rows into one set of tensors and makes every member's
        buffers views of its rows. Peak memory: one extra copy of this group's weights, briefly
        (none when the members already lie back to back in one buffer, as pyengine.load
        reads them)."""
        ms = self.members
        qweight = _concatenated([m.qweight for m in ms])
        scales = _concatenated([m.scales for m in ms])
        zeros = None if ms[0].zeros is None else _concatenated([m.zeros for m in ms])
        bias = None if ms[0].bias is None else _concatenated([m.bias.detach() for m in ms])
        self.weight = None  # members' refresh below must not invalidate a half-built group
        for m, start in zip(ms, self.offsets):
            rows = slice(start, start + m.out_features)
            m.qweight = qweight[rows]
            m.scales = scales[rows]
            if zeros is not None:
                m.zeros = zeros[rows]
            if bias is not None:
                m.bias = nn.Parameter(bias[rows], requires_grad=False)
            m._refresh_weight()
        first = ms[0]
        self.weight = QuantizedWeight(qweight, scales, zeros, bits=first.bits,
                                      group_size=first.group_size,
                                      shape=(self.out_features, first.in_features),
                                      method=first.method)
        self.bias = bias
        self._pending = None

    def unbind(self) -> None:
        """Drops the fused tensors (a member's buffers were replaced); :meth:`output` rebinds."""
        self.weight = None
        self.bias = None
        self._pending = None

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member ``index``'s output for input ``x``: [..., members[index].out_features], its
        columns of the fused product (computed once per input), copied to a contiguous tensor:
        what follows (an activation, a reshape) then runs exactly as on the member's own
        output (PyTorch's element-wise kernels may round differently on a strided view)."""
        member = self.members[index]
        if torch.compiler.is_compiling():
            # No Python-side state while tracing: the member's own op on its row view. (Tracing
            # the fused op once per member would run it once per member: the compiler does not
            # merge identical custom-op calls in inference graphs.)
            return qlinear(x, member.quantized_weight, member.bias, act_bits=member.act_bits)
        pending = self._pending
        version = _version(x)
        if pending is None or pending[0] is not x or pending[1] != version:
            if self.weight is None:
                self.bind()
            y = qlinear(x, self.weight, self.bias, act_bits=self.members[0].act_bits)
            pending = self._pending = [x, version, y, set(range(len(self.members)))]
        waiting = pending[3]
        waiting.discard(index)
        if not waiting:
            self._pending = None  # every member served: do not keep x and y alive
        return pending[2].narrow(-1, self.offsets[index], member.out_features).contiguous()


def _concatenated(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.cat(parts) along dim 0; without a copy when the parts already lie back to back in
    one storage (pyengine.load reads a group's members into one buffer)."""
    first = parts[0]
    adjacent = all(p.is_contiguous() and p.dtype == first.dtype and p.device == first.device
                   and p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                   for p in parts)
    if adjacent:
        end = first.data_ptr()
        for p in parts:
            adjacent = adjacent and p.data_ptr() == end
            end = p.data_ptr() + p.numel() * p.element_size()
    if not adjacent:
        return torch.cat(list(parts))
    rows = sum(p.shape[0] for p in parts)
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(),
                                   (rows,) + tuple(first.shape[1:]))


def fusable_groups(model: nn.Module) -> List[List[QuantLinear]]:
    """The layers :func:`fuse_projections` would fuse (the same rule; the layers may be on the
    meta device), per group in output order."""
    from ..model.adapters import get_adapter
    adapter = get_adapter(model)
    groups = []
    for layer in adapter.decoder_layers(model):
        for block, names in ((adapter.attn, adapter.attn_inputs),
                             (adapter.mlp, adapter.mlp_inputs)):
            if len(names) < 2:
                continue
            try:
                parent = layer.get_submodule(block)
                members = [parent.get_submodule(n) for n in names]
            except AttributeError:
                continue
            if not fusion_blocker(members):
                groups.append(members)
    return groups


def _version(x: torch.Tensor) -> int:
    """The in-place version counter of ``x``; -1 for inference-mode tensors, which have none
    (an inference tensor changed in place between two members' calls is not detected)."""
    return -1 if x.is_inference() else x._version


def fusion_blocker(layers: Sequence[nn.Module]) -> str:
    """Why ``layers`` cannot share one fused op ('' when they can)."""
    if any(type(m) is not QuantLinear for m in layers):
        return "all layers must be plain QuantLinear layers (not dense, not Matryoshka)"
    if any(getattr(m, "_fusion", None) is not None for m in layers):
        return "a layer is fused already"
    first = layers[0]
    for m in layers[1:]:
        for attr in ("in_features", "bits", "group_size", "symmetric", "act_bits"):
            if getattr(m, attr) != getattr(first, attr):
                return f"{attr} differs ({getattr(first, attr)} vs {getattr(m, attr)})"
        if m.scales.dtype != first.scales.dtype:
            return f"scale dtype differs ({first.scales.dtype} vs {m.scales.dtype})"
        if m.qweight.device != first.qweight.device:
            return f"device differs ({first.qweight.device} vs {m.qweight.device})"
        if (m.bias is None) != (first.bias is None):
            return "some layers have a bias and some do not"
    return ""


def fuse_projections(model: nn.Module) -> int:
    """Fuses, in every decoder layer, the linear layers that read one input (attention q/k/v,
    MLP gate/up; as the model family's adapter names them) wherever they share a format.

    Weights are not copied (each layer's buffers become views of the fused rows); outputs are
    unchanged. Layers already fused, dense layers and Matryoshka layers are left alone.
    Returns the number of groups fused by this call.
    """
    groups = fusable_groups(model)
    for members in groups:
        ProjectionGroup(members)
    return len(groups)


def fused_groups(model: nn.Module) -> List[ProjectionGroup]:
    """The distinct projection groups of ``model``, in module order."""
    groups, seen = [], set()
    for m in model.modules():
        fusion = getattr(m, "_fusion", None) if isinstance(m, QuantLinear) else None
        if fusion is not None and id(fusion[0]) not in seen:
            seen.add(id(fusion[0]))
            groups.append(fusion[0])
    return groups
