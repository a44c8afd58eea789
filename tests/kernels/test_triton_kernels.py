"""The Triton kernels (pyengine.kernels) and the ``triton`` backend against the pure-torch
reference, with poisoned outputs and fresh random data.

Without a CUDA device the kernels run on CPU tensors under the Triton interpreter, with small
odd shapes and one fixed config per path; with a CUDA device the same tests run on CUDA tensors
at full size (plus the ``gpu`` test with real layer shapes).

The interpreter is switched on by tests/conftest.py (before anything imports triton) when
torch sees no CUDA device.
"""

import functools
import importlib

import pytest
import torch

import pyengine
from pyengine import ops
from pyengine.backends import (LinearCase, PackedOperand, get_backend,
                               reference_matmul, select_backend)

from helpers import (BITS, DTYPES, GROUP_SIZES, QUANT_CASE_IDS, QUANT_CASES, assert_matches,
                     check_against_reference, packed_operand, poison_groups_outside, poisoned,
                     random_weight, randn, run_python, shortcut_inputs)

pytest.importorskip("triton")

pytestmark = pytest.mark.interpreter

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DEVICES = [pytest.param(DEVICE, id=DEVICE)]

# Shapes: odd in every dimension; the interpreter is slow, so smaller there.
if ON_GPU:
    DECODE_M, PREFILL_M = (1, 3, 16), (17, 123)
    KS, NS = (576, 1536, 100), (1536, 576, 33)
else:
    DECODE_M, PREFILL_M = (1, 3), (17, 33)
    KS, NS = (100, 160), (33, 70)


@pytest.fixture(scope="module")
def kernels():
    """pyengine.kernels.matmul (the interpreter is switched on by tests/conftest.py when there
    is no GPU)."""
    module = importlib.import_module("pyengine.kernels.matmul")
    if module.INTERPRETED == ON_GPU:
        pytest.skip(f"the Triton interpreter is {'on' if module.INTERPRETED else 'off'}; these "
                    f"tests need it {'off' if ON_GPU else 'on'} here")
    return module


@functools.lru_cache(maxsize=None)
def _quantized_cpu(n, k, bits, group_size, symmetric, scale_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return pyengine.quantize(random_weight(n, k, gen), bits, group_size, symmetric,
                             scale_dtype=scale_dtype, clip_search=False)


def _quantized(n, k, bits, group_size, symmetric, scale_dtype, rng, device):
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=rng).item())
    return _quantized_cpu(n, k, bits, group_size, symmetric, scale_dtype, seed).to(device)


# _randn(rng, *shape, dtype=..., device=DEVICE, scale=...)
_randn = functools.partial(randn, device=DEVICE)


def _check(kernels, x, weight, n, k, dtype, what, bias=None, residual=None, shortcut=None,
           config=None):
    """Runs the launcher on a NaN-poisoned output and compares with the fp32 reference."""
    if isinstance(weight, PackedOperand):
        def call(out):
            return kernels.quant_matmul(x, weight.qweight, weight.scales, weight.zeros,
                                        weight.bits, weight.group_size, n, k, bias=bias,
                                        residual=residual, shortcut=shortcut, out=out,
                                        config=config)
    else:
        def call(out):
            return kernels.dense_matmul(x, weight, n, k, bias=bias, residual=residual,
                                        shortcut=shortcut, out=out, config=config)
    check_against_reference(call, x, weight, n, k, dtype, what, bias, residual, shortcut)


