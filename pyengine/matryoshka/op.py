"""The plane-layout matmul: ``y = x @ W_r^T + bias`` for the r-bit slice of a Matryoshka parent.

One ``torch.library`` custom op, ``torch.ops.pyengine.matryoshka_matmul``, takes the parent's bit
planes and the precision r. The public wrapper passes only the planes the slice reads
(``PLANES_READ[r]``; the others are None), so an r-bit call touches only those bytes.

Paths (:func:`matryoshka_path` tells which one a call takes; ``$PYENGINE_BACKEND`` stands in for
``backend=None``, as for the other ops):

* ``"cpu-plane-kernel"``: the C++ kernel ``pyengine._C.plane_matmul_cpu`` reads the planes
  directly (fp32 accumulation, no canonical copy of the weight). It serves CPU tensors for
  ``backend=None`` and ``backend="cpu"`` whenever the extension has it.
* ``"triton-plane-kernel"``: the Triton kernels of ``pyengine.kernels.matryoshka`` read the
  planes directly on CUDA tensors, for ``backend=None`` and ``backend="triton"`` where the
  triton backend is available.
* ``"cuda-plane-kernel"``: the CUDA kernels ``pyengine._C.plane_matmul_cuda`` (a decode GEMV for
  M <= 16, a simple kernel above) read the planes directly on CUDA tensors, for
  ``backend="cuda"``, and for ``backend=None`` where Triton is missing.
* ``"torch-reference"``: fp32 math on the slice dequantized from the planes on every call
  (nothing is cached). ``backend="torch"``, and ``backend=None`` where the C++ kernel is missing
  (no extension, or an older build) or, on CUDA, neither Triton nor the CUDA plane kernel is
  there.
* ``"canonical-slice:<backend>"``: any other explicitly requested backend (``"cuda"`` with an
  extension that has no CUDA plane kernel, ``"triton"`` on CPU tensors, or ``"cpu"`` with an
  extension that predates the plane kernel) serves the call
  by assembling the canonical r-bit slice for this call only (a transient tensor of
  ``K * r / 8`` bytes per row, freed afterwards; an int6 slice is assembled as 8-bit codes) and
  running its canonical quantized kernel on it; an unavailable backend raises BackendError.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..backends import ENV_BACKEND, _native
from ..ops import checks
from ..ops.matmul import eager_call_ok
from .weight import (PLANE_BITS, PLANES_READ, MatryoshkaWeight, canonical_slice, check_precision,
                     dequantize_planes)

Tensor = torch.Tensor

PATH_PLANE_KERNEL = "cpu-plane-kernel"
PATH_REFERENCE = "torch-reference"
PATH_CANONICAL_PREFIX = "canonical-slice:"
PATH_TRITON = "triton-plane-kernel"
PATH_CUDA = "cuda-plane-kernel"


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


def _select_path(device_type: str, backend: Optional[str]) -> str:
    """The path (PATH_*) for tensors on ``device_type`` and the requested backend."""
    requested = backend or os.environ.get(ENV_BACKEND) or None
    if requested == "torch":
        return PATH_REFERENCE
    kernel_here = device_type == "cpu" and _native.plane_kernel_unavailable_reason() is None
    cuda_kernel_here = (device_type == "cuda"
                        and _native.cuda_plane_kernel_unavailable_reason() is None)
    if requested is None:
        if kernel_here:
            return PATH_PLANE_KERNEL
        if device_type == "cuda" and _triton_usable():
            return PATH_TRITON
        if cuda_kernel_here:
            return PATH_CUDA
        return PATH_REFERENCE
    if requested == "cpu" and kernel_here:
        return PATH_PLANE_KERNEL
    if requested == "triton" and device_type == "cuda" and _triton_usable():
        return PATH_TRITON
    if requested == "cuda" and cuda_kernel_here:
        return PATH_CUDA
    return PATH_CANONICAL_PREFIX + requested


def _triton_usable() -> bool:
    from ..backends import get_backend
    return get_backend("triton").unavailable_reason() is None


def matryoshka_path(x: Tensor, backend: Optional[str] = None) -> str:
    """Which implementation :func:`matryoshka_matmul` uses for activations ``x`` and ``backend``
    (``$PYENGINE_BACKEND`` when backend is None): ``"cpu-plane-kernel"``,
    ``"triton-plane-kernel"``, ``"cuda-plane-kernel"``, ``"torch-reference"`` or
    ``"canonical-slice:<backend>"`` (see the module docstring)."""
    return _select_path(x.device.type, backend)


def _plane_kernel_matmul(x2: Tensor, plane_hi: Tensor, plane_mid: Optional[Tensor],
                         plane_lo: Optional[Tensor], scales: Tensor, zeros: Optional[Tensor],
                         bias: Optional[Tensor], precision: int, group_size: int, n: int,
                         k: int, kernel=_native.plane_matmul_cpu) -> Tensor:
    """[M, n] in x2's dtype from a compiled plane kernel (``_native.plane_matmul_cpu`` or
    ``plane_matmul_cuda``); tensors are made contiguous in their last dimension where they are
    not (the kernels take row strides)."""
    def last_contiguous(t):
        return t if t is None or t.stride(-1) == 1 else t.contiguous()

    if zeros is not None and zeros.stride() != scales.stride():
        scales, zeros = scales.contiguous(), zeros.contiguous()
    return kernel(
        last_contiguous(x2), last_contiguous(plane_hi), last_contiguous(plane_mid),
        last_contiguous(plane_lo), last_contiguous(scales), last_contiguous(zeros),
        None if bias is None else bias.contiguous(), precision,
        _effective_group_size(plane_hi, group_size), n, k)


def _matryoshka_matmul_impl(x: Tensor, plane_hi: Tensor, plane_mid: Optional[Tensor],
                            plane_lo: Optional[Tensor], scales: Tensor, zeros: Optional[Tensor],
                            bias: Optional[Tensor], precision: int, group_size: int, n: int,
                            k: int, backend: Optional[str] = None) -> Tensor:
    """The custom op's body (also called directly for plain eager calls, see
    pyengine.ops.matmul.eager_call_ok)."""
    path = _select_path(x.device.type, backend)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_empty(*lead, n)
    if path == PATH_PLANE_KERNEL:
        y = _plane_kernel_matmul(x2, plane_hi, plane_mid, plane_lo, scales, zeros, bias,
                                 precision, group_size, n, k)
        return y.view(*lead, n)
    if path == PATH_CUDA:
        y = _plane_kernel_matmul(x2, plane_hi, plane_mid, plane_lo, scales, zeros, bias,
                                 precision, group_size, n, k, _native.plane_matmul_cuda)
        return y.view(*lead, n)
    if path == PATH_TRITON:
        from ..kernels.matryoshka import matryoshka_matmul_triton  # imports triton
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        y = matryoshka_matmul_triton(x2, plane_hi, plane_mid, plane_lo, scales, zeros, bias,
                                     precision, group_size, n, k)
        return y.view(*lead, n)
    if path == PATH_REFERENCE:
        y = plane_reference_matmul(x2, plane_hi, plane_mid, plane_lo, scales, zeros, bias,
                                   precision, group_size, n, k)
        return y.to(x.dtype).view(*lead, n)
    from ..ops import dequant_matmul
    qw = canonical_slice(_planes(plane_hi, plane_mid, plane_lo), scales, zeros, precision,
                         group_size, (n, k))
    requested = path[len(PATH_CANONICAL_PREFIX):]
    return dequant_matmul(x2.contiguous(), qw, bias, backend=requested).view(*lead, n)


@torch.library.custom_op("pyengine::matryoshka_matmul", mutates_args=())
def _matryoshka_matmul_op(x: Tensor, plane_hi: Tensor, plane_mid: Optional[Tensor],
                          plane_lo: Optional[Tensor], scales: Tensor, zeros: Optional[Tensor],
                          bias: Optional[Tensor], precision: int, group_size: int, n: int, k: int,
                          backend: Optional[str] = None) -> Tensor:
    return _matryoshka_matmul_impl(x, plane_hi, plane_mid, plane_lo, scales, zeros, bias,
                                   precision, group_size, n, k, backend)


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
        backend: None (the C++ plane kernel for CPU tensors when pyengine._C has it, the Triton
            plane kernels for CUDA tensors, else the CUDA plane kernels, else the plane
            reference), "torch" (the plane reference), "cpu" (the C++ plane kernel), "triton"
            or "cuda" (their plane kernels on CUDA tensors), or another backend name that then
            serves the call on a transient canonical r-bit slice (see the module docstring and
            :func:`matryoshka_path`).
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
    if eager_call_ok(x, *planes, weight.scales, weight.zeros, bias):
        return _matryoshka_matmul_impl(x, planes[0], planes[1], planes[2], weight.scales,
                                       weight.zeros, bias, r, weight.group_size, n, k, backend)
    return _matryoshka_matmul_op(x, planes[0], planes[1], planes[2], weight.scales, weight.zeros,
                                 bias, r, weight.group_size, n, k, backend)


__all__ = ["PATH_CANONICAL_PREFIX", "PATH_CUDA", "PATH_PLANE_KERNEL", "PATH_REFERENCE",
           "PATH_TRITON", "matryoshka_matmul", "matryoshka_path", "plane_reference_matmul"]
