"""MatQuant: int8 Matryoshka parents whose int8, int4 and int2 slices are all good at once.

Method: Nair, Datta, Dean, Jain and Kusupati, "Matryoshka Quantization" (2025,
arXiv:2502.06786). One set of int8 codes is trained so that its nested slices (the top r bits,
rounded: docs/FORMAT.md) are accurate at every precision, with a loss that sums the errors of
the slices with weights lambda_r. This module is pyengine's own layer-wise, post-training
version of that idea, written for pyengine's canonical groups:

* per linear layer ``W[N, K]`` with calibration inputs ``X[T, K]`` it minimises

      L = sum_r lambda_r * ||X W^T - X W_r^T||^2 / L_r(RTN)
        = sum_r lambda_r * tr((W - W_r) H (W - W_r)^T) / L_r(RTN),      H = X^T X / T,

  where ``W_r = (c_r(q) * 2^(8-r) - z) * s`` is the r-bit slice of the parent (scale s and zero
  z per group of ``group_size`` inputs, parent codes q in [0, 255]). Each term is divided by
  its value for the plain RTN parent, so lambda weighs *relative* errors (an int2 slice's raw
  error is thousands of times an int8 one's); the default lambda = {8: 1, 4: 1, 2: 10} weights
  the int2 slice up;
* stage 1 (the quantization parameters): per group, a search over clipping ranges
  ``[p_lo * min, p_hi * max]`` (symmetric: ``p * max|w|``) — one shared shrinking factor, then
  the upper and the lower factor in turn, widening allowed — scored with the diagonal of H
  (separable per group). It sets every group's scale and zero point;
* stage 2 (the codes, ``error_feedback=True``): the parent codes are chosen column by column
  with the scales fixed, GPTQ-style (Frantar et al., 2022) but for all slices at once: each
  precision r keeps its own target weights, updated after every column with *its* slice's
  error through the Cholesky factor of H^-1; a column's code is the candidate minimising
  ``sum_r lambda_r (t_r - w_r(q))^2`` (candidates: the rounded target of each precision and
  the int8 choice moved into the code ranges whose r-bit slice is each target's best slice);
* stage 3 (optional, ``steps > 0``): Adam on the clipping factors, and with ``learn_codes`` on
  a per-weight offset of the rounded value, through straight-through estimators of every
  rounding (the parent's and each slice's, clamps kept differentiable);
* the result is the best of {plain RTN parent, stage 1, stage 2, stage 3} under the exact
  objective (scales and zeros rounded to their storage dtype; the searched stages use integer
  zero points, the plain parent pyengine.quantize's fractional ones), so it is never worse
  than the plain parent on the calibration objective.

Models are processed decoder layer by decoder layer (pyengine.pipeline.calibrate.LayerwiseRunner),
as GPTQ is: one pass of the not-yet-quantized layer gives every target linear its H; the layer is
then quantized and run (serving its int8 slice) to produce the next layer's inputs.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..pipeline.calibrate import LayerInputs
from ..matryoshka.weight import PARENT_BITS, PRECISIONS, MatryoshkaWeight
from ..format.packing import unpack_codes
from ..format.qweight import SCALE_DTYPES, padded_in_features
from .rtn import quantize
from ..utils import keep_better
from .recipe import QuantConfig
from .layerwise import input_hessians
from ..model.walk import linear_holder
from .methods import MatQuantOptions, get_method, replace_linears

# Default slice weights lambda_r (of relative errors): int8 and int4 at 1, int2 weighted up.
DEFAULT_WEIGHTS: Dict[int, float] = {8: 1.0, 4: 1.0, 2: 10.0}
MAXQ = (1 << PARENT_BITS) - 1
MID = (MAXQ + 1) // 2  # symmetric zero point, 128


def check_slice_weights(weights: Optional[Mapping[int, float]]) -> Dict[int, float]:
    """{precision: lambda}, highest precision first; ValueError on bad keys or values."""
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    if not weights:
        raise ValueError("matquant needs at least one slice weight")
    for r, lam in weights.items():
        if r not in PRECISIONS:
            raise ValueError(f"matquant slice weights are keyed by precisions {PRECISIONS}, got {r!r}")
        if not float(lam) >= 0.0:
            raise ValueError(f"matquant slice weight lambda_{r} must be >= 0, got {lam!r}")
    if sum(weights.values()) <= 0:
        raise ValueError("matquant slice weights must not all be 0")
    return {int(r): float(lam) for r, lam in sorted(weights.items(), reverse=True)}


def _slice_float(q: torch.Tensor, r: int) -> torch.Tensor:
    """The slice in parent units, min(floor(q / 2^m + 1/2), 2^r - 1) * 2^m, of integer-valued
    float codes q (exact in fp32)."""
    if r == PARENT_BITS:
        return q
    step = float(1 << (PARENT_BITS - r))
    return torch.clamp(torch.floor(q / step + 0.5), max=float((1 << r) - 1)) * step


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward (half to even, as RTN picks parent codes), identity backward."""
    return x + (torch.round(x) - x).detach()


