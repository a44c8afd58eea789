"""The pure-PyTorch reference backend: fp32 math on dequantized weights.

It is the oracle of every test, the fallback on any device, and the benchmark baseline. It is
written for clarity, not speed: it dequantizes the weight on every call.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..matryoshka.weight import dequantize_planes
from ..format.qweight import dequantize_packed
from .base import Backend, LinearCase, Operand, PackedOperand, PlaneOperand


def reference_weight(weight: Operand, n: int, k: int) -> torch.Tensor:
    """W[:n, :k] in fp32 (dequantized when packed or planar)."""
    if isinstance(weight, PackedOperand):
        return dequantize_packed(weight.qweight, weight.scales, weight.zeros, weight.bits,
                                 weight.group_size, n, k)
    if isinstance(weight, PlaneOperand):
        planes = {"plane_hi": weight.plane_hi, "plane_mid": weight.plane_mid,
                  "plane_lo": weight.plane_lo}
        return dequantize_planes(planes, weight.scales, weight.zeros, weight.precision,
                                 weight.group_size, n, k)
    return weight[:n, :k].to(torch.float32)


def reference_matmul(x: torch.Tensor, weight: Operand, n: int, k: int,
                     bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                     shortcut: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 result [M, n] of x[:, :k] @ W[:n, :k]^T (+ bias[:n]) (+ residual @ shortcut)."""
    y = x[:, :k].to(torch.float32) @ reference_weight(weight, n, k).T
    if bias is not None:
        y = y + bias[:n].to(torch.float32)
    if residual is not None:
        y = y + residual.to(torch.float32) @ shortcut.to(torch.float32)
    return y


class TorchBackend(Backend):
    name = "torch"

    def unavailable_reason(self) -> Optional[str]:
        return None

    def unsupported_reason(self, case: LinearCase) -> Optional[str]:
        return None

    def priority(self, case: LinearCase) -> float:
        return 0.0

    def matmul(self, x, weight, n, k, bias, residual, shortcut, out=None, act_bits=0):
        y = reference_matmul(x, weight, n, k, bias, residual, shortcut)
        if out is None:
            return y.to(x.dtype)
        return out.copy_(y)
