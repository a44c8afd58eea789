"""Small shared helpers."""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, Optional, TypeVar

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
