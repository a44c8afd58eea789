"""Decode path (small M, 1..16): out[M, N] = x @ W^T (+ bias) (+ residual @ shortcut), split-K.

Every weight byte is read once per call: a program owns BLOCK_N output rows and one K slice and
covers all M rows of x in one tile, so the weight is streamed exactly once while the few
activation rows stay in cache. Grid: (cdiv(N, BLOCK_N), split_k).

* M == 1 (BLOCK_M = 1): GEMV form on the CUDA cores. Packed words are loaded as contiguous runs
  along K ([BLOCK_N, words]) and unpacked with compile-time shifts (_gemv_step); scales and
  zeros are applied once per segment (word or 3-bit block), not per code:
      sum_k x_k (q_k - z) s = s * (sum_k x_k q_k - z * sum_k x_k)   over a segment of one group.
* 2 <= M <= 16 (BLOCK_M = 16): the dequantized tile goes through tl.dot with the x tile.

With several K slices (split_k > 1) each program writes its fp32 partial sum to a workspace
[split_k, M, N] and a second small kernel adds the slices, the bias and the shortcut product
and writes the output (still exactly one write). With one slice the decode kernel does that.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import triton
import triton.language as tl

from .problem import KernelLaunch, MatmulConfig, MatmulProblem
from .tiles import (block_code, codes_to_float, dense_tile, dot_loop, finish_split, finish_tile,
                    group_params, load_words, split_k_program)


@triton.jit
def _word_codes(w, BITS: tl.constexpr):
    """The 32 / BITS codes of every word of w (uint32 [..., W]) in K order: [..., W, 32 / BITS],
    code j of a word (bits [j * BITS, (j + 1) * BITS)) at index j.

    Built with tl.join, whose new axis is the last one and stays in one thread: joining the
    codes of even j with those of odd j puts bit 0 of j on the last axis; the halves are built
    the same way one level down (bit 1 of j), and so on. No code leaves the thread that loaded
    its word."""
    M: tl.constexpr = (1 << BITS) - 1
    if BITS == 8:       # j = 2 a1 + a0
        c = tl.join(tl.join(w & M, (w >> 16) & M), tl.join((w >> 8) & M, w >> 24))
    elif BITS == 4:     # j = 4 a2 + 2 a1 + a0
        even = tl.join(tl.join(w & M, (w >> 16) & M), tl.join((w >> 8) & M, (w >> 24) & M))
        odd = tl.join(tl.join((w >> 4) & M, (w >> 20) & M), tl.join((w >> 12) & M, w >> 28))
        c = tl.join(even, odd)
    else:               # BITS == 2: j = 8 a3 + 4 a2 + 2 a1 + a0
        e0 = tl.join(tl.join(w & M, (w >> 16) & M), tl.join((w >> 8) & M, (w >> 24) & M))
        e1 = tl.join(tl.join((w >> 4) & M, (w >> 20) & M), tl.join((w >> 12) & M, (w >> 28) & M))
        o0 = tl.join(tl.join((w >> 2) & M, (w >> 18) & M), tl.join((w >> 10) & M, (w >> 26) & M))
        o1 = tl.join(tl.join((w >> 6) & M, (w >> 22) & M), tl.join((w >> 14) & M, w >> 30))
        c = tl.join(tl.join(e0, e1), tl.join(o0, o1))
    return tl.reshape(c, w.shape + [32 // BITS])


@triton.jit
def _gemv_step(x_ptr, w_ptr, stride_wn, s_ptr, stride_sn, z_ptr, stride_zn, offs_n, N, k0, K,
               BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial sums over k in [k0, k0 + BLOCK_K) of x[0, k] * W[offs_n, k], per segment: fp32
    [BLOCK_N, SEGS] (the caller adds them up over K and reduces over segments once, after its
    loop). Dense weights: SEGS = 1.

    Quantized weights stay [BLOCK_N, SEGS] words (a segment: one word for 2/4/8 bits, one
    three-word block of 32 codes for 3 bits); a segment lies in one group, so its scale and zero
    apply once:  sum_j x_j (q_j - z) s = s (sum_j x_j q_j - z sum_j x_j).
    2/4/8 bits: the codes of each word are spread in K order over a third axis in the thread
    that loaded the word (_word_codes) and meet x loaded as one contiguous [SEGS, SEG_LEN] tile.
    3 bits: a compile-time loop over the 32 codes of a block (constant shifts and word choice).
    """
    if BITS == 0:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        w = dense_tile(w_ptr, stride_wn, offs_n, N, k0, K, BLOCK_K).to(tl.float32)
        return tl.sum(w * xv[None, :], axis=1, keep_dims=True)
    else:
        if BITS == 3:
            SEGS: tl.constexpr = BLOCK_K // 32
            seg_k0 = k0 + tl.arange(0, SEGS) * 32
            word0 = (seg_k0 // 32) * 3
            w0 = load_words(w_ptr, stride_wn, offs_n, N, word0, seg_k0, K)
            w1 = load_words(w_ptr, stride_wn, offs_n, N, word0 + 1, seg_k0, K)
            w2 = load_words(w_ptr, stride_wn, offs_n, N, word0 + 2, seg_k0, K)
            xq = tl.zeros((BLOCK_N, SEGS), dtype=tl.float32)     # sum_j x * q per segment
            x_sum = tl.zeros((SEGS,), dtype=tl.float32)           # sum_j x per segment
            for j in tl.static_range(32):
                # code j: bits [3j, 3j + 3) of w0 | w1 << 32 | w2 << 64 (docs/FORMAT.md),
                # with compile-time shifts and word choice (codes 10 and 21 straddle words).
                # block_code takes J as a constexpr argument: the constants it derives are
                # fresh per call, never reassigned inside this static_range loop.
                code = block_code(w0, w1, w2, j, 3)
                xj = tl.load(x_ptr + seg_k0 + j, mask=seg_k0 + j < K, other=0.0).to(tl.float32)
                xq += codes_to_float(code) * xj[None, :]
                x_sum += xj
        else:
            SEG_LEN: tl.constexpr = 32 // BITS
            SEGS: tl.constexpr = BLOCK_K // SEG_LEN
            word = k0 // SEG_LEN + tl.arange(0, SEGS)
            seg_k0 = word * SEG_LEN
            w0 = load_words(w_ptr, stride_wn, offs_n, N, word, seg_k0, K)
            # x[seg_k0[a] + j] at [a, j]: one contiguous run of BLOCK_K activations
            offs_k = seg_k0[:, None] + tl.arange(0, SEG_LEN)[None, :]
            x3 = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            codes = codes_to_float(_word_codes(w0, BITS))             # [BLOCK_N, SEGS, SEG_LEN]
            xq = tl.sum(codes * x3[None, :, :], axis=2)
            x_sum = tl.sum(x3, axis=1)
        scale, zero = group_params(s_ptr, stride_sn, z_ptr, stride_zn, offs_n, N, k0, seg_k0, K,
                                   BITS, GROUP_SIZE, HAS_ZEROS, BLOCK_K)
        return scale * (xq - zero * x_sum[None, :])


@triton.jit
def _decode_kernel(
    x_ptr, stride_xm,
    w_ptr, stride_wn, s_ptr, stride_sn, z_ptr, stride_zn,
    bias_ptr, stride_b, res_ptr, stride_rm, stride_rr, sc_ptr, stride_sr, stride_sc, R,
    out_ptr, stride_om, part_ptr,
    M, N, K, K_PER_SPLIT,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SHORTCUT: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr,
):
    pid_k, offs_n, k_begin, k_end = split_k_program(K, K_PER_SPLIT, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    if BLOCK_M == 1:
        # per-segment partial sums ([BLOCK_N, segments per step], see _gemv_step), reduced
        # over segments once after the loop
        if BITS == 0:
            part = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
        elif BITS == 3:
            part = tl.zeros((BLOCK_N, BLOCK_K // 32), dtype=tl.float32)
        else:
            part = tl.zeros((BLOCK_N, BLOCK_K * BITS // 32), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            part += _gemv_step(x_ptr, w_ptr, stride_wn, s_ptr, stride_sn, z_ptr, stride_zn,
                               offs_n, N, k0, K, BITS, GROUP_SIZE, HAS_ZEROS, BLOCK_N, BLOCK_K)
        acc = tl.sum(part, axis=1)[None, :]
    else:
        acc = dot_loop(x_ptr, stride_xm, offs_m, M, w_ptr, stride_wn, s_ptr, stride_sn, z_ptr,
                       stride_zn, offs_n, N, k_begin, k_end, K, BITS, GROUP_SIZE, HAS_ZEROS,
                       DOT_FP32, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    finish_split(acc, pid_k, offs_m, offs_n, M, N, part_ptr, bias_ptr, stride_b, res_ptr,
                 stride_rm, stride_rr, sc_ptr, stride_sr, stride_sc, R, out_ptr, stride_om,
                 HAS_BIAS, HAS_SHORTCUT, BLOCK_M, BLOCK_R, DOT_FP32, DOT_PRECISION, WRITE_PARTIAL)


@triton.jit
def split_k_reduce_kernel(
    part_ptr, split_k,
    bias_ptr, stride_b, res_ptr, stride_rm, stride_rr, sc_ptr, stride_sr, stride_sc, R,
    out_ptr, stride_om, M, N,
    HAS_BIAS: tl.constexpr, HAS_SHORTCUT: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out = sum over the split_k slices of the workspace, + bias + residual @ shortcut."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = part_ptr + offs_m[:, None] * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, split_k):
        acc += tl.load(ptrs + s * M * N, mask=mask, other=0.0)
    finish_tile(acc, offs_m, offs_n, M, N, bias_ptr, stride_b, res_ptr, stride_rm, stride_rr,
                sc_ptr, stride_sr, stride_sc, R, out_ptr, stride_om, HAS_BIAS, HAS_SHORTCUT,
                BLOCK_M, BLOCK_R, DOT_FP32, DOT_PRECISION)


def split_k_reduce_launch(part: torch.Tensor, split_k: int, epilogue_args: tuple,
                          out: torch.Tensor, M: int, N: int, block_m: int, block_r: int,
                          has_bias: bool, has_shortcut: bool, dot_fp32: bool,
                          dot_precision: str) -> KernelLaunch:
    """The launch of out = the sum of the split_k fp32 partial results in part ([split_k, M, N],
    contiguous) + bias + residual @ shortcut (epilogue_args: bias, stride, residual, 2 strides,
    shortcut, 2 strides, R, as MatmulProblem.epilogue_args gives them)."""
    reduce_n = 128 if block_m == 1 else 64
    return KernelLaunch(
        split_k_reduce_kernel, (triton.cdiv(N, reduce_n),),
        (part, split_k, *epilogue_args, out, out.stride(0), M, N),
        dict(HAS_BIAS=has_bias, HAS_SHORTCUT=has_shortcut, DOT_FP32=dot_fp32,
             DOT_PRECISION=dot_precision, BLOCK_M=block_m, BLOCK_N=reduce_n, BLOCK_R=block_r,
             num_warps=4))


def split_k_slices(K: int, block_k: int, n_tiles: int, split_k: int, target_programs: int,
                   max_split: int = 16) -> Tuple[int, int]:
    """(slices, codes per slice): enough K slices that n_tiles * slices reaches about
    target_programs (when split_k is 0), each a whole number of BLOCK_K steps, none empty."""
    k_steps = triton.cdiv(K, block_k)
    if split_k <= 0:
        split_k = min(max_split, triton.cdiv(target_programs, n_tiles))
    split_k = max(1, min(split_k, k_steps))
    steps_per_slice = triton.cdiv(k_steps, split_k)
    split_k = triton.cdiv(k_steps, steps_per_slice)
    return split_k, steps_per_slice * block_k


def decode_launches(p: MatmulProblem, cfg: MatmulConfig,
                    target_programs: int) -> List[KernelLaunch]:
    """The launches of the decode path for p (M <= 16): the decode kernel over (N tiles, K
    slices), then the split-K reduce when there are several slices (its fp32 workspace is
    allocated here, on p's device)."""
    if p.M > 16 or cfg.block_m not in (1, 16) or (cfg.block_m == 1 and p.M != 1):
        raise ValueError(f"decode path: M={p.M} does not fit block_m={cfg.block_m}")
    n_tiles = triton.cdiv(p.N, cfg.block_n)
    split_k, k_per_split = split_k_slices(p.K, cfg.block_k, n_tiles, cfg.split_k,
                                          target_programs)
    part = (torch.empty((split_k, p.M, p.N), dtype=torch.float32, device=p.x.device)
            if split_k > 1 else p.out)
    flags = p.flags()
    launches = [KernelLaunch(
        _decode_kernel, (n_tiles, split_k),
        (p.x, p.x.stride(0), *p.weight_args(), *p.epilogue_args(), p.out, p.out.stride(0), part,
         p.M, p.N, p.K, k_per_split),
        dict(**flags, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
             BLOCK_R=cfg.block_r, WRITE_PARTIAL=split_k > 1, num_warps=cfg.num_warps,
             num_stages=cfg.num_stages))]
    if split_k > 1:
        launches.append(split_k_reduce_launch(
            part, split_k, p.epilogue_args(), p.out, p.M, p.N, cfg.block_m, cfg.block_r,
            flags["HAS_BIAS"], flags["HAS_SHORTCUT"], flags["DOT_FP32"], flags["DOT_PRECISION"]))
    return launches
