"""Matryoshka matmul straight from the bit planes: out[M, n] = x[M, :k] @ W_r[:n, :k]^T (+ bias).

W_r is the r-bit slice (r in 8, 6, 4, 3, 2) of an int8 Matryoshka parent stored as three bit
planes (pyengine/matryoshka/weight.py, docs/FORMAT.md), each packed with the canonical LSB-first
packing along K::

    q = hi << 5 | mid << 3 | lo               parent code, 0..255
    plane_hi   bits 7..5 of q   3-bit codes   int32 [N, Kp * 3 / 32]   3 words per 32 codes
    plane_mid  bits 4..3 of q   2-bit codes   int32 [N, Kp * 2 / 32]   2 words per 32 codes
    plane_lo   bits 2..0 of q   3-bit codes   int32 [N, Kp * 3 / 32]   3 words per 32 codes

The slice code needs only the top r + 1 bits of q (the top r bits and the rounding bit below):

    t      = q >> (7 - r)                         top r + 1 bits
    c_r    = min((t + 1) >> 1, 2^r - 1)           (c_8 = q)
    w_r    = (c_r * 2^(8-r) - z) * s              the parent's per-group scale s and zero z

so a kernel instance compiled for r loads only the planes holding those bits (PLANES_READ):

    r = 2    t = hi                                plane_hi              3/8 of the code bytes
    r = 3    t = hi << 1 | mid >> 1                plane_hi, plane_mid   5/8
    r = 4    t = hi << 2 | mid                     plane_hi, plane_mid   5/8
    r = 6    t = hi << 4 | mid << 2 | lo >> 1      all three             8/8
    r = 8    q = hi << 5 | mid << 3 | lo           all three             8/8

The planes an r-bit instance does not read are passed to it as None (a compile-time constant:
the kernel has no pointer it could read them through). No canonical copy of the slice is ever
made: codes are assembled in registers, tile by tile.

Paths, chosen by M as in pyengine/kernels/matmul.py (same config tables):

* M <= 16, decode: split-K over (cdiv(N, BLOCK_N), split_k) programs; every weight byte is read
  once. M == 1 runs the GEMV form on the CUDA cores: per 32-code block and row, the needed plane
  words are loaded as [BLOCK_N, SEGS] tensors (3 + 2 + 3 words at most) and code j of every
  block is extracted with compile-time shifts; the scale and zero are applied once per block:
      sum_j x_j (c_j 2^m - z) s = s (2^m sum_j x_j c_j - z sum_j x_j)   (m = 8 - r)
  2 <= M <= 16 dequantizes the tile and runs a 16-row tl.dot. Split-K partial sums go through
  the canonical path's reduce kernel (pyengine/kernels/matmul_decode.py), which adds the bias.
* M > 16, prefill: tiled tl.dot on dequantized [BLOCK_N, BLOCK_K] tiles (fp32 dequant, rounded
  to the activation dtype), fp32 accumulation, grouped program order for L2 reuse.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..matryoshka.weight import PLANE_BITS, PLANES_READ, PRECISIONS
from .matmul import INTERPRETED, Checker, check_common, select_config, target_programs
from .matmul_decode import split_k_reduce_launch, split_k_slices
from .problem import KernelLaunch, MatmulConfig, run_launches
from .tiles import (block_code, codes_to_float, dot_wt, finish_split, finish_tile, group_params,
                    grouped_tile, load_words, split_k_program, unpack_code_blocks, unpack_codes,
                    x_tile)

PARENT_BITS = 8

# GPU, M == 1 (BLOCK_N = 16, 4 warps): BLOCK_K per precision so that the [16, BLOCK_K / 32]
# word tensors give every thread at least one block and a step reads 40..64 plane words
# (160..256 bytes) per row: r = 8 and 6 read 8 words per 32 codes, r = 4 and 3 read 5, r = 2
# reads 3. Not tuned on a GPU yet.
_GEMV_BLOCK_K = {8: 256, 6: 256, 4: 256, 3: 256, 2: 512}
# GPU, 2 <= M <= 16: at most this many codes per tl.dot step, on 8 warps. Three planes' codes
# are live at once while a tile is assembled: at the canonical kernels' 128 codes and 4 warps
# the sm_90 build needs 255 registers and spills (triton 3.6, symmetric weights with a
# shortcut); at 64 codes 4 warps still spill with fp32 activations on sm_80 (triton 3.6) and
# for int4 slices with a shortcut on sm_90 (triton 3.9). fp32 activations (32 codes a step): 4
# warps, 2 stages (8 warps spill on sm_80 for the 6-bit slice with a bias, 3 stages with a
# shortcut at odd shapes, triton 3.6; 16-row tiles spill on sm_90, triton 3.9).
_DOT_BLOCK_K_MAX = 64
_DOT_WARPS = 8
_DOT_WARPS_FP32, _DOT_STAGES_FP32 = 4, 2
# Interpreter, M == 1: wider and longer steps than the canonical GEMV's (1, 16, 64): the
# interpreter pays per operation, and the 32-code loop is the costly part. Small test shapes
# still get several N tiles and split-K.
_INTERP_GEMV = MatmulConfig(1, 32, 128)


# ---- Triton: slice codes, tiles, kernels --------------------------------------------------------

@triton.jit
def _slice_code(hi, mid, lo, PRECISION: tl.constexpr):
    """The r-bit slice code c_r (uint32, the inputs' shape) from the plane codes of the same
    weights: hi (bits 7..5 of q), mid (bits 4..3), lo (bits 2..0). Arguments the precision does
    not need (mid for r = 2, lo for r < 6) are ignored."""
    if PRECISION == 8:
        code = (hi << 5) | (mid << 3) | lo
    else:
        if PRECISION == 6:
            top = (hi << 4) | (mid << 2) | (lo >> 1)     # bits 7..1 of q
        elif PRECISION == 4:
            top = (hi << 2) | mid                        # bits 7..3
        elif PRECISION == 3:
            top = (hi << 1) | (mid >> 1)                 # bits 7..4
        else:
            top = hi                                     # bits 7..5
        # round half up on the dropped bit, then clamp the one overflow (t = 2^(r+1) - 1)
        code = tl.minimum((top + 1) >> 1, (1 << PRECISION) - 1)
    return code


@triton.jit
def _gemv_step(x_ptr, hi_ptr, stride_hn, mid_ptr, stride_mn, lo_ptr, stride_ln,
               s_ptr, stride_sn, z_ptr, stride_zn, offs_n, N, k0, K,
               PRECISION: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial sums over k in [k0, k0 + BLOCK_K) of x[0, k] * W_r[offs_n, k], per 32-code
    block: fp32 [BLOCK_N, BLOCK_K // 32] (the caller adds them up over K and reduces over
    blocks once, after its loop).

    Segment a of the step is the 32-code packing block starting at seg_k0[a] = k0 + 32 a, i.e.
    block b = seg_k0[a] / 32 of every plane: plane_hi and plane_lo words 3b .. 3b + 2,
    plane_mid words 2b, 2b + 1. Each word is loaded once as a [BLOCK_N, SEGS] tensor; the
    compile-time loop over j extracts code j of every block of every row at once.
    """
    SEGS: tl.constexpr = BLOCK_K // 32
    STEP: tl.constexpr = 256 >> PRECISION   # 2^(8-r): slice code -> parent units
    seg_k0 = k0 + tl.arange(0, SEGS) * 32
    block = seg_k0 // 32
    h0 = load_words(hi_ptr, stride_hn, offs_n, N, block * 3, seg_k0, K)
    h1 = load_words(hi_ptr, stride_hn, offs_n, N, block * 3 + 1, seg_k0, K)
    h2 = load_words(hi_ptr, stride_hn, offs_n, N, block * 3 + 2, seg_k0, K)
    # placeholders for the planes this precision does not read (never used by _slice_code)
    m0 = h0
    m1 = h0
    l0 = h0
    l1 = h0
    l2 = h0
    if PRECISION >= 3:
        m0 = load_words(mid_ptr, stride_mn, offs_n, N, block * 2, seg_k0, K)
        m1 = load_words(mid_ptr, stride_mn, offs_n, N, block * 2 + 1, seg_k0, K)
    if PRECISION >= 6:
        l0 = load_words(lo_ptr, stride_ln, offs_n, N, block * 3, seg_k0, K)
        l1 = load_words(lo_ptr, stride_ln, offs_n, N, block * 3 + 1, seg_k0, K)
        l2 = load_words(lo_ptr, stride_ln, offs_n, N, block * 3 + 2, seg_k0, K)
    xc = tl.zeros((BLOCK_N, SEGS), dtype=tl.float32)      # sum_j x_j * c_j per block
    x_sum = tl.zeros((SEGS,), dtype=tl.float32)            # sum_j x_j per block
    for j in tl.static_range(32):
        hi = block_code(h0, h1, h2, j, 3)
        mid = hi
        lo = hi
        if PRECISION >= 3:
            mid = block_code(m0, m1, m1, j, 2)
        if PRECISION >= 6:
            lo = block_code(l0, l1, l2, j, 3)
        code = _slice_code(hi, mid, lo, PRECISION)
        xj = tl.load(x_ptr + seg_k0 + j, mask=seg_k0 + j < K, other=0.0).to(tl.float32)
        xc += codes_to_float(code) * xj[None, :]
        x_sum += xj
    # BITS = 8 (the parent's): a symmetric parent's zero point is 2^(8-1) = 128
    scale, zero = group_params(s_ptr, stride_sn, z_ptr, stride_zn, offs_n, N, k0, seg_k0, K,
                               8, GROUP_SIZE, HAS_ZEROS, BLOCK_K)
    return scale * (xc * STEP - zero * x_sum[None, :])


@triton.jit
def _plane_tile(hi_ptr, stride_hn, mid_ptr, stride_mn, lo_ptr, stride_ln,
                s_ptr, stride_sn, z_ptr, stride_zn, offs_n, n_lim, k0, k_lim,
                PRECISION: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W_r[offs_n, k0:k0+BLOCK_K] dequantized, fp32 [BLOCK_N, BLOCK_K]: (c_r 2^(8-r) - z) s.

    Each plane is unpacked to [BLOCK_N, BLOCK_K // 32, 32] (one segment per 32-code block, so
    the 3-bit and 2-bit planes line up code by code) and combined into slice codes in place.
    """
    hi, seg_k0 = unpack_codes(hi_ptr, stride_hn, offs_n, n_lim, k0, k_lim, 3, BLOCK_K)
    mid = hi
    lo = hi
    if PRECISION >= 3:
        mid, _mid_k0 = unpack_code_blocks(mid_ptr, stride_mn, offs_n, n_lim, k0, k_lim, 2,
                                          BLOCK_K)
    if PRECISION >= 6:
        lo, _lo_k0 = unpack_codes(lo_ptr, stride_ln, offs_n, n_lim, k0, k_lim, 3, BLOCK_K)
    STEP: tl.constexpr = 256 >> PRECISION   # 2^(8-r): slice code -> parent units
    code = _slice_code(hi, mid, lo, PRECISION)
    # BITS = 8 (the parent's): a symmetric parent's zero point is 2^(8-1) = 128
    scale, zero = group_params(s_ptr, stride_sn, z_ptr, stride_zn, offs_n, n_lim, k0, seg_k0,
                               k_lim, 8, GROUP_SIZE, HAS_ZEROS, BLOCK_K)
    parent_units = codes_to_float(code * STEP)
    w = (parent_units - zero[:, :, None]) * scale[:, :, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _plane_dot_loop(x_ptr, stride_xm, offs_m, m_lim,
                    hi_ptr, stride_hn, mid_ptr, stride_mn, lo_ptr, stride_ln,
                    s_ptr, stride_sn, z_ptr, stride_zn, offs_n, n_lim, k_begin, k_end, k_lim,
                    PRECISION: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
                    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The tl.dot loop of the 16-row decode form and of the prefill kernel (tiles.dot_loop on
    the slice's tiles, _plane_tile): x[offs_m, k_begin:k_end] @ W_r[offs_n, k_begin:k_end]^T,
    fp32 [BLOCK_M, BLOCK_N], in steps of BLOCK_K codes."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        x = x_tile(x_ptr, stride_xm, offs_m, m_lim, k0, k_lim, BLOCK_K)
        w = _plane_tile(hi_ptr, stride_hn, mid_ptr, stride_mn, lo_ptr, stride_ln,
                        s_ptr, stride_sn, z_ptr, stride_zn, offs_n, n_lim, k0, k_lim,
                        PRECISION, GROUP_SIZE, HAS_ZEROS, BLOCK_N, BLOCK_K)
        acc = dot_wt(x, w, acc, DOT_FP32, DOT_PRECISION)
    return acc


@triton.jit
def _plane_decode_kernel(
    x_ptr, stride_xm,
    hi_ptr, stride_hn, mid_ptr, stride_mn, lo_ptr, stride_ln,
    s_ptr, stride_sn, z_ptr, stride_zn,
    bias_ptr, stride_b, res_ptr, stride_rm, stride_rr, sc_ptr, stride_sr, stride_sc, R,
    out_ptr, stride_om, part_ptr,
    M, N, K, K_PER_SPLIT,
    PRECISION: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SHORTCUT: tl.constexpr, DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
):
    """Decode path (M <= 16). Grid (cdiv(N, BLOCK_N), split_k): program (i, s) owns output
    columns [i BLOCK_N, (i + 1) BLOCK_N) and K slice [s K_PER_SPLIT, (s + 1) K_PER_SPLIT) for
    all M rows. With one slice it writes out (+ bias + residual @ shortcut); with several it
    writes its fp32 partial sum to part[s, :M, :N] (contiguous [split_k, M, N]) for the reduce
    kernel, which adds the epilogue."""
    pid_k, offs_n, k_begin, k_end = split_k_program(K, K_PER_SPLIT, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    if BLOCK_M == 1:
        # per-block partial sums ([BLOCK_N, blocks per step]), reduced over blocks once after
        # the loop
        part = tl.zeros((BLOCK_N, BLOCK_K // 32), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            part += _gemv_step(x_ptr, hi_ptr, stride_hn, mid_ptr, stride_mn, lo_ptr, stride_ln,
                               s_ptr, stride_sn, z_ptr, stride_zn, offs_n, N, k0, K,
                               PRECISION, GROUP_SIZE, HAS_ZEROS, BLOCK_N, BLOCK_K)
        acc = tl.sum(part, axis=1)[None, :]
    else:
        acc = _plane_dot_loop(x_ptr, stride_xm, offs_m, M, hi_ptr, stride_hn, mid_ptr, stride_mn,
                              lo_ptr, stride_ln, s_ptr, stride_sn, z_ptr, stride_zn, offs_n, N,
                              k_begin, k_end, K, PRECISION, GROUP_SIZE, HAS_ZEROS, DOT_FP32,
                              DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    finish_split(acc, pid_k, offs_m, offs_n, M, N, part_ptr, bias_ptr, stride_b, res_ptr,
                 stride_rm, stride_rr, sc_ptr, stride_sr, stride_sc, R, out_ptr, stride_om,
                 HAS_BIAS, HAS_SHORTCUT, BLOCK_M, BLOCK_R, DOT_FP32, DOT_PRECISION, WRITE_PARTIAL)


@triton.jit
def _plane_prefill_kernel(
    x_ptr, stride_xm,
    hi_ptr, stride_hn, mid_ptr, stride_mn, lo_ptr, stride_ln,
    s_ptr, stride_sn, z_ptr, stride_zn,
    bias_ptr, stride_b, res_ptr, stride_rm, stride_rr, sc_ptr, stride_sr, stride_sc, R,
    out_ptr, stride_om,
    M, N, K,
    PRECISION: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SHORTCUT: tl.constexpr, DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Prefill path (M > 16): one [BLOCK_M, BLOCK_N] output tile per program, K walked in
    BLOCK_K steps of x tile @ dequantized plane tile^T (fp32 accumulation)."""
    offs_m, offs_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _plane_dot_loop(x_ptr, stride_xm, offs_m, M, hi_ptr, stride_hn, mid_ptr, stride_mn,
                          lo_ptr, stride_ln, s_ptr, stride_sn, z_ptr, stride_zn, offs_n, N, 0, K,
                          K, PRECISION, GROUP_SIZE, HAS_ZEROS, DOT_FP32, DOT_PRECISION, BLOCK_M,
                          BLOCK_N, BLOCK_K)
    finish_tile(acc, offs_m, offs_n, M, N, bias_ptr, stride_b, res_ptr, stride_rm, stride_rr,
                sc_ptr, stride_sr, stride_sc, R, out_ptr, stride_om, HAS_BIAS, HAS_SHORTCUT,
                BLOCK_M, BLOCK_R, DOT_FP32, DOT_PRECISION)


# ---- launch -------------------------------------------------------------------------------------

def select_plane_config(M: int, precision: int, dtype: torch.dtype,
                        interpreted: bool = INTERPRETED) -> Tuple[str, MatmulConfig]:
    """("decode" or "prefill", config) for M rows: the canonical kernels' tables
    (kernels.matmul.select_config, as for an 8-bit weight), except for M == 1: on a GPU the
    GEMV step length is chosen by the bytes an r-bit slice reads per code; under the
    interpreter a larger tile (_INTERP_GEMV). ``interpreted`` as in select_config."""
    path, cfg = select_config(M, PARENT_BITS, dtype, interpreted)
    if path == "decode" and cfg.block_m == 1:
        cfg = (_INTERP_GEMV if interpreted
               else dataclasses.replace(cfg, block_k=_GEMV_BLOCK_K[precision]))
    elif path == "decode" and not interpreted:
        if dtype == torch.float32:
            cfg = dataclasses.replace(cfg, block_k=min(cfg.block_k, _DOT_BLOCK_K_MAX),
                                      num_warps=_DOT_WARPS_FP32, num_stages=_DOT_STAGES_FP32)
        else:
            cfg = dataclasses.replace(cfg, block_k=min(cfg.block_k, _DOT_BLOCK_K_MAX),
                                      num_warps=_DOT_WARPS)
    return path, cfg


def _check_plane(c: Checker, name: str, plane: torch.Tensor, n: int, kp: Optional[int]) -> int:
    """Validates one packed plane (int32 [>= n, words], unit stride along K, whole 32-code
    blocks) and returns the codes per row it holds; kp: the row length it must match."""
    bits = PLANE_BITS[name]
    c.tensor(name, plane, 2, (torch.int32,))
    codes = plane.shape[1] * 32 // bits
    if plane.shape[0] < n or plane.shape[1] % bits:
        c.fail(f"{name} {tuple(plane.shape)} does not hold {n} rows of whole 32-code blocks of "
               f"{bits}-bit codes")
    if kp is not None and codes != kp:
        c.fail(f"{name} {tuple(plane.shape)} holds {codes} codes per row but plane_hi holds {kp}")
    return codes


def matryoshka_matmul_triton(x: torch.Tensor, plane_hi: torch.Tensor,
                             plane_mid: Optional[torch.Tensor], plane_lo: Optional[torch.Tensor],
                             scales: torch.Tensor, zeros: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor], precision: int, group_size: int,
                             n: int, k: int, out: Optional[torch.Tensor] = None,
                             config: Optional[MatmulConfig] = None,
                             residual: Optional[torch.Tensor] = None,
                             shortcut: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[M, n] = x[:, :k] @ W_r[:n, :k]^T (+ bias[:n]) (+ residual @ shortcut[:, :n]), W_r the
    r-bit slice of a Matryoshka parent, computed from its bit planes (only those of
    PLANES_READ[precision] are read).

    Args:
        x: [M, >= k] fp32 / fp16 / bf16, unit stride along K (any row stride).
        plane_hi: int32 [N_stored >= n, Kp * 3 / 32], bits 7..5 of the parent codes.
        plane_mid: int32 [N_stored, Kp * 2 / 32], bits 4..3; needed for precision >= 3,
            otherwise ignored (may be None).
        plane_lo: int32 [N_stored, Kp * 3 / 32], bits 2..0; needed for precision >= 6,
            otherwise ignored (may be None).
            All planes: unit stride along K, Kp >= k a multiple of 32 (the padded row).
        scales: [N_stored, G] fp32 / fp16 / bf16, the parent's scales, unit stride along G.
        zeros: like scales (the parent's zero points), or None: symmetric, zero point 128.
        bias: [>= n] fp32 / fp16 / bf16 (any stride) or None.
        precision: r in (8, 6, 4, 3, 2).
        group_size: as stored: 32, 64, 128 (any positive multiple of 32), or -1 per channel
            (one group of Kp codes); G >= ceil(k / group size).
        n, k: the block W[:n, :k] that is used (the weight's shape for a full layer).
        out: [M, n] in x's dtype, unit stride along n; allocated when None.
        config: overrides the tile configuration (tests, tuning).
        residual, shortcut: [M, R] and [R, >= n] in x's dtype (any strides), or both None:
            their product is added in the epilogue (a sliced model's output projection).
    Returns:
        out, every element written exactly once.
    Raises:
        ValueError naming M, N, K, the precision and the group size, for a bad argument.
    """
    rows = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() == 2 else -1
    c = Checker(x, n, k, PARENT_BITS, group_size)
    c.what = (f"triton matryoshka_matmul(M={rows}, N={n}, K={k}, precision={precision}, "
              f"group_size={group_size})")
    if isinstance(precision, bool) or precision not in PRECISIONS:
        c.fail(f"precision must be one of {PRECISIONS}")
    if group_size != -1 and (group_size < 32 or group_size % 32):
        c.fail("group_size must be -1 (per channel) or a positive multiple of 32")
    M, out = check_common(c, x, n, k, bias, residual, shortcut, out)
    reads = PLANES_READ[precision]
    kp = _check_plane(c, "plane_hi", plane_hi, n, None)
    if kp < k:
        c.fail(f"plane_hi {tuple(plane_hi.shape)} holds {kp} codes per row, fewer than k={k}")
    given = {"plane_mid": plane_mid, "plane_lo": plane_lo}
    for name, plane in given.items():
        if plane is None:
            if name in reads:
                c.fail(f"precision {precision} reads {name} (PLANES_READ[{precision}] = "
                       f"{reads}), got None")
        else:
            _check_plane(c, name, plane, n, kp)   # validated even when this precision skips it
    effective_group = kp if group_size == -1 else group_size
    n_groups = triton.cdiv(k, effective_group)
    c.tensor("scales", scales, 2, (torch.float32, torch.float16, torch.bfloat16))
    if scales.shape[0] < n or scales.shape[1] < n_groups:
        c.fail(f"scales {tuple(scales.shape)} do not cover [{n}, {k}] in groups of "
               f"{effective_group}")
    if zeros is not None:
        c.tensor("zeros", zeros, 2, (torch.float32, torch.float16, torch.bfloat16))
        if zeros.shape[0] < n or zeros.shape[1] < n_groups:
            c.fail(f"zeros {tuple(zeros.shape)} do not cover [{n}, {k}] in groups of "
                   f"{effective_group}")
    if M == 0:
        return out
    # The path follows M (decode for M <= 16); a given config replaces the tile sizes only.
    path, cfg = select_plane_config(M, precision, x.dtype)
    if config is not None:
        cfg = config
    if path == "decode" and (cfg.block_m not in (1, 16) or (cfg.block_m == 1 and M != 1)):
        c.fail(f"decode config {cfg} does not fit M={M} (block_m 1 for M = 1, or 16)")
    if path == "prefill" and cfg.block_m < 16:
        c.fail(f"prefill config {cfg}: block_m must be >= 16 (tl.dot)")
    device_ctx = (torch.cuda.device(x.device) if x.device.type == "cuda"
                  else contextlib.nullcontext())
    with device_ctx:
        run_launches(plane_launches(x, plane_hi, plane_mid, plane_lo, scales, zeros, bias,
                                    precision, group_size, n, k, out, config, residual,
                                    shortcut, target_programs(x.device)))
    return out


def plane_launches(x: torch.Tensor, plane_hi: torch.Tensor, plane_mid: Optional[torch.Tensor],
                   plane_lo: Optional[torch.Tensor], scales: torch.Tensor,
                   zeros: Optional[torch.Tensor], bias: Optional[torch.Tensor], precision: int,
                   group_size: int, n: int, k: int, out: torch.Tensor,
                   config: Optional[MatmulConfig], residual: Optional[torch.Tensor],
                   shortcut: Optional[torch.Tensor], target_programs: int,
                   interpreted: bool = INTERPRETED) -> List[KernelLaunch]:
    """The launches of a validated :func:`matryoshka_matmul_triton` call (M >= 1, out
    allocated; arguments as there): the decode kernel (and the split-K reduce when there are
    several K slices) for M <= 16, the prefill kernel above. ``interpreted`` picks the
    interpreter's configs and bf16 upcast (default: how the kernels were loaded) or a GPU's
    (False: what the ahead-of-time compiler compiles)."""
    M = x.shape[0]
    # Planes the precision does not read go to the kernel as None (stride 0).
    reads = PLANES_READ[precision]
    mid = plane_mid if "plane_mid" in reads else None
    lo = plane_lo if "plane_lo" in reads else None
    plane_args = (plane_hi, plane_hi.stride(0), mid, 0 if mid is None else mid.stride(0),
                  lo, 0 if lo is None else lo.stride(0))
    kp = plane_hi.shape[1] * 32 // PLANE_BITS["plane_hi"]
    effective_group = kp if group_size == -1 else group_size
    # All of the used K in group 0 (per-channel weights, or k <= group size): GROUP_SIZE = 0.
    kernel_group = 0 if k <= effective_group else effective_group
    dot_fp32 = interpreted and x.dtype == torch.bfloat16   # the interpreter's bf16 dot is wrong
    flags = dict(PRECISION=int(precision), GROUP_SIZE=kernel_group, HAS_ZEROS=zeros is not None,
                 HAS_BIAS=bias is not None, HAS_SHORTCUT=residual is not None, DOT_FP32=dot_fp32,
                 DOT_PRECISION="ieee" if (x.dtype == torch.float32 or dot_fp32) else "tf32")
    scale_args = (scales, scales.stride(0), x if zeros is None else zeros,
                  0 if zeros is None else zeros.stride(0))
    # (bias, stride, residual, 2 strides, shortcut, 2 strides, R); absent tensors are replaced
    # by x, never dereferenced (HAS_BIAS / HAS_SHORTCUT are off)
    epilogue_args = ((x, 0) if bias is None else (bias, bias.stride(0))) + (
        (x, 0, 0, x, 0, 0, 0) if residual is None else
        (residual, residual.stride(0), residual.stride(1), shortcut, shortcut.stride(0),
         shortcut.stride(1), residual.shape[1]))

    # The path follows M (decode for M <= 16); a given config replaces the tile sizes only.
    path, cfg = select_plane_config(M, precision, x.dtype, interpreted)
    if config is not None:
        cfg = config
    if path == "prefill":
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
        return [KernelLaunch(
            _plane_prefill_kernel, grid,
            (x, x.stride(0), *plane_args, *scale_args, *epilogue_args, out, out.stride(0),
             M, n, k),
            dict(**flags, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                 BLOCK_R=cfg.block_r, GROUP_M=cfg.group_m, num_warps=cfg.num_warps,
                 num_stages=cfg.num_stages))]
    # decode: (N tiles, K slices), then the split-K reduce when there are several slices (it
    # adds the epilogue and writes out)
    n_tiles = triton.cdiv(n, cfg.block_n)
    split_k, k_per_split = split_k_slices(k, cfg.block_k, n_tiles, cfg.split_k,
                                          target_programs)
    part = (torch.empty((split_k, M, n), dtype=torch.float32, device=x.device)
            if split_k > 1 else out)
    launches = [KernelLaunch(
        _plane_decode_kernel, (n_tiles, split_k),
        (x, x.stride(0), *plane_args, *scale_args, *epilogue_args, out, out.stride(0), part,
         M, n, k, k_per_split),
        dict(**flags, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
             BLOCK_R=cfg.block_r, WRITE_PARTIAL=split_k > 1, num_warps=cfg.num_warps,
             num_stages=cfg.num_stages))]
    if split_k > 1:
        launches.append(split_k_reduce_launch(
            part, split_k, epilogue_args, out, M, n, cfg.block_m, cfg.block_r,
            flags["HAS_BIAS"], flags["HAS_SHORTCUT"], flags["DOT_FP32"],
            flags["DOT_PRECISION"]))
    return launches


__all__ = ["matryoshka_matmul_triton", "plane_launches", "select_plane_config"]
