"""The tensor-core decode kernel's fragment-native layout, checked without a GPU.

pyengine/backends/cuda_layout.py repacks a canonical packed weight (docs/FORMAT.md) into the
layout of csrc/mma_frag.h; pyengine._C.mma_decode_emulate replays the CUDA kernel
(csrc/cuda/decode_mma.cuh) warp by warp on the host with the same bit extraction, fragment
coordinates (PTX ISA, mma.m16n8k16), activation staging and its indexing (csrc/mma_stage.h: the
B fragments and unit records every operand and accumulator start is read from) and epilogue
arithmetic. These tests compare that replay with
the pure-torch reference on fresh random data, odd shapes and every width, group size and
activation dtype the kernel takes, into NaN-poisoned outputs. The GPU runs of the kernel itself
are in tests/backends/test_cuda_decode.py (marked gpu).
"""

from __future__ import annotations

import pytest
import torch

import pyengine
from pyengine._ext import extension
from pyengine.backends import reference_weight
from pyengine.backends.base import PackedOperand
from pyengine.format.packing import pack_codes
from pyengine.backends.cuda_layout import (FRAG_TAIL, ONE_GROUP_SHIFT, STEPS, WORDS,
                                           iteration_k, mma_decode_emulate,
                                           mma_unsupported_reason, repack_mma,
                                           repack_mma_planes)
from pyengine.matryoshka import PLANES_READ

from helpers import (packed_operand, plane_reference_matmul, poisoned, random_parent,
                     random_weight)

PLANE_NAMES = ("plane_hi", "plane_mid", "plane_lo")

HALF_DTYPES = (torch.float16, torch.bfloat16)
# (N, K): tiny, odd (N not a multiple of 16, K not a multiple of 32 or of an iteration), a
# SmolLM2 shape, one K spanning several slabs of staged activations.
SHAPES = [(1, 17), (37, 300), (130, 200), (576, 136), (20, 2600)]


def _quantized(n, k, bits, group_size, symmetric, scale_dtype, gen):
    w = random_weight(n, k, gen)
    qw = pyengine.quantize(w, bits, group_size, symmetric, scale_dtype=scale_dtype,
                           clip_search=False)
    qt = packed_operand(qw)
    return qt, reference_weight(qt, n, k)


def _row_scales(mw, n, k):
    """|s| of every weight [n, k] from the layout's params ([tiles, groups, 8, (s, -s z) x 2]:
    rows 16 t + g and 16 t + g + 8)."""
    p = mw.params
    s = torch.stack([p[..., 0], p[..., 2]], dim=2)            # [tiles, groups, 2, 8]
    s = s.permute(0, 2, 3, 1).reshape(-1, p.shape[1])[:n]     # [rows, groups]
    group = (torch.arange(k) >> min(mw.gshift, 62)).clamp(max=p.shape[1] - 1)
    return s[:, group].abs()


def _accumulated_size(x, mw, w_abs, n, k):
    """The size of what the kernel's fp32 accumulators sum for each output, the largest over
    the outputs: sum_k |x| (|w| + E |s|), E the largest offset a raw code carries (1024 in
    fp16, 128 in bf16; none for 8-bit codes with bf16: csrc/mma_frag.h). Only the summation
    order differs from the reference, so the error is measured against this (a dot product
    near 0 has no relative precision to keep)."""
    offset = {torch.float16: 1024.0, torch.bfloat16: 128.0}[x.dtype]
    if mw.bits == 8 and x.dtype == torch.bfloat16:
        offset = 0.0
    terms = w_abs[:n, :k] + offset * _row_scales(mw, n, k)
    return (x.float().abs() @ terms.T).max()


def _check(qt, w_ref, n, k, m, dtype, gen, what, bias=None):
    x = torch.randn(m, k, generator=gen).to(dtype)
    mw = repack_mma(qt.qweight, qt.scales, qt.zeros, qt.bits, qt.group_size, n, k)
    out = poisoned((m, n), torch.float32, "cpu")
    mma_decode_emulate(x, mw, bias=bias, out=out)
    ref = x.float() @ w_ref[:n, :k].T
    if bias is not None:
        ref = ref + bias[:n].float()
    size = _accumulated_size(x, mw, w_ref.abs(), n, k)
    err = ((out - ref).abs().max() / size).item()
    assert err < 1e-6, f"{what}: error {err:.3e} of the accumulated terms' size"
    return mw


CASES = [(s, b, g) for s in range(len(SHAPES)) for b in (2, 3, 4, 8) for g in (32, 64, 128, -1)]


@pytest.mark.parametrize("shape,bits,group_size", CASES,
                         ids=[f"{SHAPES[s][0]}x{SHAPES[s][1]}-b{b}-g{g}" for s, b, g in CASES])
