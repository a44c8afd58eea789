"""The Matryoshka plane-layout Triton kernels (pyengine.kernels.matryoshka) against the plane
reference (helpers.plane_reference_matmul, fp32) and against the slice
dequantized then multiplied in float64, with NaN-poisoned outputs and fresh random parents.

Without a CUDA device the kernels run on CPU tensors under the Triton interpreter (switched on by
tests/conftest.py) on small odd shapes: every precision x group x dtype x symmetry, with M, bias
and scale dtype rotating; the ``gpu`` test runs every precision x group x dtype x M at real
layer shapes where CUDA is present.
"""

import functools
import importlib
import itertools
import sys
from pathlib import Path

import pytest
import torch

from pyengine import MatryoshkaWeight
from pyengine.matryoshka import PLANES_READ, PRECISIONS
from pyengine.format.packing import pack_codes

from helpers import (DTYPES, GROUP_SIZES, assert_matches, into_poisoned, plane_reference_matmul,
                     poison_groups_outside, poisoned, random_parent, randn)

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from pyengine.kernels.tiles import block_code, unpack_code_blocks  # noqa: E402

pytestmark = pytest.mark.interpreter

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PLANES = ("plane_hi", "plane_mid", "plane_lo")

# Odd shapes: N not a multiple of a tile, K = 6 * 32 + 8 (a partial 32-code block at the end).
N_ODD, K_ODD = 45, 200
DECODE_M, PREFILL_M = (1, 3), (17,)


@pytest.fixture(scope="module")
def mq():
    """pyengine.kernels.matryoshka, compiled for the GPU or interpreted on the CPU."""
    module = importlib.import_module("pyengine.kernels.matryoshka")
    if module.INTERPRETED == ON_GPU:
        pytest.skip(f"the Triton interpreter is {'on' if module.INTERPRETED else 'off'}; these "
                    f"tests need it {'off' if ON_GPU else 'on'} here")
    return module


def _parent(n, k, group_size, symmetric, scale_dtype, gen, device=DEVICE):
    return random_parent(n, k, group_size, symmetric, gen, scale_dtype, device)


# _randn(gen, *shape, dtype=..., device=DEVICE)
_randn = functools.partial(randn, device=DEVICE)


def _needed_planes(mw, r):
    """(hi, mid, lo) with the planes an r-bit slice does not read replaced by None."""
    return tuple(getattr(mw, name) if name in PLANES_READ[r] else None for name in PLANES)


def _references(x, mw, r, bias, n, k, dense64=None):
    """(fp32 plane reference, float64 dequantize-then-matmul) of x[:, :k] @ W_r[:n, :k]^T + bias."""
    xk = x[:, :k]
    ref32 = plane_reference_matmul(xk, mw.plane_hi, mw.plane_mid, mw.plane_lo, mw.scales,
                                   mw.zeros, None if bias is None else bias[:n], r,
                                   mw.group_size, n, k)
    if dense64 is None:
        dense64 = mw.dequantize(r, torch.float64)
    ref64 = xk.to(torch.float64) @ dense64[:n, :k].T
    if bias is not None:
        ref64 = ref64 + bias[:n].to(torch.float64)
    return ref32, ref64


def _check(mq, x, mw, r, bias, what, n=None, k=None, planes=None, config=None, dense64=None):
    """Runs the launcher into a NaN-poisoned output and compares it with both references."""
    n = mw.shape[0] if n is None else n
    k = mw.shape[1] if k is None else k
    hi, mid, lo = _needed_planes(mw, r) if planes is None else planes
    out = into_poisoned(lambda out: mq.matryoshka_matmul_triton(
        x, hi, mid, lo, mw.scales, mw.zeros, bias, r, mw.group_size, n, k, out=out,
        config=config), (x.shape[0], n), x.dtype, x.device, what)
    ref32, ref64 = _references(x, mw, r, bias, n, k, dense64)
    assert_matches(out.float(), ref32, x.dtype, f"{what} vs plane_reference_matmul")
    assert_matches(out.double(), ref64, x.dtype, f"{what} vs float64 dequantize-then-matmul")


# ---- every precision x group size; dtype, symmetry, M and bias rotate ------------------------

