"""The plane-layout matmul: ``y = x @ W_r^T + bias`` for the r-bit slice of a Matryoshka parent.

One ``torch.library`` custom op, ``torch.ops.pyengine.matryoshka_matmul``, takes the parent's bit
planes and the precision r. The public wrapper passes only the planes the slice reads
(``PLANES_READ[r]``; the others are None), so an r-bit call touches only those bytes.

Backends: no compiled kernel reads the plane layout yet. ``backend=None`` and ``"torch"`` run
the reference (``$PYENGINE_BACKEND`` overrides None, as for the other ops): fp32 math on the slice dequantized from the planes on every call (nothing is
cached). An explicitly requested other backend (``"cpu"``, ``"cuda"``, ``"triton"``) serves the
call by assembling the canonical r-bit slice for this call only (a transient tensor of
``K * r / 8`` bytes per row, freed afterwards; an int6 slice is assembled as 8-bit codes) and
running its canonical quantized kernel on it; an unavailable backend raises BackendError.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..backends import ENV_BACKEND
from ..ops import checks
from .weight import (PLANE_BITS, PLANES_READ, MatryoshkaWeight, canonical_slice, check_precision,
                     dequantize_planes)

Tensor = torch.Tensor


def _planes(plane_hi, plane_mid, plane_lo):
    return {"plane_hi": plane_hi, "plane_mid": plane_mid, "plane_lo": plane_lo}


def _effective_group_size(plane_hi: Tensor, group_size: int) -> int:
    kp = plane_hi.shape[1] * 32 // PLANE_BITS["plane_hi"]
    return kp if group_size == -1 else group_size


def plane_reference_matmul(x: Tensor, plane_hi: Tensor, plane_mid: Optional[Tensor],
                           plane_lo: Optional[Tensor], scales: Tensor, zeros: Optional[Tensor],
                           bias: Optional[Tensor], precision: int, group_size: int, n: int,
                           k: int) -> Tensor:
    """fp32 reference [M, n] = x[M, k] @ W_r[:n, :k]^T (+ bias), W_r dequantized from the planes
    (only those of PLANES_READ[precision] are read)."""
    w = dequantize_planes(_planes(plane_hi, plane_mid, plane_lo), scales, zeros, precision,
                          _effective_group_size(plane_hi, group_size), n, k)
    y = x.to(torch.float32) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y


@torch.library.custom_op("pyengine::matryoshka_matmul", mutates_args=())
def _matryoshka_matmul_op(x: Tensor, plane_hi: Tensor, plane_mid: Optional[Tensor],
                          plane_lo: Optional[Tensor], scales: Tensor, zeros: Optional[Tensor],
                          bias: Optional[Tensor], precision: int, group_size: int, n: int, k: int,
                          backend: Optional[str] = None) -> Tensor:
    requested = backend or os.environ.get(ENV_BACKEND) or None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_empty(*lead, n)
    if requested in (None, "torch"):
        y = plane_reference_matmul(x2, plane_hi, plane_mid, plane_lo, scales, zeros, bias,
                                   precision, group_size, n, k)
        return y.to(x.dtype).view(*lead, n)
    from ..ops import dequant_matmul
    qw = canonical_slice(_planes(plane_hi, plane_mid, plane_lo), scales, zeros, precision,
                         group_size, (n, k))
    return dequant_matmul(x2.contiguous(), qw, bias, backend=requested).view(*lead, n)


@_matryoshka_matmul_op.register_fake
def _(x, plane_hi, plane_mid, plane_lo, scales, zeros, bias, precision, group_size, n, k,
      backend=None):
    return x.new_empty(*x.shape[:-1], n)


def _setup(ctx, inputs, output):
    x, hi, mid, lo, scales, zeros, bias, precision, group_size, n, k, _ = inputs
    ctx.save_for_backward(hi, mid, lo, scales, zeros)
    ctx.precision, ctx.group_size, ctx.n, ctx.k = precision, group_size, n, k
    ctx.x_dtype, ctx.x_shape = x.dtype, x.shape
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    hi, mid, lo, scales, zeros = ctx.saved_tensors
    g2 = grad.reshape(-1, ctx.n).to(torch.float32)
    gx = gb = None
    if ctx.needs_input_grad[0]:
        w = dequantize_planes(_planes(hi, mid, lo), scales, zeros, ctx.precision,
                              _effective_group_size(hi, ctx.group_size), ctx.n, ctx.k)
        gx = (g2 @ w).to(ctx.x_dtype).view(ctx.x_shape)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[6]:
        gb = g2.sum(dim=0).to(ctx.bias_dtype)
    return gx, None, None, None, None, None, gb, None, None, None, None, None


_matryoshka_matmul_op.register_autograd(_backward, setup_context=_setup)


def matryoshka_matmul(x: Tensor, weight: MatryoshkaWeight, precision: int,
                      bias: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """y = x @ W_r^T + bias, W_r the r-bit slice of a Matryoshka parent (docs/FORMAT.md).

    Args:
        x: [..., K] float32 / float16 / bfloat16.
        weight: MatryoshkaWeight [N, K] on x's device.
        precision: r in (8, 6, 4, 3, 2); only the planes of PLANES_READ[r] are passed on.
        bias: [N] or None.
        backend: None or "torch" (the plane reference), or a backend name that then serves the
            call on a transient canonical r-bit slice (see the module docstring).
    Returns:
        y: [..., N] in x's dtype.
    """
    op = "matryoshka_matmul"
    if not isinstance(weight, MatryoshkaWeight):
        raise TypeError(f"{op}: weight must be a MatryoshkaWeight, got {type(weight).__name__}")
    r = check_precision(precision)
    n, k = weight.shape
    checks.check_activation(op, "x", x, k, f"the Matryoshka weight of shape {tuple(weight.shape)}")
    checks.check_same_device(op, x, weight=weight.plane_hi)
    checks.check_bias(op, bias, n, x, exact=True)
    read = PLANES_READ[r]
    planes = [getattr(weight, name) if name in read else None
              for name in ("plane_hi", "plane_mid", "plane_lo")]
    return _matryoshka_matmul_op(x, planes[0], planes[1], planes[2], weight.scales, weight.zeros,
                                 bias, r, weight.group_size, n, k, backend)


__all__ = ["matryoshka_matmul", "plane_reference_matmul"]
