"""pyengine.quantize and QuantizedWeight: shapes, error, clipping search, bad input, round trips."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import pyengine
from pyengine.format.packing import unpack_codes

from helpers import BITS, GROUP_SIZES, random_weight, rel_err

SHAPES = [(1, 1), (33, 100), (7, 576), (5, 130), (64, 256)]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_dequantize_has_the_exact_shape_and_codes_fit(bits, group_size, symmetric, rng):
    for n, k in SHAPES:
        w = random_weight(n, k, rng)
        qw = pyengine.quantize(w, bits, group_size, symmetric)
        assert qw.shape == (n, k) and qw.bits == bits and qw.group_size == group_size
        assert qw.symmetric == symmetric and (qw.zeros is None) == symmetric
        deq = qw.dequantize()
        assert deq.shape == (n, k) and deq.dtype == w.dtype
        assert bool(torch.isfinite(deq).all())
        codes = unpack_codes(qw.qweight, bits)
        assert int(codes.max()) < (1 << bits) and int(codes.min()) >= 0
        assert int(codes[:, k:].abs().sum()) == 0, "padding codes must be stored as 0"


# Loose upper bounds on the relative error of RTN on Gaussian weights (group 128).
ERROR_BOUND = {8: 0.01, 4: 0.12, 3: 0.25, 2: 0.5}


@pytest.mark.parametrize("bits", BITS)
def test_reconstruction_error_is_what_the_bit_width_allows(bits, rng):
    w = random_weight(256, 1024, rng)
    err = rel_err(pyengine.quantize(w, bits, 128).dequantize(), w)
    assert err < ERROR_BOUND[bits]
    if bits < 8:  # one bit more roughly halves the error
        assert rel_err(pyengine.quantize(w, bits + 1 if bits < 4 else 8, 128).dequantize(), w) < err


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_clip_search_never_loses_to_min_max(bits, symmetric, rng):
    w = random_weight(128, 512, rng)
    searched = rel_err(pyengine.quantize(w, bits, 64, symmetric).dequantize(), w)
    minmax = rel_err(pyengine.quantize(w, bits, 64, symmetric, clip_search=False).dequantize(), w)
    assert searched <= minmax + 1e-12
    if bits <= 3:  # at low bit widths clipping the outliers clearly pays
        assert searched < 0.97 * minmax


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_weights_on_the_grid_are_reproduced_exactly(bits, group_size, rng):
    n, k = 9, 256
    maxq = (1 << bits) - 1
    gs = k if group_size == -1 else group_size
    codes = torch.randint(0, maxq + 1, (n, k), generator=rng)
    codes[:, ::gs] = 0       # every group reaches both ends of the code range
    codes[:, 1::gs] = maxq
    zeros = torch.randint(1, maxq, (n, k // gs), generator=rng).float()
    scales = torch.rand(n, k // gs, generator=rng) + 0.5
    scales = scales.to(torch.bfloat16).float()  # few mantissa bits: (hi - lo) / maxq is exact
    w = (codes - zeros.repeat_interleave(gs, 1)) * scales.repeat_interleave(gs, 1)
    deq = pyengine.quantize(w, bits, group_size).dequantize()
    assert torch.allclose(deq, w, rtol=0, atol=1e-6 * float(w.abs().max()))


def test_constant_and_zero_groups_stay_finite():
    w = torch.zeros(4, 128)
    w[1] = 3.0
    w[2, :64] = -1e-30
    for symmetric in (False, True):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            deq = pyengine.quantize(w.to(dtype), 4, 32, symmetric).dequantize().float()
            assert bool(torch.isfinite(deq).all())
            assert torch.equal(deq[0], torch.zeros(128))
            assert torch.allclose(deq[1], w[1], rtol=0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scales_follow_the_weight_dtype(dtype, rng):
    qw = pyengine.quantize(random_weight(8, 96, rng, dtype), 4, 32)
    assert qw.scales.dtype == dtype and qw.zeros.dtype == dtype
    assert qw.dequantize().dtype == dtype
    assert pyengine.quantize(random_weight(8, 96, rng, dtype), 4, 32,
                             scale_dtype=torch.float32).scales.dtype == torch.float32


def test_bits_per_weight_counts_scales_and_zeros(rng):
    w = random_weight(64, 512, rng, torch.float16)
    assert pyengine.quantize(w, 4, 128).bits_per_weight == pytest.approx(4 + 32 / 128)
    assert pyengine.quantize(w, 4, 128, symmetric=True).bits_per_weight == pytest.approx(4 + 16 / 128)
    assert pyengine.quantize(w, 3, -1).bits_per_weight == pytest.approx(3 + 32 / 512)


@pytest.mark.parametrize("bad, message", [
    (dict(bits=9), "bits"),
    (dict(bits=1), "bits"),
    (dict(group_size=48), "group_size"),
    (dict(group_size=0), "group_size"),
    (dict(method="gptq"), "method"),
    (dict(method="nope"), "method"),
    (dict(weight=torch.randn(2, 3, 64)), "2-D"),
    (dict(weight=torch.randn(64)), "2-D"),
    (dict(weight=torch.randn(0, 64)), "empty"),
    (dict(weight=torch.randn(4, 0)), "empty"),
    (dict(weight=torch.ones(4, 64, dtype=torch.int32)), "floating"),
    (dict(weight=torch.tensor([[1.0, float("nan")]])), "non-finite"),
    (dict(weight=torch.tensor([[1.0, float("inf")]])), "non-finite"),
    (dict(weight=[[1.0, 2.0]]), "torch.Tensor"),
])
def test_bad_input_raises_value_error_that_says_why(bad, message):
    args = dict(weight=torch.randn(4, 64), bits=4, group_size=32, method="rtn")
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        pyengine.quantize(args.pop("weight"), **args)


@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_through_dict_and_safetensors(symmetric, tmp_path, rng):
    qw = pyengine.quantize(random_weight(37, 200, rng, torch.bfloat16), 3, 64, symmetric)
    tensors, meta = qw.to_dict()
    assert set(tensors) == ({"qweight", "scales"} if symmetric else {"qweight", "scales", "zeros"})
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata={"pyengine": json.dumps(meta)})
    back = pyengine.QuantizedWeight.from_dict(load_file(str(path)), json.loads(json.dumps(meta)))
    assert (back.bits, back.group_size, back.symmetric, back.shape) == (3, 64, symmetric, (37, 200))
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert back.scales.dtype == torch.bfloat16


def test_from_dict_rejects_foreign_or_inconsistent_data(rng):
    tensors, meta = pyengine.quantize(random_weight(8, 64, rng), 4, 32).to_dict()
    with pytest.raises(ValueError, match="not a pyengine"):
        pyengine.QuantizedWeight.from_dict(tensors, {**meta, "format": "gptq"})
    with pytest.raises(ValueError, match="newer"):
        pyengine.QuantizedWeight.from_dict(tensors, {**meta, "version": 99})
    with pytest.raises(ValueError, match="zeros"):
        pyengine.QuantizedWeight.from_dict({k: v for k, v in tensors.items() if k != "zeros"}, meta)
    with pytest.raises(ValueError, match="qweight must be"):
        pyengine.QuantizedWeight.from_dict(tensors, {**meta, "shape": [8, 300]})


def test_to_changes_scale_dtype_and_keeps_codes(rng):
    qw = pyengine.quantize(random_weight(8, 64, rng), 4, 32)
    half = qw.to(dtype=torch.float16)
    assert half.scales.dtype == torch.float16 and half.qweight is qw.qweight
    assert qw.to() is qw
    assert rel_err(half.dequantize(torch.float32), qw.dequantize()) < 1e-3


# ---- input weights (calibrated RTN) ------------------------------------------------------------

def _weighted_error(qw, w, input_weights):
    return float(((qw.dequantize().float() - w) ** 2 * input_weights).sum())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_input_weights_lower_the_weighted_error(bits, symmetric, rng):
    """Quantizing with input weights lowers the error they measure (inputs 0..7 carry 100x
    the signal of the rest, as outlier channels do), and the heavy inputs' own error falls."""
    n, k = 64, 200  # K not a multiple of the group: padding columns weigh nothing
    w = random_weight(n, k, rng)
    input_weights = torch.ones(k)
    input_weights[:8] = 100.0
    plain = pyengine.quantize(w, bits, 64, symmetric)
    weighted = pyengine.quantize(w, bits, 64, symmetric, input_weights=input_weights)
    assert _weighted_error(weighted, w, input_weights) < 0.9 * _weighted_error(plain, w,
                                                                                input_weights)
    heavy = slice(0, 8)
    assert (rel_err(weighted.dequantize()[:, heavy], w[:, heavy])
            < rel_err(plain.dequantize()[:, heavy], w[:, heavy]))


