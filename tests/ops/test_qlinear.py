"""pyengine's one linear op, ``torch.ops.pyengine.qlinear``: every weight kind (dense, packed,
Matryoshka planes) x every epilogue (bias, slicing, the shortcut of sliced models) x every
backend that runs here (the cpu backend per instruction-set build, triton under its
interpreter, the torch reference), against the fp32 reference on fresh random data with odd
shapes and NaN-poisoned outputs; the public ``out=``; autograd through planes and shortcuts; the
dispatch key and its errors."""

from __future__ import annotations

import pytest
import torch

import pyengine
from pyengine import backends, ops
from pyengine.backends import (BackendError, LinearCase, PackedOperand, PlaneOperand,
                               get_backend, reference_matmul, select_backend)
from pyengine.matryoshka import PLANES_READ, MatryoshkaView

from helpers import (DTYPES, assert_matches, native_backends, poisoned, random_parent,
                     random_weight)

KINDS = ("dense", "packed", "planes")


def _backends_here():
    """(label, Backend) of every backend that serves CPU tensors in this process: the torch
    reference, each CPU instruction-set build, and triton when its interpreter is on."""
    found = [("torch", get_backend("torch"))] + native_backends("cpu")
    triton = get_backend("triton")
    case = LinearCase("cpu", torch.float32, "packed", 4)
    if triton.unavailable_reason() is None and triton.unsupported_reason(case) is None:
        found.append(("triton", triton))
    return found


BACKENDS = _backends_here()


def _weight(kind, n, k, rng, dtype, group_size=64, bits=3, precision=4):
    """A public weight object of ``kind`` [n, k] (scales in ``dtype``) and its backend operand."""
    if kind == "dense":
        w = random_weight(n, k, rng, dtype)
        return w, w
    if kind == "packed":
        qw = pyengine.quantize(random_weight(n, k, rng), bits, group_size, scale_dtype=dtype,
                               clip_search=False)
        return qw, PackedOperand(qw.qweight, qw.scales, qw.zeros, qw.bits,
                                 qw.effective_group_size)
    mw = random_parent(n, k, group_size, False, rng, dtype)
    view = mw.at(precision)
    return view, PlaneOperand(*view.planes, mw.scales, mw.zeros, precision,
                              mw.effective_group_size)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("label,backend", BACKENDS, ids=[b[0] for b in BACKENDS])
def test_every_backend_serves_every_kind_and_epilogue(label, backend, kind, rng):
    """backend.matmul on each weight kind: full, sliced (a block of the weight read in place),
    with bias and with the shortcut epilogue, into a NaN-poisoned output, on odd shapes."""
    n, k = 45, 200                       # neither a multiple of 32; K ends in a partial block
    for dtype in DTYPES:
        weight, operand = _weight(kind, n, k, rng, dtype)
        # (a single output column gets 9 rows: with fewer, bf16 rounding of the weight against
        # a cancelling sum can exceed the relative tolerance on a 2-element output by chance)
        for m, (n_used, k_used) in ((1, (n, k)), (3, (n, k)), (17, (n, k)), (5, (29, 128)),
                                    (9, (1, 64))):
            x = torch.randn(m, k_used, generator=rng).to(dtype)
            bias = torch.randn(n + 3, generator=rng).to(dtype)      # longer than n_used
            residual = torch.randn(m, 19, generator=rng).to(dtype)
            shortcut = (torch.randn(19, n_used, generator=rng) * 0.1).to(dtype)
            column_major = shortcut.T.contiguous().T   # the same values, other strides
            for b, res, sc in ((None, None, None), (bias, None, None),
                               (bias, residual, shortcut), (None, residual, column_major)):
                out = poisoned((m, n_used), dtype, "cpu")
                got = backend.matmul(x, operand, n_used, k_used, b, res, sc, out=out)
                assert got.data_ptr() == out.data_ptr(), f"{label}: result not written into out"
                ref = reference_matmul(x, operand, n_used, k_used, b, res, sc)
                what = (f"{label} {kind} {dtype} M={m} [{n_used}, {k_used}] bias={b is not None} "
                        f"shortcut={res is not None}")
                assert_matches(out.float(), ref, dtype, what)


