"""Entry points of the Triton matmul kernels: validation, path and config selection, launch.

    out[M, n] = x[M, :k] @ W[:n, :k]^T (+ bias[:n]) (+ residual[M, R] @ shortcut[R, :n])

W is a canonical packed quantized weight (:func:`quant_matmul`, docs/FORMAT.md) or a dense
weight (:func:`dense_matmul`); only its top-left [n, k] block is read, in place (no copy).

Paths, chosen by M:

* M <= 16: decode (pyengine/kernels/matmul_decode.py): split-K, each weight byte read once; M == 1 runs
  the GEMV form on the CUDA cores, 2 <= M <= 16 a 16-row tl.dot.
* M > 16: prefill (pyengine/kernels/matmul_prefill.py): tiled tl.dot on dequantized tiles, tile sizes by
  M bucket (32, 64, 256, larger).

Configs are fixed tables (no autotuning, so no first-call stall); under the Triton interpreter
(TRITON_INTERPRET=1 when the kernels were imported) one small fixed config per path, which
still exercises several K steps, several N tiles and split-K on small test shapes.
"""

from __future__ import annotations

import contextlib
import functools
from typing import List, Optional, Tuple

import torch
import triton

from .matmul_decode import decode_launches
from .matmul_prefill import prefill_launches
from .problem import (KernelLaunch, MatmulConfig, MatmulProblem, describe, dummy_for,
                      run_launches)

# How the kernels of this package were decorated: True when TRITON_INTERPRET was on at import
# time, i.e. they run CPU tensors under the interpreter (and are not compiled for a GPU).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

DECODE_MAX_M = 16
SUPPORTED_BITS = (2, 3, 4, 8)
ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ---- configs ------------------------------------------------------------------------------------
# GPU, decode with M == 1: 16 rows per program and BLOCK_K chosen so a step reads 32 packed
# words (128 bytes) per row: wide, coalesced loads along K.
_GEMV_BLOCK_K = {8: 128, 4: 256, 3: 256, 2: 512, 0: 128}
# GPU, prefill: (M bucket upper bound, config); the first bucket that holds M wins.
_PREFILL = (
    (32, MatmulConfig(32, 64, 64, num_warps=4, num_stages=4)),
    (64, MatmulConfig(64, 64, 64, num_warps=4, num_stages=4)),
    (256, MatmulConfig(64, 128, 64, num_warps=4, num_stages=4)),
    (None, MatmulConfig(128, 128, 64, num_warps=8, num_stages=3)),
)
# Interpreter: one fixed small config per path.
_INTERP_GEMV = MatmulConfig(1, 16, 64)
_INTERP_DECODE_DOT = MatmulConfig(16, 16, 64)
_INTERP_PREFILL = MatmulConfig(32, 32, 64, group_m=2)
_INTERP_TARGET_PROGRAMS = 8


def m_bucket(M: int) -> int:
    """The M bucket configs are keyed on: 1, 16 (2..16), then 32, 64, 256, or 0 (larger)."""
    if M == 1:
        return 1
    if M <= DECODE_MAX_M:
        return 16
    for bound, _ in _PREFILL:
        if bound is not None and M <= bound:
            return bound
    return 0


def select_config(M: int, bits: int, dtype: torch.dtype,
                  interpreted: bool = INTERPRETED) -> Tuple[str, MatmulConfig]:
    """("decode" or "prefill", config) for M rows of ``dtype`` activations and a weight of
    ``bits`` (0: dense). ``interpreted``: the interpreter's small configs (the default when the
    kernels were loaded for the interpreter) or the GPU tables (False: what a GPU runs; the
    ahead-of-time compiler asks for these)."""
    if interpreted:
        if M == 1:
            return "decode", _INTERP_GEMV
        if M <= DECODE_MAX_M:
            return "decode", _INTERP_DECODE_DOT
        return "prefill", _INTERP_PREFILL
    if M == 1:
        return "decode", MatmulConfig(1, 16, _GEMV_BLOCK_K[bits], num_warps=4, num_stages=2)
    if M <= DECODE_MAX_M:
        return "decode", MatmulConfig(16, 32, 128 if dtype != torch.float32 else 32,
                                      num_warps=4, num_stages=3)
    bucket = m_bucket(M)
    cfg = next(c for bound, c in _PREFILL if bound == (bucket or None))
    if dtype == torch.float32:  # fp32 operands take twice the shared memory per stage
        cfg = MatmulConfig(cfg.block_m, cfg.block_n, 32, cfg.num_warps, cfg.num_stages)
    return "prefill", cfg


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """Programs the decode grid should reach (split-K fills up to it): 4 per SM on a GPU."""
    if device.type != "cuda" or INTERPRETED:
        return _INTERP_TARGET_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 4 * _sm_count(index)


# ---- validation ---------------------------------------------------------------------------------

