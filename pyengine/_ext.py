"""Loading of the compiled extension ``pyengine._C`` and what it was built with.

The extension is optional: without it (no compiler at install time, a broken build) pyengine
imports and runs on the ``torch`` backend. Loading it never touches CUDA.
"""

from __future__ import annotations

import importlib
import platform
from types import ModuleType
from typing import Any, Dict, Optional

import torch

from ._version import __version__

# Dtype codes shared with csrc/common.h (enum DType). Keep both in sync.
DTYPE_CODES: Dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_module: Optional[ModuleType] = None
_load_error: Optional[str] = None
_loaded = False


def extension() -> Optional[ModuleType]:
    """The compiled module ``pyengine._C``, or None when it is missing or fails to load."""
    global _module, _load_error, _loaded
    if not _loaded:
        _loaded = True
        try:
            _module = importlib.import_module("pyengine._C")
        except ImportError as exc:  # not built, or built for another Python
            _module, _load_error = None, f"{type(exc).__name__}: {exc}"
    return _module


def extension_with(function: str) -> Optional[ModuleType]:
    """``pyengine._C`` when it loaded and binds ``function`` (an older build may lack a newer
    binding), else None."""
    ext = extension()
    return ext if ext is not None and hasattr(ext, function) else None


def extension_error() -> Optional[str]:
    """Why ``pyengine._C`` could not be loaded (None when it loaded)."""
    extension()
    return _load_error


def build_info() -> Dict[str, Any]:
    """What this installation of pyengine was built with.

    Returns a dict with at least ``cpu_kernels`` (bool), ``cuda_kernels`` (bool), ``cuda_archs``
    (list of "sm_XX" strings), ``version``, ``torch_version``, ``triton_version`` (None when
    triton is not installed) and ``python_version``; when the extension is loaded also the CPU
    instruction sets compiled in and the one selected on this CPU.
    """
    info: Dict[str, Any] = {
        "version": __version__,
        "torch_version": torch.__version__,
        "triton_version": _triton_version(),
        "python_version": platform.python_version(),
        "cpu_kernels": False,
        "cuda_kernels": False,
        "cuda_archs": [],
        "extension_error": None,
    }
    mod = extension()
    if mod is None:
        info["extension_error"] = _load_error
        return info
    info.update(mod.build_info())
    return info


def _triton_version() -> Optional[str]:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    try:
        return version("triton")
    except PackageNotFoundError:
        return None
