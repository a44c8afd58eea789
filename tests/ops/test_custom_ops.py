"""The custom-op contract: torch.library.opcheck, torch.compile(fullgraph=True), autograd."""

import warnings

import pytest
import torch

import pyengine
from pyengine import ops

from helpers import assert_matches, random_parent, random_weight

BACKENDS = [name for name in pyengine.available_backends()]


def _qw(n, k, gen, bits=4, group_size=32, symmetric=False):
    return pyengine.quantize(random_weight(n, k, gen), bits, group_size, symmetric,
                             clip_search=False)


def _samples(gen, backend):
    """Argument tuples of torch.ops.pyengine.qlinear covering every weight kind (dense, packed,
    Matryoshka planes), bias, symmetric weights, slicing and the shortcut epilogue."""
    qa = _qw(24, 64, gen)
    qs = _qw(24, 64, gen, bits=3, group_size=-1, symmetric=True)
    mw = random_parent(24, 64, 32, False, gen)
    x = torch.randn(3, 64, generator=gen, requires_grad=True)
    bias = torch.randn(24, generator=gen, requires_grad=True)
    dense = random_weight(24, 64, gen).requires_grad_()
    residual = torch.randn(3, 16, generator=gen, requires_grad=True)
    shortcut = torch.randn(16, 24, generator=gen, requires_grad=True)
    packed = (qa.qweight, qa.scales, qa.zeros, None, None)
    planes = lambda r: (mw.plane_hi, mw.scales, mw.zeros,  # noqa: E731
                        mw.plane_mid if r >= 3 else None, mw.plane_lo if r >= 6 else None)
    return [
        # x, weight, scales, zeros, plane_mid, plane_lo, bias, residual, shortcut,
        # kind, bits, group_size, n, k, backend
        (x, *packed, bias, None, None, "packed", 4, 32, 24, 64, backend),
        (x, qs.qweight, qs.scales, None, None, None, None, None, None, "packed", 3, -1, 24, 64,
         backend),
        (x[:, :32], *packed, bias, None, None, "packed", 4, 32, 20, 32, backend),
        (x[:, :40], dense, None, None, None, None, None, None, None, "dense", 0, 0, 10, 40,
         backend),
        (x, *packed, bias, residual, shortcut, "packed", 4, 32, 24, 64, backend),
        (x, dense, None, None, None, None, None, residual, shortcut, "dense", 0, 0, 24, 64,
         backend),
        (x, *planes(4), bias, None, None, "planes", 4, 32, 24, 64, backend),
        (x, *planes(2), None, residual, shortcut, "planes", 2, 32, 24, 64, backend),
        (x[:, :32], *planes(8), bias, None, None, "planes", 8, 32, 16, 32, backend),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, rng):
    op = torch.ops.pyengine.qlinear.default
    for args in _samples(rng, backend):
        torch.library.opcheck(op, args)


def test_compiles_in_one_graph(rng):
    qw = _qw(32, 64, rng)
    dense = random_weight(48, 64, rng)
    shortcut = torch.randn(32, 48, generator=rng)

    def graph(x):
        h = ops.dequant_matmul(x, qw)
        s = ops.sliced_matmul(x, dense, in_dims=64, out_dims=48)
        return ops.shortcut_matmul(x, qw, s, shortcut.T, None) + h

    compiled = torch.compile(graph, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 64, generator=rng)
    assert_matches(compiled(x), graph(x), torch.float32, "compiled vs eager")
    x2 = torch.randn(7, 64, generator=rng)  # a new batch size retraces or runs dynamic
    assert_matches(compiled(x2), graph(x2), torch.float32, "compiled, new M")


@pytest.mark.parametrize("quantized", [True, False])
def test_gradients_match_the_dense_formula(quantized, rng):
    n, k, r = 20, 64, 12
    w = _qw(n, k, rng) if quantized else random_weight(n, k, rng).requires_grad_()
    dense = w.dequantize() if quantized else w
    x = torch.randn(2, 5, k, generator=rng, requires_grad=True)
    residual = torch.randn(2, 5, r, generator=rng, requires_grad=True)
    shortcut = torch.randn(r, n, generator=rng, requires_grad=True)
    bias = torch.randn(n, generator=rng, requires_grad=True)
    leaves = [x, residual, shortcut, bias] + ([] if quantized else [w])

    y = ops.shortcut_matmul(x, w, residual, shortcut, bias)
    grad_out = torch.randn(y.shape, generator=rng)
    got = torch.autograd.grad(y, leaves, grad_out)
    ref = x @ dense.T + residual @ shortcut + bias
    want = torch.autograd.grad(ref, leaves, grad_out)
    for name, g, e in zip(["x", "residual", "shortcut", "bias", "weight"], got, want):
        assert_matches(g, e, torch.float32, f"grad of {name}")


def test_sliced_gradient_lands_in_the_block(rng):
    w = random_weight(30, 50, rng).requires_grad_()
    x = torch.randn(4, 40, generator=rng, requires_grad=True)
    y = ops.sliced_matmul(x, w, in_dims=40, out_dims=25)
    gw, gx = torch.autograd.grad(y.square().sum(), [w, x])
    ref_w = w.detach().clone().requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    (ref_x @ ref_w[:25, :40].T).square().sum().backward()
    assert_matches(gw, ref_w.grad, torch.float32, "weight grad")
    assert_matches(gx, ref_x.grad, torch.float32, "x grad")
    assert bool((gw[25:] == 0).all()) and bool((gw[:, 40:] == 0).all())


def test_plain_eager_calls_skip_the_op_and_agree_with_it(rng, monkeypatch):
    """Plain eager calls run the implementation directly (no dispatcher); anything that needs
    the op (autograd, tensor subclasses such as fake tensors) still goes through it; both give
    bit-identical results."""
    from pyengine.ops.linear import eager_call_ok
    qa = _qw(24, 64, rng)
    x = torch.randn(3, 64, generator=rng)
    bias = torch.randn(24, generator=rng)
    assert eager_call_ok(x, qa.qweight, None, bias)
    assert eager_call_ok(torch.nn.Parameter(x.clone()).requires_grad_(False))
    assert not eager_call_ok(x.clone().requires_grad_())
    with torch.no_grad():
        assert eager_call_ok(x.clone().requires_grad_())
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        fake = torch.empty(3, 64)
    assert not eager_call_ok(fake)
    assert torch.func.vmap(lambda t: torch.tensor(eager_call_ok(t)))(x).tolist() == [False] * 3
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace is deprecated
        torch.jit.trace(lambda t: seen.append(eager_call_ok(t)) or t * 1, (x,), check_trace=False)
    assert seen == [False]

    calls = []
    real = torch.ops.pyengine.qlinear.default

    def counted(*args):
        calls.append(args[0].requires_grad)
        return real(*args)

    monkeypatch.setattr(ops.linear, "_qlinear_op", counted)
    direct = ops.dequant_matmul(x, qa, bias)
    assert calls == []  # the plain call did not go through the op
    through_op = real(x, qa.qweight, qa.scales, qa.zeros, None, None, bias, None, None, "packed",
                      4, 32, 24, 64, None)
    assert torch.equal(direct, through_op)
    xg = x.clone().requires_grad_()
    y = ops.dequant_matmul(xg, qa, bias)
    assert calls == [True] and y.requires_grad
    assert torch.equal(y.detach(), direct)
