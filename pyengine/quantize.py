"""Weight quantization into the canonical format: round-to-nearest with a clipping search.

RTN picks, per group, the clipping range that minimises the squared reconstruction error of
that group: the group's range [min, max] (asymmetric) or [-absmax, absmax] (symmetric) is
shrunk by each factor of a grid, and the factor with the smallest error wins. Scales are rounded
to their storage dtype *before* the codes are chosen, so the stored weight is the one evaluated.
"""

from __future__ import annotations

from typing import Optional

import torch

from .packing import SUPPORTED_BITS, pack_codes
from .qweight import SCALE_DTYPES, SUPPORTED_GROUP_SIZES, QuantizedWeight, padded_in_features
from .utils import is_int

QUANT_METHODS = ("rtn",)

# Elements of the weight processed at once by the clip search (bounds temporary memory).
_CHUNK_ELEMENTS = 1 << 20


def quantize(weight: torch.Tensor, bits: int, group_size: int = 128, symmetric: bool = False,
             method: str = "rtn", *, scale_dtype: Optional[torch.dtype] = None,
             clip_search: bool = True, clip_grid: int = 24, min_clip: float = 0.4) -> QuantizedWeight:
    """Quantizes a linear weight.

    Args:
        weight: float tensor [N, K] (N output channels, K inputs), any N, K >= 1, finite.
        bits: 2, 3, 4 or 8.
        group_size: 32, 64, 128, or -1 for one scale per output channel.
        symmetric: zero point fixed at 2^(bits-1) (no zeros stored) instead of a per-group one.
        method: "rtn" (round to nearest with clipping search). Calibration-based methods
            (GPTQ) run through the model-level API, which has the calibration inputs.
        scale_dtype: dtype of scales and zeros; default: the weight's dtype when it is fp32,
            fp16 or bf16, else fp32.
        clip_search: search a clipping range per group (default) instead of plain min-max.
        clip_grid: number of clipping factors tried, evenly spaced from 1 down to ``min_clip``.
        min_clip: smallest clipping factor tried.

    Returns:
        The :class:`QuantizedWeight` on the weight's device.

    Raises:
        ValueError: on unsupported bits / group size / method (an integer is required: 4.0 is
            refused), a weight that is not 2-D, empty, not floating point, on the meta device or
            not finite.
    """
    _check_arguments(weight, bits, group_size, method, clip_grid, min_clip)
    if scale_dtype is None:
        scale_dtype = weight.dtype if weight.dtype in SCALE_DTYPES else torch.float32
    elif scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype}")

    n, k = weight.shape
    kp = padded_in_features(k, group_size)
    gs = kp if group_size == -1 else group_size
    n_groups = kp // gs
    factors = (torch.linspace(1.0, min_clip, clip_grid).tolist() if clip_search else [1.0])

    packed = torch.empty(n, kp * bits // 32, dtype=torch.int32, device=weight.device)
    scales = torch.empty(n, n_groups, dtype=scale_dtype, device=weight.device)
    zeros = None if symmetric else torch.empty(n, n_groups, dtype=scale_dtype, device=weight.device)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // kp)
    for r0 in range(0, n, rows_per_chunk):  # rows in chunks: temporary memory stays small
        r1 = min(n, r0 + rows_per_chunk)
        w = torch.zeros(r1 - r0, kp, dtype=torch.float32, device=weight.device)
        w[:, :k] = weight[r0:r1].to(torch.float32)
        q, s, z = _rtn_groups(w.view(r1 - r0, n_groups, gs), k, bits, symmetric, scale_dtype, factors)
        codes = q.view(r1 - r0, kp)
        codes[:, k:] = 0  # padding codes are stored as 0 (docs/FORMAT.md)
        packed[r0:r1] = pack_codes(codes, bits)
        scales[r0:r1] = s
        if zeros is not None:
            zeros[r0:r1] = z
    return QuantizedWeight(packed, scales, zeros, bits=bits, group_size=group_size, shape=(n, k),
                           method=method)


def _check_arguments(weight, bits, group_size, method, clip_grid, min_clip) -> None:
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape "
                         f"{tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"weight is empty (shape {tuple(weight.shape)})")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    if weight.device.type == "meta":
        raise ValueError(f"weight {tuple(weight.shape)} is on the meta device (it has no values "
                         f"yet): load or initialise it before quantizing")
    # `4.0 in (2, 3, 4, 8)` is True in Python, so the type is checked as well as the value
    if not is_int(bits) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be an integer among {SUPPORTED_BITS}, got {bits!r}")
    if not is_int(group_size) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be an integer among {SUPPORTED_GROUP_SIZES}, got "
                         f"{group_size!r}")
    if method not in QUANT_METHODS:
        raise ValueError(f"method must be one of {QUANT_METHODS} for a single weight, got "
                         f"{method!r} (GPTQ needs calibration inputs: use the model-level API)")
    if not is_int(clip_grid) or clip_grid < 1 or not 0.0 < min_clip <= 1.0:
        raise ValueError(f"clip_grid must be >= 1 and min_clip in (0, 1], got {clip_grid}, {min_clip}")
    _check_finite(weight)


