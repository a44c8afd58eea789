"""The ``cpu`` backend: C++ kernels of pyengine._C (OpenMP, SIMD chosen at run time).

Quantized weights run on the native kernels (a decode path for M <= 8, a tiled prefill path
above); dense weights (sliced_matmul / shortcut_matmul on unquantized matrices) go to the
vendor BLAS through torch on a strided view, without copying the weight.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .._ext import DTYPE_CODES, extension, extension_error
from ._native import dense_matmul_blas, quant_matmul_native
from .base import Backend, MatmulCase, QuantTensors


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, isa: str = "") -> None:
        # isa: "" picks the widest instruction set of this CPU; tests name each one.
        self.isa = isa

    @functools.lru_cache(maxsize=None)
    def unavailable_reason(self) -> Optional[str]:
        if extension() is None:
            return f"pyengine._C is not available ({extension_error()})"
        return None

    def unsupported_reason(self, case: MatmulCase) -> Optional[str]:
        if case.device_type != "cpu":
            return f"the cpu backend runs CPU tensors only, got device {case.device_type}"
        if case.dtype not in DTYPE_CODES:
            return f"unsupported activation dtype {case.dtype}"
        return None

    def priority(self, case: MatmulCase) -> float:
        return 10.0

    def matmul(self, x, weight, n, k, bias, residual, shortcut, out=None):
        if not isinstance(weight, QuantTensors):
            return dense_matmul_blas(x, weight, n, k, bias, residual, shortcut, out)
        ext = extension()
        threads = torch.get_num_threads()

        isa = self.isa

        def kernel(*args):  # num_threads and isa passed by position (cheaper than keywords)
            ext.qmatmul_cpu(*args, threads, isa)

        return quant_matmul_native(kernel, x, weight, n, k, bias, residual, shortcut, out)
