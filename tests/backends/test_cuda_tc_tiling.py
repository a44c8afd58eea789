"""The tiling plan of the CUDA tensor-core kernel (csrc/cuda/qmatmul_tc.cu), replayed in numpy.

This does not run the compiled kernel (tests/backends/test_cuda_tc.py does, on a GPU): it replays
the kernel's index math with its constants -- which thread stages which activations and weight codes
into which shared-memory tile, the masking of rows past M / N and codes past K, the group of a
32-code block, the 2 x 2 warps' WMMA sub-tiles and the epilogue -- and checks that the result is
the reference product. Keep the constants and the staging below in step with the kernel.
"""

import itertools

import numpy as np
import pytest
import torch

import pyengine

# the kernel's constants
BM = BN = 64          # output tile
BK = 32               # K step: one packing block
LDA = LDB = BK + 8    # shared-memory row pitch of the A and B tiles (elements)
LDC = BN + 4          # row pitch of the accumulator tile
CODES_PER_THREAD = 16
THREADS = 128


def block_code(words, j, bits):
    """Code j of a 32-code packing block (the kernel's block_code<BITS>)."""
    if bits == 3:
        bit = 3 * j
        w, shift = bit >> 5, bit & 31
        v = int(words[w]) >> shift
        if shift > 29:  # codes 10 and 21 straddle two words
            v |= (int(words[w + 1]) << (32 - shift)) & 0xFFFFFFFF
        return v & 7
    per_word = 32 // bits
    return (int(words[j // per_word]) >> ((j % per_word) * bits)) & ((1 << bits) - 1)


def stage_tiles(x, q, s, z, bits, group, m0, n0, k0):
    """The A and B shared-memory tiles of one K step, filled thread by thread as the kernel's
    load_stage / store_stage do (NaN where no thread writes)."""
    M, K = x.shape
    N = q.shape[0]
    a_tile = np.full((BM, LDA), np.nan, np.float32)
    b_tile = np.full((BN, LDB), np.nan, np.float32)
    for tid in range(THREADS):
        row, half = tid >> 1, tid & 1
        m, kc = m0 + row, k0 + half * CODES_PER_THREAD
        for i in range(CODES_PER_THREAD):
            inside = m < M and kc + i < K
            a_tile[row, half * CODES_PER_THREAD + i] = x[m, kc + i] if inside else 0.0
        n = n0 + row
        if n < N:
            words = q[n, (k0 // 32) * bits:(k0 // 32 + 1) * bits]
            g = k0 // group
            scale = s[n, g]
            zero = z[n, g] if z is not None else float(1 << (bits - 1))
        else:
            words, scale, zero = np.zeros(bits, np.uint32), 0.0, 0.0
        for i in range(CODES_PER_THREAD):
            j = half * CODES_PER_THREAD + i
            w = (block_code(words, j, bits) - zero) * scale
            b_tile[row, j] = w if k0 + j < K else 0.0
    return a_tile, b_tile


def emulate(x, qw):
    """out = x @ W^T computed tile by tile, warp by warp, as the kernel does. x: [M, K] fp32."""
    M, K = x.shape
    N, bits = qw.shape[0], qw.bits
    q = qw.qweight.numpy().view(np.uint32)
    s = qw.scales.float().numpy()
    z = None if qw.zeros is None else qw.zeros.float().numpy()
    group = qw.effective_group_size
    out = np.full((M, N), np.nan, np.float32)
    for by, bx in itertools.product(range((M + BM - 1) // BM), range((N + BN - 1) // BN)):
        m0, n0 = by * BM, bx * BN
        c_tile = np.zeros((BM, LDC), np.float32)
        for kb in range((K + BK - 1) // BK):
            a_tile, b_tile = stage_tiles(x, q, s, z, bits, group, m0, n0, kb * BK)
            for warp in range(THREADS // 32):
                wm, wn = warp >> 1, warp & 1
                for kk, i, j in itertools.product((0, 16), range(2), range(2)):
                    rows = slice(wm * 32 + i * 16, wm * 32 + i * 16 + 16)
                    cols = slice(wn * 32 + j * 16, wn * 32 + j * 16 + 16)
                    # a row-major 16x16 A fragment times a column-major B fragment (= W rows)
                    c_tile[rows, cols] += a_tile[rows, kk:kk + 16] @ b_tile[cols, kk:kk + 16].T
        for idx in range(BM * BN):  # the epilogue
            r, c = idx // BN, idx % BN
            if m0 + r < M and n0 + c < N:
                out[m0 + r, n0 + c] = c_tile[r, c]
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,symmetric", [(32, False), (-1, True), (64, True)])
def test_tiling_plan_computes_the_product(bits, group_size, symmetric, rng):
    m, n, k = 70, 45, 200  # tails in every dimension; two row tiles
    w = torch.randn(n, k, generator=rng)
    qw = pyengine.quantize(w, bits, group_size, symmetric)
    x = torch.randn(m, k, generator=rng)
    got = emulate(x.numpy(), qw)
    ref = (x.double() @ qw.dequantize(torch.float64).T).numpy()
    assert np.isfinite(got).all(), "an output element was never written"
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5
