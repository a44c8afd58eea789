"""The online Walsh-Hadamard transform (pyengine.ops.hadamard_transform): every backend against
the dense float64 oracle on fresh random data, odd leading shapes, strided inputs and poisoned
outputs; its algebra (orthonormal, its own inverse); gradients; errors."""

import pytest
import torch

import pyengine

from pyengine.ops import hadamard as hadamard_ops
from pyengine.ops.hadamard import (HadamardBackendError, hadamard_block_for, hadamard_matrix,
                                   hadamard_transform, reference_hadamard)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (shape of x, block_size): leading dimensions of any count and size, blocks from 1 to the
# whole row, rows of several blocks (SmolLM2's MLP width 1536 = 3 x 512)
CASES = [((1, 16), None), ((3, 5, 96), 32), ((7, 1536), 512), ((2, 8), 8), ((4, 1), None),
         ((5, 24), 8), ((3, 2048), 256), ((11, 4), 2), ((1, 14336), 2048)]


def _backends():
    names = ["torch", "cpu"]
    if hadamard_ops._unavailable("triton", torch.empty(1), 16) is None:
        names.append("triton")
    return names


def _close(y, want):
    scale = want.float().abs().max().clamp_min(1.0)
    return ((y.float() - want.float()).abs().max() / scale).item()


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,block", CASES, ids=[f"{s}-b{b}" for s, b in CASES])
def test_every_backend_matches_the_oracle(backend, dtype, shape, block, rng):
    if backend == "triton" and shape[-1] * shape[0] > 4096:
        pytest.skip("rows this large are slow in the Triton interpreter; "
                    "test_triton_on_a_gpu runs them on CUDA tensors")
    if backend == "cpu" and hadamard_ops._native() is None:
        pytest.skip("pyengine._C is not built")
    x = torch.randn(shape, generator=rng).to(dtype)
    want = reference_hadamard(x, block)
    out = torch.full(shape, float("nan"), dtype=dtype)        # poisoned: every element written
    got = hadamard_transform(x, block, out=out, backend=backend)
    assert got is out and got.dtype == dtype
    assert _close(got, want) <= TOLERANCE[dtype]
    fresh = hadamard_transform(x, block, backend=backend)
    assert torch.equal(fresh, got)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_on_a_gpu(dtype, rng):
    """The compiled kernel (the default on CUDA tensors) and the torch path on the GPU, every
    case, poisoned outputs; and a block at the kernel's limit."""
    cases = CASES + [((3, 3 * 16384), 16384)]
    for shape, block in cases:
        x = torch.randn(shape, generator=rng).to(dtype)
        want = reference_hadamard(x, block)
        x = x.cuda()
        for backend in ("triton", "torch"):
            out = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
            got = hadamard_transform(x, block, out=out, backend=backend)
            assert _close(got.cpu(), want) <= TOLERANCE[dtype], (shape, block, backend)
        assert hadamard_ops._choose(x, block, None) == "triton"


@pytest.mark.parametrize("backend", _backends())
def test_strided_inputs(backend, rng):
    if backend == "cpu" and hadamard_ops._native() is None:
        pytest.skip("pyengine._C is not built")
    base = torch.randn(64, 10, generator=rng)
    x = base.T[:, :32]                                       # [10, 32], stride (1, 10)
    assert not x.is_contiguous()
    assert _close(hadamard_transform(x, 16, backend=backend), reference_hadamard(x, 16)) < 2e-6
    rows = torch.randn(6, 48, generator=rng)[::2]            # row stride 96
    assert _close(hadamard_transform(rows, 16, backend=backend),
                  reference_hadamard(rows, 16)) < 2e-6


def test_the_transform_is_orthonormal_and_its_own_inverse(rng):
    x = torch.randn(9, 192, generator=rng, dtype=torch.float32)
    y = hadamard_transform(x, 64)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(hadamard_transform(y, 64), x, atol=1e-5)
    assert not torch.allclose(y, x, atol=1e-2)
    h = hadamard_matrix(32)
    assert torch.equal(h, h.T) and torch.equal(h @ h, 32 * torch.eye(32, dtype=torch.float64))
    # Sylvester order: H[i][j] = (-1)^popcount(i & j)
    i, j = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    parity = torch.tensor([bin(v).count("1") % 2 for v in (i & j).flatten().tolist()])
    assert torch.equal(h.flatten(), (1 - 2 * parity).to(torch.float64))


def test_blocks_are_independent(rng):
    """Block c of the output depends on block c of the input only."""
    x = torch.randn(2, 96, generator=rng)
    y = hadamard_transform(x, 32)
    x2 = x.clone()
    x2[:, 32:64] += 1.0
    y2 = hadamard_transform(x2, 32)
    assert torch.equal(y[:, :32], y2[:, :32]) and torch.equal(y[:, 64:], y2[:, 64:])
    assert not torch.allclose(y[:, 32:64], y2[:, 32:64])


def test_gradient_is_the_transform_of_the_output_gradient(rng):
    x = torch.randn(4, 64, generator=rng, requires_grad=True)
    w = torch.randn(4, 64, generator=rng)
    (hadamard_transform(x, 16) * w).sum().backward()
    assert torch.allclose(x.grad, reference_hadamard(w, 16), atol=1e-6)


