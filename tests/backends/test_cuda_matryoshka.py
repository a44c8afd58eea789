"""The CUDA Matryoshka plane kernels (csrc/cuda/plane_matmul.cu: the decode GEMV and the simple
kernel on PlaneSource<R>) against the plane reference and float64 dequantize-then-matmul.

Without a GPU: the bit manipulation those kernels run (csrc/code_bits.h: slice_code<R> and the
word-wide int2 conversion) is compiled into the host module too, and checked here against
pyengine.matryoshka.slice_codes on random and edge-case parents; the kernel's argument checks
(which run before any CUDA call) and the backend selection of Matryoshka slices are checked too.
The ``gpu`` tests run every precision x group x dtype x M on odd and real layer shapes, both
kernels, with NaN-poisoned outputs.
"""

from __future__ import annotations

import itertools
import types

import pytest
import torch

import pyengine
from pyengine._ext import extension
from pyengine import backends
from pyengine.backends import BackendError, LinearCase, _native, get_backend, select_backend
from pyengine.backends import cuda as cuda_module
from pyengine.matryoshka import PLANES_READ, PRECISIONS, slice_codes, split_planes
from pyengine.ops import backend_for, matryoshka_matmul

from helpers import (DTYPES, GROUP_SIZES, assert_matches, plane_reference_matmul, poisoned,
                     random_parent)

INFO = pyengine.build_info()
needs_extension = pytest.mark.skipif(extension() is None, reason="pyengine._C is not built")
needs_cuda_build = pytest.mark.skipif(not INFO.get("cuda_plane_kernels"),
                                      reason="pyengine._C has no CUDA plane kernels")
PLANES = ("plane_hi", "plane_mid", "plane_lo")
WORDS = {"plane_hi": 3, "plane_mid": 2, "plane_lo": 3}  # words per 32-code block


# ---- the device bit manipulation, run on the host ----------------------------------------------

def _edge_and_random_codes(gen, blocks):
    """[blocks * 32] parent codes: every value 0..255 once (so every rounding and saturation case
    of every precision appears, in every position of a block), then uniform random codes."""
    every = torch.randperm(256, generator=gen)
    rest = torch.randint(0, 256, (blocks * 32 - 256,), generator=gen)
    return torch.cat([every, rest])


def _block_words(planes, name, block):
    """The words of packing block ``block`` of a plane (int32 [1, words]) as unsigned ints."""
    w = WORDS[name]
    return [int(v) & 0xFFFFFFFF for v in planes[name][0, block * w:(block + 1) * w].tolist()]


@needs_extension
@pytest.mark.parametrize("r", PRECISIONS)
def test_slice_codes_of_the_device_functions_match_the_formula(r, rng):
    """plane_block_codes (csrc/code_bits.h slice_code<r>, the per-code path of the CUDA kernels)
    gives c_r = min(((q >> (7 - r)) + 1) >> 1, 2^r - 1) for every code of every block, with
    0..255 all present, straddling 3-bit fields included."""
    blocks = 24
    q = _edge_and_random_codes(rng, blocks)
    planes = split_planes(q.view(1, -1))
    want = slice_codes(q, r).view(blocks, 32)
    ext = extension()
    for b in range(blocks):
        got = ext.plane_block_codes(*(_block_words(planes, name, b) for name in PLANES), r)
        assert got == want[b].tolist(), f"r={r} block {b}"


@needs_extension
def test_the_word_wide_int2_conversion_matches_the_formula(rng):
    """plane_int2_block (the int2 kernel's SWAR step) puts c_2 of code j in 3-bit field j with
    its top bit clear, for all 32 fields (fields 10 and 21 straddle words)."""
    blocks = 40
    q = _edge_and_random_codes(rng, blocks)
    planes = split_planes(q.view(1, -1))
    want = slice_codes(q, 2).view(blocks, 32)
    ext = extension()
    for b in range(blocks):
        words = ext.plane_int2_block(_block_words(planes, "plane_hi", b))
        bits = sum(w << (32 * i) for i, w in enumerate(words))
        fields = [(bits >> (3 * j)) & 7 for j in range(32)]
        assert fields == want[b].tolist(), f"block {b}"
    # every 3-bit value in every field position at once: 8 blocks, field j of block i holds
    # (i + j) % 8
    for i in range(8):
        codes = torch.tensor([((i + j) % 8) << 5 for j in range(32)])
        hi = _block_words(split_planes(codes.view(1, -1)), "plane_hi", 0)
        bits = sum(w << (32 * t) for t, w in enumerate(ext.plane_int2_block(hi)))
        assert [(bits >> (3 * j)) & 7 for j in range(32)] == slice_codes(codes, 2).tolist()


@needs_extension
def test_block_helpers_refuse_bad_input():
    ext = extension()
    with pytest.raises(ValueError, match="precision must be"):
        ext.plane_block_codes([0] * 3, [0] * 2, [0] * 3, 5)
    with pytest.raises(ValueError, match="3 words of plane_hi"):
        ext.plane_block_codes([0] * 2, [0] * 2, [0] * 3, 4)
    with pytest.raises(ValueError, match="3 words"):
        ext.plane_int2_block([0] * 4)


