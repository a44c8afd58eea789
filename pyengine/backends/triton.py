"""The ``triton`` backend: the Triton kernels of pyengine.kernels.

Available when triton imports and there is a CUDA device, or when the Triton interpreter is on
(``TRITON_INTERPRET=1`` before triton is imported), which runs the same kernels on CPU tensors
(slowly: it exists for testing). triton is imported lazily, on the first availability
question or call, never at ``import pyengine`` time.

Every weight kind runs on its own kernels: packed weights on pyengine.kernels.matmul, Matryoshka
slices on the plane kernels of pyengine.kernels.matryoshka (only the planes the slice reads),
dense weights on the dense path of pyengine.kernels.matmul.

Selection: priority 20 on CUDA tensors (above the ``cuda`` backend's, 10); on CPU tensors under
the interpreter -1, so it runs there only when asked for by name.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from types import ModuleType
from typing import Optional

import torch

from .base import Backend, LinearCase, PackedOperand, PlaneOperand

_KERNELS = "pyengine.kernels.matmul"
_PLANE_KERNELS = "pyengine.kernels.matryoshka"
_TRUE_WORDS = ("1", "true", "on", "yes", "y")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_requested() -> bool:
    """TRITON_INTERPRET is set to a true value (as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE_WORDS


def _interpreted() -> bool:
    """Whether the kernels run under the interpreter: fixed once they are imported (triton
    decides at decoration time); before that, triton's own switch if triton is imported (it
    can be set in code, tests/conftest.py does), else what the environment asks for."""
    module = sys.modules.get(_KERNELS)
    if module is not None:
        return bool(module.INTERPRETED)
    triton = sys.modules.get("triton")
    if triton is not None and hasattr(triton, "knobs"):
        return bool(triton.knobs.runtime.interpret)
    return interpreter_requested()


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # noqa: BLE001 - any failure to import means "unavailable"
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


def _kernels(module: str = _KERNELS) -> ModuleType:
    return importlib.import_module(module)


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self) -> Optional[str]:
        why = _triton_import_error()
        if why is not None:
            return why
        if _interpreted() or torch.cuda.is_available():
            return None
        return ("torch sees no CUDA device and the Triton interpreter is off "
                "(TRITON_INTERPRET=1 runs the kernels on CPU tensors)")

    def unsupported_reason(self, case: LinearCase) -> Optional[str]:
        if case.dtype not in _DTYPES:
            return f"unsupported activation dtype {case.dtype}"
        if case.kind == "packed" and case.bits not in (2, 3, 4, 8):
            return f"unsupported bits {case.bits}"
        if case.device_type == "cuda":
            if _interpreted():
                return "the Triton kernels were loaded for the interpreter (TRITON_INTERPRET=1)"
            return None
        if case.device_type == "cpu":
            if _interpreted():
                return None
            return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
        return f"the triton backend runs CUDA tensors, got device {case.device_type}"

    def priority(self, case: LinearCase) -> float:
        return 20.0 if case.device_type == "cuda" else -1.0

    def matmul(self, x, weight, n, k, bias, residual, shortcut, out=None, act_bits=0):
        if isinstance(weight, PackedOperand):
            return _kernels().quant_matmul(x, weight.qweight, weight.scales, weight.zeros,
                                           weight.bits, weight.group_size, n, k, bias=bias,
                                           residual=residual, shortcut=shortcut, out=out)
        if isinstance(weight, PlaneOperand):
            return _kernels(_PLANE_KERNELS).matryoshka_matmul_triton(
                x, weight.plane_hi, weight.plane_mid, weight.plane_lo, weight.scales,
                weight.zeros, bias, weight.precision, weight.group_size, n, k, out=out,
                residual=residual, shortcut=shortcut)
        return _kernels().dense_matmul(x, weight, n, k, bias=bias, residual=residual,
                                       shortcut=shortcut, out=out)
