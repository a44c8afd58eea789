"""Shared glue of the backends that call pyengine._C: pointer and stride extraction, the fused
shortcut epilogue around the native kernels, and the plane-layout (Matryoshka) kernels
plane_matmul_cpu / plane_matmul_cuda."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .._ext import DTYPE_CODES, extension, extension_error
from .base import PackedOperand, PlaneOperand

# launch(target, accumulate): runs a native kernel writing (accumulate False) or adding
# (accumulate True) x @ W^T (+ bias) into target [M, n] (x's dtype or float32).
Launch = Callable[[torch.Tensor, bool], None]


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def run_native(launch: Launch, x: torch.Tensor, n: int, residual: Optional[torch.Tensor],
               shortcut: Optional[torch.Tensor], out: Optional[torch.Tensor],
               accumulates: bool) -> torch.Tensor:
    """Runs a native kernel into ``out`` ([M, n] in x's dtype; allocated when None), with the
    shortcut product ``residual @ shortcut`` fused: it goes through the vendor BLAS into an fp32
    buffer that the kernel accumulates into (``accumulates``), or that is added to the kernel's
    fp32 result (kernels without an accumulate mode); one rounding to x's dtype at the end."""
    if out is None:
        out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    if residual is None:
        launch(out, False)
        return out
    product = residual.to(torch.float32) @ shortcut.to(torch.float32)  # [M, n] fp32
    if accumulates:
        launch(product, True)
    else:
        kernel_result = torch.empty_like(product)
        launch(kernel_result, False)
        product += kernel_result
    return out.copy_(product)


# The builders of the kernels' positional arguments below return plain tuples (a call packs and
# unpacks no names), in the order of the lists of csrc/kernel_args.h, which pyengine._C exports
# as QMATMUL_ARG_NAMES, PLANE_ARG_NAMES, ...; tests/backends/test_native_args.py checks each
# builder's values against those names.
def packed_weight_args(w: PackedOperand) -> tuple:
    """The weight's part of the ``qmatmul_cpu`` / ``qmatmul_cuda`` arguments (qweight, ldq,
    scales, zeros, sz_dtype, lds), derived once per operand (PackedOperand.native)."""
    weight_args = w.native
    if weight_args is None:
        for t in (w.qweight, w.scales, w.zeros):
            if t is not None and t.stride(-1) != 1:
                raise ValueError("quantized weight tensors must have a contiguous last dimension")
        weight_args = w.native = (
            w.qweight.data_ptr(), w.qweight.stride(0), w.scales.data_ptr(), _ptr(w.zeros),
            DTYPE_CODES[w.scales.dtype], w.scales.stride(0))
    return weight_args


def packed_kernel_args(x: torch.Tensor, w: PackedOperand, bias: Optional[torch.Tensor],
                       target: torch.Tensor, accumulate: bool, n: int, k: int) -> tuple:
    """The arguments of ``qmatmul_cpu`` / ``qmatmul_cuda`` up to group_size (pointers,
    strides, dtype codes, sizes: ``_C.QMATMUL_ARG_NAMES``) for a packed weight (its part:
    :func:`packed_weight_args`)."""
    q_ptr, ldq, s_ptr, z_ptr, sz_dtype, lds = packed_weight_args(w)
    return (x.data_ptr(), DTYPE_CODES[x.dtype], x.stride(0), q_ptr, ldq, s_ptr, z_ptr, sz_dtype,
            lds, _ptr(bias), DTYPE_CODES[bias.dtype] if bias is not None else 0,
            target.data_ptr(), DTYPE_CODES[target.dtype], target.stride(0), accumulate,
            x.shape[0], n, k, w.bits, w.group_size)


def plane_kernel_call(kernel: Callable[..., torch.Tensor], x: torch.Tensor, w: PlaneOperand,
                      bias: Optional[torch.Tensor], target: torch.Tensor, n: int,
                      k: int) -> None:
    """Runs a plane kernel (:func:`plane_matmul_cpu` or :func:`plane_matmul_cuda`) on a
    PlaneOperand into ``target`` (bias: [>= n], contiguous); scales and zeros of different
    strides are made contiguous (the kernels take one stride for both)."""
    scales, zeros = w.scales, w.zeros
    if zeros is not None and zeros.stride() != scales.stride():
        scales, zeros = scales.contiguous(), zeros.contiguous()
    if bias is not None and bias.shape[0] != n:
        bias = bias[:n]  # a sliced call reads the first n entries of a longer bias
    kernel(x, w.plane_hi, w.plane_mid, w.plane_lo, scales, zeros, bias, w.precision,
           w.group_size, n, k, out=target)


def dense_matmul_blas(x: torch.Tensor, w: torch.Tensor, n: int, k: int,
                      bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                      shortcut: Optional[torch.Tensor], out: Optional[torch.Tensor]) -> torch.Tensor:
    """Dense weights go to the vendor BLAS through torch, on a strided view of W[:n, :k] (no
    copy of the weight)."""
    y = F.linear(x[:, :k], w[:n, :k], None if bias is None else bias[:n])
    if residual is not None:
        y = y.addmm_(residual, shortcut)
    if out is None:
        return y
    return out.copy_(y)


# ---- Matryoshka bit planes ----------------------------------------------------------------------

def plane_kernel_unavailable_reason() -> Optional[str]:
    """None when pyengine._C has the CPU plane-layout kernel (``plane_matmul_cpu``), else why
    not (one line)."""
    ext = extension()
    if ext is None:
        return f"pyengine._C is not available ({extension_error()})"
    if not hasattr(ext, "plane_matmul_cpu"):
        return "this build of pyengine._C has no plane_matmul_cpu (rebuild the extension)"
    return None


_PLANE_NAMES = ("plane_hi", "plane_mid", "plane_lo")
_PLANE_MIN_PRECISION = {"plane_hi": 2, "plane_mid": 3, "plane_lo": 6}  # lowest r reading it


def cuda_plane_kernel_unavailable_reason() -> Optional[str]:
    """None when pyengine._C has the CUDA plane-layout kernels (``plane_matmul_cuda``) and torch
    sees a CUDA device, else why not (one line)."""
    from . import get_backend  # the cuda backend's own check: extension, CUDA build, device
    why = get_backend("cuda").unavailable_reason()
    if why is not None:
        return why
    if not hasattr(extension(), "plane_matmul_cuda"):
        return ("this build of pyengine._C predates the CUDA plane kernels (no "
                "plane_matmul_cuda): rebuild the extension")
    return None


def _plane_pointer_args(op: str, device_type: str, x: torch.Tensor, plane_hi: torch.Tensor,
                        plane_mid: Optional[torch.Tensor], plane_lo: Optional[torch.Tensor],
                        scales: torch.Tensor, zeros: Optional[torch.Tensor],
                        bias: Optional[torch.Tensor], precision: int, group_size: int, n: int,
                        k: int, out: Optional[torch.Tensor]) -> tuple:
    """Checks the tensors of a plane-layout call (every tensor on x's device, which must be of
    ``device_type``) and returns (out, the pointer/stride/size arguments of the _C kernels up to
    group_size: ``_C.PLANE_ARG_NAMES``)."""
    def fail(exc, why):
        raise exc(f"{op}(M={x.shape[0] if x.dim() == 2 else '?'}, N={n}, K={k}, "
                  f"precision={precision}, group_size={group_size}): {why}")

    if x.device.type != device_type:
        fail(ValueError, f"x must be a {device_type} tensor, got device {x.device}")
    if x.dim() != 2 or x.shape[1] != k:
        fail(ValueError, f"x must be [M, {k}], got shape {tuple(x.shape)}")
    if x.dtype not in DTYPE_CODES:
        fail(TypeError, f"x must be float32, float16 or bfloat16, got {x.dtype}")
    planes = (plane_hi, plane_mid, plane_lo)
    for name, t in (("x", x), ("plane_hi", plane_hi), ("plane_mid", plane_mid),
                    ("plane_lo", plane_lo), ("scales", scales), ("zeros", zeros), ("bias", bias),
                    ("out", out)):
        if t is None:
            continue
        if t.device != x.device:
            fail(ValueError, f"{name} must be on x's device {x.device}, got {t.device}")
        if t.stride(-1) != 1 and t.numel():
            fail(ValueError, f"{name} must have a contiguous last dimension")
    for name, t in zip(_PLANE_NAMES, planes):
        if t is None:
            if precision >= _PLANE_MIN_PRECISION[name]:
                fail(ValueError, f"a {precision}-bit slice reads {name}, got None")
        elif t.dtype != torch.int32 or t.dim() != 2 or t.shape[0] < n:
            fail(ValueError, f"{name} must be int32 [>={n}, words], got {t.dtype} "
                             f"{tuple(t.shape)}")
    if scales.dtype not in DTYPE_CODES or scales.dim() != 2 or scales.shape[0] < n:
        fail(ValueError, f"scales must be float [>={n}, G], got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    if zeros is not None and (zeros.dtype != scales.dtype or zeros.shape != scales.shape
                              or zeros.stride() != scales.stride()):
        fail(ValueError, "zeros must match scales in dtype, shape and strides")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n
                             or bias.dtype not in DTYPE_CODES):
        fail(ValueError, f"bias must be a float vector of {n}, got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif (out.shape != (m, n) or out.dtype not in (x.dtype, torch.float32)
          or not out.is_contiguous()):
        fail(ValueError, f"out must be contiguous [{m}, {n}] in x's dtype ({x.dtype}) or "
                         f"float32, got {out.dtype} {tuple(out.shape)}")
    args = (x.data_ptr(), DTYPE_CODES[x.dtype], x.stride(0),
            plane_hi.data_ptr(), plane_hi.stride(0),
            _ptr(plane_mid), 0 if plane_mid is None else plane_mid.stride(0),
            _ptr(plane_lo), 0 if plane_lo is None else plane_lo.stride(0),
            scales.data_ptr(), _ptr(zeros), DTYPE_CODES[scales.dtype], scales.stride(0),
            _ptr(bias), 0 if bias is None else DTYPE_CODES[bias.dtype],
            out.data_ptr(), DTYPE_CODES[out.dtype], out.stride(0),
            m, n, k, precision, group_size)
    return out, args


