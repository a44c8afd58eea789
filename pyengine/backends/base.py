"""The backend interface and the problem description backends are selected on.

A backend computes, for 2-D activations x[M, K'] (last dimension contiguous):

    out[M, N] = x[:, :K] @ W[:N, :K]^T (+ bias[:N]) (+ residual[M, R] @ shortcut[R, N])

where W is either a quantized weight in the canonical format (given as its tensors) or a dense
weight, and N, K may be smaller than the stored weight (sliced_matmul). Backends write into a
caller-provided output when one is given (tests poison it to catch unwritten elements).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class MatmulCase:
    """What a backend needs to know to say whether (and how well) it serves a call."""

    op: str                     # "dequant_matmul", "sliced_matmul" or "shortcut_matmul"
    device_type: str            # "cpu", "cuda", ...
    dtype: torch.dtype          # activation dtype
    bits: int                   # 2, 3, 4, 8, or 0 for a dense weight
    group_size: int             # as stored (-1 per channel); 0 for dense
    M: int
    N: int
    K: int
    has_shortcut: bool = False

    def describe(self) -> str:
        w = "dense" if self.bits == 0 else f"bits={self.bits}, group_size={self.group_size}"
        return (f"{self.op}(M={self.M}, N={self.N}, K={self.K}, {w}, {self.dtype}, "
                f"device={self.device_type})")


@dataclass
class QuantTensors:
    """The tensors and layout of a canonical quantized weight, as the ops pass them around."""

    qweight: torch.Tensor            # int32 [N_stored, words]
    scales: torch.Tensor             # [N_stored, G]
    zeros: Optional[torch.Tensor]    # [N_stored, G] or None (symmetric)
    bits: int
    group_size: int                  # effective codes per scale (padded row length if per channel)


class Backend:
    """Base class of backends. Subclasses set ``name`` and implement the three methods below."""

    name: str = ""

    def unavailable_reason(self) -> Optional[str]:
        """None when this backend can run in this process, else why not (one line)."""
        raise NotImplementedError

    def unsupported_reason(self, case: MatmulCase) -> Optional[str]:
        """None when this backend serves ``case``, else why not (one line)."""
        raise NotImplementedError

    def priority(self, case: MatmulCase) -> float:
        """Higher wins when ``backend=None``; only asked for cases the backend supports."""
        return 0.0

    def matmul(self, x: torch.Tensor, weight: "QuantTensors | torch.Tensor", n: int, k: int,
               bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
               shortcut: Optional[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """out[M, n] = x[:, :k] @ W[:n, :k]^T (+ bias[:n]) (+ residual @ shortcut).

        Args:
            x: [M, >=k] activations (fp32/fp16/bf16), stride(-1) == 1.
            weight: QuantTensors, or a dense [>=n, >=k] tensor with stride(-1) == 1.
            bias: [>=n] or None. residual: [M, R] or None. shortcut: [R, n] or None.
            out: [M, n] in x's dtype, contiguous, to write into (allocated when None).
        Returns:
            out.
        """
        raise NotImplementedError
