"""The ``cuda`` backend: CUDA kernels of pyengine._C, launched on torch's current stream.

Quantized weights run on the native kernels (``kernel="auto"``): the decode GEMV for M <= 16;
above that the tensor-core GEMM for float16 / bfloat16 activations and the simple kernel for
float32 ones. ``CudaBackend(kernel="simple" | "decode" | "tc")`` or the environment variable
``PYENGINE_CUDA_KERNEL`` (read at each call when the backend names no kernel) forces one of them,
so they can be compared; "decode" raises for M > 16, "tc" for float32 activations. Dense weights go to cuBLAS through torch
on a strided view of the weight.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from .._ext import DTYPE_CODES, extension, extension_error
from ._native import dense_matmul_blas, quant_matmul_native
from .base import Backend, MatmulCase, QuantTensors


ENV_KERNEL = "PYENGINE_CUDA_KERNEL"
KERNELS = ("auto", "simple", "decode", "tc")


def _checked_kernel(kernel: str, source: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"{source} must be one of {KERNELS}, got {kernel!r}")
    return kernel


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, kernel: Optional[str] = None) -> None:
        # kernel: None follows $PYENGINE_CUDA_KERNEL (default "auto"); tests name one.
        self.kernel = None if kernel is None else _checked_kernel(kernel, "kernel")

    def kernel_name(self) -> str:
        """The CUDA kernel choice in force for the next call: "auto", "simple", "decode" or
        "tc"."""
        if self.kernel is not None:
            return self.kernel
        return _checked_kernel(os.environ.get(ENV_KERNEL, "") or "auto", ENV_KERNEL)

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
        which = self.kernel_name()

        def kernel(*args):
            ext.qmatmul_cuda(*args, device=device, stream=stream, kernel=which)

        return quant_matmul_native(kernel, x, weight, n, k, bias, residual, shortcut, out)
