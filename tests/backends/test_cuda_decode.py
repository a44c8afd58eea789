"""The CUDA decode kernels for M <= 16 against the pure-torch reference: the decode GEMV
(csrc/cuda/qmatmul_decode.cu), the tensor-core decode kernel on the fragment-native layout
(csrc/cuda/qmatmul_mma.cu, float16 / bfloat16 activations; its layout and arithmetic are also
checked without a GPU through its host emulation: tests/backends/test_mma_layout.py), and the simple
CUDA kernel forced on the same inputs (PYENGINE_CUDA_KERNEL=simple / CudaBackend(kernel="simple")).

The GPU tests are marked ``gpu`` (skipped without a CUDA device). Outputs are poisoned with NaN
before every call. The few tests at the end need only the compiled extension: they check the
kernel choice and the decode kernel's argument checks, which run before any CUDA call.
"""

from __future__ import annotations

import pytest
import torch

from pyengine._ext import extension
from pyengine.backends import get_backend
from pyengine.backends.cuda import ENV_KERNEL, CudaBackend

from helpers import (BITS, DTYPES, TOLERANCE, assert_matches, check_shortcut, check_sliced_blocks,
                     needs_cuda_build, rel_err, unaligned_x, weight_cases)
from helpers import cuda_weight as _weight
from helpers import reference_product as _ref
from helpers import run_poisoned as _run

DECODE_M = (1, 3, 8, 16)
# (N, K): SmolLM2 and Llama-3-8B layer shapes, odd ones (K not a multiple of the group or of 32).
SHAPES = [(1536, 576), (4096, 4096), (14336, 4096), (130, 200), (3, 40)]
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _backends(dtype=torch.float32):
    """The kernels forced by name; "mma" only for the activations it takes."""
    kernels = {"decode": CudaBackend(kernel="decode"), "simple": CudaBackend(kernel="simple")}
    if dtype in (torch.float16, torch.bfloat16):
        kernels["mma"] = CudaBackend(kernel="mma")
    return kernels


_SEED = int(torch.randint(0, 2**31 - 1, (1,)).item())


def _check_both(x, qt, w_ref, n, k, what, bias=None, residual=None, shortcut=None):
    """decode, simple and (fp16 / bf16) mma against the reference, and against each other."""
    dtype = x.dtype
    ref = _ref(x, w_ref, n, k, bias, residual, shortcut)
    outs = {}
    for name, backend in _backends(dtype).items():
        outs[name] = _run(backend, x, qt, n, k, bias, residual, shortcut)
        assert_matches(outs[name].float(), ref, dtype, f"{name}: {what}")
    for name in outs:
        if name != "simple":
            err = rel_err(outs[name].float(), outs["simple"].float())
            assert err <= 2 * TOLERANCE[dtype], f"{name} vs simple: {what}: {err:.3e}"
    return outs


CASES, CASE_IDS = weight_cases(SHAPES)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,bits,group_size,symmetric", CASES, ids=CASE_IDS)
def test_decode_matches_reference(shape, bits, group_size, symmetric, rng):
    n, k = SHAPES[shape]
    scale_dtype = SCALE_DTYPES[(bits + group_size + symmetric) % 3]
    qt, w_ref = _weight(n, k, bits, group_size, symmetric, scale_dtype, _SEED)
    for dtype in DTYPES:
        for m in DECODE_M:
            x = torch.randn(m, k, generator=rng).to(device="cuda", dtype=dtype)
            bias = torch.randn(n, generator=rng).to(device="cuda", dtype=dtype) if m % 2 else None
            _check_both(x, qt, w_ref, n, k,
                        f"M={m} N={n} K={k} bits={bits} g={group_size} sym={symmetric} "
                        f"x={dtype} scales={scale_dtype} bias={bias is not None}", bias)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_decode_sliced_block(bits, group_size, rng):
    """A sub-block [out_dims, in_dims] of a stored weight, x wider than in_dims (row stride > K,
    also an odd stride that rules out the 16-byte activation loads)."""
    check_sliced_blocks(_check_both, rng, bits, group_size, (1, 3, 8, 16),
                        (torch.float16, torch.bfloat16), _SEED)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
