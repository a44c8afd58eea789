"""Backend registry and selection.

Backends: ``cuda`` (CUDA C++ via pybind11), ``triton``, ``cpu`` (C++ via pybind11) and
``torch`` (the pure-PyTorch reference, always available). ``backend=None`` picks the
highest-priority backend that is available in this process and serves the call;
``PYENGINE_BACKEND`` (environment) overrides that choice. Asking for a backend explicitly (the
argument or the environment variable) never falls back silently: if it is unknown, unavailable
or cannot serve the call, :class:`BackendError` says why.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from .base import (WEIGHT_KINDS, Backend, LinearCase, Operand, PackedOperand, PlaneOperand,
                   operand_kind)
from .cpu import CpuBackend
from .cuda import CudaBackend
from .torch_ref import TorchBackend, reference_matmul, reference_weight
from .triton import TritonBackend

ENV_BACKEND = "PYENGINE_BACKEND"

__all__ = [
    "WEIGHT_KINDS", "Backend", "BackendError", "LinearCase", "Operand", "PackedOperand",
    "PlaneOperand", "available_backends", "get_backend", "known_backends", "operand_kind",
    "reference_matmul", "reference_weight", "register_backend", "select_backend",
]


class BackendError(RuntimeError):
    """A requested backend is unknown, unavailable, or cannot serve the call."""


_REGISTRY: Dict[str, Backend] = {}
# The one memo of select_backend: (case, requested backend) -> Backend.
_SELECTED: Dict[Tuple[tuple, Optional[str]], Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Adds (or replaces) a backend under ``backend.name``."""
    if not backend.name:
        raise ValueError("a backend needs a name")
    _REGISTRY[backend.name] = backend
    _SELECTED.clear()
    return backend


def known_backends() -> List[str]:
    """Every registered backend, usable here or not."""
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; known backends: {known_backends()}") from None


def available_backends() -> List[str]:
    """The backends usable in this process (extension loaded, device and libraries present)."""
    return [name for name, b in _REGISTRY.items() if b.unavailable_reason() is None]


def _environment_backend() -> Optional[str]:
    """$PYENGINE_BACKEND, read at each call (os.environ's own dict: a plain lookup, where
    os.environ.get costs about a microsecond of encoding and wrapping per call)."""
    try:
        value = _ENVIRON_DATA.get(_ENV_KEY)
    except AttributeError:  # pragma: no cover - an interpreter without os.environ._data
        return os.environ.get(ENV_BACKEND) or None
    return os.environ.decodevalue(value) if value else None


_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_BACKEND) if _ENVIRON_DATA is not None else None


def select_backend(case: "LinearCase | tuple", requested: Optional[str] = None) -> Backend:
    """The backend that runs ``case``: ``requested`` (or $PYENGINE_BACKEND) when given, else the
    highest-priority available backend that serves it. ``case`` may be a plain tuple of the
    LinearCase fields (the ops' hot path builds no LinearCase once a case has been seen).
    Raises BackendError when an explicit request cannot be honoured."""
    if not requested:
        requested = _environment_backend()
    key = (case, requested)
    backend = _SELECTED.get(key)
    if backend is None:
        backend = _select(LinearCase(*case), requested)
        if len(_SELECTED) >= 4096:
            _SELECTED.clear()
        _SELECTED[key] = backend
    return backend


def _select(case: LinearCase, requested: Optional[str]) -> Backend:
    if requested:
        backend = get_backend(requested)
        why = backend.unavailable_reason()
        if why is not None:
            raise BackendError(f"backend {requested!r} is not available: {why}")
        why = backend.unsupported_reason(case)
        if why is not None:
            raise BackendError(f"backend {requested!r} cannot run {case.describe()}: {why}")
        return backend
    candidates = [b for b in _REGISTRY.values()
                  if b.unavailable_reason() is None and b.unsupported_reason(case) is None]
    if not candidates:  # the torch backend serves everything; only reachable if it was replaced
        raise BackendError(f"no backend can run {case.describe()}")
    return max(candidates, key=lambda b: b.priority(case))


register_backend(TorchBackend())
register_backend(CpuBackend())
register_backend(CudaBackend())
register_backend(TritonBackend())
