"""Small shared helpers."""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, Optional, Tuple, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, enabled: bool = True, total: Optional[int] = None,
             unit: str = "it") -> Iterator[T]:
    """A tqdm progress bar on stderr for long loops; plain iteration when disabled, when
    PYENGINE_NO_PROGRESS is set, or when tqdm is missing."""
    if not enabled or os.environ.get("PYENGINE_NO_PROGRESS"):
        return iter(items)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iter(items)
    return iter(tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False,
                     dynamic_ncols=True))


def is_int(value: object) -> bool:
    """True for Python and NumPy integers; False for bools, floats and anything else."""
    import numbers
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def module_device(module, default=None):
    """The device of a module's first parameter or, when it has none (a layer whose linears are
    all quantized keeps its weights in buffers), of its first buffer; ``default`` if neither."""
    import torch

    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu") if default is None else torch.device(default)


def keep_better(cost, best_cost, candidates: Tuple, bests: Tuple) -> Tuple:
    """Elementwise search step: where ``cost < best_cost``, each of ``candidates`` replaces the
    matching one of ``bests``; returns (new best cost, *new bests). Tensors of one shape (or
    broadcastable to the costs')."""
    import torch
    better = cost < best_cost
    return (torch.where(better, cost, best_cost),
            *(torch.where(better, new, old) for new, old in zip(candidates, bests)))