def test_decode_unaligned_tensors(bits, rng):
    """qweight and x at addresses that are not 16-byte aligned: the decode kernel falls back to
    4-byte weight loads and scalar activation loads."""
    n, k = 200, 1536
    qt, w_ref = _weight(n, k, bits, 64, False, torch.float16, _SEED)
    words = qt.qweight.shape[1]
    buf = torch.empty(n * words + 1, dtype=torch.int32, device="cuda")
    buf[1:].copy_(qt.qweight.reshape(-1))
    shifted = buf[1:].view(n, words)
    assert shifted.data_ptr() % 16 != 0
    qt_shifted = type(qt)(shifted, qt.scales, qt.zeros, qt.bits, qt.group_size)
    for m in (1, 5, 16):
        x = unaligned_x(rng, m, k)
        _check_both(x, qt_shifted, w_ref, n, k, f"unaligned {bits}-bit M={m}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_decode_shortcut(dtype, bits, rng):
    """out = x @ W^T + bias + residual @ shortcut: the kernel accumulates into the fp32 product."""
    check_shortcut(_check_both, rng, bits, dtype, DECODE_M, _SEED)


@pytest.mark.gpu
def test_default_route_and_environment_override(monkeypatch, rng):
    """The default cuda backend runs the tensor-core decode kernel for M <= 16 with fp16/bf16
    activations, the decode GEMV for fp32 ones, the tensor-core GEMM above M = 16 for fp16/bf16
    activations and the simple kernel for fp32 ones (bit-identical results: each kernel is
    deterministic); PYENGINE_CUDA_KERNEL=simple forces the simple kernel."""
    n, k = 1536, 576
    qt, w_ref = _weight(n, k, 4, 128, False, torch.float16, _SEED)
    default = get_backend("cuda")
    monkeypatch.delenv(ENV_KERNEL, raising=False)
    kernels = {**_backends(torch.float16), "tc": CudaBackend(kernel="tc")}
    for m, dtype, expected in ((1, torch.float16, "mma"), (16, torch.bfloat16, "mma"),
                               (3, torch.float32, "decode"),
                               (17, torch.float16, "tc"), (40, torch.bfloat16, "tc"),
                               (40, torch.float32, "simple")):
        x = torch.randn(m, k, generator=rng).to(device="cuda", dtype=dtype)
        auto = _run(default, x, qt, n, k)
        forced = _run(kernels[expected], x, qt, n, k)
        assert torch.equal(auto, forced), f"M={m}: the default route is not the {expected} kernel"
        assert_matches(auto.float(), _ref(x, w_ref, n, k), dtype, f"auto M={m} {dtype}")
    x = torch.randn(4, k, generator=rng).to(device="cuda", dtype=torch.float16)
    monkeypatch.setenv(ENV_KERNEL, "simple")
    via_env = _run(default, x, qt, n, k)
    assert torch.equal(via_env, _run(_backends()["simple"], x, qt, n, k))


@pytest.mark.gpu
def test_mma_refuses_what_it_does_not_serve(rng):
    """kernel="mma" forced: fp32 activations, M > 16 and a group size that is no power of two
    raise one line naming the reason; the default route falls back to the decode GEMV."""
    n, k = 64, 384
    qt, w_ref = _weight(n, k, 4, 32, False, torch.float16, _SEED)
    mma = CudaBackend(kernel="mma")
    for m, dtype, reason in ((1, torch.float32, "float16 / bfloat16"), (17, torch.float16,
                                                                         "M <= 16")):
        x = torch.randn(m, k, generator=rng).to(device="cuda", dtype=dtype)
        with pytest.raises(ValueError, match=f"does not serve this call: .*{reason}"):
            _run(mma, x, qt, n, k)
    odd = type(qt)(qt.qweight, qt.scales, qt.zeros, qt.bits, 96)  # 96: not a power of two
    x = torch.randn(2, k, generator=rng).to(device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="power-of-two group sizes"):
        _run(mma, x, odd, n, k)


@pytest.mark.gpu
def test_mma_layout_copy_is_made_once_per_shape(rng):
    """The fragment-native copy is made on the first call and kept with the operand, one per
    (n, k) of the calls (a sliced call gets its own)."""
    n, k = 256, 512
    qt, w_ref = _weight(n, k, 4, 128, False, torch.float16, _SEED)
    mma = CudaBackend(kernel="mma")
    x = torch.randn(3, k, generator=rng).to(device="cuda", dtype=torch.float16)
    _run(mma, x, qt, n, k)
    first = qt.layouts[("mma", n, k)]
    _run(mma, x, qt, n, k)
    assert qt.layouts[("mma", n, k)] is first
    out = _run(mma, x, qt, 100, 300)
    assert ("mma", 100, 300) in qt.layouts
    assert_matches(out.float(), _ref(x, w_ref, 100, 300), torch.float16, "sliced mma")


@pytest.mark.gpu
def test_decode_refuses_large_m(rng):
    n, k = 64, 256
    qt, _ = _weight(n, k, 4, 32, False, torch.float16, _SEED)
    x = torch.randn(17, k, generator=rng).to(device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match=r"qmatmul_cuda_decode\(M=17, N=64, K=256, bits=4, "
                                         r"group_size=32"):
        _run(CudaBackend(kernel="decode"), x, qt, n, k)


@pytest.mark.gpu
def test_decode_after_other_streams_work(rng):
    """Runs on a side stream: the kernel is launched on torch's current stream."""
    n, k = 4096, 4096
    qt, w_ref = _weight(n, k, 4, 128, False, torch.float16, _SEED)
    x = torch.randn(1, k, generator=rng).to(device="cuda", dtype=torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = _run(CudaBackend(kernel="decode"), x, qt, n, k)
    torch.cuda.current_stream().wait_stream(side)
    assert_matches(out.float(), _ref(x, w_ref, n, k), torch.float16, "side stream")


# ---- no GPU needed -------------------------------------------------------------------------


def test_kernel_choice_is_validated(monkeypatch):
    with pytest.raises(ValueError, match="kernel"):
        CudaBackend(kernel="fastest")
    assert CudaBackend(kernel="simple").kernel_name() == "simple"
    assert CudaBackend(kernel="mma").kernel_name() == "mma"
    b = CudaBackend()
    monkeypatch.delenv(ENV_KERNEL, raising=False)
    assert b.kernel_name() == "auto"
    monkeypatch.setenv(ENV_KERNEL, "decode")
    assert b.kernel_name() == "decode"
    monkeypatch.setenv(ENV_KERNEL, "bogus")
    with pytest.raises(ValueError, match=ENV_KERNEL):
        b.kernel_name()


def _call(ext, kernel, M, N=64, K=256, bits=4, group_size=32):
    # Fake, never dereferenced addresses: every check below fails before any CUDA call.
    fake = 1 << 20
    ext.qmatmul_cuda(fake, 1, K, fake, K * bits // 32, fake, 0, 1, K // group_size, 0, 0,
                     fake, 1, N, False, M, N, K, bits, group_size, device=0, stream=0,
                     kernel=kernel)


@needs_cuda_build
def test_binding_checks_before_touching_cuda():
    ext = extension()
    assert ext.cuda_decode_max_m == 16
    with pytest.raises(ValueError, match="kernel must be"):
        _call(ext, "bogus", M=1)
    with pytest.raises(ValueError, match=r"qmatmul_cuda_decode\(M=17, N=64, K=256, bits=4, "
                                         r"group_size=32.*M <= 16"):
        _call(ext, "decode", M=17)
    with pytest.raises(ValueError, match=r"qmatmul_cuda_decode\(M=1, N=64, K=256, bits=5"):
        _call(ext, "decode", M=1, bits=5)