@pytest.mark.parametrize("kind", KINDS)
def test_the_public_op_on_every_kind(kind, rng):
    """ops.qlinear with 3-D activations, bias, slicing, shortcut and out=, against the dense
    formula on the dequantized weight (float64)."""
    n, k = 40, 96
    weight, _ = _weight(kind, n, k, rng, torch.float32, group_size=32)
    dense = weight if kind == "dense" else weight.dequantize(torch.float32)
    x = torch.randn(2, 3, k, generator=rng)
    bias = torch.randn(n, generator=rng)
    residual = torch.randn(2, 3, 7, generator=rng)
    shortcut = torch.randn(7, n, generator=rng) * 0.1
    ref = x.double() @ dense.double().T + bias.double() + residual.double() @ shortcut.double()
    y = ops.qlinear(x, weight, bias, residual=residual, shortcut=shortcut)
    assert y.shape == (2, 3, n)
    assert_matches(y, ref.float(), torch.float32, f"{kind} qlinear")
    out = poisoned((2, 3, n), torch.float32, "cpu")
    assert ops.qlinear(x, weight, bias, residual=residual, shortcut=shortcut, out=out) is out
    assert torch.equal(out, y)
    # a block read in place: in_dims a multiple of the group size
    ys = ops.qlinear(x[..., :64], weight, bias, in_dims=64, out_dims=33)
    ref_s = x[..., :64].double() @ dense[:33, :64].double().T + bias[:33].double()
    assert_matches(ys, ref_s.float(), torch.float32, f"{kind} sliced qlinear")
    assert torch.equal(ops.sliced_matmul(x[..., :64], weight, 64, 33, bias=bias), ys)
    # and the wrapper of a shortcut call is the same op
    assert torch.equal(ops.shortcut_matmul(x, weight, residual, shortcut, bias), y)
    # no rows: an empty result of the right shape, out untouched but returned
    empty = torch.empty(0, k)
    assert ops.qlinear(empty, weight).shape == (0, n)


def test_out_under_autograd_and_compile(rng):
    qw, _ = _weight("packed", 24, 64, rng, torch.float32, group_size=32)
    x = torch.randn(3, 64, generator=rng, requires_grad=True)
    with pytest.raises(RuntimeError, match="out= does not support automatic differentiation"):
        ops.qlinear(x, qw, out=torch.empty(3, 24))
    with torch.no_grad():
        out = torch.empty(3, 24)
        assert ops.qlinear(x, qw, out=out) is out
    want = ops.qlinear(x.detach(), qw)
    assert torch.equal(out, want)

    def graph(t, buf):
        return ops.qlinear(t, qw, out=buf) * 2

    compiled = torch.compile(graph, fullgraph=True, backend="aot_eager")
    buf = poisoned((3, 24), torch.float32, "cpu")
    y = compiled(x.detach(), buf)
    assert torch.equal(buf, want) and torch.equal(y, 2 * want)


def test_planes_and_shortcut_have_gradients(rng):
    """The one autograd formula through a Matryoshka slice with the shortcut epilogue."""
    mw = random_parent(20, 64, 32, False, rng)
    w = mw.dequantize(3, torch.float32)
    x = torch.randn(2, 4, 64, generator=rng, requires_grad=True)
    residual = torch.randn(2, 4, 9, generator=rng, requires_grad=True)
    shortcut = torch.randn(9, 20, generator=rng, requires_grad=True)
    bias = torch.randn(20, generator=rng, requires_grad=True)
    leaves = [x, residual, shortcut, bias]
    y = ops.qlinear(x, mw.at(3), bias, residual=residual, shortcut=shortcut)
    grad_out = torch.randn(y.shape, generator=rng)
    got = torch.autograd.grad(y, leaves, grad_out)
    want = torch.autograd.grad(x @ w.T + residual @ shortcut + bias, leaves, grad_out)
    for name, g, e in zip(("x", "residual", "shortcut", "bias"), got, want):
        assert_matches(g, e, torch.float32, f"grad of {name}")


