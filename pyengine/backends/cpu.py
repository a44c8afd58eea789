"""The ``cpu`` backend: C++ kernels of pyengine._C (OpenMP, SIMD chosen at run time).

Packed weights run on ``qmatmul_cpu`` (decode paths for small M, a tiled path above; with
``act_bits=8``, integer dot products on int8 activations, csrc/cpu/act8_kernels.cpp); Matryoshka
slices on ``plane_matmul_cpu``, which reads only the bit planes the slice needs; dense weights
(sliced or shortcut calls on unquantized matrices) go to the vendor BLAS through torch on a
strided view, without copying the weight.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .._ext import DTYPE_CODES, extension, extension_error
from ._native import (dense_matmul_blas, packed_kernel_args, plane_kernel_call,
                      plane_kernel_unavailable_reason, plane_matmul_cpu, run_native)
from .base import Backend, LinearCase, PackedOperand


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

    def unsupported_reason(self, case: LinearCase) -> Optional[str]:
        if case.device_type != "cpu":
            return f"the cpu backend runs CPU tensors only, got device {case.device_type}"
        if case.dtype not in DTYPE_CODES:
            return f"unsupported activation dtype {case.dtype}"
        if case.kind == "planes":
            return plane_kernel_unavailable_reason()
        return None

    def priority(self, case: LinearCase) -> float:
        return 10.0

    def native_act_bits(self, weight, act_bits):
        # qmatmul_cpu quantizes the activations itself: integer dot products for 2- and 4-bit
        # weights at decode sizes, the exact kernels on the quantized activations otherwise
        return isinstance(weight, PackedOperand)

    def matmul(self, x, weight, n, k, bias, residual, shortcut, out=None, act_bits=0):
        if isinstance(weight, torch.Tensor):
            return dense_matmul_blas(x, weight, n, k, bias, residual, shortcut, out)
        threads, isa = torch.get_num_threads(), self.isa
        if isinstance(weight, PackedOperand):
            ext = extension()

            def launch(target, accumulate):  # num_threads, isa, act_bits by position (cheaper)
                ext.qmatmul_cpu(*packed_kernel_args(x, weight, bias, target, accumulate, n, k),
                                threads, isa, act_bits)

            return run_native(launch, x, n, residual, shortcut, out, accumulates=True)

        kernel = functools.partial(plane_matmul_cpu, isa=isa, num_threads=threads)
        return run_native(lambda target, _: plane_kernel_call(kernel, x, weight, bias, target, n,
                                                              k),
                          x, n, residual, shortcut, out, accumulates=False)
