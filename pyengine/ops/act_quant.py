"""Int8 activations (``act_bits=8``): the reference of what a layer with dynamic int8 activation
quantization computes.

Before the matmul, each row of x is quantized to int8 per block of ``ACT_BLOCK`` consecutive
elements along K (the last block zero-padded): symmetric, ``d = max|x| / 127`` in fp32,
``q = round(x / d)`` with ties to even (0 where the block is all zeros), and x is replaced by
``x^ = d * q``. The layer's output is ``x^ @ W^T`` (+ bias): every backend computes that product,
the CPU kernels with integer dot products (csrc/cpu/act8_kernels.cpp), the others on x^.
"""

from __future__ import annotations

import torch

ACT_BLOCK = 32          # activation elements per int8 scale (csrc/common.h: kActBlock)
ACT_BITS = (0, 8)       # 0: activations as they are


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x^ = d * q for x [..., K] (any float dtype): fp32 of x's shape."""
    k = x.shape[-1]
    pad = (-k) % ACT_BLOCK
    x32 = x.to(torch.float32)
    if pad:
        x32 = torch.nn.functional.pad(x32, (0, pad))
    blocks = x32.reshape(*x32.shape[:-1], -1, ACT_BLOCK)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127.0
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.where(d > 0, torch.round(blocks / safe), torch.zeros_like(blocks))
    xhat = (q.clamp(-127, 127) * d).reshape(x32.shape)
    return xhat[..., :k] if pad else xhat


def check_act_bits(act_bits: object, where: str = "act_bits") -> int:
    """act_bits as an int; ValueError unless it is 0 (none) or 8."""
    if isinstance(act_bits, bool) or not isinstance(act_bits, int) or act_bits not in ACT_BITS:
        raise ValueError(f"{where} must be 0 (activations as they are) or 8 (int8 per block of "
                         f"{ACT_BLOCK}), got {act_bits!r}")
    return int(act_bits)