class Checker:
    """Raises ValueError naming the call (M, N, K, bits, group size) and the offending tensor."""

    def __init__(self, x: torch.Tensor, n: int, k: int, bits: int, group_size: int):
        rows = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() == 2 else -1
        self.x, self.what = x, describe("triton matmul", rows, n, k, bits, group_size)

    def fail(self, msg: str) -> None:
        raise ValueError(f"{self.what}: {msg}")

    def tensor(self, name: str, t: torch.Tensor, dim: int, dtypes, unit_stride: bool = True):
        if not isinstance(t, torch.Tensor):
            self.fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dim:
            self.fail(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            self.fail(f"{name} has dtype {t.dtype}; expected one of {list(dtypes)}")
        if t.device != self.x.device:
            self.fail(f"{name} is on {t.device} but x is on {self.x.device}")
        if unit_stride and t.numel() and t.stride(-1) != 1:
            self.fail(f"{name} must have a contiguous last dimension, got strides {t.stride()}")


def check_common(c: Checker, x, n, k, bias, residual, shortcut, out) -> Tuple[int, torch.Tensor]:
    c.tensor("x", x, 2, ACTIVATION_DTYPES)
    M = x.shape[0]
    if n < 1 or k < 1 or x.shape[1] < k:
        c.fail(f"x has shape {tuple(x.shape)}; needs at least k={k} columns (and n, k >= 1)")
    dev = x.device
    if dev.type == "cpu" and not INTERPRETED:
        c.fail("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before "
               "pyengine.kernels is imported)")
    if dev.type not in ("cpu", "cuda"):
        c.fail(f"unsupported device {dev}")
    if bias is not None:
        c.tensor("bias", bias, 1, ACTIVATION_DTYPES, unit_stride=False)
        if bias.shape[0] < n:
            c.fail(f"bias has {bias.shape[0]} entries, fewer than n={n}")
    if (residual is None) != (shortcut is None):
        c.fail("residual and shortcut come together")
    if residual is not None:
        c.tensor("residual", residual, 2, ACTIVATION_DTYPES, unit_stride=False)
        c.tensor("shortcut", shortcut, 2, ACTIVATION_DTYPES, unit_stride=False)
        r = residual.shape[1]
        if residual.shape[0] != M or shortcut.shape[0] != r or shortcut.shape[1] < n:
            c.fail(f"residual {tuple(residual.shape)} @ shortcut {tuple(shortcut.shape)} does not "
                   f"give [M={M}, n={n}]")
        if residual.dtype != x.dtype or shortcut.dtype != x.dtype:
            c.fail(f"residual ({residual.dtype}) and shortcut ({shortcut.dtype}) must have x's "
                   f"dtype ({x.dtype})")
    if out is None:
        out = torch.empty((M, n), dtype=x.dtype, device=dev)
    else:
        c.tensor("out", out, 2, (x.dtype,))
        if tuple(out.shape) != (M, n):
            c.fail(f"out has shape {tuple(out.shape)}, expected {(M, n)}")
    return M, out


def _problem(x, out, M, n, k, weight, bits, group_size, scales, zeros, bias, residual, shortcut,
             interpreted: bool):
    dot_fp32 = interpreted and x.dtype == torch.bfloat16
    return MatmulProblem(
        x=x, out=out, M=M, N=n, K=k, weight=weight, bits=bits, group_size=group_size,
        scales=dummy_for(x, scales), zeros=dummy_for(x, zeros), has_zeros=zeros is not None,
        bias=dummy_for(x, bias), has_bias=bias is not None,
        residual=dummy_for(x, residual), shortcut=dummy_for(x, shortcut),
        R=0 if residual is None else residual.shape[1], has_shortcut=residual is not None,
        dot_fp32=dot_fp32,
        dot_precision="ieee" if (x.dtype == torch.float32 or dot_fp32) else "tf32")


def quant_problem(x, qweight, scales, zeros, bits: int, group_size: int, n: int, k: int,
                  bias, residual, shortcut, out: torch.Tensor,
                  interpreted: bool = INTERPRETED) -> MatmulProblem:
    """The problem of a validated :func:`quant_matmul` call (out allocated)."""
    # All of the used K in group 0 (per-channel weights, or k <= group_size): one scale per row.
    kernel_group_size = 0 if k <= group_size else group_size
    return _problem(x, out, x.shape[0], n, k, qweight, bits, kernel_group_size, scales, zeros,
                    bias, residual, shortcut, interpreted)


def dense_problem(x, weight, n: int, k: int, bias, residual, shortcut, out: torch.Tensor,
                  interpreted: bool = INTERPRETED) -> MatmulProblem:
    """The problem of a validated :func:`dense_matmul` call (out allocated)."""
    return _problem(x, out, x.shape[0], n, k, weight, 0, 0, None, None, bias, residual,
                    shortcut, interpreted)


def plan_launches(p: MatmulProblem, config: Optional[MatmulConfig], target_programs: int,
                  interpreted: bool = INTERPRETED) -> List[KernelLaunch]:
    """The launches that compute p (M >= 1): path and config from :func:`select_config` (or
    ``config``, which replaces the tile sizes), decode or prefill. ``target_programs``: the
    decode grid's goal (split-K fills up to it)."""
    path, cfg = select_config(p.M, p.bits, p.x.dtype, interpreted)
    if config is not None:
        cfg = config
    if path == "decode" and cfg.block_m == 1 and p.M != 1:
        raise ValueError(f"config {cfg} (GEMV) needs M == 1, got M={p.M}")
    if path == "decode":
        return decode_launches(p, cfg, target_programs)
    return prefill_launches(p, cfg)


def _run(p: MatmulProblem, config: Optional[MatmulConfig]) -> torch.Tensor:
    if p.M == 0:
        return p.out
    with torch.cuda.device(p.x.device) if p.x.device.type == "cuda" else contextlib.nullcontext():
        run_launches(plan_launches(p, config, target_programs(p.x.device)))
    return p.out


# ---- public entry points ------------------------------------------------------------------------

def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: Optional[torch.Tensor], bits: int, group_size: int, n: int, k: int,
                 bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                 shortcut: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                 config: Optional[MatmulConfig] = None) -> torch.Tensor:
    """out[M, n] = x[:, :k] @ dequant(W)[:n, :k]^T (+ bias[:n]) (+ residual @ shortcut[:, :n]).

    Args:
        x: [M, >=k] fp32/fp16/bf16, unit stride along K.
        qweight: int32 [N_stored >= n, words] in the canonical packing (docs/FORMAT.md), unit
            stride along K; row length words * 32 / bits >= k.
        scales, zeros: [N_stored, G] fp32/fp16/bf16 (zeros None: symmetric, zero 2^(bits-1)),
            unit stride along G, G >= ceil(k / group_size).
        bits: 2, 3, 4 or 8. group_size: the effective group size (a multiple of 32; the padded
            row length for per-channel weights).
        bias: [>=n] fp32/fp16/bf16 or None. residual: [M, R], shortcut: [R, >=n] (any strides).
        out: [M, n] in x's dtype with unit stride along n (allocated when None).
        config: overrides the tile configuration (tests, tuning).
    Returns:
        out, written exactly once per element.
    """
    c = Checker(x, n, k, bits, group_size)
    if bits not in SUPPORTED_BITS:
        c.fail(f"bits must be one of {SUPPORTED_BITS}")
    if group_size < 32 or group_size % 32:
        c.fail("the effective group size must be a positive multiple of 32")
    out = check_common(c, x, n, k, bias, residual, shortcut, out)[1]
    c.tensor("qweight", qweight, 2, (torch.int32,))
    if qweight.shape[0] < n or qweight.shape[1] % bits or qweight.shape[1] * 32 // bits < k:
        c.fail(f"qweight {tuple(qweight.shape)} does not hold [{n}, {k}] {bits}-bit codes in "
               f"whole 32-code blocks")
    c.tensor("scales", scales, 2, ACTIVATION_DTYPES)
    if scales.shape[0] < n or scales.shape[1] < triton.cdiv(k, group_size):
        c.fail(f"scales {tuple(scales.shape)} do not cover [{n}, {k}] in groups of {group_size}")
    if zeros is not None:
        c.tensor("zeros", zeros, 2, ACTIVATION_DTYPES)
        if zeros.shape[0] < n or zeros.shape[1] < triton.cdiv(k, group_size):
            c.fail(f"zeros {tuple(zeros.shape)} do not cover [{n}, {k}] in groups of {group_size}")
    p = quant_problem(x, qweight, scales, zeros, bits, group_size, n, k, bias, residual, shortcut,
                      out)
    return _run(p, config)


def dense_matmul(x: torch.Tensor, weight: torch.Tensor, n: int, k: int,
                 bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                 shortcut: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                 config: Optional[MatmulConfig] = None) -> torch.Tensor:
    """out[M, n] = x[:, :k] @ weight[:n, :k]^T (+ bias[:n]) (+ residual @ shortcut[:, :n]).

    Args:
        x: [M, >=k] fp32/fp16/bf16, unit stride along K.
        weight: dense [N_stored >= n, K_stored >= k] fp32/fp16/bf16 (rounded to x's dtype for
            the dot), unit stride along K; read in place through its row stride.
        bias, residual, shortcut, out, config: as in :func:`quant_matmul`.
    Returns:
        out.
    """
    c = Checker(x, n, k, 0, 0)
    out = check_common(c, x, n, k, bias, residual, shortcut, out)[1]
    c.tensor("weight", weight, 2, ACTIVATION_DTYPES)
    if weight.shape[0] < n or weight.shape[1] < k:
        c.fail(f"weight {tuple(weight.shape)} is smaller than [{n}, {k}]")
    p = dense_problem(x, weight, n, k, bias, residual, shortcut, out)
    return _run(p, config)
