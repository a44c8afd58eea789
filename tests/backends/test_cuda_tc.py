"""The CUDA tensor-core GEMM (csrc/cuda/qmatmul_tc.cu, fp16/bf16 activations, the default for
M > 16) against the pure-torch reference and the simple CUDA kernel.

GPU tests are marked ``gpu``; outputs are poisoned with NaN before every call. The last test
needs only the compiled extension (argument checks run before any CUDA call).
"""

from __future__ import annotations

import pytest
import torch

from pyengine._ext import extension
from pyengine.backends.cuda import CudaBackend

from helpers import (BITS, TOLERANCE, assert_matches, check_shortcut, check_sliced_blocks,
                     needs_cuda_build, rel_err, unaligned_x, weight_cases)
from helpers import cuda_weight as _weight
from helpers import reference_product as _ref
from helpers import run_poisoned as _run

HALF_DTYPES = (torch.float16, torch.bfloat16)
PREFILL_M = (17, 64, 123, 1024)
# (N, K): SmolLM2 and Llama-3-8B layer shapes, odd ones (K not a multiple of 32 or of the group)
SHAPES = [(1536, 576), (4096, 4096), (14336, 4096), (1024, 4096), (130, 200), (45, 40)]

_SEED = int(torch.randint(0, 2**31 - 1, (1,)).item())


def _check(x, qt, w_ref, n, k, what, bias=None, residual=None, shortcut=None, against_simple=True):
    ref = _ref(x, w_ref, n, k, bias, residual, shortcut)
    tc = _run(CudaBackend(kernel="tc"), x, qt, n, k, bias, residual, shortcut)
    assert_matches(tc.float(), ref, x.dtype, f"tc: {what}")
    if against_simple:
        simple = _run(CudaBackend(kernel="simple"), x, qt, n, k, bias, residual, shortcut)
        err = rel_err(tc.float(), simple.float())
        assert err <= 2 * TOLERANCE[x.dtype], f"tc vs simple: {what}: {err:.3e}"


CASES, CASE_IDS = weight_cases(SHAPES)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,bits,group_size,symmetric", CASES, ids=CASE_IDS)
def test_tc_matches_reference(shape, bits, group_size, symmetric, rng):
    n, k = SHAPES[shape]
    scale_dtype = (torch.float16, torch.bfloat16, torch.float32)[(bits + group_size + symmetric) % 3]
    qt, w_ref = _weight(n, k, bits, group_size, symmetric, scale_dtype, _SEED)
    for i, m in enumerate(PREFILL_M):
        dtype = HALF_DTYPES[i % 2]
        x = torch.randn(m, k, generator=rng).to(device="cuda", dtype=dtype)
        bias = torch.randn(n, generator=rng).to(device="cuda", dtype=dtype) if m % 2 else None
        # the simple kernel is slow at large M x N: compare with it on the smaller problems
        _check(x, qt, w_ref, n, k, f"M={m} N={n} K={k} bits={bits} g={group_size} "
               f"sym={symmetric} x={dtype} scales={scale_dtype} bias={bias is not None}", bias,
               against_simple=m * n <= 123 * 4096)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_tc_sliced_block_and_odd_strides(bits, group_size, rng):
    """A sub-block [out_dims, in_dims] of a stored weight, x rows wider than in_dims (an odd
    stride rules out the 16-byte activation loads)."""
    check_sliced_blocks(_check, rng, bits, group_size, (17, 70, 129, 64), HALF_DTYPES, _SEED)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
def test_tc_unaligned_activations(bits, rng):
    n, k = 200, 1536
    qt, w_ref = _weight(n, k, bits, 64, False, torch.float16, _SEED)
    x = unaligned_x(rng, 40, k)
    _check(x, qt, w_ref, n, k, f"unaligned x, {bits}-bit")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_tc_shortcut(dtype, bits, rng):
    check_shortcut(_check, rng, bits, dtype, (17, 100), _SEED)


@pytest.mark.gpu
def test_tc_refuses_fp32_activations(rng):
    n, k = 64, 256
    qt, _ = _weight(n, k, 4, 32, False, torch.float16, _SEED)
    x = torch.randn(40, k, generator=rng).to(device="cuda")
    with pytest.raises(ValueError, match=r"qmatmul_cuda_tc\(M=40, N=64, K=256, bits=4.*float16 "
                                         r"or bfloat16"):
        _run(CudaBackend(kernel="tc"), x, qt, n, k)


@needs_cuda_build
def test_tc_binding_checks_before_touching_cuda():
    ext = extension()
    fake = 1 << 20  # never dereferenced: the checks fail before any CUDA call
    with pytest.raises(ValueError, match=r"qmatmul_cuda_tc\(M=40.*float16 or bfloat16"):
        ext.qmatmul_cuda(fake, 0, 256, fake, 32, fake, 0, 1, 8, 0, 0, fake, 0, 64, False,
                         40, 64, 256, 4, 32, device=0, stream=0, kernel="tc")
    with pytest.raises(ValueError, match=r"qmatmul_cuda_tc\(M=40, N=64, K=256, bits=5"):
        ext.qmatmul_cuda(fake, 1, 256, fake, 40, fake, 0, 1, 8, 0, 0, fake, 1, 64, False,
                         40, 64, 256, 5, 32, device=0, stream=0, kernel="tc")
