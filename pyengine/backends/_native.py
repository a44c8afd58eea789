"""Shared glue of the backends that call pyengine._C: pointer and stride extraction, and the
fused epilogue (bias, shortcut) around the quantized kernels."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .._ext import DTYPE_CODES
from .base import QuantTensors

# kernel(x, x_dtype, ldx, qweight, ldq, scales, zeros, sz_dtype, lds, bias, bias_dtype,
#        out, out_dtype, ldo, accumulate, M, N, K, bits, group_size)
Kernel = Callable[..., None]


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def quant_matmul_native(kernel: Kernel, x: torch.Tensor, w: QuantTensors, n: int, k: int,
                        bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                        shortcut: Optional[torch.Tensor], out: Optional[torch.Tensor]) -> torch.Tensor:
    """Runs a native quantized kernel; the shortcut product goes through the vendor BLAS into an
    fp32 buffer that the kernel then accumulates into."""
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if residual is not None:
        target = residual.to(torch.float32) @ shortcut.to(torch.float32)  # [M, n] fp32
        accumulate = True
    else:
        target, accumulate = out, False
    for t in (w.qweight, w.scales, w.zeros):
        if t is not None and t.stride(-1) != 1:
            raise ValueError("quantized weight tensors must have a contiguous last dimension")
    kernel(
        _ptr(x), DTYPE_CODES[x.dtype], x.stride(0),
        _ptr(w.qweight), w.qweight.stride(0),
        _ptr(w.scales), _ptr(w.zeros), DTYPE_CODES[w.scales.dtype], w.scales.stride(0),
        _ptr(bias), DTYPE_CODES[bias.dtype] if bias is not None else 0,
        _ptr(target), DTYPE_CODES[target.dtype], target.stride(0), accumulate,
        m, n, k, w.bits, w.group_size)
    if target is not out:
        out.copy_(target)
    return out


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
