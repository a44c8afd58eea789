"""Helpers shared by the tests: tolerances, error measures, poisoned outputs, backends."""

from __future__ import annotations

import functools
import itertools
import math
import subprocess
import sys
import textwrap
from typing import Callable, List, Optional, Tuple

import pytest
import torch

import pyengine
from pyengine.backends import Backend, CpuBackend, get_backend, reference_matmul
from pyengine.backends import PackedOperand

# Relative Frobenius error allowed against the fp32 reference (docs/DESIGN.md).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, -1)
# Every (bits, group size, activation dtype) of a packed weight, and test ids for them.
QUANT_CASES = list(itertools.product(BITS, GROUP_SIZES, DTYPES))
QUANT_CASE_IDS = [f"b{b}-g{g}-{str(d)[6:]}" for b, g, d in QUANT_CASES]


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


def into_poisoned(call: Callable[[torch.Tensor], torch.Tensor], shape, dtype, device,
                  what: str) -> torch.Tensor:
    """Runs ``call(out)`` with ``out`` a NaN-filled buffer (:func:`poisoned`), checks that the
    result is ``out`` itself (written into the given output) and returns ``out``."""
    out = poisoned(shape, dtype, device)
    got = call(out)
    assert got.data_ptr() == out.data_ptr(), f"{what}: result not written into the given output"
    return out


def check_against_reference(call: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                            weight, n: int, k: int, dtype: torch.dtype, what: str, bias=None,
                            residual=None, shortcut=None) -> None:
    """``call(out)`` (a matmul of x and weight's block [:n, :k] with these epilogue terms)
    into a NaN-poisoned [M, n] output, against the fp32 reference_matmul of the same operands
    within dtype's tolerance."""
    out = into_poisoned(call, (x.shape[0], n), dtype, x.device, what)
    ref = reference_matmul(x, weight, n, k, bias, residual, shortcut)
    assert_matches(out.float(), ref, dtype, what)


