"""The online Walsh-Hadamard transform, ``torch.ops.pyengine.hadamard_transform``.

    y[..., c*b:(c+1)*b] = H_b @ x[..., c*b:(c+1)*b] / sqrt(b)     for every block c

H_b is the Sylvester Hadamard matrix of order b (a power of two; H[i][j] = (-1)^popcount(i & j)),
so the transform is orthonormal, symmetric and its own inverse. A rotated model applies it to an
activation no weight can absorb (the MLP's inner activation, after the nonlinearity: see
pyengine.quant.rotation); the weight that reads the activation holds the same transform of
its columns, so the product is unchanged while outlier channels are spread over the block.

Backends (``backend=``, or $PYENGINE_BACKEND when it names one of these; otherwise the
device's default):

* ``cpu``: C++ (csrc/cpu/decode_ops.cpp: fp32 fast transform per row, rows over threads), the
  default for CPU tensors when pyengine._C is built;
* ``triton``: pyengine/kernels/hadamard.py, the default for CUDA tensors (blocks up to
  kernels.hadamard.MAX_BLOCK); CPU tensors under the Triton interpreter when asked for;
* ``torch``: log2(b) vectorised butterfly stages in fp32, any device; the fallback.

Every backend computes in fp32 and rounds once to x's dtype. :func:`reference_hadamard` (a dense
float64 matrix product) is the oracle of the tests. Gradients: the transform is symmetric, so
x's gradient is the transform of the output's gradient.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from .checks import ACTIVATION_DTYPES

Tensor = torch.Tensor
BACKENDS = ("cpu", "triton", "torch")
_OP = "hadamard_transform"


class HadamardBackendError(RuntimeError):
    """A requested backend cannot run the transform here."""


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def hadamard_block_for(n: int, limit: Optional[int] = None) -> int:
    """The largest power of two that divides ``n`` (at most ``limit`` when given): the block of a
    block-diagonal transform of ``n`` features."""
    block = n & -n
    if limit is not None:
        block = min(block, 1 << (int(limit).bit_length() - 1))
    return block


def hadamard_matrix(b: int, dtype: torch.dtype = torch.float64,
                    device: "torch.device | str | None" = None) -> Tensor:
    """H_b [b, b] (entries +-1, Sylvester order), b a power of two."""
    if not is_power_of_two(b):
        raise ValueError(f"hadamard_matrix: b must be a power of two, got {b}")
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def reference_hadamard(x: Tensor, block_size: Optional[int] = None) -> Tensor:
    """The oracle: x [..., n] times the block-diagonal H_b / sqrt(b) in float64, rounded to
    x's dtype."""
    n = x.shape[-1]
    b = n if block_size is None else int(block_size)
    h = hadamard_matrix(b, device=x.device) / b ** 0.5
    blocks = x.to(torch.float64).reshape(*x.shape[:-1], n // b, b)
    return (blocks @ h).reshape(x.shape).to(x.dtype)


# ---- validation -------------------------------------------------------------------------------

def _check(x: object, block_size: Optional[int], out: Optional[Tensor]) -> int:
    """The block size of a valid call; TypeError / ValueError naming the problem otherwise."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{_OP}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{_OP}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{_OP}: x must have at least one feature on its last dimension, got "
                         f"shape {tuple(x.shape)}")
    n = x.shape[-1]
    if block_size is None:
        block = n
        if not is_power_of_two(n):
            raise ValueError(f"{_OP}: x has {n} features, not a power of two; give a "
                             f"block_size that divides it (e.g. {hadamard_block_for(n)})")
    else:
        if isinstance(block_size, bool) or not isinstance(block_size, int):
            raise TypeError(f"{_OP}: block_size must be an int, got {type(block_size).__name__}")
        block = block_size
        if not is_power_of_two(block) or n % block:
            raise ValueError(f"{_OP}: block_size must be a power of two dividing the {n} "
                             f"features of x, got {block}")
    if out is not None:
        if not isinstance(out, Tensor):
            raise TypeError(f"{_OP}: out must be a torch.Tensor, got {type(out).__name__}")
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(f"{_OP}: out must be a {x.dtype} tensor of shape "
                             f"{tuple(x.shape)} on {x.device}, got {out.dtype} "
                             f"{tuple(out.shape)} on {out.device}")
        if not out.is_contiguous():
            raise ValueError(f"{_OP}: out must be contiguous")
    return block


# ---- backends -----------------------------------------------------------------------------------

def _native():
    from .._ext import extension_with
    return extension_with("hadamard_cpu")


@functools.lru_cache(maxsize=None)
def _triton_kernels():
    from ..backends.triton import TritonBackend
    if TritonBackend().unavailable_reason() is not None:
        return None
    from ..kernels import hadamard
    return hadamard


def _unavailable(backend: str, x: Tensor, block: int) -> Optional[str]:
    """Why ``backend`` cannot run this call, or None."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if x.device.type != "cpu":
            return f"it runs CPU tensors, x is on {x.device}"
        return None if _native() is not None else "pyengine._C is not built"
    if backend == "triton":
        kernels = _triton_kernels()
        if kernels is None:
            from ..backends.triton import TritonBackend
            return TritonBackend().unavailable_reason()
        if block > kernels.MAX_BLOCK:
            return f"its kernel holds blocks of at most {kernels.MAX_BLOCK} elements"
        interpreted = kernels.triton.knobs.runtime.interpret
        if x.device.type == "cpu" and not interpreted:
            return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
        if x.device.type == "cuda" and interpreted:
            return "the kernel was loaded for the interpreter (TRITON_INTERPRET=1)"
        if x.device.type not in ("cpu", "cuda"):
            return f"it runs CUDA tensors, got {x.device}"
        return None
    return f"unknown backend; the transform runs on {', '.join(BACKENDS)}"


def _choose(x: Tensor, block: int, backend: Optional[str]) -> str:
    if backend is None:
        env = os.environ.get("PYENGINE_BACKEND") or None
        backend = env if env in BACKENDS else None
    if backend is not None:
        why = _unavailable(backend, x, block)
        if why is not None:
            raise HadamardBackendError(f"{_OP}: backend {backend!r} cannot run this call: {why}")
        return backend
    default = "cpu" if x.device.type == "cpu" else "triton" if x.device.type == "cuda" else ""
    if default and _unavailable(default, x, block) is None:
        return default
    return "torch"


def butterfly_transform(x2: Tensor, block: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The transform of x2 [rows, n] computed in ``dtype`` (returned in it): log2(block) butterfly
    stages over every block at once (the torch backend; float64 for weights)."""
    rows, n = x2.shape
    v = x2.to(dtype).reshape(rows, n // block, block)
    h = 1
    while h < block:
        pairs = v.view(rows, n // block, block // (2 * h), 2, h)
        lo, hi = pairs[:, :, :, 0], pairs[:, :, :, 1]
        v = torch.stack((lo + hi, lo - hi), dim=3).view(rows, n // block, block)
        h *= 2
    return (v * block ** -0.5).view(rows, n)


def _run(x: Tensor, block: int, backend: str, out: Optional[Tensor]) -> Tensor:
    """The transform of a validated call on ``backend``."""
    n = x.shape[-1]
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out2 = out.view(-1, n)
    if x2.shape[0] == 0:
        return out
    if backend == "cpu":
        from .._ext import DTYPE_CODES
        _native().hadamard_cpu(x2.data_ptr(), x2.stride(0), out2.data_ptr(), out2.stride(0),
                               DTYPE_CODES[x.dtype], x2.shape[0], n, block,
                               torch.get_num_threads())
    elif backend == "triton":
        _triton_kernels().hadamard_triton(x2, out2, block)
    else:
        out2.copy_(butterfly_transform(x2, block))
    return out


# ---- the custom op ------------------------------------------------------------------------------

@torch.library.custom_op("pyengine::hadamard_transform", mutates_args=())
def _hadamard_op(x: Tensor, block_size: int, backend: Optional[str] = None) -> Tensor:
    return _run(x, block_size, _choose(x, block_size, backend), None)


@_hadamard_op.register_fake
def _(x, block_size, backend=None):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.block_size, ctx.backend = inputs[1], inputs[2]


def _backward(ctx, grad):
    # the transform is symmetric: d(T x) / dx applied to g is T^T g = T g
    return _hadamard_op(grad.contiguous(), ctx.block_size, ctx.backend), None, None


_hadamard_op.register_autograd(_backward, setup_context=_setup_context)


def hadamard_transform(x: Tensor, block_size: Optional[int] = None, *,
                       out: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """The orthonormal Walsh-Hadamard transform of each block of ``block_size`` consecutive
    features of ``x`` (see the module docstring).

    Args:
        x: [..., n] float32, float16 or bfloat16, any strides.
        block_size: a power of two dividing n; None: the whole last dimension (n must be a
            power of two).
        out: a contiguous tensor like x to write into (not with autograd).
        backend: "cpu", "triton" or "torch"; None: $PYENGINE_BACKEND when it names one of
            them, else C++ for CPU tensors, Triton for CUDA tensors, torch where neither runs.
    Returns:
        [..., n] in x's dtype (``out`` when given).
    Raises:
        TypeError / ValueError: bad arguments; HadamardBackendError: the named backend cannot
        run the call.
    """
    block = _check(x, block_size, out)
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    if needs_grad or torch.compiler.is_compiling():
        if out is not None:
            raise ValueError(f"{_OP}: out= is not supported with autograd or under "
                             f"torch.compile")
        return _hadamard_op(x, block, backend)
    return _run(x, block, _choose(x, block, backend), out)
