"""GPTQ (Frantar et al., 2022): quantize a linear layer's columns one at a time, pushing each
column's rounding error onto the columns not yet quantized through the inverse Hessian of the
layer's reconstruction loss ||X W^T - X Q^T||^2, H = X^T X from calibration inputs.

Written for pyengine's canonical format:

* groups of ``group_size`` consecutive inputs share a scale and zero point; each group's
  parameters come from the RTN clipping search (pyengine.quantize) applied to the group's
  weights as they are when GPTQ reaches the group (already updated by earlier errors), judged
  by what the rounding costs the layer's output: column i's squared error weighed by
  1 / [H^-1]_ii (the loss GPTQ's own update leaves for it: an input the calibration activations
  barely use may be clipped harder);
* ``act_order=True`` visits columns by decreasing Hessian diagonal. Its groups stay contiguous in
  the original order ("static groups": their parameters come from the original weights before
  the pass), so the stored layout is the canonical one and kernels need no permutation (nor the
  visiting order) at run time;
* damping adds ``damp * mean(diag(H))`` to the diagonal; lazy batch updates apply the
  accumulated error of a block of ``block_size`` columns to the rest in one matrix product;
* once every code is chosen, each row's scales and zeros are refit to its codes by least
  squares in the layer's output error (:func:`refit_group_params`; kept per row only where it
  lowers that error). Zero points are fractional, as in pyengine.quantize.

Models are processed layer by layer (pyengine.pipeline.calibrate): every linear layer of a decoder
layer gets its Hessian from one pass of the not-yet-quantized layer over the calibration
inputs; the quantized layer then produces the next layer's inputs.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..pipeline.calibrate import LayerInputs
from .layerwise import input_hessians
from ..model.walk import linear_holder
from .methods import replace_linears
from ..format.packing import pack_codes
from ..format.qweight import QuantizedWeight, padded_in_features
from .rtn import _rtn_groups
from .recipe import QuantConfig

CLIP_FACTORS = torch.linspace(1.0, 0.4, 24).tolist()


def _group_params(w: torch.Tensor, valid: int, bits: int, symmetric: bool,
                  scale_dtype: torch.dtype, column_weights: Optional[torch.Tensor] = None,
                  integer_zeros: bool = False):
    """Scale and zero point (fp32 [N], zero is None-free: symmetric gives the midpoint) of one
    group w [N, g] whose first ``valid`` columns are real; ``column_weights`` [g]: the cost of
    an error in each column (None: 1); ``integer_zeros``: as in pyengine.quantize."""
    weights = None if column_weights is None else column_weights.view(1, 1, -1)
    _, scales, zeros = _rtn_groups(w.unsqueeze(1), valid, bits, symmetric, scale_dtype,
                                   CLIP_FACTORS, weights, integer_zeros=integer_zeros)
    scale = scales[:, 0].to(torch.float32)
    zero = (torch.full_like(scale, float(1 << (bits - 1))) if zeros is None
            else zeros[:, 0].to(torch.float32))
    return scale, zero


@torch.no_grad()
def prepare_hessian(hessian: torch.Tensor, act_order: bool, damp: float,
                    device: "torch.device | None" = None) -> Tuple[torch.Tensor, ...]:
    """What GPTQ derives from a Hessian [K, K] alone, shared by the linears that read one
    input: (dead inputs [K] bool, visiting order [K], its inverse [K], the upper Cholesky
    factor of the damped inverse Hessian in visiting order [K, K] fp32)."""
    k = hessian.shape[0]
    h = hessian.detach().to(device=device or hessian.device, dtype=torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    perm = (torch.argsort(torch.diag(h), descending=True) if act_order
            else torch.arange(k, device=h.device))
    inv_perm = torch.argsort(perm)
    h = h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, device=h.device)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return dead, perm, inv_perm, h_inv


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int = 128,
                  symmetric: bool = False, act_order: bool = False, damp: float = 0.01,
                  block_size: int = 128, scale_dtype: Optional[torch.dtype] = None,
                  prepared: Optional[Tuple[torch.Tensor, ...]] = None,
                  refit: bool = True, integer_zeros: bool = False) -> QuantizedWeight:
    """GPTQ of one weight.

    Args:
        weight: [N, K] float.
        hessian: [K, K], sum of x^T x over calibration inputs x [tokens, K] (any positive
            scale: only ratios matter).
        bits, group_size, symmetric: as in pyengine.quantize.
        act_order: visit columns by decreasing diag(H) (groups stay static, see the module doc).
        damp: fraction of the mean diagonal added to it.
        prepared: :func:`prepare_hessian` of ``hessian`` with the same act_order and damp
            (computed here when None).
        refit: after the codes are chosen, refit every row's scales and zeros to them by
            least squares in the layer's output error (:func:`refit_group_params`).
        integer_zeros: asymmetric zero points are integers in [0, 2^bits - 1] (as in
            pyengine.quantize; the refit then moves the scales alone).
    Returns:
        The QuantizedWeight (method "gptq").
    """
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}] for a weight of shape {(n, k)}, got "
                         f"{tuple(hessian.shape)}")
    scale_dtype = scale_dtype or (weight.dtype if weight.dtype in (torch.float32, torch.float16,
                                                                   torch.bfloat16) else torch.float32)
    device = weight.device
    maxq = (1 << bits) - 1
    kp = padded_in_features(k, group_size)
    gs = kp if group_size == -1 else group_size
    n_groups = kp // gs

    if prepared is None:
        prepared = prepare_hessian(hessian, act_order, damp, device)
    dead, perm, inv_perm, h_inv = prepared

    # The weight is worked on transposed, [K, N] in visiting order: a column of W is a
    # contiguous row, so the per-column steps and the rank-1 updates run on contiguous memory.
    w_orig = weight.detach().to(torch.float32)
    wt = w_orig.t()[perm].contiguous()
    wt[dead[perm]] = 0.0
    scales_t = torch.empty(n_groups, n, dtype=torch.float32, device=device)  # [group, row]
    zeros_t = torch.empty(n_groups, n, dtype=torch.float32, device=device)
    known = [False] * n_groups

    # what an error in each column (visiting order) costs the output: 1 / [H^-1]_ii, the
    # squared diagonal of the inverse's Cholesky factor (a dead column: nothing)
    error_cost = h_inv.diagonal().square().reciprocal()
    error_cost[dead[perm]] = 0.0

    def fill_group(g: int, rows_of: "callable") -> None:
        """Scale and zero of group g from its columns' values as rows_of(positions) gives
        them ([len, N], positions in visiting order)."""
        start = g * gs
        stop = min(start + gs, k)
        positions = inv_perm[start:stop]
        cols = torch.zeros(n, gs, dtype=torch.float32, device=device)
        cols[:, : stop - start] = rows_of(positions).t()
        cost = torch.zeros(gs, dtype=torch.float32, device=device)
        cost[: stop - start] = error_cost[positions]
        scales_t[g], zeros_t[g] = _group_params(cols, stop - start, bits, symmetric, scale_dtype,
                                                cost, integer_zeros)
        known[g] = True

    if act_order:
        for g in range(n_groups):          # static groups from the original weights
            fill_group(g, lambda positions: wt[positions])

    codes_t = torch.zeros(kp, n, dtype=torch.uint8, device=device)  # [original column, row]
    visit = perm.tolist()                  # visiting position -> original column
    native = _native_columns(wt)
    if native is not None:
        h_inv = h_inv.contiguous()         # the kernel reads its rows with unit stride
    block_size = max(block_size, 1)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2].clone()
        err1 = torch.empty_like(w1)
        h_inv1 = h_inv[i1:i2, i1:i2]
        block_columns = (perm[i1:i2].to(dtype=torch.int64).contiguous() if native is not None
                         else None)
        i = 0
        while i < i2 - i1:
            g = visit[i1 + i] // gs
            if not known[g]:
                # the group's columns as they are now: updated ones in this block, the rest in wt
                def rows_of(positions, i1=i1, i2=i2, w1=w1):
                    rows = wt[positions]
                    inside = (positions >= i1) & (positions < i2)
                    rows[inside] = w1[positions[inside] - i1]
                    return rows
                fill_group(g, rows_of)
            # the run of columns from i whose groups are all known: GPTQ's steps need nothing
            # else until the next group to fill
            stop = i + 1
            while stop < i2 - i1 and known[visit[i1 + stop] // gs]:
                stop += 1
            if native is not None:
                _columns_native(native, w1, h_inv1, err1, codes_t, block_columns, gs, scales_t,
                                zeros_t, i, stop, maxq)
            else:
                for c in range(i, stop):
                    col = visit[i1 + c]
                    s, z = scales_t[col // gs], zeros_t[col // gs]
                    x = w1[c]
                    q = torch.clamp(torch.round(x / s + z), 0, maxq)
                    codes_t[col] = q.to(torch.uint8)
                    e = (x - (q - z) * s) / h_inv1[c, c]
                    w1[c:].addr_(h_inv1[c, c:], e, alpha=-1.0)  # w1[c:] -= h_inv1[c, c:] (x) e
                    err1[c] = e
            i = stop
        wt[i2:].addmm_(h_inv[i1:i2, i2:].t(), err1, alpha=-1.0)

    if refit:
        scales_t, zeros_t = refit_group_params(w_orig, codes_t[:k].t(), scales_t.t(),
                                               zeros_t.t(), hessian_for_refit(hessian, dead, damp),
                                               gs, symmetric, scale_dtype,
                                               fixed_zeros=integer_zeros)
        scales_t, zeros_t = scales_t.t(), zeros_t.t()

    def rows_first(t: torch.Tensor) -> torch.Tensor:  # [group, row] -> a fresh [row, group]
        # (not .contiguous(): with one group torch calls the transposed view contiguous)
        return torch.empty(n, n_groups, dtype=scale_dtype, device=device).copy_(t.t())

    return QuantizedWeight(pack_codes(codes_t.t(), bits), rows_first(scales_t),
                           None if symmetric else rows_first(zeros_t), bits=bits,
                           group_size=group_size, shape=(n, k), method="gptq")


def _native_columns(wt: torch.Tensor):
    """pyengine._C when it can run GPTQ's column loop on ``wt`` (a CPU fp32 tensor), else None
    (the loop then runs as torch calls: the same steps, one column at a time)."""
    if wt.device.type != "cpu" or wt.dtype != torch.float32:
        return None
    from .._ext import extension_with
    return extension_with("gptq_columns_cpu")


def _columns_native(ext, w1: torch.Tensor, h_inv1: torch.Tensor, err1: torch.Tensor,
                    codes_t: torch.Tensor, block_columns: torch.Tensor, gs: int,
                    scales_t: torch.Tensor, zeros_t: torch.Tensor, start: int, stop: int,
                    maxq: int) -> None:
    """GPTQ's steps for block columns [start, stop) in pyengine._C (csrc/cpu/quant_ops.h).

    w1, err1: [B, N] fp32 contiguous (the block, transposed); h_inv1: [B, B] fp32 with unit
    inner stride (a view of the whole factor); codes_t: [Kp, N] uint8 contiguous;
    block_columns: [B] int64, the block's original column indices; scales_t, zeros_t: [G, N]
    fp32 contiguous."""
    rows, n = w1.shape
    group = torch.div(block_columns, gs, rounding_mode="floor")
    ext.gptq_columns_cpu(w1.data_ptr(), w1.stride(0), h_inv1.data_ptr(), h_inv1.stride(0),
                         err1.data_ptr(), err1.stride(0), codes_t.data_ptr(), codes_t.stride(0),
                         block_columns.data_ptr(), scales_t.data_ptr(), zeros_t.data_ptr(),
                         scales_t.stride(0), group.data_ptr(), start, stop, rows, n, maxq,
                         torch.get_num_threads())


def hessian_for_refit(hessian: torch.Tensor, dead: torch.Tensor, damp: float) -> torch.Tensor:
    """The damped Hessian [K, K] fp32 the refit weighs errors with (GPTQ's own damping; a dead
    input keeps only the damping)."""
    h = hessian.detach().to(device=dead.device, dtype=torch.float32).clone()
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    diagonal = torch.diagonal(h)
    diagonal += damp * torch.mean(torch.diag(hessian.to(torch.float32)).to(h.device)) + 1e-30
    return h


@torch.no_grad()
def refit_group_params(weight: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor, hessian: torch.Tensor, group_size: int,
                       symmetric: bool, scale_dtype: torch.dtype,
                       chunk_elements: int = 1 << 24,
                       fixed_zeros: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The scales and zeros [N, G] that minimise each row's output error for fixed codes.

    With row n's codes q fixed, its dequantized weight is linear in the group parameters:
    w_q[k] = s_g q_k + b_g for k in group g (b_g = -z_g s_g; symmetric: w_q[k] = s_g (q_k - z)
    with z fixed). The error (w - w_q) H (w - w_q)^T is then a quadratic in theta = (s, b) whose
    minimum solves the 2G x 2G normal equations (A^T H A) theta = A^T H w, A [K, 2G] holding
    q and 1 on each group's columns. Groups are coupled through H: a group's offset can take
    up what its neighbours' rounding left. The solution is rounded to ``scale_dtype`` and kept
    for a row only where its scales are positive and its error is lower than the old one's.

    Args:
        weight: [N, K] fp32, the layer's original weight.
        codes: [N, K] integer codes (the padding past K excluded).
        scales, zeros: [N, G] fp32 (zeros: the symmetric midpoint when symmetric).
        hessian: [K, K] fp32, positive definite (:func:`hessian_for_refit`).
        fixed_zeros: keep the zeros as given and refit the scales alone, as for a symmetric
            weight (integer zero points stay integers).
    Returns:
        (scales, zeros) [N, G] fp32, rounded to ``scale_dtype``.
    """
    n, k = weight.shape
    groups = scales.shape[1]
    kp = groups * group_size
    # with its zeros fixed a weight refits like a symmetric one: w_q = s_g (q_k - z_g)
    symmetric = symmetric or fixed_zeros
    device = weight.device
    h = torch.zeros(kp, kp, dtype=torch.float32, device=device)
    h[:k, :k] = hessian.to(device)
    # block sums of H: h_block[k, g] = sum of H[k, l] over l in group g; h_groups [G, G]
    h_block = h.view(kp, groups, group_size).sum(dim=2)
    h_groups = h_block.view(groups, group_size, groups).sum(dim=1)
    new_scales, new_zeros = scales.clone(), zeros.clone()
    tiny = torch.finfo(scale_dtype).tiny
    # rows per chunk: the largest temporary is [rows, G, G, group_size] fp32
    rows_per_chunk = max(1, chunk_elements // (groups * kp))
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)
        rows = r1 - r0
        w = torch.zeros(rows, kp, dtype=torch.float32, device=device)
        w[:, :k] = weight[r0:r1]
        q = torch.zeros(rows, kp, dtype=torch.float32, device=device)
        q[:, :k] = codes[r0:r1].to(torch.float32)
        s_old, z_old = scales[r0:r1], zeros[r0:r1]
        if symmetric:
            q = q - z_old.repeat_interleave(group_size, dim=1)  # the fixed zero moves into q
            q[:, k:] = 0.0
        # the "q" column of group g as a [rows, G, kp] mask-free product: (q H) restricted to g
        qg = q.view(rows, groups, group_size)
        # m_qq[n, g, h] = sum_{k in g, l in h} q_k H_kl q_l
        qh = torch.einsum("rgi,gihj->rghj", qg, h.view(groups, group_size, groups, group_size))
        m_qq = torch.einsum("rghj,rhj->rgh", qh, qg)
        hw = (w @ h).view(rows, groups, group_size)              # (H w)[k], by group
        r_q = (qg * hw).sum(dim=2)                              # [rows, G]
        if symmetric:
            matrix, rhs = m_qq, r_q
            theta_old = s_old
        else:
            # m_q1[n, g, h] = sum_{k in g} q_k sum_{l in h} H_kl
            m_q1 = torch.einsum("rgi,gih->rgh", qg, h_block.view(groups, group_size, groups))
            matrix = torch.cat([torch.cat([m_qq, m_q1], dim=2),
                                torch.cat([m_q1.transpose(1, 2),
                                           h_groups.expand(rows, groups, groups)], dim=2)], dim=1)
            rhs = torch.cat([r_q, hw.sum(dim=2)], dim=1)
            theta_old = torch.cat([s_old, -z_old * s_old], dim=1)
        # a small ridge toward the old parameters: a group whose codes are all equal leaves
        # its scale and offset undetermined
        ridge = 1e-6 * torch.diagonal(matrix, dim1=1, dim2=2).mean(dim=1, keepdim=True) + 1e-30
        matrix64, rhs64 = matrix.to(torch.float64), rhs.to(torch.float64)
        ridged = matrix64 + torch.diag_embed(ridge.to(torch.float64).expand(rows, matrix.shape[1]))
        theta = torch.linalg.solve(ridged, rhs64 + ridge * theta_old).to(torch.float32)
        s_new = theta[:, :groups]
        ok = (s_new > tiny).all(dim=1) & torch.isfinite(theta).all(dim=1)
        s_new = torch.where(s_new > tiny, s_new, s_old).to(scale_dtype).to(torch.float32)
        z_new = (z_old if symmetric
                 else (-theta[:, groups:] / s_new).to(scale_dtype).to(torch.float32))

        def error(s_, z_):
            """(w - w_q) H (w - w_q)^T per row, less w H w^T (the same for every candidate):
            theta^T (A^T H A) theta - 2 theta^T A^T H w for the parameters as stored, theta =
            (s, -z s) (symmetric: s), in float64 from the normal equations' terms."""
            s64 = s_.to(torch.float64)
            t = s64 if symmetric else torch.cat([s64, -z_.to(torch.float64) * s64], dim=1)
            return (torch.einsum("ri,rij,rj->r", t, matrix64, t)
                    - 2.0 * (t * rhs64).sum(dim=1))
        better = ok & (error(s_new, z_new) < error(s_old, z_old))
        new_scales[r0:r1] = torch.where(better.unsqueeze(1), s_new, s_old)
        new_zeros[r0:r1] = torch.where(better.unsqueeze(1), z_new, z_old)
    return new_scales, new_zeros


