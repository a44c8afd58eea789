"""The Triton kernel of pyengine.ops.hadamard_transform: the orthonormal Walsh-Hadamard
transform of each block of ``block`` consecutive elements along the last dimension.

    out[r, c*b:(c+1)*b] = H_b @ x[r, c*b:(c+1)*b] / sqrt(b)

One program per (row, block). The block is held in registers as fp32 and transformed in
log2(b) identical stages of the constant-geometry form of the fast transform: a stage reads the
block as pairs (v[2i], v[2i+1]) and writes their sums to the first half and their differences
to the second half, v'[i] = v[2i] + v[2i+1], v'[b/2 + i] = v[2i] - v[2i+1]. After log2(b)
stages v is H_b v with H_b in Sylvester order (H[i][j] = (-1)^popcount(i & j)); every stage
has the same shape, so the loop unrolls into reshapes the compiler keeps in registers.
"""

from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from .problem import KernelLaunch, run_launches

# The largest block the kernel holds in one program (fp32 in registers: 64 per thread with 8
# warps at 16384); larger blocks run on the torch path of the op.
MAX_BLOCK = 16384


@triton.jit
def _hadamard_kernel(x_ptr, out_ptr, stride_x, stride_out, scale,
                     BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + row * stride_x + offsets).to(tl.float32)
    for _ in tl.static_range(LOG_BLOCK):
        even, odd = tl.split(tl.reshape(v, (BLOCK // 2, 2)))       # v[2i], v[2i + 1]
        # [BLOCK / 2, 2] -> [2, BLOCK / 2]: the sums first, then the differences
        v = tl.reshape(tl.trans(tl.join(even + odd, even - odd)), (BLOCK,))
    tl.store(out_ptr + row * stride_out + offsets, (v * scale).to(out_ptr.dtype.element_ty))


def hadamard_launches(x: torch.Tensor, out: torch.Tensor, block: int) -> List[KernelLaunch]:
    """The launch of :func:`hadamard_triton` (nothing runs): x, out [rows, n], stride(-1) == 1,
    n a multiple of ``block`` (a power of two <= MAX_BLOCK)."""
    rows, n = x.shape
    log_block = block.bit_length() - 1
    warps = 1 if block <= 256 else 4 if block <= 2048 else 8
    return [KernelLaunch(_hadamard_kernel, (rows, n // block),
                         (x, out, x.stride(0), out.stride(0), float(block) ** -0.5),
                         dict(BLOCK=block, LOG_BLOCK=log_block, num_warps=warps))]


def hadamard_triton(x: torch.Tensor, out: torch.Tensor, block: int) -> torch.Tensor:
    """out[r, :] = the blocks of x[r, :] transformed (x, out [rows, n], one dtype, validated by
    the op); returns out."""
    if x.shape[0] and x.shape[1]:
        run_launches(hadamard_launches(x, out, block))
    return out