def plane_matmul_cpu(x: torch.Tensor, plane_hi: torch.Tensor, plane_mid: Optional[torch.Tensor],
                     plane_lo: Optional[torch.Tensor], scales: torch.Tensor,
                     zeros: Optional[torch.Tensor], bias: Optional[torch.Tensor], precision: int,
                     group_size: int, n: int, k: int, out: Optional[torch.Tensor] = None,
                     isa: str = "", num_threads: Optional[int] = None) -> torch.Tensor:
    """out[M, n] = x[M, k] @ W_r[:n, :k]^T (+ bias) with the C++ kernel ``plane_matmul_cpu``,
    W_r the r-bit slice of a Matryoshka parent read from its bit planes (fp32 accumulation).

    Args:
        x: [M, k] float32 / float16 / bfloat16 on the CPU, stride(-1) == 1.
        plane_hi, plane_mid, plane_lo: int32 [>=n, words] packed planes (stride(-1) == 1);
            plane_mid may be None for r = 2 and plane_lo for r <= 4 (never read then).
        scales, zeros: [>=n, G] float (zeros None: symmetric, zero point 128).
        bias: [n] float or None.
        precision: r in (8, 6, 4, 3, 2).
        group_size: codes per scale, a multiple of 32 (the padded row length for a per-channel
            weight).
        out: [M, n] contiguous in x's dtype (or float32) to write into (allocated in x's
            dtype when None).
        isa: "" for the best instruction set of this CPU, or one of
            build_info()["cpu_isas_usable"].
        num_threads: OpenMP threads (default: torch.get_num_threads()).
    Returns:
        out, [M, n] in x's dtype.
    """
    op = "plane_matmul_cpu"
    why = plane_kernel_unavailable_reason()
    if why is not None:
        raise RuntimeError(f"{op}: {why}")
    out, args = _plane_pointer_args(op, "cpu", x, plane_hi, plane_mid, plane_lo, scales, zeros,
                                    bias, precision, group_size, n, k, out)
    extension().plane_matmul_cpu(
        *args, torch.get_num_threads() if num_threads is None else num_threads, isa)
    return out