def test_custom_op_registration(rng):
    """Fake implementation, autograd formula and schema pass torch's own op checks."""
    x = torch.randn(3, 32, generator=rng, requires_grad=True)
    torch.library.opcheck(torch.ops.pyengine.hadamard_transform.default, (x, 8, None))


def test_compiled_call_matches_eager(rng):
    x = torch.randn(5, 64, generator=rng)
    compiled = torch.compile(lambda t: hadamard_transform(t, 32) * 2, fullgraph=True)
    assert torch.allclose(compiled(x), hadamard_transform(x, 32) * 2, atol=1e-6)


def test_block_for_a_width():
    assert hadamard_block_for(1536) == 512
    assert hadamard_block_for(14336) == 2048
    assert hadamard_block_for(4096, limit=1024) == 1024
    assert hadamard_block_for(8192, limit=3000) == 2048
    assert hadamard_block_for(96) == 32
    assert hadamard_block_for(7) == 1


def test_environment_names_a_backend(monkeypatch):
    x = torch.randn(2, 16)
    monkeypatch.setenv("PYENGINE_BACKEND", "torch")
    assert hadamard_ops._choose(x, 16, None) == "torch"
    monkeypatch.setenv("PYENGINE_BACKEND", "cuda")  # a linear backend: the device's default
    assert hadamard_ops._choose(x, 16, None) == ("cpu" if hadamard_ops._native() else "torch")


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(2, 24)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        hadamard_transform([1.0, 2.0])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        hadamard_transform(torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="24 features, not a power of two; give a block_size "
                                         r"that divides it \(e.g. 8\)"):
        hadamard_transform(x)
    with pytest.raises(ValueError, match="power of two dividing the 24 features"):
        hadamard_transform(x, 16)
    with pytest.raises(ValueError, match="power of two dividing"):
        hadamard_transform(x, 12)
    with pytest.raises(TypeError, match="block_size must be an int"):
        hadamard_transform(x, 8.0)
    with pytest.raises(ValueError, match="at least one feature"):
        hadamard_transform(torch.ones(3, 0))
    with pytest.raises(ValueError, match="out must be a torch.float32 tensor of shape"):
        hadamard_transform(x, 8, out=torch.empty(2, 16))
    with pytest.raises(ValueError, match="out must be a torch.float32"):
        hadamard_transform(x, 8, out=torch.empty(2, 24, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must be contiguous"):
        hadamard_transform(x, 8, out=torch.empty(24, 2).T)
    with pytest.raises(ValueError, match="out= is not supported with autograd"):
        hadamard_transform(x.clone().requires_grad_(), 8, out=torch.empty(2, 24))
    with pytest.raises(HadamardBackendError, match="backend 'cuda' cannot run this call: "
                                                   "unknown backend"):
        hadamard_transform(x, 8, backend="cuda")
    with pytest.raises(ValueError, match="b must be a power of two"):
        hadamard_matrix(12)


def test_empty_rows_are_fine():
    x = torch.empty(0, 32)
    assert hadamard_transform(x, 16).shape == (0, 32)


@pytest.mark.parametrize("isa", pyengine.build_info().get("cpu_isas_usable", []) or ["none"])
def test_every_cpu_build(isa, rng):
    """Each instruction-set build of the C++ transform (the default picks the widest this CPU
    runs; the others run on other CPUs), threads over rows, in place."""
    ext = hadamard_ops._native()
    if ext is None:
        pytest.skip("pyengine._C is not built")
    from pyengine._ext import DTYPE_CODES
    for (rows, n), block in (((5, 1536), 512), ((3, 14336), 2048), ((9, 64), 8), ((2, 4), 4),
                             ((40, 1024), 1024)):
        for dtype in DTYPES:
            x = torch.randn(rows, n, generator=rng).to(dtype)
            want = reference_hadamard(x, block)
            out = torch.full_like(x, float("nan"))
            ext.hadamard_cpu(x.data_ptr(), n, out.data_ptr(), n, DTYPE_CODES[dtype], rows, n,
                             block, 2, isa)
            assert _close(out, want) <= TOLERANCE[dtype], (isa, n, block, dtype)
            ext.hadamard_cpu(x.data_ptr(), n, x.data_ptr(), n, DTYPE_CODES[dtype], rows, n,
                             block, 1, isa)                       # in place
            assert torch.equal(x, out)


def test_native_binding_checks_its_arguments():
    ext = hadamard_ops._native()
    if ext is None:
        pytest.skip("pyengine._C is not built")
    x = torch.randn(2, 24)
    with pytest.raises(ValueError, match="block must be a power of two dividing n"):
        ext.hadamard_cpu(x.data_ptr(), 24, x.data_ptr(), 24, 0, 2, 24, 16, 1)
    with pytest.raises(ValueError, match="bad sizes, strides or pointers"):
        ext.hadamard_cpu(x.data_ptr(), 12, x.data_ptr(), 24, 0, 2, 24, 8, 1)
    with pytest.raises(ValueError, match="no kernels for instruction set 'sse9'"):
        ext.hadamard_cpu(x.data_ptr(), 24, x.data_ptr(), 24, 0, 2, 24, 8, 1, "sse9")