def test_a_sliced_matryoshka_projection_reads_the_planes(monkeypatch, rng):
    """The fused residual projection of a sliced model with a Matryoshka layer serves the planes
    directly: no canonical slice is assembled on the forward."""
    from pyengine.matryoshka import weight as weight_module
    from pyengine.nn.matryoshka_linear import MatryoshkaLinear
    from pyengine.nn.sliced import ResidualProjection

    layer = MatryoshkaLinear.from_weight(random_parent(32, 64, 32, True, rng), precision=4)
    shortcut = torch.randn(24, 32, generator=rng) * 0.1
    projection = ResidualProjection(layer, shortcut)
    x, residual = torch.randn(5, 64, generator=rng), torch.randn(5, 24, generator=rng)
    want = x @ layer.dequantize(torch.float32).T + residual @ shortcut

    def no_copy(*args, **kwargs):
        raise AssertionError("the forward assembled a canonical copy of the slice")

    monkeypatch.setattr(weight_module, "canonical_slice", no_copy)
    assert isinstance(layer.op_weight, MatryoshkaView) and layer.op_weight.precision == 4
    with torch.no_grad():
        got = projection.project(x, residual)
    assert_matches(got, want, torch.float32, "sliced Matryoshka projection")


def test_dispatch_key_and_errors(rng):
    """The dispatch key holds device, dtype, weight kind, bits and whether the call is a decode
    call (M <= 16) only; errors from selection name the call's M, N, K, bits and group size; bad
    weights say what to pass."""
    qw, _ = _weight("packed", 24, 64, rng, torch.float32, group_size=32, bits=4)
    assert LinearCase._fields == ("device_type", "dtype", "kind", "bits", "decode")
    assert LinearCase("cpu", torch.float32, "packed", 4).decode is False
    case = LinearCase("cpu", torch.float32, "packed", 4)
    assert select_backend(case) is select_backend(tuple(case))  # one memo, tuples accepted
    x = torch.randn(3, 64)
    with pytest.raises(BackendError, match=r"qlinear\(M=3, N=24, K=64, 4-bit packed, "
                                           r"group_size=32\): backend 'cuda'"):
        ops.qlinear(x, qw, backend="cuda")
    mw = random_parent(24, 64, 32, False, rng)
    with pytest.raises(TypeError, match=r"weight.at\(r\)"):
        ops.qlinear(x, mw)
    with pytest.raises(TypeError, match="weight must be"):
        ops.qlinear(x, "not a weight")
    with pytest.raises(ValueError, match="out must be a contiguous"):
        ops.qlinear(x, qw, out=torch.empty(3, 25))
    with pytest.raises(TypeError, match="residual and shortcut"):
        ops.qlinear(x, qw, residual=torch.randn(3, 4))
    assert ops.backend_for(x, mw.at(2)) in pyengine.available_backends()
    assert ops.backend_for(x, qw, "torch") == "torch"


def test_a_view_hands_over_only_the_planes_it_reads(rng):
    mw = random_parent(8, 64, 32, True, rng)
    for r, read in PLANES_READ.items():
        planes = dict(zip(("plane_hi", "plane_mid", "plane_lo"), mw.at(r).planes))
        assert {name for name, p in planes.items() if p is not None} == set(read)
        for name in read:
            assert planes[name] is getattr(mw, name)  # the parent's tensors, not copies


def test_selection_memo_is_cleared_when_a_backend_is_registered(monkeypatch):
    case = LinearCase("cpu", torch.float32, "dense", 0)
    monkeypatch.setattr(backends, "_SELECTED", {})
    select_backend(case)
    assert backends._SELECTED

    class Loud(backends.Backend):
        name = "loud-test-backend"

        def unavailable_reason(self):
            return None

        def unsupported_reason(self, case):
            return None

        def priority(self, case):
            return 1e9

        def matmul(self, x, weight, n, k, bias, residual, shortcut, out=None):
            return backends.get_backend("torch").matmul(x, weight, n, k, bias, residual,
                                                        shortcut, out)

    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    backends.register_backend(Loud())
    assert select_backend(case).name == "loud-test-backend"


