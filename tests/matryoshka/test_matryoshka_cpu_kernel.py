"""The C++ CPU kernel of the Matryoshka bit-plane layout (pyengine._C.plane_matmul_cpu): every
precision x group size x symmetry x activation dtype on odd shapes, every instruction-set build
this CPU can run, against the plane reference (plane_reference_matmul, fp32) and against the
slice dequantized then multiplied in float64, with NaN-poisoned outputs and fresh random
parents; plus exact slice values for every parent code, the planes a slice may leave out, the
errors for bad inputs, and how matryoshka_matmul dispatches to the kernel.
"""

import types

import pytest
import torch

import pyengine
from pyengine import MatryoshkaWeight
from pyengine.backends import _native
from pyengine import backends
from pyengine.matryoshka import PLANES_READ, PRECISIONS
from pyengine.ops import backend_for, matryoshka_matmul

from helpers import (DTYPES, GROUP_SIZES, assert_matches, plane_reference_matmul, poisoned,
                     random_parent, run_python)

INFO = pyengine.build_info()
pytestmark = pytest.mark.skipif(
    not INFO.get("cpu_kernels"),
    reason=f"pyengine._C has no CPU kernels here ({INFO.get('extension_error')})")

# The instruction-set builds this CPU runs (the public op runs the one the dispatcher picks).
ISAS = list(INFO.get("cpu_isas_usable", []))
PLANE_NAMES = ("plane_hi", "plane_mid", "plane_lo")
N_ODD, K_ODD = 45, 200           # neither a multiple of 32; K ends in a partial 32-code block
MS = (1, 3, 17, 33)              # decode (M <= 8) and tiled (M > 8) paths


def _parent(n, k, group_size, symmetric, gen, scale_dtype=torch.float32):
    return random_parent(n, k, group_size, symmetric, gen, scale_dtype)


def _planes(mw, r):
    """The planes an r-bit slice reads; the others None."""
    return [getattr(mw, name) if name in PLANES_READ[r] else None for name in PLANE_NAMES]


def _kernel(x, mw, r, bias=None, out=None, isa="", n=None, planes=None, num_threads=None):
    n = mw.out_features if n is None else n
    return _native.plane_matmul_cpu(x, *(planes or _planes(mw, r)), mw.scales, mw.zeros, bias,
                                    r, mw.effective_group_size, n, mw.in_features, out=out,
                                    isa=isa, num_threads=num_threads)


def _ref64(x, mw, r, bias):
    """x @ W_r^T (+ bias) in float64 from the dequantized slice."""
    y = x.to(torch.float64) @ mw.dequantize(r, torch.float32).to(torch.float64).T
    return y if bias is None else y + bias.to(torch.float64)


def test_extension_has_the_plane_kernel():
    assert INFO.get("cpu_plane_kernels") is True
    assert _native.plane_kernel_unavailable_reason() is None
    assert ISAS and "generic" in ISAS


# ---- every precision x group x symmetry x dtype, odd shapes, every ISA ------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("r", PRECISIONS)
def test_kernel_matches_the_references(r, group_size, symmetric, dtype, rng):
    mw = _parent(N_ODD, K_ODD, group_size, symmetric, rng, scale_dtype=dtype)
    bias = torch.randn(N_ODD, generator=rng).to(dtype)
    for m in MS:
        x = torch.randn(m, K_ODD, generator=rng).to(dtype)
        ref = plane_reference_matmul(x, *_planes(mw, r), mw.scales, mw.zeros, None, r,
                                     group_size, N_ODD, K_ODD)
        ref64 = _ref64(x, mw, r, None)
        for with_bias in (False, True):
            b = bias if with_bias else None
            want = ref + bias.to(torch.float32) if with_bias else ref
            want64 = ref64 + bias.to(torch.float64) if with_bias else ref64
            for isa in ISAS:
                what = f"r={r} g={group_size} M={m} bias={with_bias} isa={isa}"
                out = poisoned((m, N_ODD), dtype, "cpu")
                y = _kernel(x, mw, r, b, out=out, isa=isa)
                assert y is out and y.dtype == dtype
                assert_matches(y.to(torch.float32), want, dtype, what + " vs plane reference")
                assert_matches(y, want64, dtype, what + " vs float64 dequantize-then-matmul")
            # The public op (default dispatch) runs the same kernel: bitwise equal to it.
            y_op = matryoshka_matmul(x, mw, r, b)
            assert torch.equal(y_op, _kernel(x, mw, r, b)), f"r={r} M={m}: op != kernel"


