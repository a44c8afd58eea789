"""pyengine: compressed LLM inference on custom kernels.

Importing pyengine never initialises CUDA and never fails because the compiled extension
(pyengine._C) or triton is missing: the ``torch`` backend always works.
"""

from __future__ import annotations

from typing import List

from . import ops
from ._ext import build_info
from ._version import __version__
from .backends import BackendError, known_backends
from .backends import available_backends as _available_backends
from .qweight import QuantizedWeight
from .quantize import quantize


def available_backends() -> List[str]:
    """The backends usable in this process, e.g. ["torch", "cpu"] on a machine without a GPU.
    (Asks torch whether a CUDA device is present, which initialises nothing but the driver
    query.)"""
    return _available_backends()


__all__ = [
    "BackendError", "QuantizedWeight", "__version__", "available_backends", "build_info",
    "known_backends", "ops", "quantize",
]