# ---- path selection and argument checks (no GPU needed) ---------------------------------------

def test_planes_on_cuda_tensors_select_triton_then_cuda_then_the_reference(monkeypatch):
    """Selection of a Matryoshka slice on CUDA tensors, with availability simulated: backend=None
    prefers Triton's plane kernel, then the CUDA plane kernel, then the reference;
    backend="cuda" takes the CUDA plane kernel where the build has it and says why not where
    it does not."""
    cuda, triton = get_backend("cuda"), get_backend("triton")
    monkeypatch.setattr(backends, "_SELECTED", {})
    monkeypatch.setattr(cuda, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cuda_module, "cuda_plane_kernel_unavailable_reason", lambda: None)
    monkeypatch.setattr(triton, "unavailable_reason", lambda: None)
    monkeypatch.setattr(triton, "unsupported_reason", lambda case: None)
    case = LinearCase("cuda", torch.float16, "planes", 4)
    assert select_backend(case).name == "triton"
    assert select_backend(case, "cuda").name == "cuda"
    # decode calls (M <= 16) with half activations: the cuda backend's tensor-core decode
    # kernel ranks first where the extension has it
    has_mma = types.SimpleNamespace(qmatmul_cuda_mma=None)
    monkeypatch.setattr(cuda_module, "extension", lambda: has_mma)
    backends._SELECTED.clear()
    assert select_backend(case._replace(decode=True)).name == "cuda"
    assert select_backend(case._replace(decode=True, dtype=torch.float32)).name == "triton"
    monkeypatch.setattr(cuda_module, "extension", extension)
    backends._SELECTED.clear()
    monkeypatch.setattr(triton, "unavailable_reason", lambda: "no triton")
    backends._SELECTED.clear()
    assert select_backend(case).name == "cuda"
    monkeypatch.setattr(cuda_module, "cuda_plane_kernel_unavailable_reason",
                        lambda: "this build has no plane_matmul_cuda")
    backends._SELECTED.clear()
    assert select_backend(case).name == "torch"
    with pytest.raises(BackendError, match="no plane_matmul_cuda"):
        select_backend(case, "cuda")
    # CPU tensors are never the cuda backend's, whatever it has
    with pytest.raises(BackendError, match="CUDA tensors only"):
        select_backend(LinearCase("cpu", torch.float16, "planes", 4), "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-device message")
def test_the_wrapper_says_why_it_cannot_run(rng):
    mw = random_parent(8, 64, 32, False, rng)
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="plane_matmul_cuda: "):
        _native.plane_matmul_cuda(x, mw.plane_hi, None, None, mw.scales, mw.zeros, None, 2,
                                  32, 8, 64)


@needs_cuda_build
def test_kernel_argument_checks_run_before_any_cuda_call():
    """The bound function checks its arguments (csrc/common.h check_plane_matmul_args) before it
    touches the device, so these raise the same way with or without a GPU."""
    ext = extension()

    def call(**kw):
        args = dict(x=0, x_dtype=0, ldx=64, plane_hi=0, ld_hi=6, plane_mid=0, ld_mid=4,
                    plane_lo=0, ld_lo=6, scales=0, zeros=0, sz_dtype=0, lds=2, bias=0,
                    bias_dtype=0, out=0, out_dtype=0, ldo=8, M=0, N=8, K=64, precision=4,
                    group_size=32, device=0, stream=0, kernel="")
        args.update(kw)
        ext.plane_matmul_cuda(**args)

    with pytest.raises(ValueError, match=r"plane_matmul_cuda\(M=0, N=8, K=64, precision=5"):
        call(precision=5)
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 32"):
        call(group_size=48)
    with pytest.raises(ValueError, match="ld of plane_mid is smaller"):
        call(ld_mid=1)
    with pytest.raises(ValueError, match="null pointer"):
        call(M=1)
    with pytest.raises(ValueError, match="kernel must be 'auto', 'decode' or 'simple'"):
        call(kernel="tc")
    with pytest.raises(ValueError, match="decode kernel serves M <= 16"):
        call(M=17, x=8, plane_hi=8, plane_mid=8, scales=8, out=8, kernel="decode")


# ---- on the GPU -------------------------------------------------------------------------------

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNELS = ("decode", "simple")


