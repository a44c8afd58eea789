"""The public ops: results through every path, input validation, backend selection."""

import pytest
import torch

import pyengine
from pyengine import ops
from pyengine.backends import BackendError, LinearCase, select_backend

from helpers import DTYPES, assert_matches, random_weight

BACKEND_NAMES = [name for name in pyengine.available_backends()]


def _qw(n, k, gen, bits=4, group_size=32, symmetric=False, dtype=torch.float32):
    return pyengine.quantize(random_weight(n, k, gen, dtype), bits, group_size, symmetric,
                             clip_search=False)


@pytest.mark.parametrize("backend", BACKEND_NAMES + [None])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequant_matmul_keeps_leading_dims_and_dtype(backend, dtype, rng):
    qw = _qw(40, 96, rng)
    x = torch.randn(2, 3, 96, generator=rng).to(dtype)
    bias = torch.randn(40, generator=rng)
    y = ops.dequant_matmul(x, qw, bias, backend=backend)
    assert y.shape == (2, 3, 40) and y.dtype == dtype
    ref = x.float() @ qw.dequantize(torch.float32).T + bias
    assert_matches(y.float(), ref, dtype, f"dequant_matmul backend={backend}")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_non_contiguous_and_empty_inputs(backend, rng):
    qw = _qw(24, 64, rng)
    base = torch.randn(64, 10, generator=rng)
    x = base.T  # [10, 64], last dimension strided
    y = ops.dequant_matmul(x, qw, backend=backend)
    assert_matches(y, x @ qw.dequantize().T, torch.float32, "strided x")
    x_rows = torch.randn(10, 128, generator=rng)[:, :64]  # row stride 128
    assert_matches(ops.dequant_matmul(x_rows, qw, backend=backend), x_rows @ qw.dequantize().T,
                   torch.float32, "row-strided x")
    empty = ops.dequant_matmul(torch.randn(0, 64), qw, backend=backend)
    assert empty.shape == (0, 24)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("quantized", [True, False])
def test_sliced_matmul_uses_the_top_left_block(backend, quantized, rng):
    n, k = 130, 256
    w = _qw(n, k, rng) if quantized else random_weight(n, k, rng)
    dense = w.dequantize() if quantized else w
    x = torch.randn(5, 128, generator=rng)
    bias = torch.randn(n, generator=rng)
    y = ops.sliced_matmul(x, w, in_dims=128, out_dims=100, backend=backend, bias=bias)
    assert y.shape == (5, 100)
    assert_matches(y, x @ dense[:100, :128].T + bias[:100], torch.float32, "sliced")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("quantized", [True, False])
def test_shortcut_matmul_adds_the_residual_projection(backend, quantized, rng):
    n, k, r = 48, 64, 80
    w = _qw(n, k, rng) if quantized else random_weight(n, k, rng)
    dense = w.dequantize() if quantized else w
    x = torch.randn(2, 3, k, generator=rng)
    residual = torch.randn(2, 3, r, generator=rng)
    shortcut = torch.randn(r, n, generator=rng)
    bias = torch.randn(n, generator=rng)
    y = ops.shortcut_matmul(x, w, residual, shortcut, bias, backend=backend)
    assert y.shape == (2, 3, n)
    ref = x @ dense.T + residual @ shortcut + bias
    assert_matches(y, ref, torch.float32, "shortcut")


# ---- validation -------------------------------------------------------------------------------

def test_bad_inputs_name_the_shapes(rng):
    qw = _qw(16, 64, rng)
    with pytest.raises(ValueError, match=r"\(3, 60\).*64"):
        ops.dequant_matmul(torch.randn(3, 60), qw)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.dequant_matmul(torch.ones(3, 64, dtype=torch.int64), qw)
    with pytest.raises(TypeError, match="QuantizedWeight"):
        ops.dequant_matmul(torch.randn(3, 64), torch.randn(16, 64))
    with pytest.raises(ValueError, match="bias"):
        ops.dequant_matmul(torch.randn(3, 64), qw, bias=torch.randn(15))
    with pytest.raises(ValueError, match="meta"):
        ops.dequant_matmul(torch.randn(3, 64, device="meta"), qw)
    with pytest.raises(ValueError, match="multiple of the group size 32"):
        ops.sliced_matmul(torch.randn(3, 40), qw, in_dims=40, out_dims=8)
    with pytest.raises(ValueError, match="out_dims=17"):
        ops.sliced_matmul(torch.randn(3, 32), qw, in_dims=32, out_dims=17)
    with pytest.raises(TypeError, match="must match"):
        ops.sliced_matmul(torch.randn(3, 32, dtype=torch.float16), torch.randn(8, 32), 32, 8)
    with pytest.raises(ValueError, match="shortcut"):
        ops.shortcut_matmul(torch.randn(3, 64), qw, torch.randn(3, 5), torch.randn(5, 15))
    with pytest.raises(ValueError, match="residual"):
        ops.shortcut_matmul(torch.randn(3, 64), qw, torch.randn(4, 5), torch.randn(5, 16))


def test_sliced_matmul_of_the_whole_weight_needs_no_alignment(rng):
    qw = _qw(16, 100, rng)  # K = 100 is not a multiple of the group size
    x = torch.randn(2, 100, generator=rng)
    assert_matches(ops.sliced_matmul(x, qw, 100, 16), x @ qw.dequantize().T, torch.float32,
                   "full slice")


# ---- backend selection ------------------------------------------------------------------------

def _case(**kw):
    base = dict(device_type="cpu", dtype=torch.float32, kind="packed", bits=4)
    base.update(kw)
    return LinearCase(**base)


def test_auto_selection_prefers_the_compiled_cpu_backend():
    expected = "cpu" if "cpu" in pyengine.available_backends() else "torch"
    assert select_backend(_case()).name == expected


def test_environment_override_and_explicit_requests(monkeypatch, rng):
    monkeypatch.setenv("PYENGINE_BACKEND", "torch")
    assert select_backend(_case()).name == "torch"
    qw = _qw(8, 64, rng)
    ops.dequant_matmul(torch.randn(2, 64), qw)  # runs on the torch backend
    monkeypatch.setenv("PYENGINE_BACKEND", "nonsense")
    with pytest.raises(BackendError, match="unknown backend 'nonsense'"):
        ops.dequant_matmul(torch.randn(2, 64), qw)
    monkeypatch.delenv("PYENGINE_BACKEND")
    with pytest.raises(BackendError, match="unknown backend"):
        ops.dequant_matmul(torch.randn(2, 64), qw, backend="nonsense")


def test_a_backend_that_cannot_serve_the_case_is_an_error_not_a_fallback(rng):
    qw = _qw(8, 64, rng)
    with pytest.raises(BackendError, match="cuda"):
        ops.dequant_matmul(torch.randn(2, 64), qw, backend="cuda")  # CPU tensors


def test_available_backends_always_has_the_reference():
    names = pyengine.available_backends()
    assert "torch" in names
    assert set(names) <= set(pyengine.known_backends())