@torch.no_grad()
def gptq_layer_weights(model: nn.Module, layer: nn.Module, inputs: LayerInputs,
                       targets: Dict[str, QuantConfig], damp: Optional[float] = None,
                       scale_dtype: Optional[torch.dtype] = None,
                       compute_device=None,
                       integer_zeros: bool = False) -> Dict[str, QuantizedWeight]:
    """GPTQ weights of the linears of decoder ``layer`` named in ``targets`` (module names in
    ``model``), from one pass of the layer over ``inputs``; the model is not changed.
    ``damp``: every linear's damping (None: each QuantConfig's ``damp``); ``integer_zeros``:
    as in :func:`gptq_quantize`. The registered method "gptq" (pyengine.quant.methods) runs
    it."""
    hessians, _ = input_hessians(model, layer, inputs, targets, compute_device)
    # one factorisation per Hessian that linears share (the Hessian is kept with it, so its
    # id stays its own)
    prepared: Dict[Tuple[int, bool, float],
                   Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]] = {}
    weights: Dict[str, QuantizedWeight] = {}
    for name, cfg in targets.items():
        holder, attr = linear_holder(model, name)
        linear = getattr(holder, attr)
        hessian = hessians.pop(name)
        layer_damp = cfg.damp if damp is None else damp
        key = (id(hessian), bool(cfg.act_order), layer_damp)
        if key not in prepared:
            prepared[key] = (hessian, prepare_hessian(hessian, cfg.act_order, layer_damp,
                                                      linear.weight.device))
        weights[name] = gptq_quantize(linear.weight, hessian, cfg.bits, cfg.group_size,
                                      cfg.symmetric, act_order=cfg.act_order, damp=layer_damp,
                                      scale_dtype=scale_dtype or linear.weight.dtype,
                                      prepared=prepared[key][1], integer_zeros=integer_zeros)
    return weights


def gptq_quantize_layer(model: nn.Module, layer: nn.Module, inputs: LayerInputs,
                        targets: Dict[str, QuantConfig], damp: Optional[float] = None,
                        scale_dtype: Optional[torch.dtype] = None, compute_device=None) -> None:
    """:func:`gptq_layer_weights`, each weight then put in place of its linear
    (pyengine.quant.methods.replace_linears)."""
    weights = gptq_layer_weights(model, layer, inputs, targets, damp, scale_dtype,
                                 compute_device)
    replace_linears(model, weights, targets)