def _check(x, mw, r, bias, kernel, what, n=None, k=None):
    """One call into a NaN-poisoned output against the fp32 plane reference and the float64
    dequantize-then-matmul."""
    n = mw.shape[0] if n is None else n
    k = mw.shape[1] if k is None else k
    hi, mid, lo = (getattr(mw, p) if p in PLANES_READ[r] else None for p in PLANES)
    out = poisoned((x.shape[0], n), x.dtype, x.device)
    got = _native.plane_matmul_cuda(x, hi, mid, lo, mw.scales, mw.zeros, bias, r,
                                    mw.effective_group_size, n, k, out=out, kernel=kernel)
    assert got.data_ptr() == out.data_ptr(), f"{what}: result not written into out"
    ref32 = plane_reference_matmul(x, mw.plane_hi, mw.plane_mid, mw.plane_lo, mw.scales,
                                   mw.zeros, bias, r, mw.group_size, n, k)
    ref64 = x.double() @ mw.dequantize(r, torch.float64)[:n, :k].T
    if bias is not None:
        ref64 = ref64 + bias.double()
    assert_matches(out.float(), ref32, x.dtype, f"{what} vs plane_reference_matmul")
    assert_matches(out.double(), ref64, x.dtype, f"{what} vs float64 dequantize-then-matmul")


CASES = list(itertools.product(PRECISIONS, GROUP_SIZES))


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"r{r}-g{g}" for r, g in CASES])
def test_odd_shapes_every_dtype_and_m(case, rng):
    """N = 45, K = 200 (a partial block at the end of K), every activation dtype, asymmetric and
    symmetric, M = 1, 3, 8, 16 (decode) and 17, 64 (simple), both kernels where they serve."""
    r, group_size = CASES[case]
    for i, (dtype, symmetric) in enumerate(itertools.product(DTYPES, (False, True))):
        mw = random_parent(45, 200, group_size, symmetric, rng, SCALE_DTYPES[(i + case) % 3],
                           "cuda")
        for j, m in enumerate((1, 3, 8, 16, 17, 64)):
            x = torch.randn(m, 200, generator=rng).to("cuda", dtype)
            bias = torch.randn(45, generator=rng).to("cuda", dtype) if (i + j) % 2 else None
            for kernel in KERNELS if m <= 16 else ("simple", ""):
                _check(x, mw, r, bias, kernel, f"r={r} g={group_size} M={m} {dtype} "
                       f"sym={symmetric} kernel={kernel or 'auto'} bias={bias is not None}")


@pytest.mark.gpu
@pytest.mark.parametrize("r", PRECISIONS)
def test_real_layer_shapes(r, rng):
    """SmolLM2 (1536 x 576) and Llama-3-8B (4096 x 4096, 14336 x 4096, 1024 x 4096) at
    M = 1, 3, 16 in fp16 and bf16, group 128; the decode GEMV against the references."""
    for i, (n, k) in enumerate(((1536, 576), (4096, 4096), (14336, 4096), (1024, 4096))):
        mw = random_parent(n, k, 128, i % 2 == 1, rng, torch.float16, "cuda")
        for m in (1, 3, 16):
            for dtype in (torch.float16, torch.bfloat16):
                x = torch.randn(m, k, generator=rng).to("cuda", dtype)
                _check(x, mw, r, None, "decode", f"{n}x{k} r={r} M={m} {dtype}")
        torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("r", PRECISIONS)
def test_slices_on_the_tensor_core_decode_kernel(r, monkeypatch, rng):
    """PYENGINE_CUDA_KERNEL=mma: the slice repacked into the fragment-native layout (codes of r
    bits, or 8 for r = 6, 8) against the plane reference, every group size, fp16 and bf16,
    M = 1, 5, 16, into NaN-poisoned outputs."""
    monkeypatch.setenv(cuda_module.ENV_KERNEL, "mma")
    for g in GROUP_SIZES:
        mw = random_parent(45, 200, g, g % 64 == 0, rng, torch.float16, "cuda")
        for dtype in (torch.float16, torch.bfloat16):
            for m in (1, 5, 16):
                x = torch.randn(m, 200, generator=rng).to("cuda", dtype)
                out = poisoned((m, 45), dtype, "cuda")
                pyengine.ops.qlinear(x, mw.at(r), backend="cuda", out=out)
                ref = plane_reference_matmul(x, mw.plane_hi, mw.plane_mid, mw.plane_lo,
                                             mw.scales, mw.zeros, None, r, mw.group_size, 45,
                                             200)
                assert_matches(out.float(), ref, dtype, f"mma r={r} g={g} M={m} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("r", PRECISIONS)
def test_matryoshka_matmul_with_backend_cuda_runs_this_kernel(r, rng):
    mw = random_parent(576, 1536, 64, False, rng, torch.float16, "cuda")
    x = torch.randn(2, 3, 1536, generator=rng).to("cuda", torch.float16)
    assert backend_for(x, mw.at(r), "cuda") == "cuda"
    y = matryoshka_matmul(x, mw, r, backend="cuda")
    ref = plane_reference_matmul(x.view(-1, 1536), mw.plane_hi, mw.plane_mid, mw.plane_lo,
                                 mw.scales, mw.zeros, None, r, 64, 576, 1536)
    assert y.shape == (2, 3, 576)
    assert_matches(y.view(-1, 576).float(), ref, torch.float16, f"r={r}")
