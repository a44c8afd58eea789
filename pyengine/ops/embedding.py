"""Quantized embedding lookup: the rows of a packed table for a batch of token ids.

    out[..., :] = dequant(W)[ids[...], :]

The table is a :class:`~pyengine.QuantizedWeight` [V, D] in the canonical format (the very
tensors a tied output head multiplies with, docs/FORMAT.md). The lookup gathers the packed words,
scales and zeros of the rows it needs and dequantizes only those rows (fp32 math, one rounding to
the output dtype), with plain torch operations: it runs on every device and traces under
``torch.compile``. :func:`reference_qembedding` (the whole table dequantized, then indexed) is
its oracle.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..format.packing import BLOCK_CODES, padded_length, unpack_codes
from ..format.qweight import QuantizedWeight
from .checks import ACTIVATION_DTYPES

Tensor = torch.Tensor


def _check(op: str, ids: object, weight: object, dtype: Optional[torch.dtype]) -> torch.dtype:
    if not isinstance(weight, QuantizedWeight):
        raise TypeError(f"{op}: weight must be a pyengine.QuantizedWeight [V, D], got "
                        f"{type(weight).__name__}")
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{op}: ids must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{op}: ids must be an integer tensor, got {ids.dtype}")
    if ids.device != weight.device:
        raise ValueError(f"{op}: ids are on {ids.device} but the table is on {weight.device}")
    dtype = weight.dtype if dtype is None else dtype
    if dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{op}: dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype


def _check_range(op: str, ids: Tensor, vocab: int) -> None:
    """Token ids must lie in [0, V) (a data-dependent check: skipped while tracing)."""
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise IndexError(f"{op}: token id {bad} is outside the table's {vocab} rows")


def qembedding(ids: Tensor, weight: QuantizedWeight, *, dtype: Optional[torch.dtype] = None,
               out: Optional[Tensor] = None) -> Tensor:
    """Rows ``ids`` of the quantized table ``weight``, dequantized.

    Args:
        ids: integer tensor of any shape [...] with values in [0, V), on the table's device.
        weight: QuantizedWeight [V, D] (any bits and group size).
        dtype: float32, float16 or bfloat16; default the table's scale dtype.
        out: a contiguous tensor [..., D] of ``dtype`` to write into, or None.
    Returns:
        [..., D] in ``dtype`` (``out`` when given).
    Raises:
        TypeError / ValueError: a bad table, ids, dtype or out; IndexError: an id outside [0, V).
    """
    op = "qembedding"
    dtype = _check(op, ids, weight, dtype)
    v, d = (int(s) for s in weight.shape)
    if out is not None:
        want = tuple(ids.shape) + (d,)
        if (not isinstance(out, torch.Tensor) or tuple(out.shape) != want or out.dtype != dtype
                or not out.is_contiguous() or out.device != ids.device):
            raise ValueError(f"{op}: out must be a contiguous {dtype} tensor of shape {want} on "
                             f"{ids.device}")
    _check_range(op, ids, v)
    flat = ids.reshape(-1).to(torch.int64)
    words = padded_length(d, BLOCK_CODES) * weight.bits // 32
    codes = unpack_codes(weight.qweight.index_select(0, flat)[:, :words], weight.bits, d)
    group_of_k = torch.arange(d, device=ids.device) // weight.effective_group_size
    scales = weight.scales.index_select(0, flat).to(torch.float32)[:, group_of_k]
    if weight.zeros is None:
        zeros: "Tensor | float" = float(1 << (weight.bits - 1))
    else:
        zeros = weight.zeros.index_select(0, flat).to(torch.float32)[:, group_of_k]
    rows = ((codes.to(torch.float32) - zeros) * scales).view(*ids.shape, d)
    if out is None:
        return rows.to(dtype)
    return out.copy_(rows)


def reference_qembedding(ids: Tensor, weight: QuantizedWeight,
                         dtype: Optional[torch.dtype] = None) -> Tensor:
    """The oracle of :func:`qembedding`: the whole table dequantized (fp32), then indexed.
    ids [...] -> [..., D] in ``dtype`` (default the scale dtype)."""
    table = weight.dequantize(torch.float32)
    return table[ids.to(torch.int64)].to(dtype or weight.dtype)


__all__ = ["qembedding", "reference_qembedding"]
