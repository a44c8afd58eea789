"""The ``cuda`` backend: CUDA kernels of pyengine._C, launched on torch's current stream.

Quantized weights run on the native kernels; dense weights go to cuBLAS through torch on a
strided view of the weight.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .._ext import DTYPE_CODES, extension, extension_error
from ._native import dense_matmul_blas, quant_matmul_native
from .base import Backend, MatmulCase, QuantTensors


class CudaBackend(Backend):
    name = "cuda"

    @functools.lru_cache(maxsize=None)
    def unavailable_reason(self) -> Optional[str]:
        ext = extension()
        if ext is None:
            return f"pyengine._C is not available ({extension_error()})"
        if not hasattr(ext, "qmatmul_cuda"):
            return "pyengine._C was built without CUDA kernels (no nvcc at build time)"
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
        return None

    def unsupported_reason(self, case: MatmulCase) -> Optional[str]:
        if case.device_type != "cuda":
            return f"the cuda backend runs CUDA tensors only, got device {case.device_type}"
        if case.dtype not in DTYPE_CODES:
            return f"unsupported activation dtype {case.dtype}"
        return None

    def priority(self, case: MatmulCase) -> float:
        return 10.0

    def matmul(self, x, weight, n, k, bias, residual, shortcut, out=None):
        if not isinstance(weight, QuantTensors):
            return dense_matmul_blas(x, weight, n, k, bias, residual, shortcut, out)
        ext = extension()
        device = x.device.index if x.device.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(x.device).cuda_stream

        def kernel(*args):
            ext.qmatmul_cuda(*args, device=device, stream=stream)

        return quant_matmul_native(kernel, x, weight, n, k, bias, residual, shortcut, out)