CASES = list(itertools.product(PRECISIONS, GROUP_SIZES))


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"r{r}-g{g}" for r, g in CASES])
def test_matches_the_references(mq, case, rng):
    """Each (r, group) runs every activation dtype, asymmetric and symmetric, on N=45, K=200;
    M (1, 3, 17: GEMV, 16-row decode, prefill), bias and the scale dtype rotate, so each case
    meets every M with and without a bias."""
    r, group_size = CASES[case]
    for i, (dtype, symmetric) in enumerate(itertools.product(DTYPES, (False, True))):
        m = (DECODE_M + PREFILL_M)[(i + case) % 3]
        scale_dtype = SCALE_DTYPES[(i // 2 + case) % 3]
        mw = _parent(N_ODD, K_ODD, group_size, symmetric, scale_dtype, rng)
        x = _randn(rng, m, K_ODD, dtype=dtype)
        bias = _randn(rng, N_ODD, dtype=dtype) if (i // 3 + case) % 2 else None
        _check(mq, x, mw, r, bias, f"r={r} g={group_size} M={m} {dtype} sym={symmetric} "
               f"scales={scale_dtype} bias={bias is not None}")


@pytest.mark.parametrize("r", [8, 4, 2])
def test_every_path_and_split(mq, r, rng):
    """Forced configs: the GEMV and 16-row decode forms with one and several K slices, and the
    prefill tiles, on a K of several steps and an N of several tiles."""
    MC = mq.MatmulConfig
    n, k = (70, 300) if not ON_GPU else (600, 2000)
    mw = _parent(n, k, 64, r == 4, torch.float16, rng)
    configs = [(1, MC(1, 16, 64, split_k=1)), (1, MC(1, 32, 128, split_k=3)),
               (5, MC(16, 16, 64, split_k=1)), (16, MC(16, 32, 64, split_k=4)),
               (40, MC(32, 32, 64, group_m=1)), (40, MC(16, 64, 32, group_m=3))]
    for j, (m, cfg) in enumerate(configs):
        dtype = (torch.float16, torch.float32)[j % 2]
        x = _randn(rng, m, k, dtype=dtype)
        bias = _randn(rng, n) if j % 3 else None   # an fp32 bias with 16-bit x, too
        _check(mq, x, mw, r, bias, f"r={r} M={m} {cfg} {dtype}", config=cfg)


# ---- only the planes of PLANES_READ[r] reach the kernel -------------------------------------

class _LaunchSpy:
    """Stands in for a Triton kernel object: records each launch's arguments by name (and
    launches the real kernel)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            named = dict(zip(self.kernel.arg_names, args))
            named.update(kwargs)
            self.launches.append(named)
            return launch(*args, **kwargs)
        return run


@pytest.mark.parametrize("r", PRECISIONS)
def test_only_the_planes_a_precision_reads_reach_the_kernel(mq, r, monkeypatch, rng):
    """All three planes are handed to the launcher; the kernel must receive None for the planes
    outside PLANES_READ[r] (int2: plane_mid and plane_lo; int3/int4: plane_lo), so it cannot
    read them. Those planes are also filled with garbage: the result must not change."""
    spies = {name: _LaunchSpy(getattr(mq, name))
             for name in ("_plane_decode_kernel", "_plane_prefill_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(mq, name, spy)
    mw = _parent(N_ODD, 96, 32, False, torch.float16, rng)
    garbage = {name: torch.randint(-2**31, 2**31 - 1, getattr(mw, name).shape,
                                   dtype=torch.int32, generator=rng).to(DEVICE)
               for name in PLANES}
    planes = tuple(getattr(mw, name) if name in PLANES_READ[r] else garbage[name]
                   for name in PLANES)
    for m in (1, 3, 17):
        x = _randn(rng, m, 96, dtype=torch.float16)
        _check(mq, x, mw, r, None, f"r={r} M={m}, unread planes garbage", planes=planes)
    launches = spies["_plane_decode_kernel"].launches + spies["_plane_prefill_kernel"].launches
    assert len(launches) == 3
    for launch in launches:
        assert launch["hi_ptr"] is mw.plane_hi
        for name, arg in (("plane_mid", "mid_ptr"), ("plane_lo", "lo_ptr")):
            if name in PLANES_READ[r]:
                assert launch[arg] is getattr(mw, name), f"r={r}: {name} not passed on"
            else:
                assert launch[arg] is None, f"r={r}: the kernel was given {name}"
    if r == 2:
        # and the launcher accepts None for them
        x = _randn(rng, 1, 96, dtype=torch.float16)
        _check(mq, x, mw, r, None, "r=2, plane_mid/plane_lo None",
               planes=(mw.plane_hi, None, None))


def test_missing_planes_are_refused(mq, rng):
    mw = _parent(16, 64, 32, False, torch.float32, rng)
    x = _randn(rng, 2, 64)
    for r in (3, 4, 6, 8):
        with pytest.raises(ValueError, match=f"precision={r}.*reads plane_mid"):
            mq.matryoshka_matmul_triton(x, mw.plane_hi, None, mw.plane_lo, mw.scales, mw.zeros,
                                        None, r, 32, 16, 64)
    for r in (6, 8):
        with pytest.raises(ValueError, match="reads plane_lo"):
            mq.matryoshka_matmul_triton(x, mw.plane_hi, mw.plane_mid, None, mw.scales,
                                        mw.zeros, None, r, 32, 16, 64)


# ---- the tile helpers added for plane layouts (kernels/tiles.py) -----------------------------

@triton.jit
def _unpack_blocks_kernel(q_ptr, stride_qn, n_lim, k0, k_lim, out_ptr, first_ptr,
                          BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Writes tiles.unpack_code_blocks' codes of rows [0, BLOCK_N) and codes [k0, k0 + BLOCK_K)
    to out[BLOCK_N, BLOCK_K] (int32) and, for 2 and 3 bits, tiles.block_code's code j of the
    first 32-code block of each row to first[BLOCK_N, 32]."""
    offs_n = tl.arange(0, BLOCK_N)
    codes, seg_k0 = unpack_code_blocks(q_ptr, stride_qn, offs_n, n_lim, k0, k_lim, BITS,
                                       BLOCK_K)
    flat = tl.reshape(codes, (BLOCK_N, BLOCK_K)).to(tl.int32)
    tl.store(out_ptr + offs_n[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :], flat)
    if BITS <= 3:
        # the BITS words of block 0 of each row, then code j of each with constant shifts
        rows = q_ptr + offs_n * stride_qn
        w0 = tl.load(rows).to(tl.uint32, bitcast=True)
        w1 = tl.load(rows + 1).to(tl.uint32, bitcast=True)
        w2 = w1
        if BITS == 3:
            w2 = tl.load(rows + 2).to(tl.uint32, bitcast=True)
        for j in tl.static_range(32):
            code = block_code(w0, w1, w2, j, BITS)
            tl.store(first_ptr + offs_n * 32 + j, code.to(tl.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_block_unpackers_match_the_packing(mq, bits, rng):
    """unpack_code_blocks (every width) and block_code (2 and 3 bits) give pack_codes' codes in K
    order; rows >= n_lim and blocks starting at >= k_lim come out as 0."""
    codes = torch.randint(0, 1 << bits, (16, 192), generator=rng)
    packed = pack_codes(codes, bits).to(DEVICE)
    for k0, n_lim, k_lim in ((0, 16, 192), (64, 11, 192), (128, 16, 150)):
        out = torch.full((16, 64), -1, dtype=torch.int32, device=DEVICE)
        first = torch.full((16, 32), -1, dtype=torch.int32, device=DEVICE)
        _unpack_blocks_kernel[(1,)](packed, packed.stride(0), n_lim, k0, k_lim, out, first,
                                    BITS=bits, BLOCK_N=16, BLOCK_K=64)
        expected = codes[:, k0:k0 + 64].clone()
        expected[n_lim:] = 0
        block_start = k0 + 32 * (torch.arange(64) // 32)
        expected[:, block_start >= k_lim] = 0
        assert torch.equal(out.cpu().to(torch.int64), expected), f"bits={bits} k0={k0}"
        if bits <= 3:
            assert torch.equal(first.cpu().to(torch.int64), codes[:, :32]), f"bits={bits}"


# ---- blocks of a weight, strides, allocation ---------------------------------------------------

def _poison_outside(mw, n, k):
    """A copy whose scales/zeros outside the groups of [:n, :k] are NaN and whose plane words
    in rows >= n or in 32-code blocks starting at >= k are random: a kernel reading past the
    block gets NaN or a wrong result."""
    scales, zeros = poison_groups_outside(mw.scales, mw.zeros, n, k, mw.effective_group_size)
    used_blocks = -(-k // 32)
    planes = []
    for name in PLANES:
        plane = getattr(mw, name).clone()
        words = {"plane_mid": 2}.get(name, 3)   # words per 32-code block
        junk = torch.randint(-2**31, 2**31 - 1, plane.shape, dtype=torch.int32).to(plane.device)
        plane[n:] = junk[n:]
        plane[:, used_blocks * words:] = junk[:, used_blocks * words:]
        planes.append(plane)
    return MatryoshkaWeight(*planes, scales, zeros, group_size=mw.group_size,
                            shape=tuple(mw.shape))


@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_block_of_a_weight_reads_only_the_block(mq, group_size, rng):
    """n < N and k < K (k = 256, 384 and 150, which ends inside a group and inside a 32-code
    block): everything outside W[:n, :k] is poisoned, x has more than k columns, the bias more
    than n entries."""
    n_full, k_full = 90, 512
    mw = _parent(n_full, k_full, group_size, group_size == 128, torch.float16, rng)
    for j, (m, n, k) in enumerate(((1, 50, 256), (5, 89, 150), (33, 77, 384))):
        poisoned_weight = _poison_outside(mw, n, k)
        x = _randn(rng, m, k_full, dtype=torch.float16)        # row stride 512 > k
        bias = _randn(rng, n_full + 3, dtype=torch.float16)
        for r in ((8, 2), (6, 3), (4,))[j]:
            out = poisoned((m, n), torch.float16, DEVICE)
            mq.matryoshka_matmul_triton(x, *_needed_planes(poisoned_weight, r),
                                        poisoned_weight.scales, poisoned_weight.zeros, bias, r,
                                        group_size, n, k, out=out)
            ref32, ref64 = _references(x, mw, r, bias, n, k)
            what = f"block [{n}, {k}] of [{n_full}, {k_full}] r={r} g={group_size} M={m}"
            assert_matches(out.float(), ref32, torch.float16, what)
            assert_matches(out.double(), ref64, torch.float16, what + " (float64)")


def test_output_is_allocated_when_not_given(mq, rng):
    mw = _parent(33, 64, 32, True, torch.bfloat16, rng)
    for m, dtype in ((1, torch.float32), (4, torch.float16), (20, torch.float32)):
        x = _randn(rng, m, 64, dtype=dtype)
        y = mq.matryoshka_matmul_triton(x, *_needed_planes(mw, 4), mw.scales, mw.zeros, None,
                                        4, 32, 33, 64)
        assert y.shape == (m, 33) and y.dtype == dtype and y.device == x.device
        assert_matches(y.float(), _references(x, mw, 4, None, 33, 64)[0], dtype, f"M={m}")
    empty = mq.matryoshka_matmul_triton(_randn(rng, 0, 64), *_needed_planes(mw, 4), mw.scales,
                                        mw.zeros, None, 4, 32, 33, 64)
    assert empty.shape == (0, 33)


def test_launcher_rejects_bad_inputs(mq, rng):
    mw = _parent(16, 64, 32, False, torch.float32, rng)
    x = _randn(rng, 3, 64)
    hi, mid, lo = mw.plane_hi, mw.plane_mid, mw.plane_lo

    def call(**changes):
        args = dict(x=x, plane_hi=hi, plane_mid=mid, plane_lo=lo, scales=mw.scales,
                    zeros=mw.zeros, bias=None, precision=8, group_size=32, n=16, k=64)
        args.update(changes)
        return mq.matryoshka_matmul_triton(**args)

    with pytest.raises(ValueError, match=r"M=3, N=16, K=64, precision=5, group_size=32"):
        call(precision=5)
    with pytest.raises(ValueError, match="group_size must be"):
        call(group_size=48)
    with pytest.raises(ValueError, match="x has dtype"):
        call(x=x.double())
    with pytest.raises(ValueError, match="contiguous last dimension"):
        call(x=_randn(rng, 64, 3).T)
    with pytest.raises(ValueError, match="plane_hi has dtype"):
        call(plane_hi=hi.to(torch.int64))
    with pytest.raises(ValueError, match="plane_mid .* holds 32 codes per row but plane_hi"):
        call(plane_mid=mid[:, :2])
    with pytest.raises(ValueError, match="plane_lo must have a contiguous last dimension"):
        call(plane_lo=torch.cat([lo, lo], dim=1)[:, ::2])
    with pytest.raises(ValueError, match="plane_hi .* does not hold 17 rows"):
        call(n=17)
    with pytest.raises(ValueError, match="fewer than k=96"):
        call(x=_randn(rng, 3, 96), k=96)
    with pytest.raises(ValueError, match="scales .* do not cover"):
        call(scales=mw.scales[:, :1])
    with pytest.raises(ValueError, match="zeros .* do not cover"):
        call(zeros=mw.zeros[:8])
    with pytest.raises(ValueError, match="bias has 8 entries"):
        call(bias=_randn(rng, 8))
    with pytest.raises(ValueError, match="out has shape"):
        call(out=torch.empty(3, 15, device=DEVICE))
    with pytest.raises(ValueError, match="out has dtype"):
        call(out=torch.empty(3, 16, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="is on meta but x is on"):
        call(plane_hi=torch.empty(hi.shape, dtype=torch.int32, device="meta"))
    with pytest.raises(ValueError, match="decode config"):
        call(x=x[:2], config=mq.MatmulConfig(1, 16, 64))


# ---- GPU: real layer shapes, every precision x group x dtype -----------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"r{r}-g{g}" for r, g in CASES])
def test_real_layer_shapes_on_the_gpu(mq, case, rng):
    """SmolLM2 (1536 x 576) and Llama-3-8B (4096 x 4096, 14336 x 4096) at M = 1, 3, 17, 123 in
    fp16, bf16 and fp32; symmetry alternates by shape, bias by M."""
    r, group_size = CASES[case]
    for i, (n, k) in enumerate(((1536, 576), (4096, 4096), (14336, 4096))):
        mw = _parent(n, k, group_size, i % 2 == 1, SCALE_DTYPES[(case + i) % 3], rng, "cuda")
        dense64 = mw.dequantize(r, torch.float64)
        for j, m in enumerate((1, 3, 17, 123)):
            for dtype in DTYPES:
                x = _randn(rng, m, k, dtype=dtype, device="cuda")
                bias = _randn(rng, n, dtype=dtype, device="cuda") if j % 2 else None
                _check(mq, x, mw, r, bias, f"{n}x{k} r={r} g={group_size} M={m} {dtype} "
                       f"sym={mw.symmetric} bias={bias is not None}", dense64=dense64)
        del dense64
        torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("r", PRECISIONS)
def test_matryoshka_matmul_routes_cuda_tensors_to_the_plane_kernel(mq, r, rng):
    """pyengine.matryoshka_matmul on CUDA tensors runs this kernel (backend None or "triton")."""
    from pyengine.ops import backend_for, matryoshka_matmul
    mw = _parent(576, 1536, 128, False, torch.float16, rng, "cuda")
    x = _randn(rng, 5, 1536, dtype=torch.float16, device="cuda")
    assert backend_for(x, mw.at(r)) == backend_for(x, mw.at(r), "triton") == "triton"
    ref32, _ = _references(x, mw, r, None, 576, 1536)
    for backend in (None, "triton"):
        assert_matches(matryoshka_matmul(x, mw, r, backend=backend).float(), ref32,
                       torch.float16, f"r={r} backend={backend}")


# ---- the GPU benchmark script -------------------------------------------------------------------

def test_gpu_benchmark_script_parses_and_needs_cuda(capsys, tmp_path):
    """benchmarks/bench_matryoshka_gpu.py imports and parses --help everywhere; without CUDA it
    stops with one line on stderr and writes nothing."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    bench = importlib.import_module("bench_matryoshka_gpu")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0 and "--json" in capsys.readouterr().out
    if ON_GPU:
        return
    out = tmp_path / "matryoshka_gpu.json"
    assert bench.main(["--json", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err
    assert not out.exists()