# ---- quantized weights: every bits x group size x dtype x symmetric ----------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(QUANT_CASES)), ids=QUANT_CASE_IDS)
def test_quantized_matmul_matches_reference(kernels, device, case, rng):
    """Each (bits, group, dtype) runs asymmetric and symmetric, each on a decode and a prefill
    M; shapes, scale dtypes and bias rotate with the case number."""
    bits, group_size, dtype = QUANT_CASES[case]
    for symmetric in (False, True):
        i = 2 * case + symmetric
        scale_dtype = (torch.float16, torch.bfloat16, torch.float32)[i % 3]
        for m in (DECODE_M[i % len(DECODE_M)], PREFILL_M[(i // 2) % len(PREFILL_M)]):
            k, n = KS[(i + m) % len(KS)], NS[(i // 3 + m) % len(NS)]
            qw = _quantized(n, k, bits, group_size, symmetric, scale_dtype, rng, device)
            x = _randn(rng, m, k, dtype=dtype, device=device)
            bias = _randn(rng, n, dtype=dtype, device=device) if (i + m) % 2 else None
            _check(kernels, x, packed_operand(qw), n, k, dtype,
                   f"M={m} K={k} N={n} bits={bits} g={group_size} sym={symmetric} "
                   f"scales={scale_dtype} {dtype} bias={bias is not None}", bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
def test_every_path_and_split(kernels, device, bits, rng):
    """Forced configs: the GEMV and 16-row decode forms with one and several K slices, and the
    prefill tiles, on a K of several steps and an N of several tiles."""
    MC = kernels.MatmulConfig
    n, k = (70, 300) if not ON_GPU else (600, 2000)
    qw = _quantized(n, k, bits, 64, bits % 2 == 1, torch.float16, rng, device)
    configs = [(1, MC(1, 16, 64, split_k=1)), (1, MC(1, 32, 128, split_k=3)),
               (5, MC(16, 16, 64, split_k=1)), (16, MC(16, 32, 64, split_k=4)),
               (40, MC(32, 32, 64, group_m=1)), (40, MC(16, 64, 32, group_m=3))]
    for m, cfg in configs:
        for dtype in (torch.float16, torch.float32):
            x = _randn(rng, m, k, dtype=dtype, device=device)
            bias = _randn(rng, n, device=device)
            _check(kernels, x, packed_operand(qw), n, k, dtype, f"M={m} {cfg} {dtype}", bias,
                   config=cfg)


def _poison_outside(qw: pyengine.QuantizedWeight, n: int, k: int) -> PackedOperand:
    """A copy whose scales/zeros outside the block [:n, :k] are NaN and whose codes outside it
    are random: a kernel that reads past the block produces NaN or a wrong result."""
    t = packed_operand(qw)
    scales, zeros = poison_groups_outside(t.scales, t.zeros, n, k, t.group_size)
    qweight = t.qweight.clone()
    qweight[n:] = torch.randint(-2**31, 2**31 - 1, qweight[n:].shape, dtype=torch.int32,
                                device=qweight.device)
    return PackedOperand(qweight, scales, zeros, t.bits, t.group_size)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_sliced_block_of_a_quantized_weight(kernels, device, bits, group_size, rng):
    n, k = (90, 512) if not ON_GPU else (400, 1024)
    qw = _quantized(n, k, bits, group_size, bits == 4, torch.float16, rng, device)
    # in_dims: a multiple of the group (of 32 per channel) that is not one of the tile's K
    # step, so the masks at the slice's K edge are exercised
    in_dims = {32: 224, 128: 384, -1: 288}[group_size]
    for m, out_dims in ((1, 50), (5, n - 1), (33, 77)):
        weight = _poison_outside(qw, out_dims, in_dims)
        x = _randn(rng, m, in_dims, dtype=torch.bfloat16, device=device)
        bias = _randn(rng, n + 3, dtype=torch.bfloat16, device=device)  # longer than out_dims
        _check(kernels, x, weight, out_dims, in_dims, torch.bfloat16,
               f"slice [{out_dims}, {in_dims}] of {bits}-bit g={group_size} [{n}, {k}] M={m}",
               bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_sliced_block_reads_only_the_block(kernels, device, dtype, rng):
    w = random_weight(130, 200, rng, dtype).to(device)
    w_poisoned = w.clone()
    for m, out_dims, in_dims in ((1, 130, 200), (7, 61, 45), (40, 100, 150), (3, 1, 1)):
        w_poisoned.copy_(w)
        w_poisoned[out_dims:] = float("nan")
        w_poisoned[:, in_dims:] = float("nan")
        x = _randn(rng, m, in_dims, dtype=dtype, device=device)
        _check(kernels, x, w_poisoned, out_dims, in_dims, dtype,
               f"dense slice [{out_dims}, {in_dims}] M={m} {dtype}")
    # x wider than k (a row stride larger than k), read through its stride
    x_wide = _randn(rng, 20, 256, dtype=dtype, device=device)
    _check(kernels, x_wide, w, 90, 150, dtype, "x with row stride 256, k=150")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantized", [True, False], ids=["quantized", "dense"])
def test_shortcut_fusion(kernels, device, quantized, rng):
    n, k, r = 96, 160, 72
    for m, dtype in ((1, torch.float32), (4, torch.float16), (19, torch.bfloat16),
                     (33, torch.float32), (1, torch.bfloat16)):
        if quantized:
            weight = packed_operand(_quantized(n, k, 3, 32, False, dtype, rng, device))
        else:
            weight = random_weight(n, k, rng, dtype).to(device)
        x, residual, shortcut, bias = shortcut_inputs(rng, m, n, k, r, dtype, device)
        _check(kernels, x, weight, n, k, dtype, f"shortcut M={m} {dtype}", bias, residual,
               shortcut)
        # a transposed (non-contiguous) shortcut, no bias
        shortcut_t = _randn(rng, n, r, dtype=dtype, device=device, scale=0.1).T
        _check(kernels, x, weight, n, k, dtype, f"shortcut.T M={m} {dtype}", None, residual,
               shortcut_t)


# ---- the backend and the public ops --------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_backend_writes_into_the_given_output(kernels, device, rng):
    backend = get_backend("triton")
    assert backend.unavailable_reason() is None
    qw = _quantized(70, 160, 4, 32, False, torch.float16, rng, device)
    for m in (1, 3, 17):
        x = _randn(rng, m, 160, dtype=torch.float16, device=device)
        out = poisoned((m, 50), torch.float16, device)
        got = backend.matmul(x, packed_operand(qw), 50, 128, None, None, None, out=out)
        assert got.data_ptr() == out.data_ptr()
        ref = reference_matmul(x, packed_operand(qw), 50, 128)
        assert_matches(out.float(), ref, torch.float16, f"backend M={m}")
        fresh = backend.matmul(x, packed_operand(qw), 50, 128, None, None, None)
        assert fresh.dtype == torch.float16 and fresh.shape == (m, 50)
        assert_matches(fresh.float(), ref, torch.float16, f"backend M={m}, allocated output")


def test_selection_priorities(kernels):
    case = LinearCase(device_type=DEVICE, dtype=torch.float16, kind="packed", bits=4)
    backend = get_backend("triton")
    assert backend.unsupported_reason(case) is None
    assert select_backend(case, "triton").name == "triton"
    if ON_GPU:
        assert backend.priority(case) == 20.0
        assert select_backend(case).name == "triton"
        # decode calls with half activations go to the cuda backend's tensor-core decode kernel
        # when the extension has it (its static figures rank it first; pyengine/backends/cuda.py)
        decode = case._replace(decode=True)
        has_mma = hasattr(pyengine._ext.extension(), "qmatmul_cuda_mma")
        assert select_backend(decode).name == ("cuda" if has_mma else "triton")
    else:
        assert backend.priority(case) < 0, "the interpreter must never be picked automatically"
        assert select_backend(case).name != "triton"
        meta = LinearCase(device_type="meta", dtype=torch.float16, kind="packed", bits=4)
        assert backend.unsupported_reason(meta) is not None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_public_ops_on_the_triton_backend(kernels, device, dtype, rng):
    qw = _quantized(40, 96, 3, 32, False, torch.float16, rng, device)
    dense = random_weight(48, 96, rng, dtype).to(device)
    x = _randn(rng, 2, 3, 96, dtype=dtype, device=device)
    bias = _randn(rng, 48, device=device)
    ref_q = x.float() @ qw.dequantize(torch.float32).T

    y = ops.dequant_matmul(x, qw, bias[:40], backend="triton")
    assert y.shape == (2, 3, 40) and y.dtype == dtype
    assert_matches(y.float(), ref_q + bias[:40], dtype, "dequant_matmul")

    y = ops.sliced_matmul(x[..., :64], qw, in_dims=64, out_dims=33, backend="triton", bias=bias)
    ref = x[..., :64].float() @ qw.dequantize(torch.float32)[:33, :64].T + bias[:33]
    assert_matches(y.float(), ref, dtype, "sliced_matmul quantized")

    y = ops.sliced_matmul(x[..., :50], dense, in_dims=50, out_dims=45, backend="triton")
    assert_matches(y.float(), x[..., :50].float() @ dense[:45, :50].float().T, dtype,
                   "sliced_matmul dense")

    residual = _randn(rng, 2, 3, 24, dtype=dtype, device=device)
    shortcut = _randn(rng, 24, 40, dtype=dtype, device=device, scale=0.1)
    y = torch.ops.pyengine.qlinear(x, qw.qweight, qw.scales, qw.zeros, None, None, bias[:40],
                                   residual, shortcut, "packed", qw.bits, qw.group_size, 40, 96,
                                   "triton")
    ref = ref_q + residual.float() @ shortcut.float() + bias[:40]
    assert_matches(y.float(), ref, dtype, "torch.ops.pyengine.qlinear with a shortcut")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_on_the_triton_backend(kernels, device, rng):
    qw = _quantized(24, 64, 4, 32, False, torch.float32, rng, device)
    x = _randn(rng, 3, 64, device=device)
    residual = _randn(rng, 3, 16, device=device)
    shortcut = _randn(rng, 16, 24, device=device)
    op = torch.ops.pyengine.qlinear.default
    packed = (qw.qweight, qw.scales, qw.zeros, None, None)
    torch.library.opcheck(op, (x, *packed, None, None, None, "packed", 4, 32, 24, 64, "triton"))
    torch.library.opcheck(op, (x, *packed, None, residual, shortcut, "packed", 4, 32, 24, 64,
                               "triton"))


def test_launcher_rejects_bad_inputs(kernels, rng):
    qw = _quantized(16, 64, 4, 32, False, torch.float32, rng, DEVICE)
    x = _randn(rng, 3, 64)
    args = (qw.qweight, qw.scales, qw.zeros, 4, 32, 16, 64)
    with pytest.raises(ValueError, match=r"M=3, N=16, K=64, bits=4, group_size=32.*dtype"):
        kernels.quant_matmul(x.to(torch.float64), *args)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        kernels.quant_matmul(_randn(rng, 64, 3).T, *args)
    with pytest.raises(ValueError, match="out has shape"):
        kernels.quant_matmul(x, *args, out=torch.empty(3, 15, device=DEVICE))
    with pytest.raises(ValueError, match="out has dtype"):
        kernels.quant_matmul(x, *args, out=torch.empty(3, 16, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="bits must be one of"):
        kernels.quant_matmul(x, qw.qweight, qw.scales, qw.zeros, 5, 32, 16, 64)
    with pytest.raises(ValueError, match="qweight"):
        kernels.quant_matmul(x, qw.qweight, qw.scales, qw.zeros, 4, 32, 17, 64)
    with pytest.raises(ValueError, match="scales"):
        kernels.quant_matmul(x, qw.qweight, qw.scales[:, :1], qw.zeros, 4, 32, 16, 64)
    with pytest.raises(ValueError, match="residual"):
        kernels.quant_matmul(x, *args, residual=_randn(rng, 3, 8))
    with pytest.raises(ValueError, match="weight"):
        kernels.dense_matmul(x, _randn(rng, 16, 32), 16, 64)


def test_importing_the_kernel_package_does_not_import_triton():
    out = run_python("import sys, pyengine, pyengine.kernels\n"
                     "assert 'triton' not in sys.modules, 'triton imported'\n"
                     "pyengine.available_backends()\n"
                     "print('ok')\n")
    assert out.strip() == "ok", out


# ---- GPU: real layer shapes ----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
def test_real_layer_shapes_on_the_gpu(kernels, bits, rng):
    """SmolLM2 (576/1536) and Llama-3-8B (4096/14336/1024) layer shapes at odd M."""
    shapes = [(1536, 576), (576, 1536), (14336, 4096), (4096, 14336), (1024, 4096)]
    for i, (n, k) in enumerate(shapes):
        group_size = GROUP_SIZES[(i + bits) % len(GROUP_SIZES)]
        qw = _quantized(n, k, bits, group_size, i % 2 == 1, torch.float16, rng, "cuda")
        for j, m in enumerate((1, 3, 17, 123, 1024)):
            dtype = (torch.float16, torch.bfloat16)[(i + j) % 2]
            x = _randn(rng, m, k, dtype=dtype, device="cuda")
            bias = _randn(rng, n, dtype=dtype, device="cuda") if j % 2 else None
            _check(kernels, x, packed_operand(qw), n, k, dtype,
                   f"{n}x{k} M={m} bits={bits} g={group_size} {dtype}", bias)