@pytest.mark.parametrize("uniform", [1.0, 4.0])  # powers of two: the sums scale exactly
def test_uniform_input_weights_change_nothing(uniform, rng):
    w = random_weight(48, 96, rng)
    plain = pyengine.quantize(w, 3, 32)
    same = pyengine.quantize(w, 3, 32, input_weights=torch.full((96,), uniform))
    assert torch.equal(plain.qweight, same.qweight) and torch.equal(plain.scales, same.scales)
    assert torch.equal(plain.zeros, same.zeros)


@pytest.mark.parametrize("bad, match", [
    (torch.ones(95), r"shape \(96,\)"),
    (torch.ones(96, 1), r"shape \(96,\)"),
    ([1.0] * 96, r"shape \(96,\)"),
    (torch.ones(96, dtype=torch.int32), "floating point"),
    (torch.full((96,), -1.0), "finite and >= 0"),
    (torch.full((96,), float("nan")), "finite and >= 0"),
    (torch.full((96,), float("inf")), "finite and >= 0"),
])
def test_bad_input_weights(bad, match, rng):
    with pytest.raises(ValueError, match=match):
        pyengine.quantize(random_weight(8, 96, rng), 4, 32, input_weights=bad)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zero_points_are_not_rounded(bits, rng):
    """RTN's zero points are fractional (docs/FORMAT.md): an integer zero moves the grid by
    up to half a step. They are stored exactly as the codes were chosen with them."""
    w = random_weight(64, 256, rng)
    qw = pyengine.quantize(w, bits, 64, scale_dtype=torch.float32)
    assert (qw.zeros != qw.zeros.round()).float().mean() > 0.5
    codes = unpack_codes(qw.qweight, bits)[:, :256].float().view(64, 4, 64)
    want = torch.clamp(torch.round(w.view(64, 4, 64) / qw.scales[..., None]
                                   + qw.zeros[..., None]), 0, (1 << bits) - 1)
    assert torch.equal(codes, want)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_integer_zeros_are_integers_on_the_code_range(bits, scale_dtype, rng):
    """integer_zeros=True: every zero point is an integer in [0, 2^bits - 1] (what GPTQ and
    compressed-tensors checkpoints hold), the codes are the ones those parameters give, and
    the error stays close to the fractional zeros' (at most 15% higher at 2 bits)."""
    w = random_weight(64, 320, rng)
    qw = pyengine.quantize(w, bits, 64, scale_dtype=scale_dtype, integer_zeros=True)
    zeros = qw.zeros.float()
    assert torch.equal(zeros, zeros.round())
    assert zeros.min() >= 0 and zeros.max() <= (1 << bits) - 1
    codes = unpack_codes(qw.qweight, bits)[:, :320].float().view(64, 5, 64)
    want = torch.clamp(torch.round(w.view(64, 5, 64) / qw.scales.float()[..., None]
                                   + zeros[..., None]), 0, (1 << bits) - 1)
    assert torch.equal(codes, want)
    fractional = pyengine.quantize(w, bits, 64, scale_dtype=scale_dtype)
    assert rel_err(qw.dequantize(), w) <= 1.15 * rel_err(fractional.dequantize(), w)


@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_integer_zeros(symmetric, rng):
    """GPTQ with integer_zeros: integer zeros, and the refit moves only the scales (a
    symmetric weight is the same either way)."""
    from pyengine.quant.gptq import gptq_quantize
    w = random_weight(48, 192, rng)
    x = torch.randn(256, 192, generator=rng)
    hessian = x.T @ x
    qw = gptq_quantize(w, hessian, 3, 64, symmetric, scale_dtype=torch.float32,
                       integer_zeros=True)
    plain = gptq_quantize(w, hessian, 3, 64, symmetric, scale_dtype=torch.float32)
    if symmetric:
        assert torch.equal(qw.qweight, plain.qweight) and torch.equal(qw.scales, plain.scales)
        return
    assert torch.equal(qw.zeros, qw.zeros.round())
    assert qw.zeros.min() >= 0 and qw.zeros.max() <= 7

    def output_error(weight):
        return ((weight.dequantize() - w) @ x.T).square().sum()
    assert output_error(qw) <= 1.2 * output_error(plain)