def _check_finite(weight: torch.Tensor) -> None:
    """ValueError when ``weight`` holds NaN or Inf (checked by rows in chunks: isfinite of a
    whole 16-bit matrix would take 6 bytes per element)."""
    rows = max(1, _CHUNK_ELEMENTS // max(1, weight.shape[-1]))
    bad = sum(int((~torch.isfinite(weight[r:r + rows])).sum())
              for r in range(0, weight.shape[0], rows))
    if bad:
        raise ValueError(f"weight has {bad} non-finite values (NaN or Inf); cannot quantize")


def _rtn_groups(w: torch.Tensor, k: int, bits: int, symmetric: bool, scale_dtype: torch.dtype,
                factors, column_weights: Optional[torch.Tensor] = None) -> tuple:
    """RTN with clip search on grouped weights: each group takes the clipping factor (1.0, no
    clipping, among them) with the smallest squared rounding error, each column's error weighed
    by ``column_weights`` (what an error in that input costs the layer's output; None: 1).

    Args:
        w: fp32 [R, G, gs], zero-padded past column k of the flattened row.
        column_weights: fp32 broadcastable to [R, G, gs] (e.g. [1, G, gs]), >= 0, or None.
    Returns:
        codes uint8 [R, G, gs], scales [R, G] and zeros [R, G] (None if symmetric) in scale_dtype.
    """
    r, g, gs = w.shape
    maxq = (1 << bits) - 1
    valid = (torch.arange(g * gs, device=w.device) < k).view(1, g, gs)
    tiny = torch.finfo(scale_dtype).tiny
    if symmetric:
        absmax = torch.where(valid, w.abs(), 0.0).amax(dim=-1)
        lo_full, hi_full = -absmax, absmax
    else:
        # The range always contains 0, so the zero point is an integer in [0, maxq].
        lo_full = torch.where(valid, w, float("inf")).amin(dim=-1).clamp(max=0.0)
        hi_full = torch.where(valid, w, float("-inf")).amax(dim=-1).clamp(min=0.0)

    best_err = torch.full((r, g), float("inf"), device=w.device)
    best_scale = torch.ones(r, g, device=w.device)
    best_zero = torch.zeros(r, g, device=w.device)
    work = torch.empty_like(w)
    for p in factors:
        scale, zero = _scale_zero(lo_full * p, hi_full * p, maxq, symmetric, scale_dtype, tiny)
        scale3, zero3 = scale.unsqueeze(-1), zero.unsqueeze(-1)
        # err = (clamp(round(w / s) + z, 0, maxq) - z) * s - w, in place in one buffer. The
        # padding (w = 0 past column k) contributes exactly 0: round(0) + z is the integer z
        # in [0, maxq], so the clamp keeps it and (z - z) * s - 0 = 0.
        torch.div(w, scale3, out=work)
        work.round_().add_(zero3).clamp_(0, maxq).sub_(zero3).mul_(scale3).sub_(w)
        work.square_()
        if column_weights is not None:
            work.mul_(column_weights)
        err = work.sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    q = torch.clamp(torch.round(w / best_scale.unsqueeze(-1)) + best_zero.unsqueeze(-1), 0, maxq)
    zeros = None if symmetric else best_zero.to(scale_dtype)
    return q.to(torch.uint8), best_scale.to(scale_dtype), zeros


def _scale_zero(lo, hi, maxq, symmetric, scale_dtype, tiny):
    """Scale (rounded to its storage dtype, never below its smallest normal) and zero point."""
    if symmetric:
        # Codes q - 2^(bits-1) span [-2^(bits-1), 2^(bits-1) - 1]: map +-absmax to
        # +-(2^(bits-1) - 1) so that both signs reach the clipping range.
        mid = (maxq + 1) // 2
        scale = (hi / (mid - 1)).clamp(min=tiny).to(scale_dtype).to(torch.float32)
        zero = torch.full_like(scale, float(mid))
    else:
        scale = ((hi - lo) / maxq).clamp(min=tiny).to(scale_dtype).to(torch.float32)
        zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero
