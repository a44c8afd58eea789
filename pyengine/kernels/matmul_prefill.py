"""Prefill path (M > 16): out[M, N] = x @ W^T (+ bias) (+ residual @ shortcut), tiled tl.dot.

Each program computes one [BLOCK_M, BLOCK_N] output tile: it walks K in BLOCK_K steps, loads the
x tile, dequantizes the weight tile to fp32 (tiles.weight_tile), rounds it to the activation
dtype and accumulates x @ W^T with tl.dot in fp32. The fused epilogue adds the bias and the
shortcut product (residual @ shortcut, its own small tl.dot loop over R) and writes the output
once. Programs are ordered in groups of GROUP_M row tiles that sweep the same weight column
tiles one after the other, so a dequantized weight tile's packed bytes are reused from L2.
"""

from __future__ import annotations

from typing import List

import triton
import triton.language as tl

from .problem import KernelLaunch, MatmulConfig, MatmulProblem
from .tiles import dot_loop, finish_tile, grouped_tile


@triton.jit
def _prefill_kernel(
    x_ptr, stride_xm,
    w_ptr, stride_wn, s_ptr, stride_sn, z_ptr, stride_zn,
    bias_ptr, stride_b, res_ptr, stride_rm, stride_rr, sc_ptr, stride_sr, stride_sc, R,
    out_ptr, stride_om,
    M, N, K,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SHORTCUT: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    offs_m, offs_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = dot_loop(x_ptr, stride_xm, offs_m, M, w_ptr, stride_wn, s_ptr, stride_sn, z_ptr,
                   stride_zn, offs_n, N, 0, K, K, BITS, GROUP_SIZE, HAS_ZEROS, DOT_FP32,
                   DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    finish_tile(acc, offs_m, offs_n, M, N, bias_ptr, stride_b, res_ptr, stride_rm, stride_rr,
                sc_ptr, stride_sr, stride_sc, R, out_ptr, stride_om, HAS_BIAS, HAS_SHORTCUT,
                BLOCK_M, BLOCK_R, DOT_FP32, DOT_PRECISION)


def prefill_launches(p: MatmulProblem, cfg: MatmulConfig) -> List[KernelLaunch]:
    """The launch of the prefill path for p: one program per [BLOCK_M, BLOCK_N] output tile."""
    if cfg.block_m < 16:
        raise ValueError(f"prefill path: block_m={cfg.block_m} must be >= 16 (tl.dot)")
    grid = (triton.cdiv(p.M, cfg.block_m) * triton.cdiv(p.N, cfg.block_n),)
    return [KernelLaunch(
        _prefill_kernel, grid,
        (p.x, p.x.stride(0), *p.weight_args(), *p.epilogue_args(), p.out, p.out.stride(0),
         p.M, p.N, p.K),
        dict(**p.flags(), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
             BLOCK_R=cfg.block_r, GROUP_M=cfg.group_m, num_warps=cfg.num_warps,
             num_stages=cfg.num_stages))]
