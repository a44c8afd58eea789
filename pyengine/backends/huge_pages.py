"""Weight copies in memory backed by transparent huge pages (Linux).

A decode step streams every weight once; in 4 KiB pages that is a TLB miss and a cold start of
the hardware prefetcher (which stops at page boundaries) every 4 KiB. The prepared copies a
kernel call reads (the CPU row-interleaved layout, :meth:`CpuBackend.bind`) are therefore
placed in private anonymous memory advised ``MADV_HUGEPAGE``, carved out of chunks of whole
2 MiB pages so that small layers share huge pages too. On AMD EPYC Zen 4 this made the int8-
activation decode kernels 1.02-1.39x faster at M = 1 on 7B-class layer shapes, 1 and 2 threads
(``benchmarks/bench_huge_pages.py``).

:func:`weight_copy` is the switch the backend calls. With ``PYENGINE_HUGE_PAGES=0`` on Linux it
places the copies in memory advised ``MADV_NOHUGEPAGE`` instead: 4 KiB pages whatever the
kernel's setting (``always`` included) and whatever advice other libraries gave the process's
heap (NumPy advises its large buffers ``MADV_HUGEPAGE``, and freed heap memory keeps that
advice), so that switching huge pages off does switch them off. Elsewhere (another OS, a kernel
with transparent huge pages set to ``never``) the copies stay in PyTorch's memory.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
from pathlib import Path
from typing import Optional

import torch

HUGE_PAGE_BYTES = 2 << 20
CHUNK_BYTES = 32 << 20    # a chunk's size; a larger copy gets a chunk of its own
MIN_COPY_BYTES = 4096     # smaller tensors are left where they are
ALIGNMENT = 64            # of every copy in a chunk (a cache line)
VARIABLE = "PYENGINE_HUGE_PAGES"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _can_advise() -> bool:
    return sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")


def _switched_off() -> bool:
    return os.environ.get(VARIABLE, "").strip() == "0"


def unavailable_reason() -> Optional[str]:
    """Why weight copies are not placed in huge pages here (None: they are). Read at every call,
    so that ``PYENGINE_HUGE_PAGES=0`` set in the process takes effect for later copies."""
    if _switched_off():
        return f"{VARIABLE}=0"
    if not _can_advise():
        return "transparent huge pages are a Linux feature"
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return f"{THP_SETTING} cannot be read"
    if "[never]" in setting:
        return "transparent huge pages are off in this kernel ([never])"
    return None


class _Chunks:
    """A bump allocator over chunks of whole huge pages, every chunk a mapping of its own
    advised ``advice`` (``MADV_HUGEPAGE`` or ``MADV_NOHUGEPAGE``). A chunk lives as long as any
    tensor carved from it (each holds its storage, which holds the mapping)."""

    def __init__(self, advice: str) -> None:
        self._advice = advice  # the name of an mmap.MADV_* constant (absent off Linux)
        self._lock = threading.Lock()
        self._chunk: Optional[torch.Tensor] = None  # uint8 [CHUNK_BYTES], 2 MiB-aligned
        self._used = 0

    def _new_chunk(self, nbytes: int) -> torch.Tensor:
        """uint8 [nbytes rounded up to whole huge pages] in a fresh private anonymous mapping
        advised as this allocator's chunks are, starting on a huge-page boundary (the mapping is
        one huge page longer than that, for the alignment)."""
        size = -(-nbytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
        mapping = mmap.mmap(-1, size + HUGE_PAGE_BYTES,
                            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mapping.madvise(getattr(mmap, self._advice))
        whole = torch.frombuffer(mapping, dtype=torch.uint8)
        start = -whole.data_ptr() % HUGE_PAGE_BYTES
        return whole[start:start + size]

    def take(self, nbytes: int) -> torch.Tensor:
        """uint8 [nbytes], 64-byte aligned, untouched or zero."""
        if nbytes > CHUNK_BYTES // 2:
            return self._new_chunk(nbytes)[:nbytes]
        with self._lock:
            start = -(-self._used // ALIGNMENT) * ALIGNMENT
            if self._chunk is None or start + nbytes > self._chunk.numel():
                self._chunk, start = self._new_chunk(CHUNK_BYTES), 0
            self._used = start + nbytes
            return self._chunk[start:start + nbytes]


_HUGE_CHUNKS = _Chunks("MADV_HUGEPAGE")
_SMALL_CHUNKS = _Chunks("MADV_NOHUGEPAGE")


def _copy_into(chunks: _Chunks, t: torch.Tensor) -> torch.Tensor:
    out = chunks.take(t.numel() * t.element_size()).view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def _copied(t: torch.Tensor) -> bool:
    """Whether the page-placed copies take ``t``: a CPU tensor of 4 KiB or more."""
    return t.device.type == "cpu" and t.numel() * t.element_size() >= MIN_COPY_BYTES


def huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of the CPU tensor ``t`` (same shape and dtype) in memory advised for
    transparent huge pages; ``t`` itself where :func:`unavailable_reason` says why not, for
    tensors under 4 KiB and for other devices."""
    if not _copied(t) or unavailable_reason() is not None:
        return t
    return _copy_into(_HUGE_CHUNKS, t)


def small_page_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of the CPU tensor ``t`` (same shape and dtype) in memory advised
    ``MADV_NOHUGEPAGE``: never backed by huge pages, whatever the kernel's setting; ``t``
    itself off Linux, for tensors under 4 KiB and for other devices."""
    if not _copied(t) or not _can_advise():
        return t
    return _copy_into(_SMALL_CHUNKS, t)


def weight_copy(t: torch.Tensor) -> torch.Tensor:
    """The copy of a prepared weight tensor a kernel streams (CpuBackend.bind): in huge pages
    (:func:`huge_page_copy`), or with ``PYENGINE_HUGE_PAGES=0`` in small pages
    (:func:`small_page_copy`)."""
    if _switched_off():
        return small_page_copy(t)
    return huge_page_copy(t)


def huge_pages_eligible(t: torch.Tensor) -> Optional[bool]:
    """Whether the kernel may back ``t``'s memory with transparent huge pages: the
    ``THPeligible`` flag of the mapping holding ``t.data_ptr()`` in /proc/self/smaps (None where
    that cannot be read). True for :func:`huge_page_copy`'s copies where huge pages are usable;
    whether a page is huge in the end is the kernel's decision (``AnonHugePages`` there)."""
    address = t.data_ptr()
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
            start, end = (int(v, 16) for v in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("THPeligible:"):
            return line.split()[1] == "1"
    return None