def _ste_round_half_up(x: torch.Tensor) -> torch.Tensor:
    """floor(x + 1/2) forward (the slice rule), identity backward."""
    return x + (torch.floor(x + 0.5) - x).detach()


class _Problem:
    """One weight: padded weight w [N, G, gs] (fp32), H [Kp, Kp] (normalised to mean diagonal
    1), diag(H) [1, G, gs], the valid-column mask and each group's range [lo0, hi0] [N, G]."""

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor, group_size: int,
                 symmetric: bool, scale_dtype: torch.dtype) -> None:
        n, k = weight.shape
        device = weight.device
        self.n, self.k = n, k
        self.kp = padded_in_features(k, group_size)
        self.gs = self.kp if group_size == -1 else group_size
        self.groups = self.kp // self.gs
        self.symmetric = symmetric
        self.scale_dtype = scale_dtype
        self.tiny = torch.finfo(scale_dtype).tiny
        w = torch.zeros(n, self.kp, dtype=torch.float32, device=device)
        w[:, :k] = weight.to(torch.float32)
        self.w = w.view(n, self.groups, self.gs)
        h = torch.zeros(self.kp, self.kp, dtype=torch.float32, device=device)
        h[:k, :k] = hessian.to(device=device, dtype=torch.float32)
        mean_diag = float(torch.diagonal(h)[:k].mean())
        self.h = h / (mean_diag if mean_diag > 0 else 1.0)
        self.diag = torch.diagonal(self.h).clamp(min=0.0).reshape(1, self.groups, self.gs)
        self.valid = (torch.arange(self.kp, device=device) < k).view(1, self.groups, self.gs)
        if symmetric:
            self.hi0 = torch.where(self.valid, self.w.abs(), 0.0).amax(dim=-1)
            self.lo0 = -self.hi0
        else:
            self.lo0 = torch.where(self.valid, self.w, float("inf")).amin(dim=-1).clamp(max=0.0)
            self.hi0 = torch.where(self.valid, self.w, float("-inf")).amax(dim=-1).clamp(min=0.0)

    def scale_zero(self, p_lo: torch.Tensor, p_hi: torch.Tensor,
                   stored: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point [N, G] (fp32) of the ranges [p_lo * lo0, p_hi * hi0].

        ``stored``: the values stored (scale rounded to its dtype, integer zero); else the
        differentiable version (straight-through rounding of the zero) used by Adam."""
        if self.symmetric:
            scale = (p_hi * self.hi0 / (MID - 1)).clamp(min=self.tiny)
            if stored:
                scale = scale.to(self.scale_dtype).to(torch.float32)
            return scale, torch.full_like(scale, float(MID))
        lo, hi = p_lo * self.lo0, p_hi * self.hi0
        scale = ((hi - lo) / MAXQ).clamp(min=self.tiny)
        if stored:
            scale = scale.to(self.scale_dtype).to(torch.float32)
            return scale, torch.clamp(torch.round(-lo / scale), 0, MAXQ)
        return scale, torch.clamp(_ste_round(-lo / scale), 0, MAXQ)

    def codes(self, scale: torch.Tensor, zero: torch.Tensor,
              offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rounded parent codes (integer-valued fp32) [N, G, gs]; padding columns are 0.
        ``offset`` [N, G, gs] shifts the rounded value, in parent steps."""
        v = self.w / scale.unsqueeze(-1)
        if offset is not None:
            v = v + offset
        q = torch.clamp(torch.round(v) + zero.unsqueeze(-1), 0, MAXQ)
        return torch.where(self.valid, q, 0.0)

    def slice_errors(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     precisions: List[int]) -> torch.Tensor:
        """W_r - W for each r: fp32 [len(precisions), N, G, gs] (0 on padding columns)."""
        s3, z3 = scale.unsqueeze(-1), zero.unsqueeze(-1)
        return torch.stack([torch.where(self.valid, (_slice_float(q, r) - z3) * s3 - self.w, 0.0)
                            for r in precisions])

    def full_losses(self, errs: torch.Tensor) -> torch.Tensor:
        """tr(E_r H E_r^T) per r: fp64 [len(precisions)]."""
        e = errs.reshape(errs.shape[0] * self.n, self.kp)
        return ((e @ self.h) * e).reshape(errs.shape[0], -1).sum(dim=1, dtype=torch.float64)

    def diag_cost(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  precisions: List[int], lam: List[float]) -> torch.Tensor:
        """Per group, sum_r lam_r sum_k diag(H)_k e_{r,k}^2: fp32 [N, G]."""
        s3, z3 = scale.unsqueeze(-1), zero.unsqueeze(-1)
        cost = None
        for r, weight in zip(precisions, lam):
            e = (_slice_float(q, r) - z3) * s3 - self.w
            c = (e.square_() * self.diag).sum(dim=-1) * weight
            cost = c if cost is None else cost + c
        return cost

    def exact(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              precisions: List[int]) -> torch.Tensor:
        """The objective's unweighted terms tr(E_r H E_r^T) of stored codes/scales/zeros."""
        return self.full_losses(self.slice_errors(q, scale, zero, precisions))


# ---- stage 1: clipping ranges --------------------------------------------------------------------

@torch.no_grad()
def _search_ranges(problem: _Problem, precisions: List[int], lam: List[float], grid: int,
                   min_clip: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per group, clipping factors (p_lo, p_hi) [N, G] minimising the diag(H)-weighted
    objective: one shared shrinking factor first, then the upper and the lower one in turn."""
    shape = problem.lo0.shape
    device = problem.w.device
    shared = torch.linspace(1.0, min_clip, max(grid, 1)).tolist()
    # one-sided factors may also widen the range: an int2 slice's top level is 192/255 of it
    sided = sorted(set(torch.linspace(min_clip, 1.4, max(grid, 2)).tolist()) | {1.0})

    def score(p_lo, p_hi):
        scale, zero = problem.scale_zero(p_lo, p_hi, stored=True)
        return problem.diag_cost(problem.codes(scale, zero), scale, zero, precisions, lam)

    best_lo = torch.ones(shape, device=device)
    best_hi = torch.ones(shape, device=device)
    best = score(best_lo, best_hi)

    def consider(p_lo, p_hi):
        nonlocal best, best_lo, best_hi
        best, best_lo, best_hi = keep_better(score(p_lo, p_hi), best, (p_lo, p_hi),
                                             (best_lo, best_hi))

    for p in shared:
        full = torch.full(shape, p, device=device)
        consider(full, full)
    for p in sided:
        consider(best_lo, torch.full(shape, p, device=device))
    if not problem.symmetric:
        for p in sided:
            consider(torch.full(shape, p, device=device), best_hi)
    return best_lo, best_hi


# ---- stage 2: codes by error feedback -------------------------------------------------------------

def _slice_ranges(u: torch.Tensor, precisions: List[int]):
    """For continuous parent-unit targets u [R, N] (one row per precision), the range [lo, hi]
    of parent codes whose r-bit slice is the slice nearest to each r < 8 target."""
    ranges = []
    for i, r in enumerate(precisions):
        if r == PARENT_BITS:
            continue
        step = 1 << (PARENT_BITS - r)
        c = torch.clamp(torch.floor(u[i] / step + 0.5), 0, (1 << r) - 1)
        lo = (c * step - step // 2).clamp(min=0)
        hi = torch.where(c >= (1 << r) - 1, torch.full_like(c, float(MAXQ)),
                         c * step + (step // 2 - 1))
        ranges.append((lo, hi))
    return ranges


@torch.no_grad()
def _error_feedback_codes(problem: _Problem, scale: torch.Tensor, zero: torch.Tensor,
                          precisions: List[int], lam: torch.Tensor, damp: float = 0.01,
                          block_size: int = 32) -> torch.Tensor:
    """Parent codes [N, G, gs] (integer-valued fp32) chosen column by column against one
    GPTQ-style compensated target per precision (see the module docstring)."""
    n, kp, gs = problem.n, problem.kp, problem.gs
    device = problem.w.device
    h = problem.h.clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(kp, device=device)
    u_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    n_r = len(precisions)
    targets = problem.w.reshape(1, n, kp).repeat(n_r, 1, 1)        # [R, N, Kp]
    codes = torch.zeros(n, kp, dtype=torch.float32, device=device)
    lam_col = lam.to(torch.float32).view(n_r, 1)
    steps = torch.tensor([float(1 << (PARENT_BITS - r)) for r in precisions],
                         device=device).view(1, n_r, 1)
    tops = torch.tensor([float((1 << r) - 1) for r in precisions], device=device).view(1, n_r, 1)

    def sliced(q: torch.Tensor) -> torch.Tensor:
        """q [C, N] -> the slices of each precision in parent units [C, R, N]."""
        return torch.minimum(torch.floor(q.unsqueeze(1) / steps + 0.5), tops) * steps

    for i1 in range(0, kp, block_size):
        i2 = min(i1 + block_size, kp)
        t1 = targets[:, :, i1:i2].clone()
        err = torch.zeros(n_r, n, i2 - i1, device=device)
        for jj in range(i2 - i1):
            j = i1 + jj
            g = j // gs
            s, z = scale[:, g], zero[:, g]
            t = t1[:, :, jj]                                       # [R, N]
            u = t / s + z                                          # parent-unit targets
            cands = list(torch.clamp(torch.round(u), 0, MAXQ).unbind(0))
            base = cands[0]
            ranges = _slice_ranges(u, precisions)
            for lo, hi in ranges:
                cands.append(torch.minimum(torch.maximum(base, lo), hi))
            if len(ranges) > 1:
                lo = torch.stack([a for a, _ in ranges]).amax(dim=0)
                hi = torch.stack([b for _, b in ranges]).amin(dim=0)
                cands.append(torch.where(lo <= hi, torch.minimum(torch.maximum(base, lo), hi), base))
            cand = torch.stack(cands)                              # [C, N]
            w_r = (sliced(cand) - z) * s                           # [C, R, N]
            cost = ((t.unsqueeze(0) - w_r).square_() * lam_col).sum(dim=1)
            pick = cost.argmin(dim=0, keepdim=True)                # [1, N]
            q = cand.gather(0, pick)                               # [1, N]
            codes[:, j] = q[0]
            e = (t - (sliced(q)[0] - z) * s) / u_inv[j, j]         # [R, N]
            t1[:, :, jj:] -= e.unsqueeze(-1) * u_inv[j, j:i2].view(1, 1, -1)
            err[:, :, jj] = e
        targets[:, :, i2:] -= err @ u_inv[i1:i2, i2:]
    codes = codes.view(n, problem.groups, gs)
    return torch.where(problem.valid, codes, 0.0)


# ---- stage 3: Adam with straight-through estimators ---------------------------------------------

def _adam(problem: _Problem, p_lo: torch.Tensor, p_hi: torch.Tensor, offset0: Optional[torch.Tensor],
          precisions: List[int], lam: torch.Tensor, steps: int, lr: float, learn_codes: bool,
          code_lr: float):
    """Adam on the full objective; returns the best (p_lo, p_hi, offset or None) seen."""
    p_lo = p_lo.clone().requires_grad_(True)
    p_hi = p_hi.clone().requires_grad_(True)
    groups = [{"params": [p_hi] if problem.symmetric else [p_lo, p_hi], "lr": lr}]
    offset = None
    if learn_codes:
        offset = (torch.zeros_like(problem.w) if offset0 is None else offset0.clone())
        offset.requires_grad_(True)
        groups.append({"params": [offset], "lr": code_lr})
    opt = torch.optim.Adam(groups)
    lam = lam.to(torch.float32)
    best = (float("inf"), p_lo.detach().clone(), p_hi.detach().clone(),
            None if offset is None else offset.detach().clone())
    for _ in range(steps):
        with torch.no_grad():
            p_lo.clamp_(0.02, 2.0)
            p_hi.clamp_(0.02, 2.0)
            if offset is not None:
                offset.clamp_(-float(MID), float(MID))
        scale, zero = problem.scale_zero(p_lo, p_hi, stored=False)
        s3, z3 = scale.unsqueeze(-1), zero.unsqueeze(-1)
        v = problem.w / s3 if offset is None else problem.w / s3 + offset
        q = torch.clamp(_ste_round(v) + z3, 0, MAXQ)
        errs = []
        for r in precisions:
            step = float(1 << (PARENT_BITS - r))
            sl = step * torch.clamp(_ste_round_half_up(q / step), 0, float((1 << r) - 1))
            errs.append(torch.where(problem.valid, (sl - z3) * s3 - problem.w, 0.0))
        e = torch.stack(errs).reshape(len(precisions) * problem.n, problem.kp)
        with torch.no_grad():
            eh = e @ problem.h
            value = float(((eh * e).reshape(len(precisions), -1).sum(dim=1) * lam).sum())
        if value < best[0]:
            best = (value, p_lo.detach().clone(), p_hi.detach().clone(),
                    None if offset is None else offset.detach().clone())
        # d tr(E H E^T) / dE = 2 E H: one matrix product per step
        surrogate = 2.0 * (e * (eh * lam.repeat_interleave(problem.n).unsqueeze(1))).sum()
        opt.zero_grad(set_to_none=True)
        surrogate.backward()
        opt.step()
    return best[1], best[2], best[3]


# ---- one weight -----------------------------------------------------------------------------------

def matquant_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = 128,
                      symmetric: bool = False, weights: Optional[Mapping[int, float]] = None, *,
                      grid: int = 10, min_clip: float = 0.3, error_feedback: bool = True,
                      damp: float = 0.01, steps: int = 0, lr: float = 2e-3,
                      learn_codes: bool = False, code_lr: float = 0.05,
                      scale_dtype: Optional[torch.dtype] = None,
                      method: str = "matquant") -> Tuple[MatryoshkaWeight, Dict[str, Any]]:
    """MatQuant parent of one weight (see the module docstring).

    Args:
        weight: float [N, K].
        hessian: [K, K], sum or mean of x^T x over calibration inputs x [tokens, K] (only its
            shape up to a positive factor matters).
        group_size, symmetric: as in pyengine.quantize.
        weights: {precision: lambda} of the slices in the objective (default DEFAULT_WEIGHTS,
            {8: 1, 4: 1, 2: 10}); keys in (8, 6, 4, 3, 2).
        grid: shrinking factors tried per group in stage 1 (and one-sided factors per side).
        min_clip: smallest factor of stage 1.
        error_feedback: run stage 2 (codes against per-precision compensated targets).
        damp: stage 2's damping, a fraction of the mean diagonal of H.
        steps, lr: stage 3's Adam steps (0: no stage 3) and learning rate of the clipping factors.
        learn_codes, code_lr: stage 3 also learns a per-weight offset (parent steps) of the value
            each code rounds, starting from the best codes so far, with learning rate code_lr.
        scale_dtype: dtype of scales/zeros (default: the weight's, or fp32).
    Returns:
        (MatryoshkaWeight on the weight's device, info). ``info`` holds, per precision, the
        objective's unweighted terms for the plain RTN parent ("rtn") and the result
        ("matquant"), the weighted objective of every candidate ("objective") and the winner
        ("chosen": "rtn", "ranges", "error_feedback" or "adam").
    """
    lam_by_r = check_slice_weights(weights)
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}] for a weight of shape {(n, k)}, got "
                         f"{tuple(hessian.shape)}")
    if scale_dtype is None:
        scale_dtype = weight.dtype if weight.dtype in SCALE_DTYPES else torch.float32
    precisions = list(lam_by_r)
    lam_list = [lam_by_r[r] for r in precisions]
    device = weight.device
    problem = _Problem(weight.detach(), hessian.detach(), group_size, symmetric, scale_dtype)
    candidates: Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        # the plain RTN parent: the objective's normalisation and the first candidate
        rtn = quantize(weight.detach(), PARENT_BITS, group_size, symmetric, scale_dtype=scale_dtype)
        rtn_q = unpack_codes(rtn.qweight, PARENT_BITS).to(torch.float32)
        rtn_q = rtn_q.view(n, problem.groups, problem.gs)
        rtn_s = rtn.scales.to(torch.float32)
        rtn_z = torch.full_like(rtn_s, float(MID)) if symmetric else rtn.zeros.to(torch.float32)
        rtn_losses = problem.exact(rtn_q, rtn_s, rtn_z, precisions)
        norm = torch.where(rtn_losses > 0, rtn_losses, torch.ones_like(rtn_losses))
        lam = torch.tensor(lam_list, dtype=torch.float64, device=device) / norm
        candidates["rtn"] = (rtn_q, rtn_s, rtn_z, rtn_losses)

        # stage 1, normalised by the RTN parent's diagonal-H terms
        rtn_diag = torch.stack([problem.diag_cost(rtn_q, rtn_s, rtn_z, [r], [1.0]).sum()
                                for r in precisions]).to(torch.float64)
        lam_diag = (torch.tensor(lam_list, dtype=torch.float64, device=device)
                    / torch.where(rtn_diag > 0, rtn_diag, torch.ones_like(rtn_diag)))
        p_lo, p_hi = _search_ranges(problem, precisions, lam_diag.tolist(), grid, min_clip)
        scale, zero = problem.scale_zero(p_lo, p_hi, stored=True)
        q = problem.codes(scale, zero)
        candidates["ranges"] = (q, scale, zero, problem.exact(q, scale, zero, precisions))

        if error_feedback:
            q = _error_feedback_codes(problem, scale, zero, precisions, lam, damp)
            candidates["error_feedback"] = (q, scale, zero, problem.exact(q, scale, zero, precisions))

    def objective(name: str) -> float:
        return float((candidates[name][3] * lam).sum())

    if steps > 0:
        offset0 = None
        if learn_codes:  # start from the best codes so far, as offsets of plain rounding
            q0 = candidates[min(("ranges", "error_feedback"), key=lambda c: objective(c)
                                if c in candidates else float("inf"))][0]
            offset0 = q0 - torch.clamp(torch.round(problem.w / scale.unsqueeze(-1))
                                       + zero.unsqueeze(-1), 0, MAXQ)
        a_lo, a_hi, offset = _adam(problem, p_lo, p_hi, offset0, precisions, lam, steps, lr,
                                   learn_codes, code_lr)
        with torch.no_grad():
            a_s, a_z = problem.scale_zero(a_lo, a_hi, stored=True)
            a_q = problem.codes(a_s, a_z, offset)
            candidates["adam"] = (a_q, a_s, a_z, problem.exact(a_q, a_s, a_z, precisions))

    chosen = min(candidates, key=objective)
    q, scale, zero, losses = candidates[chosen]
    mw = MatryoshkaWeight.from_codes(q.reshape(n, problem.kp).to(torch.int64),
                                     scale.to(scale_dtype),
                                     None if symmetric else zero.to(scale_dtype),
                                     group_size=group_size, shape=(n, k), method=method)
    info = {
        "precisions": precisions,
        "weights": lam_list,
        "rtn": {str(r): float(v) for r, v in zip(precisions, rtn_losses.tolist())},
        "matquant": {str(r): float(v) for r, v in zip(precisions, losses.tolist())},
        "objective": {name: objective(name) for name in candidates},
        "chosen": chosen,
    }
    return mw, info


# ---- a model, layer by layer ----------------------------------------------------------------------

@torch.no_grad()
def matquant_quantize_model(model: nn.Module, configs: Dict[str, QuantConfig],
                            calibration: torch.Tensor, *,
                            weights: Optional[Mapping[int, float]] = None, grid: int = 10,
                            min_clip: float = 0.3, error_feedback: bool = True,
                            damp: float = 0.01, steps: int = 0, lr: float = 2e-3,
                            learn_codes: bool = False, code_lr: float = 0.05,
                            batch_size: int = 1, show_progress: bool = True,
                            scale_dtype: Optional[torch.dtype] = None,
                            compute_device: Optional["str | torch.device"] = None,
                            report: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Replaces the linear layers named in ``configs`` (module name -> QuantConfig with
    matryoshka=True) by MatQuant MatryoshkaLinear layers, decoder layer by decoder layer, in
    place (pyengine.pipeline.compress.layerwise_quantize with the method "matquant").

    Args:
        calibration: token ids [n_samples, seqlen] (pyengine.calibration_data).
        weights, grid, min_clip, error_feedback, damp, steps, lr, learn_codes, code_lr: see
            :func:`matquant_quantize` (pyengine.quant.methods.MatQuantOptions); a bad value
            raises ValueError before any layer runs.
        compute_device: run each decoder layer and its optimisation there (e.g. "cuda") while
            the model stays where it is (default: where the layer is).
        report: if given, filled with {module name: info of matquant_quantize}.
    Returns:
        The model; every new layer serves its int8 slice.
    """
    from ..pipeline.compress import layerwise_quantize
    _check_parents(configs)
    options = MatQuantOptions(weights=weights, grid=grid, min_clip=min_clip,
                              error_feedback=error_feedback, damp=damp, steps=steps, lr=lr,
                              learn_codes=learn_codes, code_lr=code_lr, batch_size=batch_size)
    layerwise_quantize(model, calibration, get_method("matquant"), configs, [], scale_dtype,
                       show_progress, options=options, compute_device=compute_device,
                       report=report)
    return model


def _check_parents(configs: Mapping[str, QuantConfig]) -> None:
    for name, cfg in configs.items():
        if not cfg.matryoshka:
            raise ValueError(f"matquant makes Matryoshka parents; {name!r} has {cfg}")


@torch.no_grad()
def matquant_layer_weights(model: nn.Module, layer: nn.Module, inputs: LayerInputs,
                           targets: Dict[str, QuantConfig], *,
                           weights: Optional[Mapping[int, float]] = None, grid: int = 10,
                           min_clip: float = 0.3, error_feedback: bool = True,
                           damp: float = 0.01, steps: int = 0, lr: float = 2e-3,
                           learn_codes: bool = False, code_lr: float = 0.05,
                           scale_dtype: Optional[torch.dtype] = None, compute_device=None,
                           report: Optional[Dict[str, Any]] = None
                           ) -> Dict[str, MatryoshkaWeight]:
    """MatQuant parents of the linears of decoder ``layer`` named in ``targets`` (QuantConfigs
    with matryoshka=True), from one pass of the layer over ``inputs``; the model is not
    changed (arguments as :func:`matquant_quantize_model`). The registered method "matquant"
    (pyengine.quant.methods) runs it."""
    _check_parents(targets)
    hessians, counts = input_hessians(model, layer, inputs, targets, compute_device)
    parents: Dict[str, MatryoshkaWeight] = {}
    for name, cfg in targets.items():
        holder, attr = linear_holder(model, name)
        linear = getattr(holder, attr)
        with torch.enable_grad():
            parents[name], info = matquant_quantize(
                linear.weight, hessians.pop(name) / max(counts[name], 1), cfg.group_size,
                cfg.symmetric, weights, grid=grid, min_clip=min_clip,
                error_feedback=error_feedback, damp=damp, steps=steps, lr=lr,
                learn_codes=learn_codes, code_lr=code_lr,
                scale_dtype=scale_dtype or linear.weight.dtype)
        if report is not None:
            report[name] = info
    return parents


def matquant_quantize_layer(model: nn.Module, layer: nn.Module, inputs: LayerInputs,
                            targets: Dict[str, QuantConfig], **kwargs) -> None:
    """:func:`matquant_layer_weights` (same keyword arguments), each parent then put in place
    of its linear as a MatryoshkaLinear (pyengine.quant.methods.replace_linears)."""
    replace_linears(model, matquant_layer_weights(model, layer, inputs, targets, **kwargs),
                    targets)
