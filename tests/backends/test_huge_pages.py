"""pyengine.backends.huge_pages: copies in huge-page chunks equal their tensors, do not overlap,
outlive the allocator's hold on their chunk, and are what CpuBackend.bind's interleaved copies
are made of; with PYENGINE_HUGE_PAGES=0 those are small-page copies, never eligible for huge
pages; small tensors are left where they are."""

from __future__ import annotations

import gc

import pytest
import torch

import pyengine
from pyengine.backends import CpuBackend, get_backend
from pyengine.backends import huge_pages
from pyengine.backends.huge_pages import (ALIGNMENT, CHUNK_BYTES, VARIABLE, huge_page_copy,
                                          huge_pages_eligible, small_page_copy,
                                          unavailable_reason, weight_copy)

from helpers import packed_operand, random_weight

USABLE = unavailable_reason() is None
needs_huge_pages = pytest.mark.skipif(not USABLE, reason=f"no huge pages here: "
                                      f"{unavailable_reason()}")


@needs_huge_pages
def test_copies_equal_their_tensors_and_do_not_overlap(rng):
    tensors = [torch.randn(rows, 37, generator=rng).to(dtype)
               for rows, dtype in ((300, torch.float32), (41, torch.float16), (1000, torch.int32),
                                   (7, torch.float32), (512, torch.bfloat16))]
    tensors.append(torch.randn(1000, 300, generator=rng)[:, ::3])  # not contiguous
    copies = [huge_page_copy(t) for t in tensors]
    for t, c in zip(tensors, copies):
        if t.numel() * t.element_size() < huge_pages.MIN_COPY_BYTES:
            assert c is t
            continue
        assert c.data_ptr() != t.data_ptr() and c.data_ptr() % ALIGNMENT == 0
        assert c.is_contiguous() and c.dtype == t.dtype and c.shape == t.shape
        assert torch.equal(c, t)
    spans = sorted((c.data_ptr(), c.data_ptr() + c.numel() * c.element_size())
                   for t, c in zip(tensors, copies) if c is not t)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start
    saved = [t.clone() for t in tensors]
    for i, c in enumerate(copies):  # writing a copy leaves the others and the originals alone
        if c is tensors[i]:
            continue
        c.fill_(0)
        assert torch.equal(tensors[i], saved[i])
        for j in range(i + 1, len(copies)):
            assert torch.equal(copies[j], saved[j])


@needs_huge_pages
def test_copies_are_eligible_for_huge_pages_and_outlive_their_chunk(rng):
    big = torch.randn(CHUNK_BYTES // 4 // 2 + 1000, generator=rng)  # a chunk of its own
    small = torch.randn(5000, generator=rng)
    big_copy, small_copy = huge_page_copy(big), huge_page_copy(small)
    for copy in (big_copy, small_copy):
        eligible = huge_pages_eligible(copy)
        assert eligible in (True, None)  # None: /proc/self/smaps cannot be read here
    # small pages, even in heap memory that another library advised MADV_HUGEPAGE (numpy does)
    assert huge_pages_eligible(small_page_copy(torch.randn(1 << 20))) in (False, None)
    # the allocator moves on to new chunks; the copies keep theirs alive
    for _ in range(3):
        huge_page_copy(torch.zeros(CHUNK_BYTES // 4 // 3))
    gc.collect()
    assert torch.equal(big_copy, big) and torch.equal(small_copy, small)


def test_the_switch_puts_weight_copies_in_small_pages_and_small_tensors_stay(monkeypatch):
    t = torch.randn(10000)
    tiny = t[:10]
    assert huge_page_copy(tiny) is tiny and small_page_copy(tiny) is tiny
    assert weight_copy(tiny) is tiny
    monkeypatch.setenv(VARIABLE, "0")
    assert unavailable_reason() == f"{VARIABLE}=0"
    assert huge_page_copy(t) is t
    copy = weight_copy(t)
    assert torch.equal(copy, t)
    if huge_pages._can_advise():
        assert copy.data_ptr() != t.data_ptr() and huge_pages_eligible(copy) in (False, None)


@needs_huge_pages
def test_small_page_copies_stay_small_where_the_heap_was_advised_for_huge_pages(monkeypatch):
    """Heap memory can be advised MADV_HUGEPAGE by anyone in the process (NumPy advises its
    large buffers so, and the heap keeps the advice after they are freed), and tensors PyTorch
    places there are eligible for huge pages. Weight copies made with PYENGINE_HUGE_PAGES=0 are
    not: they live in mappings of their own."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    heap = torch.zeros(4 << 20, dtype=torch.uint8)  # PyTorch's memory
    start = -heap.data_ptr() % mmap.PAGESIZE
    length = (heap.numel() - start) // mmap.PAGESIZE * mmap.PAGESIZE
    assert libc.madvise(heap.data_ptr() + start, length, mmap.MADV_HUGEPAGE) == 0
    plain = heap[start:start + 16 * 8192].view(16, 8192)
    assert all(huge_pages_eligible(t) in (True, None) for t in plain)
    monkeypatch.setenv(VARIABLE, "0")
    copies = [weight_copy(t) for t in plain]
    assert all(torch.equal(c, t) for c, t in zip(copies, plain))
    assert all(huge_pages_eligible(c) in (False, None) for c in copies)


@needs_huge_pages
@pytest.mark.skipif(get_backend("cpu").unavailable_reason() is not None,
                    reason="pyengine._C (the cpu backend) is not built")
@pytest.mark.parametrize("isa", [i for i in pyengine.build_info().get("cpu_isas_usable", [])
                                 if i != "generic"])
def test_bound_interleaved_copies_live_in_huge_pages(isa, rng, monkeypatch):
    """CpuBackend.bind's interleaved copy is a huge-page copy, and its calls give the same
    outputs as a call bound with the copy in small pages (PYENGINE_HUGE_PAGES=0)."""
    n, k = 256, 1024
    qw = pyengine.quantize(random_weight(n, k, rng), 4, 128, clip_search=False)
    backend = CpuBackend(isa=isa)
    kernel = backend.bind(packed_operand(qw), n, k, None, act_bits=8)
    words = kernel.keep[2][0]
    assert huge_pages_eligible(words) in (True, None)
    monkeypatch.setenv(VARIABLE, "0")
    plain = backend.bind(packed_operand(qw), n, k, None, act_bits=8)
    assert huge_pages_eligible(plain.keep[2][0]) in (False, None)
    x = torch.randn(3, k, generator=rng)
    out, want = torch.empty(3, n), torch.empty(3, n)
    kernel(x, out, False)
    plain(x, want, False)
    assert torch.equal(out, want)
