"""Weight quantization into the canonical format: round-to-nearest with a clipping search.

RTN picks, per group, the clipping range that minimises the squared reconstruction error of
that group: the group's range [min, max] (asymmetric) or [-absmax, absmax] (symmetric) is
shrunk by each factor of a grid, and the factor with the smallest error wins; a least-squares
refit of the scale and zero point for the chosen codes follows (kept where it lowers the
error). Zero points are not rounded to integers unless ``integer_zeros`` asks for it (the
stock formats pyengine exports to, GPTQ and compressed-tensors, store integer zero points).
Scales and zeros are rounded to their storage dtype *before* the codes are chosen, so the
stored weight is the one evaluated.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..format.packing import SUPPORTED_BITS, pack_codes
from ..format.qweight import (SCALE_DTYPES, SUPPORTED_GROUP_SIZES, QuantizedWeight,
                              padded_in_features)
from ..utils import is_int, keep_better
from .methods import check_number

QUANT_METHODS = ("rtn",)

# Elements of the weight processed at once by the clip search (bounds temporary memory).
_CHUNK_ELEMENTS = 1 << 20
# Elements of the clip search's temporary (clipping factors x group elements) at once.
_CLIP_BATCH_ELEMENTS = 1 << 18


def quantize(weight: torch.Tensor, bits: int, group_size: int = 128, symmetric: bool = False,
             method: str = "rtn", *, scale_dtype: Optional[torch.dtype] = None,
             clip_search: bool = True, clip_grid: int = 24, min_clip: float = 0.4,
             input_weights: Optional[torch.Tensor] = None,
             integer_zeros: bool = False) -> QuantizedWeight:
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
        clip_search: search a clipping range per group and refit its scale and zero by least
            squares (default) instead of plain min-max.
        clip_grid: number of clipping factors tried, evenly spaced from 1 down to ``min_clip``.
        min_clip: smallest clipping factor tried.
        input_weights: float [K], finite and >= 0: what an error in each input costs the
            layer's output, e.g. the mean square of each input over calibration activations
            (pyengine.compress passes that when it has calibration data). The clip search and
            the refit then minimise sum_k input_weights[k] * (w[n, k] - w_q[n, k])^2 per group
            instead of the plain squared error. None: every input weighs 1.
        integer_zeros: asymmetric zero points are integers in [0, 2^bits - 1] (what GPTQ and
            compressed-tensors checkpoints can hold: ``pyengine.export`` writes such a weight
            exactly); the default lets them take any value, which is more accurate.

    Returns:
        The :class:`QuantizedWeight` on the weight's device.

    Raises:
        ValueError: on unsupported bits / group size / method (an integer is required: 4.0 is
            refused), a weight that is not 2-D, empty, not floating point, on the meta device or
            not finite, or input_weights that are not [K], finite and >= 0.
    """
    _check_arguments(weight, bits, group_size, method, clip_grid, min_clip)
    _check_input_weights(input_weights, weight.shape[1])
    if scale_dtype is None:
        scale_dtype = weight.dtype if weight.dtype in SCALE_DTYPES else torch.float32
    elif scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype}")

    n, k = weight.shape
    kp = padded_in_features(k, group_size)
    gs = kp if group_size == -1 else group_size
    n_groups = kp // gs
    factors = (torch.linspace(1.0, min_clip, clip_grid).tolist() if clip_search else [1.0])
    column_weights = None
    if input_weights is not None:  # [1, G, gs], padding columns weigh 0
        column_weights = torch.zeros(kp, dtype=torch.float32, device=weight.device)
        column_weights[:k] = input_weights.to(device=weight.device, dtype=torch.float32)
        column_weights = column_weights.view(1, n_groups, gs)

    packed = torch.empty(n, kp * bits // 32, dtype=torch.int32, device=weight.device)
    scales = torch.empty(n, n_groups, dtype=scale_dtype, device=weight.device)
    zeros = None if symmetric else torch.empty(n, n_groups, dtype=scale_dtype, device=weight.device)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // kp)
    for r0 in range(0, n, rows_per_chunk):  # rows in chunks: temporary memory stays small
        r1 = min(n, r0 + rows_per_chunk)
        w = torch.zeros(r1 - r0, kp, dtype=torch.float32, device=weight.device)
        w[:, :k] = weight[r0:r1].to(torch.float32)
        q, s, z = _rtn_groups(w.view(r1 - r0, n_groups, gs), k, bits, symmetric, scale_dtype,
                              factors, column_weights,
                              refit_rounds=REFIT_ROUNDS if clip_search else 0,
                              integer_zeros=integer_zeros)
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
    # the same bounds as RTNOptions (pyengine.quant.methods), checked by the same function
    check_number("quantize", "clip_grid", clip_grid, 1, 10_000, integer=True, low_open=False)
    check_number("quantize", "min_clip", min_clip, 0.0, 1.0)
    _check_finite(weight)


def _check_input_weights(input_weights: Optional[torch.Tensor], k: int) -> None:
    if input_weights is None:
        return
    if not isinstance(input_weights, torch.Tensor) or tuple(input_weights.shape) != (k,):
        shape = (tuple(input_weights.shape) if isinstance(input_weights, torch.Tensor)
                 else type(input_weights).__name__)
        raise ValueError(f"input_weights must be a tensor of shape ({k},) (one weight per "
                         f"input), got {shape}")
    if not input_weights.is_floating_point():
        raise ValueError(f"input_weights must be floating point, got {input_weights.dtype}")
    if not bool(torch.isfinite(input_weights).all()) or bool((input_weights < 0).any()):
        raise ValueError("input_weights must be finite and >= 0")


def _check_finite(weight: torch.Tensor) -> None:
    """ValueError when ``weight`` holds NaN or Inf (checked by rows in chunks: isfinite of a
    whole 16-bit matrix would take 6 bytes per element)."""
    rows = max(1, _CHUNK_ELEMENTS // max(1, weight.shape[-1]))
    bad = sum(int((~torch.isfinite(weight[r:r + rows])).sum())
              for r in range(0, weight.shape[0], rows))
    if bad:
        raise ValueError(f"weight has {bad} non-finite values (NaN or Inf); cannot quantize")


# Least-squares refits of each group's scale and zero after the clip search (see _rtn_groups).
REFIT_ROUNDS = 2


def _rtn_groups(w: torch.Tensor, k: int, bits: int, symmetric: bool, scale_dtype: torch.dtype,
                factors, column_weights: Optional[torch.Tensor] = None,
                refit_rounds: int = REFIT_ROUNDS, integer_zeros: bool = False) -> tuple:
    """RTN with clip search on grouped weights, then a least-squares refit.

    1. Clip search: each group takes the clipping factor (1.0, no clipping, among them) with the
       smallest squared rounding error, each column's error weighed by ``column_weights`` (what
       an error in that input costs the layer's output; None: 1).
    2. Refit, ``refit_rounds`` times: with the group's codes q fixed, the scale s and zero z
       that minimise the weighed error sum_j c_j ((q_j - z) s - w_j)^2 are a weighed linear
       regression of w on q (slope s, intercept -z s; symmetric: the slope alone, z fixed);
       the codes are then re-rounded with them. A group keeps a refit only where it lowers
       its error, so the result is never worse than the clip search's.

    Zero points are not rounded to integers (docs/FORMAT.md: any finite value): an integer
    zero moves the grid by up to half a step, which at 2 bits clips a sixth of the range.
    ``integer_zeros`` rounds them anyway (into [0, 2^bits - 1]; the refit then fits the scale
    alone for the rounded zero). Scales and zeros are rounded to ``scale_dtype`` before the
    codes are chosen.

    Args:
        w: fp32 [R, G, gs], zero-padded past column k of the flattened row.
        column_weights: fp32 broadcastable to [R, G, gs] (e.g. [1, G, gs]), >= 0, or None.
    Returns:
        codes uint8 [R, G, gs] (padding columns: whatever rounding gives, callers store 0),
        scales [R, G] and zeros [R, G] (None if symmetric) in scale_dtype.
    """
    r, g, gs = w.shape
    maxq = (1 << bits) - 1
    valid = (torch.arange(g * gs, device=w.device) < k).view(1, g, gs)
    # each column's weight in the error; padding columns weigh nothing (their inputs are 0)
    cost = valid.to(torch.float32)
    if column_weights is not None:
        cost = cost * column_weights
    tiny = torch.finfo(scale_dtype).tiny
    if symmetric:
        absmax = torch.where(valid, w.abs(), 0.0).amax(dim=-1)
        lo_full, hi_full = -absmax, absmax
    else:
        # the range always contains 0: a group of one sign is clipped toward 0 (where its
        # small values are), and an all-zero group gets a positive scale
        lo_full = torch.where(valid, w, float("inf")).amin(dim=-1).clamp(max=0.0)
        hi_full = torch.where(valid, w, float("-inf")).amax(dim=-1).clamp(min=0.0)

    factors = list(factors)
    best_err = torch.full((r, g), float("inf"), device=w.device)
    best_scale = torch.ones(r, g, device=w.device)
    best_zero = torch.zeros(r, g, device=w.device)

    native = _native_clip_errors(w, cost)
    if native is not None:
        w = w.contiguous()
        native_cost = cost.expand(1, g, gs).reshape(g, gs).contiguous()

    def weighed_errors(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """sum_j c_j ((clamp(round(w_j / s + z), 0, maxq) - z) s - w_j)^2 per group, for
        candidates scale, zero [F, R, G]: [F, R, G] (NaN read as +inf). On the CPU in
        pyengine._C (one pass over w for every candidate), else as torch calls."""
        if native is not None:
            err = torch.empty(scale.shape, dtype=torch.float32)
            scale, zero = scale.contiguous(), zero.contiguous()
            native.clip_errors_cpu(w.data_ptr(), native_cost.data_ptr(), scale.data_ptr(),
                                   zero.data_ptr(), err.data_ptr(), scale.shape[0], r, g, gs,
                                   maxq, torch.get_num_threads())
        else:
            scale4, zero4 = scale.unsqueeze(-1), zero.unsqueeze(-1)
            work = torch.div(w, scale4)
            work.add_(zero4).round_().clamp_(0, maxq).sub_(zero4).mul_(scale4).sub_(w)
            err = work.square_().mul_(cost).sum(dim=-1)
        return err.nan_to_num_(nan=float("inf"))

    def consider(scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Keeps, per group, the first candidate (of scale, zero [F, R, G]) whose error is
        lower than the best so far: the same choice as trying them one by one."""
        nonlocal best_err, best_scale, best_zero
        err = weighed_errors(scale, zero)
        first_best = err.argmin(dim=0, keepdim=True)  # argmin takes the first of equal minima
        best_err, best_scale, best_zero = keep_better(
            err.gather(0, first_best)[0], best_err,
            (scale.gather(0, first_best)[0], zero.gather(0, first_best)[0]),
            (best_scale, best_zero))

    # the factors are tried in batches of F candidates whose [F, R, G, gs] temporary stays
    # within _CLIP_BATCH_ELEMENTS (a small weight: all at once, few calls); the native pass
    # has no such temporary
    per_batch = (len(factors) if native is not None
                 else max(1, _CLIP_BATCH_ELEMENTS // max(1, w.numel())))
    for f0 in range(0, len(factors), per_batch):
        p = torch.tensor(factors[f0:f0 + per_batch], dtype=torch.float32,
                         device=w.device).view(-1, 1, 1)
        consider(*_scale_zero(lo_full * p, hi_full * p, maxq, symmetric, scale_dtype, tiny,
                              integer_zeros))
    for _ in range(refit_rounds):
        refit_scale, refit_zero = _refit(w, cost, best_scale, best_zero, maxq, symmetric,
                                         scale_dtype, tiny, integer_zeros)
        consider(refit_scale.unsqueeze(0), refit_zero.unsqueeze(0))

    q = _codes(w, best_scale, best_zero, maxq)
    zeros = None if symmetric else best_zero.to(scale_dtype)
    return q.to(torch.uint8), best_scale.to(scale_dtype), zeros


def _native_clip_errors(w: torch.Tensor, cost: torch.Tensor):
    """pyengine._C when it can evaluate the clip search's candidates for w [R, G, gs] (CPU fp32)
    with costs the same for every row ([1, G, gs]), else None."""
    if (w.device.type != "cpu" or w.dtype != torch.float32 or cost.dtype != torch.float32
            or cost.shape[0] != 1):
        return None
    from .._ext import extension_with
    return extension_with("clip_errors_cpu")


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """clamp(round(w / s + z), 0, maxq) (fp32 [R, G, gs]) for per-group s, z [R, G]."""
    return torch.clamp(torch.round(w / scale.unsqueeze(-1) + zero.unsqueeze(-1)), 0, maxq)


def _fixed_zero_slope(w, cost, q, zero):
    """The weighed least-squares slope s of w = s (q - z) for a fixed zero z [R, G] (a line
    through (z, 0)), and where it is determined (codes not all at z, slope positive)."""
    x = q - zero.unsqueeze(-1)
    spread = (cost * x.square()).sum(dim=-1)
    slope = (cost * x * w).sum(dim=-1) / spread.clamp(min=1e-30)
    return slope, (spread > 0) & (slope > 0)


def _refit(w, cost, scale, zero, maxq, symmetric, scale_dtype, tiny, integer_zeros=False):
    """The scale and zero [R, G] that minimise sum_j c_j ((q_j - z) s - w_j)^2 for the codes
    q that (scale, zero) give w: a weighed least-squares line through the points (q_j, w_j)
    (symmetric: through (z, 0), z fixed), rounded to ``scale_dtype``. With ``integer_zeros``
    the fitted zero is rounded to an integer in [0, maxq] and the scale refitted for it. A
    group whose codes are all equal, or whose fitted slope is not positive, keeps its scale
    and zero."""
    q = _codes(w, scale, zero, maxq)
    if symmetric:  # w = s (q - z): a line through the origin in x = q - z
        slope, fitted = _fixed_zero_slope(w, cost, q, zero)
        new_scale = torch.where(fitted, slope, scale).clamp(min=tiny)
        return new_scale.to(scale_dtype).to(torch.float32), zero
    # w = s q + b, b = -z s: centre q on its weighed mean
    total = cost.sum(dim=-1).clamp(min=1e-30)
    q_mean = (cost * q).sum(dim=-1) / total
    w_mean = (cost * w).sum(dim=-1) / total
    x = q - q_mean.unsqueeze(-1)
    spread = (cost * x.square()).sum(dim=-1)
    slope = (cost * x * w).sum(dim=-1) / spread.clamp(min=1e-30)
    fitted = (spread > 0) & (slope > 0)
    # the intercept b = w_mean - s q_mean gives z = -b / s = q_mean - w_mean / s
    new_zero = torch.where(fitted, q_mean - w_mean / torch.where(fitted, slope, 1.0), zero)
    if integer_zeros:
        new_zero = new_zero.round().clamp(0, maxq)
        slope, fitted = _fixed_zero_slope(w, cost, q, new_zero)
        new_zero = torch.where(fitted, new_zero, zero)
    new_scale = torch.where(fitted, slope, scale).clamp(min=tiny).to(scale_dtype).to(torch.float32)
    return new_scale, new_zero.to(scale_dtype).to(torch.float32)


def _scale_zero(lo, hi, maxq, symmetric, scale_dtype, tiny, integer_zeros=False):
    """Scale (rounded to its storage dtype, never below its smallest normal) and zero point
    (asymmetric: -lo / s rounded to the storage dtype, not to an integer; with
    ``integer_zeros``, rounded to an integer in [0, maxq])."""
    if symmetric:
        # Codes q - 2^(bits-1) span [-2^(bits-1), 2^(bits-1) - 1]: map +-absmax to
        # +-(2^(bits-1) - 1) so that both signs reach the clipping range.
        mid = (maxq + 1) // 2
        scale = (hi / (mid - 1)).clamp(min=tiny).to(scale_dtype).to(torch.float32)
        zero = torch.full_like(scale, float(mid))
    else:
        scale = ((hi - lo) / maxq).clamp(min=tiny).to(scale_dtype).to(torch.float32)
        zero = -lo / scale
        if integer_zeros:
            zero = zero.round().clamp(0, maxq)
        zero = zero.to(scale_dtype).to(torch.float32)
    return scale, zero
