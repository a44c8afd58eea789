"""Helpers shared by the tests: tolerances, error measures, poisoned outputs, backends."""

from __future__ import annotations

import functools
import math
from typing import List, Tuple

import torch

import pyengine
from pyengine.backends import Backend, CpuBackend, get_backend
from pyengine.backends import PackedOperand

# Relative Frobenius error allowed against the fp32 reference (docs/DESIGN.md).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, -1)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref||_F / ||ref||_F in fp64; inf when out has a NaN or Inf."""
    out64, ref64 = out.to(torch.float64), ref.to(torch.float64)
    if not bool(torch.isfinite(out64).all()):
        return math.inf
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / (denom if denom > 0 else 1.0)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3e} > {TOLERANCE[dtype]:.0e}"


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN: any element a kernel fails to write fails the check."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def native_backends(device: str) -> List[Tuple[str, Backend]]:
    """The compiled backends usable here for ``device``, with a label for test ids; on the CPU
    one entry per instruction-set build this CPU can run."""
    found: List[Tuple[str, Backend]] = []
    if device == "cpu" and get_backend("cpu").unavailable_reason() is None:
        for isa in pyengine.build_info().get("cpu_isas_usable", []):
            found.append((f"cpu-{isa}", CpuBackend(isa=isa)))
    for name in ("cuda", "triton"):
        if device == "cuda" and name in pyengine.known_backends():
            b = get_backend(name)
            if b.unavailable_reason() is None:
                found.append((name, b))
    return found


def packed_operand(qw: pyengine.QuantizedWeight) -> PackedOperand:
    return PackedOperand(qw.qweight, qw.scales, qw.zeros, qw.bits, qw.effective_group_size)


def plane_reference_matmul(x, plane_hi, plane_mid, plane_lo, scales, zeros, bias, precision,
                           group_size, n, k) -> torch.Tensor:
    """fp32 reference [M, n] = x[M, k] @ W_r[:n, :k]^T (+ bias) of a Matryoshka slice given by
    its planes (those the slice does not read may be None); group_size as stored (-1 per
    channel) or effective."""
    from pyengine.backends import PlaneOperand, reference_matmul
    if group_size == -1:
        group_size = plane_hi.shape[1] * 32 // 3
    operand = PlaneOperand(plane_hi, plane_mid, plane_lo, scales, zeros, precision, group_size)
    return reference_matmul(x, operand, n, k, bias)


def random_weight(n: int, k: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(n, k, generator=gen) * 0.05).to(dtype)


def random_parent(n: int, k: int, group_size: int, symmetric: bool, gen: torch.Generator,
                  scale_dtype: torch.dtype = torch.float32, device="cpu"):
    """A MatryoshkaWeight [n, k] on ``device`` with uniformly random parent codes (0 and 255
    included), positive scales and integer zero points (exact in every scale dtype)."""
    from pyengine import MatryoshkaWeight
    from pyengine.format.qweight import padded_in_features
    codes = torch.randint(0, 256, (n, k), generator=gen)
    codes[0, 0], codes[-1, -1] = 0, 255
    kp = padded_in_features(k, group_size)
    groups = 1 if group_size == -1 else kp // group_size
    scales = (torch.rand(n, groups, generator=gen) * 0.01 + 1e-3).to(scale_dtype)
    zeros = None
    if not symmetric:
        zeros = torch.randint(0, 256, (n, groups), generator=gen).to(scale_dtype).to(device)
    return MatryoshkaWeight.from_codes(codes.to(device), scales.to(device), zeros,
                                       group_size=group_size, shape=(n, k))


# ---- CUDA kernel tests ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def cuda_weight(n: int, k: int, bits: int, group_size: int, symmetric: bool,
                scale_dtype: torch.dtype, seed: int):
    """A quantized [n, k] weight on the GPU (PackedOperand) and its dequantized fp32 copy."""
    from pyengine.backends import reference_weight
    gen = torch.Generator().manual_seed(seed)
    w = random_weight(n, k, gen).to("cuda")
    qw = pyengine.quantize(w, bits, group_size, symmetric, scale_dtype=scale_dtype,
                           clip_search=False)
    qt = packed_operand(qw)
    return qt, reference_weight(qt, n, k)


def reference_product(x, w_ref, n, k, bias=None, residual=None, shortcut=None) -> torch.Tensor:
    """fp32 x[:, :k] @ w_ref[:n, :k]^T (+ bias[:n]) (+ residual @ shortcut)."""
    y = x[:, :k].to(torch.float32) @ w_ref[:n, :k].T
    if bias is not None:
        y = y + bias[:n].to(torch.float32)
    if residual is not None:
        y = y + residual.to(torch.float32) @ shortcut.to(torch.float32)
    return y


def run_poisoned(backend: Backend, x, qt, n, k, bias=None, residual=None, shortcut=None):
    """backend.matmul into a NaN-filled output, checking that the output given was written."""
    out = poisoned((x.shape[0], n), x.dtype, x.device)
    got = backend.matmul(x, qt, n, k, bias, residual, shortcut, out=out)
    assert got.data_ptr() == out.data_ptr(), "result not written into the given output"
    return out