def plane_matmul_cuda(x: torch.Tensor, plane_hi: torch.Tensor, plane_mid: Optional[torch.Tensor],
                      plane_lo: Optional[torch.Tensor], scales: torch.Tensor,
                      zeros: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      precision: int, group_size: int, n: int, k: int,
                      out: Optional[torch.Tensor] = None, kernel: str = "") -> torch.Tensor:
    """out[M, n] = x[M, k] @ W_r[:n, :k]^T (+ bias) with the CUDA kernels ``plane_matmul_cuda``
    (csrc/cuda/plane_matmul.cu) on torch's current stream: the decode GEMV for M <= 16, the
    simple kernel above (``kernel="decode"`` / ``"simple"`` forces one). Same arguments as
    :func:`plane_matmul_cpu`, every tensor on one CUDA device."""
    op = "plane_matmul_cuda"
    why = cuda_plane_kernel_unavailable_reason()
    if why is not None:
        raise RuntimeError(f"{op}: {why}")
    out, args = _plane_pointer_args(op, "cuda", x, plane_hi, plane_mid, plane_lo, scales, zeros,
                                    bias, precision, group_size, n, k, out)
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    extension().plane_matmul_cuda(*args, device=device,
                                  stream=torch.cuda.current_stream(x.device).cuda_stream,
                                  kernel=kernel)
    return out