def poison_groups_outside(scales: torch.Tensor, zeros: Optional[torch.Tensor], n: int, k: int,
                          group_size: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Copies of scales and zeros (None stays None) that are NaN in rows >= n and in the
    groups (of group_size codes, the effective size) past the ones covering [:k]: a kernel
    reading them for the block [:n, :k] produces NaN."""
    used_groups = -(-k // group_size)
    poisoned_copies = []
    for t in (scales, zeros):
        if t is not None:
            t = t.clone()
            t[n:] = float("nan")
            t[:, used_groups:] = float("nan")
        poisoned_copies.append(t)
    return poisoned_copies[0], poisoned_copies[1]


# ---- subprocesses ----------------------------------------------------------------------------

# Python code that makes `import pyengine._C` fail in the process that runs it (first).
BLOCK_EXTENSION = """\
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "pyengine._C":
            raise ImportError("pyengine._C blocked by the test")
        return None

sys.meta_path.insert(0, Block())
"""


def run_python(code: str, without_extension: bool = False) -> str:
    """The stdout of ``python -c code`` (code dedented) in a fresh process, which must exit
    with status 0; ``without_extension``: pyengine._C cannot be imported there
    (BLOCK_EXTENSION runs first)."""
    code = textwrap.dedent(code)
    if without_extension:
        code = BLOCK_EXTENSION + code
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


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


def randn(rng: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32,
          device="cpu", scale: float = 1.0) -> torch.Tensor:
    """Fresh normal values (times ``scale``) drawn from ``rng`` on the CPU, then moved."""
    return (torch.randn(*shape, generator=rng) * scale).to(device=device, dtype=dtype)


def shortcut_inputs(rng: torch.Generator, m: int, n: int, k: int, r: int, dtype: torch.dtype,
                    device) -> Tuple[torch.Tensor, ...]:
    """(x [m, k], residual [m, r], shortcut [r, n] (scaled by 0.1), bias [n]) for a call with
    the fused shortcut product, fresh from ``rng``."""
    return (randn(rng, m, k, dtype=dtype, device=device),
            randn(rng, m, r, dtype=dtype, device=device),
            randn(rng, r, n, dtype=dtype, device=device, scale=0.1),
            randn(rng, n, dtype=dtype, device=device))


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

# Tests of the CUDA kernels' bindings, whose argument checks run before any CUDA call.
needs_cuda_build = pytest.mark.skipif(not pyengine.build_info().get("cuda_kernels"),
                                      reason="pyengine._C has no CUDA kernels")


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


def weight_cases(shapes) -> Tuple[list, list]:
    """(cases, ids) for ``parametrize("shape,bits,group_size,symmetric", ...)``: every shape
    index of ``shapes`` x BITS x GROUP_SIZES x symmetry."""
    cases = [(s, b, g, sym) for s in range(len(shapes)) for b in BITS for g in GROUP_SIZES
             for sym in (False, True)]
    ids = [f"{shapes[s][0]}x{shapes[s][1]}-b{b}-g{g}-{'sym' if sym else 'asym'}"
           for s, b, g, sym in cases]
    return cases, ids


def unaligned_x(rng: torch.Generator, m: int, k: int, dtype: torch.dtype = torch.float16,
                device="cuda") -> torch.Tensor:
    """Fresh x [m, k] (row stride k + 1) whose data does not start at a 16-byte aligned
    address, so kernels cannot take their vector-load paths."""
    xb = randn(rng, m, k + 1, dtype=dtype, device=device)
    x = xb[:, 1:]
    assert x.data_ptr() % 16 != 0
    return x


def check_sliced_blocks(check: Callable, rng: torch.Generator, bits: int, group_size: int,
                        ms, dtypes, seed: int) -> None:
    """A CUDA kernel on blocks [out_dims, in_dims] of a stored [300, 1100] weight (asymmetric,
    fp16 scales; cuda_weight with ``seed``), x's rows padded past in_dims (an odd row stride
    rules out 16-byte activation loads), a bias: one M of ``ms`` per block, every dtype of
    ``dtypes``; ``check(x, qt, w_ref, n, k, what, bias)`` runs and checks the kernel."""
    n, k = 300, 1100
    qt, w_ref = cuda_weight(n, k, bits, group_size, False, torch.float16, seed)
    blocks = ((257, 640, 0), (300, 1000, 3), (33, 200, 8), (129, 1024, 1))  # out, in, padding
    for m, (out_dims, in_dims, pad) in zip(ms, blocks):
        for dtype in dtypes:
            xw = randn(rng, m, in_dims + pad, dtype=dtype, device="cuda")
            bias = randn(rng, n, dtype=dtype, device="cuda")
            check(xw, qt, w_ref, out_dims, in_dims,
                  f"slice [{out_dims}, {in_dims}] of {bits}-bit [{n}, {k}] g={group_size} M={m} "
                  f"ldx={in_dims + pad} {dtype}", bias)


def check_shortcut(check: Callable, rng: torch.Generator, bits: int, dtype: torch.dtype, ms,
                   seed: int) -> None:
    """A CUDA kernel computing x @ W^T + bias + residual @ shortcut for a [576, 1536] weight
    (group 128, asymmetric, scales in dtype; cuda_weight with ``seed``), R = 384, at every M
    of ``ms``; ``check(x, qt, w_ref, n, k, what, bias, residual, shortcut)`` runs and checks
    the kernel."""
    n, k, r = 576, 1536, 384
    qt, w_ref = cuda_weight(n, k, bits, 128, False, dtype, seed)
    for m in ms:
        x, residual, shortcut, bias = shortcut_inputs(rng, m, n, k, r, dtype, "cuda")
        check(x, qt, w_ref, n, k, f"shortcut {bits}-bit M={m} {dtype}", bias, residual, shortcut)


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
    return into_poisoned(lambda out: backend.matmul(x, qt, n, k, bias, residual, shortcut,
                                                    out=out),
                         (x.shape[0], n), x.dtype, x.device, f"{backend.name} matmul")


def run_vllm_verify(python, checkpoint, out, *, served=None, dtype: str = "float32",
                    logprob_tol: float = 1e-3, compile: bool = False,
                    tensor_parallel_size: int = 1, vllm_only: bool = False,
                    check_weights: bool = False, **env_extra) -> dict:
    """Runs ``python -m pyengine.vllm.verify`` (32 steps) with vLLM's Python ``python`` on
    ``checkpoint`` (vLLM serving ``served`` when given), writing ``out``:
    {"returncode", "stderr", "result": the JSON it wrote or None}."""
    import json
    import os
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    cmd = [str(python), "-m", "pyengine.vllm.verify", str(checkpoint), "--max-tokens", "32",
           "--dtype", dtype, "--logprob-tol", str(logprob_tol),
           "--tensor-parallel-size", str(tensor_parallel_size), "--out", str(out)]
    cmd += (["--served", str(served)] if served is not None else [])
    cmd += (["--compile"] if compile else []) + (["--vllm-only"] if vllm_only else [])
    cmd += ["--check-weights"] if check_weights else []
    proc = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(root), **env_extra),
                          capture_output=True, text=True, timeout=1200, cwd=Path(out).parent)
    print(proc.stdout[-3000:])
    result = json.loads(Path(out).read_text()) if Path(out).exists() else None
    return {"returncode": proc.returncode, "stderr": proc.stderr, "result": result}