def test_every_parent_code_slices_exactly_on_both_paths():
    """Column k of W_r is y = e_k @ W_r^T: with every code 0..255 in each column, one-hot rows of
    x read back every slice value through the decode (M = 1) and the tiled (M = K) path."""
    n, k = 256, 96
    codes = (torch.arange(n)[:, None] + 7 * torch.arange(k)[None, :]) % 256
    scales = torch.full((n, k // 32), 0.01)
    zeros = torch.full((n, k // 32), 100.0)
    for symmetric in (False, True):
        mw = MatryoshkaWeight.from_codes(codes, scales, None if symmetric else zeros,
                                         group_size=32, shape=(n, k))
        for r in PRECISIONS:
            w = mw.dequantize(r, torch.float32)  # [n, k], exact values of (c_r 2^(8-r) - z) s
            eye = torch.eye(k)
            for isa in ISAS:
                y = _kernel(eye, mw, r, isa=isa)                     # tiled path
                torch.testing.assert_close(y, w.T, rtol=0, atol=1e-5)
                for col in (0, 10, 21, 31, 32, 53, 95):               # straddling codes 10, 21
                    y1 = _kernel(eye[col:col + 1], mw, r, isa=isa)    # decode path
                    torch.testing.assert_close(y1[0], w[:, col], rtol=0, atol=1e-5,
                                               msg=lambda m: f"r={r} col={col} {isa}: {m}")


@pytest.mark.parametrize("n,k,group_size", [(70, 1100, 64), (33, 1100, -1), (9, 32, 32),
                                            (5, 1, 128), (130, 576, 128), (21, 512, 128),
                                            (23, 480, 32), (40, 576, -1)])
def test_longer_and_tiny_rows(n, k, group_size, rng):
    """Rows of several chunks (16 blocks with AVX-512, 8 otherwise) with and without a tail of
    blocks after the last full chunk (K = 1100: 35 blocks, 512: 16, 480: 15, 576: 18; the decode
    path packs the tails of several rows into one chunk, N not a multiple of that), a single
    block, a single code."""
    mw = _parent(n, k, group_size, False, rng)
    for r in (8, 4, 2):
        for m in (1, 8, 9, 20):
            x = torch.randn(m, k, generator=rng)
            for isa in ISAS:
                out = poisoned((m, n), torch.float32, "cpu")
                assert_matches(_kernel(x, mw, r, out=out, isa=isa), _ref64(x, mw, r, None),
                               torch.float32, f"r={r} M={m} N={n} K={k} isa={isa}")


def test_decode_and_tiled_paths_meet_at_the_threshold(rng):
    ext = _native.extension()
    top = ext.cpu_plane_decode_max_m
    mw = _parent(40, 300, 32, True, rng)
    for r in PRECISIONS:
        for m in (top, top + 1):
            x = torch.randn(m, 300, generator=rng)
            assert_matches(_kernel(x, mw, r), _ref64(x, mw, r, None), torch.float32,
                           f"r={r} M={m}")


def test_mixed_dtypes_strided_x_and_fewer_rows_than_stored(rng):
    """x fp16 with bf16 scales and an fp32 bias; x a column slice (row stride > K); n smaller than
    the stored rows (the kernel reads rows [0, n) only)."""
    mw = _parent(50, 200, 64, False, rng, scale_dtype=torch.bfloat16)
    wide = torch.randn(5, 207, generator=rng).to(torch.float16)
    x = wide[:, :200]
    assert x.stride() == (207, 1)
    bias = torch.randn(44, generator=rng)
    for r in PRECISIONS:
        y = _kernel(x, mw, r, bias, n=44)
        want = x.double() @ mw.dequantize(r, torch.float32)[:44].double().T + bias.double()
        assert y.shape == (5, 44) and y.dtype == torch.float16
        assert_matches(y, want, torch.float16, f"r={r}")


def test_planes_a_slice_does_not_read_are_never_read(rng):
    """Garbage in the planes outside PLANES_READ[r] changes nothing (and None is never touched)."""
    mw = _parent(24, 160, 32, False, rng)
    x = torch.randn(3, 160, generator=rng)
    junk = {name: torch.randint(-2**31, 2**31 - 1, tuple(getattr(mw, name).shape),
                                dtype=torch.int32, generator=rng) for name in PLANE_NAMES}
    for r in (2, 3, 4):
        clean = _kernel(x, mw, r)
        dirty = [getattr(mw, name) if name in PLANES_READ[r] else junk[name]
                 for name in PLANE_NAMES]
        assert torch.equal(_kernel(x, mw, r, planes=dirty), clean), f"r={r}"
    # ...while the planes a slice does read do matter.
    dirty_hi = [junk["plane_hi"], None, None]
    assert not torch.equal(_kernel(x, mw, 2, planes=dirty_hi), _kernel(x, mw, 2))


def test_thread_count_does_not_change_the_result(rng):
    mw = _parent(67, 700, 128, True, rng)
    for m in (1, 12):
        x = torch.randn(m, 700, generator=rng)
        for r in (8, 2):
            assert torch.equal(_kernel(x, mw, r, num_threads=1), _kernel(x, mw, r, num_threads=2))


def test_empty_batch(rng):
    mw = _parent(8, 64, 32, True, rng)
    assert _kernel(torch.empty(0, 64), mw, 4).shape == (0, 8)
    assert matryoshka_matmul(torch.empty(2, 0, 64), mw, 4).shape == (2, 0, 8)


# ---- errors ------------------------------------------------------------------------------------

def _raw_args(x, mw, r, out, **override):
    """Keyword arguments of pyengine._C.plane_matmul_cpu for a valid call, with overrides."""
    planes = _planes(mw, r)
    args = dict(
        x=x.data_ptr(), x_dtype=0, ldx=x.stride(0),
        plane_hi=planes[0].data_ptr(), ld_hi=planes[0].stride(0),
        plane_mid=0 if planes[1] is None else planes[1].data_ptr(),
        ld_mid=0 if planes[1] is None else planes[1].stride(0),
        plane_lo=0 if planes[2] is None else planes[2].data_ptr(),
        ld_lo=0 if planes[2] is None else planes[2].stride(0),
        scales=mw.scales.data_ptr(), zeros=mw.zeros.data_ptr(), sz_dtype=0,
        lds=mw.scales.stride(0), bias=0, bias_dtype=0, out=out.data_ptr(), out_dtype=0,
        ldo=out.stride(0), M=x.shape[0], N=mw.out_features, K=mw.in_features, precision=r,
        group_size=mw.effective_group_size)
    args.update(override)
    return args


def test_the_extension_checks_its_arguments(rng):
    ext = _native.extension()
    mw = _parent(45, 200, 64, False, rng)
    x = torch.randn(2, 200, generator=rng)
    out = poisoned((2, 45), torch.float32, "cpu")
    ext.plane_matmul_cpu(**_raw_args(x, mw, 4, out))  # the valid call runs
    assert torch.isfinite(out).all()
    head = r"plane_matmul_cpu\(M=2, N=45, K=200, precision=%s, group_size=%s"
    cases = [
        (dict(precision=5), head % (5, 64) + r".*precision must be 8, 6, 4, 3 or 2"),
        (dict(group_size=48), head % (4, 48) + r".*group_size must be a positive multiple of 32"),
        (dict(plane_mid=0), r"a 4-bit slice reads plane_mid, got a null pointer"),
        (dict(ld_hi=20), r"ld of plane_hi is smaller than the packed length of K"),
        (dict(lds=1), r"lds is smaller than the number of groups of K"),
        (dict(ldx=100), r"row stride smaller than the row"),
        (dict(out_dtype=7), r"unsupported dtype code"),
        (dict(M=-1), r"negative size"),
    ]
    for override, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            ext.plane_matmul_cpu(**_raw_args(x, mw, 4, out, **override))
    r6 = _raw_args(x, mw, 6, out)
    with pytest.raises(ValueError, match=r"a 6-bit slice reads plane_lo, got a null pointer"):
        ext.plane_matmul_cpu(**{**r6, "plane_lo": 0})
    with pytest.raises(ValueError, match=r"plane_matmul_cpu: no kernels for instruction set "
                                         r"'avx9' in this build"):
        ext.plane_matmul_cpu(**_raw_args(x, mw, 4, out), isa="avx9")


def test_the_python_wrapper_checks_tensors(rng):
    mw = _parent(45, 200, 64, False, rng)
    x = torch.randn(2, 200, generator=rng)
    hi, mid, lo = mw.plane_hi, mw.plane_mid, mw.plane_lo

    def call(x=x, planes=(hi, mid, lo), r=4, **kw):
        return _native.plane_matmul_cpu(x, *planes, mw.scales, mw.zeros, kw.pop("bias", None),
                                        r, 64, 45, 200, **kw)

    with pytest.raises(ValueError, match=r"plane_matmul_cpu\(M=2, N=45, K=200, precision=4.*"
                                         r"a 4-bit slice reads plane_mid, got None"):
        call(planes=(hi, None, None))
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        call(x=x.to(torch.float64))
    with pytest.raises(ValueError, match=r"x must be \[M, 200\]"):
        call(x=torch.randn(2, 199))
    with pytest.raises(ValueError, match="x must have a contiguous last dimension"):
        call(x=torch.randn(200, 2).T)
    with pytest.raises(ValueError, match="plane_hi must be int32"):
        call(planes=(hi.to(torch.int64), mid, lo))
    with pytest.raises(ValueError, match=r"plane_mid must be int32 \[>=45, words\]"):
        call(planes=(hi, mid[:40], lo))
    with pytest.raises(ValueError, match=r"bias must be a float vector of 45"):
        call(bias=torch.randn(44))
    with pytest.raises(ValueError, match=r"out must be contiguous \[2, 45\] in x's dtype"):
        call(out=torch.empty(2, 45, dtype=torch.float16))


def test_the_public_op_checks_its_inputs(rng):
    mw = _parent(45, 200, 64, False, rng)
    with pytest.raises(ValueError, match="precision"):
        matryoshka_matmul(torch.randn(2, 200), mw, 5)
    with pytest.raises(ValueError, match="200 features"):
        matryoshka_matmul(torch.randn(2, 199), mw, 4)
    with pytest.raises(TypeError, match="MatryoshkaWeight"):
        matryoshka_matmul(torch.randn(2, 200), mw.slice(4), 4)


# ---- dispatch and the custom-op contract ---------------------------------------------------------

def test_dispatch_picks_the_kernel_for_cpu_tensors(monkeypatch, rng):
    x = torch.randn(3, 64)
    mw = _parent(32, 64, 32, False, rng)
    view = mw.at(4)
    assert backend_for(x, view) == "cpu"
    assert backend_for(x, view, "cpu") == "cpu"
    assert backend_for(x, view, "torch") == "torch"
    assert backend_for(x, view, "triton") == "triton"  # its plane kernel, under the interpreter
    monkeypatch.setenv("PYENGINE_BACKEND", "torch")
    assert backend_for(x, view) == "torch"
    assert backend_for(x, view, "cpu") == "cpu"  # an explicit argument wins
    monkeypatch.delenv("PYENGINE_BACKEND")

    bias = torch.randn(32, generator=rng)
    for r in PRECISIONS:
        kernel = _kernel(x, mw, r, bias)
        assert torch.equal(matryoshka_matmul(x, mw, r, bias), kernel)
        assert torch.equal(matryoshka_matmul(x, mw, r, bias, backend="cpu"), kernel)
        reference = plane_reference_matmul(x, *_planes(mw, r), mw.scales, mw.zeros, bias, r, 32,
                                           32, 64)
        assert torch.equal(matryoshka_matmul(x, mw, r, bias, backend="torch"), reference)


@pytest.mark.parametrize("stand_in", [None, types.SimpleNamespace()], ids=["absent", "older-build"])
def test_without_the_kernel_the_reference_serves(monkeypatch, stand_in, rng):
    """No extension, or one built before the plane kernel: backend=None falls back to the torch
    reference (bitwise), and says why the kernel is unavailable."""
    monkeypatch.setattr(_native, "extension", lambda: stand_in)
    monkeypatch.setattr(backends, "_SELECTED", {})  # selections made with the kernel present
    why = _native.plane_kernel_unavailable_reason()
    assert why is not None and ("not available" in why or "rebuild" in why)
    mw = _parent(20, 96, 32, True, rng)
    x = torch.randn(2, 96, generator=rng)
    assert backend_for(x, mw.at(4)) == "torch"
    for r in PRECISIONS:
        reference = plane_reference_matmul(x, *_planes(mw, r), mw.scales, mw.zeros, None, r, 32,
                                           20, 96)
        assert torch.equal(matryoshka_matmul(x, mw, r), reference)
    with pytest.raises(RuntimeError, match="plane_matmul_cpu: "):
        _kernel(x, mw, 4)
    with pytest.raises(pyengine.BackendError, match="cpu"):
        matryoshka_matmul(x, mw, 4, backend="cpu")


def test_a_process_without_the_extension_runs_the_reference():
    """pyengine imported with pyengine._C blocked: matryoshka_matmul serves CPU tensors on the torch
    reference (and backend="cpu" says the cpu backend is unavailable)."""
    out = run_python("""
        import torch, pyengine
        from pyengine import MatryoshkaWeight
        from pyengine.matryoshka import matryoshka_matmul
        from pyengine.ops import backend_for
        codes = torch.randint(0, 256, (6, 40))
        mw = MatryoshkaWeight.from_codes(codes, torch.rand(6, 2) + 0.1, None, group_size=32,
                                         shape=(6, 40))
        x = torch.randn(3, 40)
        assert backend_for(x, mw.at(4)) == "torch", backend_for(x, mw.at(4))
        y = matryoshka_matmul(x, mw, 4)
        assert torch.allclose(y, x @ mw.dequantize(4, torch.float32).T, rtol=1e-5, atol=1e-5)
        try:
            matryoshka_matmul(x, mw, 4, backend="cpu")
        except pyengine.BackendError as e:
            assert "not available" in str(e), e
        else:
            raise AssertionError("backend='cpu' without pyengine._C must fail")
        print("ok")
    """, without_extension=True)
    assert out.strip() == "ok", out


def test_custom_op_contract_on_the_kernel_path(rng):
    """opcheck (schema, fake tensor, autograd registration) with the kernel serving the call, and
    gradients of x and bias through it."""
    mw = _parent(16, 96, 32, False, rng)
    op = torch.ops.pyengine.qlinear.default
    x = torch.randn(4, 96, generator=rng, dtype=torch.float16)
    bias = torch.randn(16, generator=rng, dtype=torch.float16)
    for r in (3, 6):
        hi, mid, lo = _planes(mw, r)
        torch.library.opcheck(op, (x, hi, mw.scales, mw.zeros, mid, lo, bias, None, None,
                                   "planes", r, 32, 16, 96, None))
    x32 = torch.randn(2, 3, 96, generator=rng, requires_grad=True)
    b32 = torch.randn(16, generator=rng, requires_grad=True)
    assert backend_for(x32, mw.at(4)) == "cpu"
    y = matryoshka_matmul(x32, mw, 4, b32)
    y.square().sum().backward()
    w = mw.dequantize(4, torch.float32)
    g = 2 * (x32.detach() @ w.T + b32.detach())
    torch.testing.assert_close(x32.grad, g @ w, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b32.grad, g.sum((0, 1)), rtol=1e-4, atol=1e-4)


def test_compiles_without_graph_breaks(rng):
    mw = _parent(24, 64, 32, True, rng)
    x = torch.randn(3, 64, generator=rng)
    compiled = torch.compile(lambda t: matryoshka_matmul(t, mw, 2), fullgraph=True,
                             backend="eager")
    assert torch.equal(compiled(x), _kernel(x, mw, 2))