# ---- prepared calls (ops.bind_linear) ------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bind_linear_writes_and_accumulates_what_qlinear_computes(bits, dtype, rng):
    if get_backend("cpu").unavailable_reason() is not None:
        pytest.skip("no cpu backend in this build")
    n, k = 77, 200
    qw = pyengine.quantize(random_weight(n, k, rng), bits, 64, scale_dtype=dtype)
    bias = random_weight(1, n, rng, dtype)[0]
    kernel = ops.bind_linear(qw, bias, dtype=dtype)
    assert kernel is not None
    for m in (1, 3, 17):
        x = random_weight(m, k, rng, dtype)
        want = ops.qlinear(x, qw, bias, backend="torch")
        out = poisoned((m, n), dtype, "cpu")
        kernel(x, out, False)
        assert_matches(out, want, dtype, f"bind_linear int{bits} M={m}")
        acc = random_weight(m, n, rng, dtype)
        start = acc.clone()
        kernel(x, acc, True)
        assert_matches(acc, start.float() + want.float(), dtype if dtype != torch.float32
                       else torch.float32, f"bind_linear accumulate int{bits} M={m}")
    # int8 activations: the product of the quantized activations, as qlinear computes it
    if bits in (2, 4):
        a8 = ops.bind_linear(qw, None, act_bits=8, dtype=dtype)
        x = random_weight(2, k, rng, dtype)
        out = poisoned((2, n), dtype, "cpu")
        a8(x, out, False)
        assert_matches(out, ops.qlinear(x, qw, act_bits=8), dtype, "bind_linear act_bits=8")


# ---- repeated eager calls through the weight's prepared call (ops.linear._prepared_call) ----

def _count_full_path(monkeypatch):
    """A list that grows by one each time a call runs the op's full path (linear._execute)."""
    from pyengine.ops import linear
    calls = []
    full = linear._execute

    def counted(*args, **kwargs):
        calls.append(1)
        return full(*args, **kwargs)

    monkeypatch.setattr(linear, "_execute", counted)
    return calls


