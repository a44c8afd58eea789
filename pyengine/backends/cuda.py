"""The ``cuda`` backend: CUDA kernels of pyengine._C, launched on torch's current stream.

Packed weights run on the native kernels (``kernel="auto"``): for M <= 16 the tensor-core
decode kernel ("mma": float16 / bfloat16 activations on sm_80 or newer, power-of-two group sizes
or one group per row; it reads a copy of the weight in its fragment-native layout, made on the
first call and kept with the operand: pyengine/backends/cuda_layout.py), else the decode GEMV
(float32 activations, other group sizes); above M = 16 the tensor-core GEMM for float16 /
bfloat16 activations and the simple kernel for float32 ones. The choice of "mma" follows the
kernels' static figures (benchmarks/static_gpu.py); no GPU has measured it yet.
``CudaBackend(kernel="simple" | "decode" | "tc" | "mma")`` or the environment variable
``PYENGINE_CUDA_KERNEL`` (read at each call when the backend names no kernel) forces one of
them, so they can be compared; "decode" raises for M > 16, "tc" for float32 activations, "mma"
for whatever it does not serve. Matryoshka slices take the same tensor-core decode kernel where
it serves them (the slice's codes repacked as codes of r bits, or 8 for r = 6 and 8), else the
plane kernels (``plane_matmul_cuda``: the decode GEMV for M <= 16, the simple kernel above;
"decode" and "simple" force one, "tc" has no plane variant and raises). Dense weights go to
cuBLAS through torch on a strided view of the weight.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from .._ext import DTYPE_CODES, extension, extension_error
from ._native import (cuda_plane_kernel_unavailable_reason, dense_matmul_blas,
                      packed_kernel_args, plane_kernel_call, plane_matmul_cuda, run_native)
from .base import Backend, LinearCase, PackedOperand, PlaneOperand
from . import cuda_layout
from .cuda_layout import (MmaWeight, mma_call_args, mma_unsupported_reason, repack_mma,
                          repack_mma_planes)


ENV_KERNEL = "PYENGINE_CUDA_KERNEL"
KERNELS = ("auto", "simple", "decode", "tc", "mma")


@functools.lru_cache(maxsize=None)
def _compute_capability(device_index: int) -> tuple:
    return torch.cuda.get_device_capability(device_index)


def _layout_bits(weight) -> int:
    """The code width of the operand in the fragment-native layout: a packed weight's bits; a
    Matryoshka slice's precision r for r = 2, 3, 4, else 8 (r = 6, 8)."""
    if isinstance(weight, PlaneOperand):
        return weight.precision if weight.precision in (2, 3, 4) else 8
    return weight.bits


_NO_ANSWER = object()  # layouts.get's default: a cached answer may be None


def mma_refusal(x: torch.Tensor, weight, n: int, k: int) -> Optional[str]:
    """None when the tensor-core decode kernel serves this call (a PackedOperand or a
    PlaneOperand), else why not (one line). What depends on the operand and k alone (its code
    width and grouping) is worked out once per operand and k and kept in ``weight.layouts``;
    the checks of x, the extension and the device run each call."""
    max_m = cuda_layout.MAX_M  # read from _C on first use (cuda_layout.__getattr__)
    if x.shape[0] > max_m:
        return f"it serves M <= {max_m}, got M={x.shape[0]}"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"it takes float16 / bfloat16 activations, got {x.dtype}"
    key = ("mma refusal", k)  # n plays no part
    why = weight.layouts.get(key, _NO_ANSWER)
    if why is _NO_ANSWER:
        why = weight.layouts[key] = mma_unsupported_reason(_layout_bits(weight),
                                                           weight.group_size, k)
    if why is not None:
        return why
    if not hasattr(extension(), "qmatmul_cuda_mma"):
        return "pyengine._C was built without it"
    index = x.device.index
    major = _compute_capability(index if index is not None else torch.cuda.current_device())[0]
    if major < 8:
        return f"it needs sm_80 or newer, this device is sm_{major}x"
    return None


def mma_weight(weight, n: int, k: int) -> MmaWeight:
    """The operand's (PackedOperand or PlaneOperand) first n rows and k inputs in the
    fragment-native layout, repacked on the first call and kept in ``weight.layouts``."""
    key = ("mma", n, k)
    cached = weight.layouts.get(key)
    if cached is None:
        if isinstance(weight, PlaneOperand):
            cached = repack_mma_planes(weight.plane_hi, weight.plane_mid, weight.plane_lo,
                                       weight.scales, weight.zeros, weight.precision,
                                       weight.group_size, n, k)
        else:
            cached = repack_mma(weight.qweight, weight.scales, weight.zeros, weight.bits,
                                weight.group_size, n, k)
        weight.layouts[key] = cached
    return cached


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

    def unsupported_reason(self, case: LinearCase) -> Optional[str]:
        if case.device_type != "cuda":
            return f"the cuda backend runs CUDA tensors only, got device {case.device_type}"
        if case.dtype not in DTYPE_CODES:
            return f"unsupported activation dtype {case.dtype}"
        if case.kind == "planes":
            return cuda_plane_kernel_unavailable_reason()
        return None

    def priority(self, case: LinearCase) -> float:
        # Decode calls on packed weights and Matryoshka slices with fp16 / bf16 activations run
        # the tensor-core decode kernel, whose static ceilings (benchmarks/static_gpu.py) beat
        # the Triton decode kernels' at every width: ranked above Triton (20) until GPU
        # measurements say otherwise. Everything else: below Triton.
        if (case.decode and case.kind in ("packed", "planes")
                and case.dtype in (torch.float16, torch.bfloat16)
                and hasattr(extension(), "qmatmul_cuda_mma")):
            return 30.0
        return 10.0

    def matmul(self, x, weight, n, k, bias, residual, shortcut, out=None, act_bits=0):
        if isinstance(weight, torch.Tensor):
            return dense_matmul_blas(x, weight, n, k, bias, residual, shortcut, out)
        ext = extension()
        device = x.device.index if x.device.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(x.device).cuda_stream
        which = self.kernel_name()
        refusal = mma_refusal(x, weight, n, k) if which in ("auto", "mma") else "not chosen"
        if which == "mma" and refusal is not None:
            raise ValueError(f"cuda backend: the tensor-core decode kernel ({ENV_KERNEL}=mma) "
                             f"does not serve this call: {refusal}")
        if refusal is None:
            mw = mma_weight(weight, n, k)
            b = bias if bias is None or bias.stride(0) == 1 else bias.contiguous()

            def launch_mma(target, accumulate):
                ext.qmatmul_cuda_mma(*mma_call_args(x, mw, b, target, accumulate),
                                     device=device, stream=stream)

            return run_native(launch_mma, x, n, residual, shortcut, out, accumulates=True)

        if isinstance(weight, PackedOperand):
            def launch(target, accumulate):
                ext.qmatmul_cuda(*packed_kernel_args(x, weight, bias, target, accumulate, n, k),
                                 device=device, stream=stream, kernel=which)

            return run_native(launch, x, n, residual, shortcut, out, accumulates=True)

        if which == "tc":
            raise ValueError(f"cuda backend: the tensor-core kernel ({ENV_KERNEL}=tc) has no "
                             f"plane-layout (Matryoshka) variant; use auto, mma, decode or simple")
        kernel = functools.partial(plane_matmul_cuda, kernel=which)
        return run_native(lambda target, _: plane_kernel_call(kernel, x, weight, bias, target, n,
                                                              k),
                          x, n, residual, shortcut, out, accumulates=False)