def test_emulated_kernel_matches_reference(shape, bits, group_size, rng):
    n, k = SHAPES[shape]
    symmetric = bool((bits + group_size) % 2)
    scale_dtype = (torch.float16, torch.bfloat16, torch.float32)[(bits + shape) % 3]
    qt, w_ref = _quantized(n, k, bits, group_size, symmetric, scale_dtype, rng)
    for dtype in HALF_DTYPES:
        for m in (1, 8, 9, 16):
            _check(qt, w_ref, n, k, m, dtype, rng,
                   f"M={m} N={n} K={k} bits={bits} g={group_size} sym={symmetric} x={dtype} "
                   f"scales={scale_dtype}")


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_fractional_zeros_extreme_codes_and_bias(bits, rng):
    """Zero points that are not integers, codes at 0 and 2^bits - 1 everywhere, and a bias."""
    n, k, g = 48, 256, 64
    kp = k
    codes = torch.randint(0, 2, (n, kp), generator=rng) * (2 ** bits - 1)
    qweight = pack_codes(codes, bits)
    scales = (torch.rand(n, kp // g, generator=rng) * 0.1 + 0.01).to(torch.float16)
    zeros = (torch.rand(n, kp // g, generator=rng) * (2 ** bits - 1)).to(torch.float16)
    qt = PackedOperand(qweight, scales, zeros, bits, g)
    w_ref = reference_weight(qt, n, k)
    bias = torch.randn(n, generator=rng).to(torch.float16)
    for dtype in HALF_DTYPES:
        _check(qt, w_ref, n, k, 5, dtype, rng, f"{bits}-bit extremes {dtype}", bias=bias)


@pytest.mark.parametrize("r", (8, 6, 4, 3, 2))
def test_matryoshka_slices_in_the_layout(r, rng):
    """A Matryoshka parent's r-bit slice repacked from its bit planes (codes of r bits, or 8 for
    r = 6, 8; scale s * 2^(8-r), zero z / 2^(8-r)) through the emulated kernel against the
    plane reference, only the planes the slice reads handed over."""
    for g, symmetric in ((32, False), (128, True), (-1, False)):
        mw = random_parent(37, 300, g, symmetric, rng, torch.bfloat16)
        planes = {p: (getattr(mw, p) if p in PLANES_READ[r] else None) for p in PLANE_NAMES}
        layout = repack_mma_planes(planes["plane_hi"], planes["plane_mid"], planes["plane_lo"],
                                   mw.scales, mw.zeros, r, mw.effective_group_size, 37, 300)
        assert layout.bits == (r if r in (2, 3, 4) else 8)
        for dtype in HALF_DTYPES:
            x = torch.randn(6, 300, generator=rng).to(dtype)
            out = poisoned((6, 37), torch.float32, "cpu")
            mma_decode_emulate(x, layout, out=out)
            ref = plane_reference_matmul(x, mw.plane_hi, mw.plane_mid, mw.plane_lo, mw.scales,
                                         mw.zeros, None, r, mw.group_size, 37, 300)
            size = _accumulated_size(x, layout, mw.dequantize(r, torch.float32).abs(), 37, 300)
            err = ((out - ref).abs().max() / size).item()
            assert err < 1e-6, f"r={r} g={g} sym={symmetric} {dtype}: {err:.3e}"


def test_sliced_block_and_accumulate(rng):
    """The first n rows and k inputs of a larger stored weight; accumulate adds into out."""
    qt, w_ref = _quantized(200, 640, 4, 128, False, torch.float16, rng)
    n, k = 150, 390
    x = torch.randn(3, 700, generator=rng).to(torch.bfloat16)[:, :k]   # row stride 700 > k
    mw = repack_mma(qt.qweight, qt.scales, qt.zeros, 4, 128, n, k)
    assert (mw.n, mw.k, mw.tiles, mw.iterations) == (n, k, 10, 7)
    base = torch.randn(3, n, generator=rng)
    out = base.clone()
    mma_decode_emulate(x, mw, out=out, accumulate=True)
    ref = base + x.float() @ w_ref[:n, :k].T
    size = _accumulated_size(x, mw, w_ref.abs(), n, k) + base.abs().max()
    assert ((out - ref).abs().max() / size).item() < 1e-6


def test_fragment_coordinates_follow_the_ptx_isa():
    """csrc/mma_frag.h's coordinates against the PTX ISA's table for mma.m16n8k16 (.f16/.bf16,
    "Matrix Fragments for mma.m16n8k16 with floating point type"), written out here: the
    emulator places operands with the header's functions, so this is what ties it to the
    hardware."""
    coords = extension().mma_fragment_coordinates()
    for lane, r, h, row, col in coords["a"]:
        i = 2 * r + h                                   # a0..a7, two per register, low first
        group, tig = lane >> 2, lane % 4
        assert row == (group if i < 2 or 4 <= i < 6 else group + 8)
        assert col == tig * 2 + (i & 1) + (8 if i >= 4 else 0)
    for lane, r, h, k, token in coords["b"]:
        i = 2 * r + h                                   # b0..b3
        assert k == (lane % 4) * 2 + (i & 1) + (8 if i >= 2 else 0) and token == lane >> 2
    for lane, i, row, token in coords["c"]:
        assert row == (lane >> 2) + (8 if i >= 2 else 0) and token == (lane % 4) * 2 + (i & 1)
    assert len(coords["a"]) == 32 * 8 and len(coords["b"]) == 32 * 4 and len(coords["c"]) == 128


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_layout_places_every_code_bit_once(bits):
    """The stored positions of one lane's iteration cover each bit of its words exactly once
    (no bit wasted, none shared), and the repack puts a lone code where they say."""
    ext = extension()
    pos = torch.tensor(ext.mma_code_positions(bits))
    assert pos.numel() == STEPS[bits] * 8 * bits == WORDS[bits] * 32
    assert torch.equal(pos.sort().values, torch.arange(WORDS[bits] * 32))
    # Code at row 9, input 16 * 1 + 3 of iteration 0: A element of step 1 held by the lane
    # with g = 1, t = 1 (row 9 = g + 8: register 1 or 3; column 3 = 2t + 1 -> half 1, r = 1).
    n, k = 16, iteration_k(bits)
    codes = torch.zeros(n, k, dtype=torch.int64)
    codes[9, 16 + 3] = 2 ** bits - 1
    qweight = pack_codes(codes, bits)
    scales = torch.ones(n, 1)
    mw = repack_mma(qweight, scales, None, bits, k, n, k)
    lane, step, reg, half = 4 * 1 + 1, 1, 1, 1
    words = mw.frag[0, 0, lane].to(torch.int64) & 0xFFFFFFFF
    expected = torch.zeros(WORDS[bits], dtype=torch.int64)
    for b in range(bits):
        p = int(pos[((step * 4 + reg) * 2 + half) * bits + b])
        expected[p // 32] |= 1 << (p % 32)
    assert torch.equal(words, expected)
    assert int((mw.frag != 0).sum()) == int((expected != 0).sum())   # nothing else is set


def test_params_hold_scale_and_scaled_zero_per_lane_group(rng):
    """params[t, group, g] = (s, -s z) of rows 16t + g and 16t + g + 8, zero past n."""
    n, k, g = 20, 256, 128
    qt, _ = _quantized(n, k, 4, g, False, torch.float32, rng)
    mw = repack_mma(qt.qweight, qt.scales, qt.zeros, 4, g, n, k)
    assert mw.params.shape == (2, 2, 8, 4) and mw.gshift == 7 and mw.units == 1
    s, z = qt.scales, qt.zeros
    assert torch.equal(mw.params[1, 1, 2], torch.stack([s[18, 1], -s[18, 1] * z[18, 1],
                                                        torch.tensor(0.), torch.tensor(0.)]))
    assert torch.equal(mw.params[0, 0, 3], torch.stack([s[3, 0], -s[3, 0] * z[3, 0],
                                                        s[11, 0], -s[11, 0] * z[11, 0]]))
    assert mw.frag.untyped_storage().nbytes() == (2 * mw.iterations + FRAG_TAIL) * 32 * 4 * 4
    one = repack_mma(qt.qweight, qt.scales[:, :1], qt.zeros[:, :1], 4, 256, n, k)
    assert (one.gshift, one.groups, one.units) == (ONE_GROUP_SHIFT, 1, 1)


def test_unsupported_groupings_and_bad_calls_are_refused(rng):
    assert mma_unsupported_reason(4, 96, 512) is not None
    assert mma_unsupported_reason(5, 128, 512) is not None
    assert mma_unsupported_reason(4, 96, 96) is None        # one group covers k
    qt, _ = _quantized(32, 256, 4, 32, False, torch.float16, rng)
    with pytest.raises(ValueError, match="power-of-two"):
        repack_mma(qt.qweight, qt.scales, qt.zeros, 4, 96, 32, 256)
    with pytest.raises(ValueError, match="outside the stored weight"):
        repack_mma(qt.qweight, qt.scales, qt.zeros, 4, 32, 33, 256)
    mw = repack_mma(qt.qweight, qt.scales, qt.zeros, 4, 32, 32, 256)
    with pytest.raises(ValueError, match="float16 / bfloat16"):
        mma_decode_emulate(torch.randn(1, 256), mw)
    ext = extension()
    x = torch.randn(17, 256).half()
    out = torch.empty(17, 32)
    args = dict(frag=mw.frag.data_ptr(), params=mw.params.data_ptr(), x=x.data_ptr(), x_dtype=1,
                ldx=256, bias=0, bias_dtype=0, out=out.data_ptr(), out_dtype=0, ldo=32,
                accumulate=False, M=17, N=32, K=256, bits=4, tiles=mw.tiles,
                iterations=mw.iterations, groups=mw.groups, gshift=mw.gshift, units=mw.units)
    with pytest.raises(ValueError, match=r"mma_decode_emulate\(M=17.*M must be at most 16"):
        ext.mma_decode_emulate(**args)
    with pytest.raises(ValueError, match="iterations do not cover K"):
        ext.mma_decode_emulate(**{**args, "M": 1, "K": 257})
    with pytest.raises(ValueError, match="params hold too few groups"):
        ext.mma_decode_emulate(**{**args, "M": 1, "groups": 1})
    with pytest.raises(ValueError, match="units"):
        ext.mma_decode_emulate(**{**args, "M": 1, "units": 3})