@pytest.mark.parametrize("act_bits", [0, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_repeated_eager_calls_skip_the_full_path_with_the_same_result(act_bits, dtype, rng,
                                                                      monkeypatch):
    if get_backend("cpu").unavailable_reason() is not None:
        pytest.skip("no cpu backend in this build")
    n, k = 77, 200
    qw = pyengine.quantize(random_weight(n, k, rng), 4, 64, scale_dtype=dtype)
    bias = random_weight(1, n, rng, dtype)[0]
    full_path = _count_full_path(monkeypatch)
    ops.qlinear(random_weight(2, k, rng, dtype), qw, bias, act_bits=act_bits)
    assert len(full_path) == 1 and qw._op_cache.bound, "the first call validates, then binds"
    for lead in ((1,), (3,), (2, 5)):
        x = random_weight(int(torch.tensor(lead).prod()), k, rng, dtype).view(*lead, k)
        got = ops.qlinear(x, qw, bias, act_bits=act_bits)
        # out= takes the full path: the same kernel, so the same bits
        want = poisoned((*lead, n), dtype, "cpu")
        ops.qlinear(x, qw, bias, act_bits=act_bits, out=want)
        assert got.shape == (*lead, n) and got.dtype == dtype
        assert torch.equal(got, want), f"prepared call != full path for x {tuple(x.shape)}"
    assert len(full_path) == 1 + 3, "only the out= calls ran the full path"


def test_calls_unlike_the_bound_one_take_the_full_path(rng, monkeypatch):
    if get_backend("cpu").unavailable_reason() is not None:
        pytest.skip("no cpu backend in this build")
    n, k = 40, 128
    qw = pyengine.quantize(random_weight(n, k, rng), 4, 32)
    bias = random_weight(1, n, rng)[0]
    x = random_weight(3, k, rng)
    ops.qlinear(x, qw, bias)
    full_path = _count_full_path(monkeypatch)
    want = ops.qlinear(x, qw, bias, backend="torch")  # (full path)
    # another bias object: the full path, which binds the new bias
    other = bias.clone() * 2
    assert_matches(ops.qlinear(x, qw, other), ops.qlinear(x, qw, other, backend="torch"),
                   torch.float32, "another bias")
    assert len(full_path) == 3
    # non-contiguous activations
    wide = random_weight(3, 2 * k, rng)
    assert_matches(ops.qlinear(wide[:, :k], qw, bias),
                   ops.qlinear(wide[:, :k].contiguous(), qw, bias, backend="torch"),
                   torch.float32, "strided x")
    # activations that need autograd: the op, with a gradient
    xg = x.clone().requires_grad_(True)
    y = ops.qlinear(xg, qw, bias)
    assert y.requires_grad
    y.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    # a backend chosen through the environment after binding
    before = len(full_path)
    monkeypatch.setenv("PYENGINE_BACKEND", "torch")
    for _ in range(2):  # a backend without prepared calls: the full path every time
        assert_matches(ops.qlinear(x, qw, bias), want, torch.float32, "$PYENGINE_BACKEND=torch")
    assert len(full_path) == before + 2
    monkeypatch.delenv("PYENGINE_BACKEND")
    # dequant_matmul takes the prepared call too
    before = len(full_path)
    assert torch.equal(ops.dequant_matmul(x, qw, bias), ops.qlinear(x, qw, bias))
    assert len(full_path) == before
    # wrong shapes still raise the op's own errors
    with pytest.raises(ValueError, match="qlinear"):
        ops.qlinear(random_weight(2, k + 1, rng), qw, bias)
    with pytest.raises(TypeError, match="qlinear"):
        ops.qlinear(torch.zeros(2, k, dtype=torch.int32), qw, bias)


def test_a_reloaded_layer_computes_with_its_new_weights(rng):
    if get_backend("cpu").unavailable_reason() is not None:
        pytest.skip("no cpu backend in this build")
    from pyengine.nn import QuantLinear
    n, k = 24, 64
    layer = QuantLinear.from_weight(pyengine.quantize(random_weight(n, k, rng), 4, 32))
    other = QuantLinear.from_weight(pyengine.quantize(random_weight(n, k, rng), 4, 32))
    x = random_weight(1, k, rng)
    layer(x), layer(x)  # bound, then through the prepared call
    layer.load_state_dict(other.state_dict())  # copies into the same buffers
    assert_matches(layer(x), ops.qlinear(x, other.quantized_weight, backend="torch"),
                   torch.float32, "after load_state_dict")


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_copies_of_a_used_weight_compute_with_their_own_tensors(copier, rng):
    """What the ops keep on a weight (pointers into its tensors, prepared calls) is not copied
    with it: a copy computes from its own tensors, whatever later happens to the original's."""
    import copy
    import pickle
    qw = pyengine.quantize(random_weight(24, 64, rng), 4, 32)
    mw = random_parent(24, 64, 32, False, rng, torch.float32)
    x = random_weight(1, 64, rng)
    for weight, tensors in ((qw, (qw.qweight,)), (mw.at(4), (mw.plane_hi, mw.plane_mid))):
        want = ops.qlinear(x, weight)
        ops.qlinear(x, weight)  # through whatever the ops derived and kept
        twin = (copy.deepcopy(weight) if copier == "deepcopy"
                else pickle.loads(pickle.dumps(weight)))
        for t in tensors:
            t.zero_()  # the original changes; the copy must not see it
        assert torch.equal(ops.qlinear(x, twin), want), copier


def test_a_used_weight_is_freed_when_its_owner_drops_it(rng):
    """What the ops keep on a weight refers to its tensors but not back to the weight object
    (no reference cycle): dropping the last reference frees the codes at once."""
    import gc
    import weakref
    qw = pyengine.quantize(random_weight(24, 64, rng), 4, 32)
    bias = random_weight(1, 24, rng)[0]
    x = random_weight(1, 64, rng)
    for act_bits in (0, 8):
        ops.qlinear(x, qw, bias, act_bits=act_bits)
        ops.qlinear(x, qw, bias, act_bits=act_bits)
    codes = weakref.ref(qw.qweight)
    gc.disable()
    try:
        del qw
        assert codes() is None
    finally:
        gc.enable()


def test_bind_linear_has_no_prepared_form_for_other_weights(rng):
    w = random_weight(16, 32, rng)
    assert ops.bind_linear(w) is None                                   # dense
    mw = random_parent(16, 64, 32, False, rng, torch.float32)
    assert ops.bind_linear(mw.at(4)) is None                            # Matryoshka planes
    qw = pyengine.quantize(random_weight(16, 64, rng), 4, 32)
    assert ops.bind_linear(qw, backend="torch") is None                 # a backend without one
    with pytest.raises(ValueError, match="bias has shape"):
        ops.bind_linear(qw, torch.zeros(15))
