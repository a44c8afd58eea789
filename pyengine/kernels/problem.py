"""The validated description of one matmul call, as the Triton launchers consume it, and the
launch configuration. Plain Python (no triton import): pyengine.kernels.matmul builds these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch


@dataclass(frozen=True)
class MatmulConfig:
    """Tile sizes and launch parameters of one path.

    block_m: rows of x per program (1 selects the GEMV form of the decode path).
    block_n: output features per program. block_k: codes of K per step (power of two >= 32).
    split_k: decode path only: K slices run by separate programs (0: chosen from the grid size).
    group_m: prefill path only: row tiles that walk the weight tiles together (L2 reuse).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    split_k: int = 0
    group_m: int = 8
    block_r: int = 32


@dataclass
class MatmulProblem:
    """out[M, N] = x[M, :K] @ W[:N, :K]^T (+ bias[:N]) (+ residual[M, :R] @ shortcut[:R, :N]).

    ``weight`` is the packed int32 qweight (bits 2/3/4/8) or the dense weight (bits 0); tensors
    that are absent are replaced by ``x`` (never dereferenced: the HAS_* flags are off).
    ``group_size`` is the effective group size, or 0 when all of K lies in group 0.
    """

    x: torch.Tensor
    out: torch.Tensor
    M: int
    N: int
    K: int
    weight: torch.Tensor
    bits: int
    group_size: int
    scales: torch.Tensor
    zeros: torch.Tensor
    has_zeros: bool
    bias: torch.Tensor
    has_bias: bool
    residual: torch.Tensor
    shortcut: torch.Tensor
    R: int
    has_shortcut: bool
    dot_fp32: bool          # upcast dot operands to fp32 (bf16 under the interpreter)
    dot_precision: str      # "ieee" for fp32 operands, "tf32" (ignored) for 16-bit ones

    def weight_args(self):
        """(w_ptr, stride_wn, s_ptr, stride_sn, z_ptr, stride_zn) in kernel argument order."""
        return (self.weight, self.weight.stride(0), self.scales, self.scales.stride(0),
                self.zeros, self.zeros.stride(0))

    def epilogue_args(self):
        """(bias, stride_b, residual, stride_rm, stride_rr, shortcut, stride_sr, stride_sc, R)."""
        return (self.bias, self.bias.stride(0), self.residual, self.residual.stride(0),
                self.residual.stride(-1), self.shortcut, self.shortcut.stride(0),
                self.shortcut.stride(-1), self.R)

    def flags(self):
        """Compile-time flags shared by the kernels, as keyword arguments."""
        return dict(BITS=self.bits, GROUP_SIZE=self.group_size, HAS_ZEROS=self.has_zeros,
                    HAS_BIAS=self.has_bias, HAS_SHORTCUT=self.has_shortcut,
                    DOT_FP32=self.dot_fp32, DOT_PRECISION=self.dot_precision)


@dataclass(frozen=True)
class KernelLaunch:
    """One planned Triton launch: ``kernel[grid](*args, **kwargs)``.

    The launchers plan their launches as a list of these and then run them, so that the
    ahead-of-time compiler (pyengine/kernels/aot.py) can compile exactly what a call would launch
    (same kernel, arguments, constexprs and options) without a GPU.

    kernel: a ``@triton.jit`` function. grid: the launch grid (1 to 3 ints).
    args: positional arguments (tensors, ints, None). kwargs: constexpr arguments and launch
    options (``num_warps``, ``num_stages``).
    """

    kernel: Any
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The kernel's function name (e.g. ``_decode_kernel``)."""
        return self.kernel.fn.__name__

    def run(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)


def run_launches(launches) -> None:
    """Runs planned launches in order."""
    for launch in launches:
        launch.run()


def describe(op: str, M: int, N: int, K: int, bits: int, group_size: int) -> str:
    """The call as error messages name it."""
    w = "dense weight" if bits == 0 else f"bits={bits}, group_size={group_size}"
    return f"{op}(M={M}, N={N}, K={K}, {w})"


def dummy_for(x: torch.Tensor, t: Optional[torch.Tensor]) -> torch.Tensor:
    return x if t is None else t
