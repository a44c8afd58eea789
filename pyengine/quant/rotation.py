"""Random orthogonal rotations that make weights easier to quantize at 4 and 3 bits.

A weight matrix with a few large columns or rows (outlier channels) quantizes badly: each group's
scale is set by its largest entries, and the rest round to few levels. Rotating the spaces a
layer reads and writes by a random orthogonal matrix spreads those channels over all
coordinates without changing what the model computes (incoherence processing, as in QuIP and
QuaRot); GPTQ, which weighs errors by the calibration inputs, then keeps much more quality at 4
and 3 bits (SmolLM2: benchmarks/results/rotation_smollm2.json). Plain round-to-nearest does not
gain: the norms' scales, folded into the weights by the rotation, no longer shape where its
error falls.

Two rotations merged into the weights (nothing runs at inference that did not before), and a
third one applied online:

* **The residual stream** (:func:`rotate_residual`): every norm's scale is folded into the linear
  layers that read it and every residual stream is expressed in one random basis Q [D, D]
  (pyengine.slicing.structure, the transforms SliceGPT uses, here at full width with no
  shortcut). A sliced model is rotated while it is sliced instead: pyengine.slicing.pca's
  ``slice_model(..., rotation_seed=)`` turns each kept subspace by a random rotation of its width.
* **Attention values** (:func:`rotate_value_heads`): each key/value head's value vectors are
  expressed in a random basis R_h [d, d] (d = head_dim): v_proj's rows of head h become
  R_h^T W, o_proj's columns of every query head that reads head h become W R_h. Attention
  mixes value vectors across positions only, so the product is unchanged.
* **The MLP's inner activation** (:func:`rotate_mlp_inner`): down_proj reads
  h = act(gate(x)) * up(x), whose few huge channels make it the hardest weight to quantize at
  3 and 2 bits (QuaRot). No weight before it can absorb a rotation (the product is
  elementwise), so h is turned online by a block Walsh-Hadamard transform T (blocks of the
  largest power of two dividing the width; pyengine.ops.hadamard, a few microseconds per token)
  after a random permutation and random signs, which up/gate's rows absorb; down_proj's columns
  hold the inverse. Its cost is the transform (O(n log n) per token), not a matrix.

Rotations are drawn from a seeded generator (Haar-distributed: QR of a Gaussian matrix with the
signs of R's diagonal folded in), so a recipe's seed reproduces them.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from ..model.adapters import get_adapter
from ..nn.sliced import ResidualProjection, SlicedDecoderLayer
from ..slicing import structure


class RotationError(ValueError):
    """The model cannot be rotated (family, quantized layers, already rotated or sliced)."""


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix [n, n], float64 on the CPU, drawn from ``generator``."""
    gaussian = torch.randn(n, n, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


@torch.no_grad()
def rotate_residual(model: nn.Module, seed: int = 0) -> nn.Module:
    """Folds the norms of ``model`` into the linear layers and rotates every residual stream
    by one random orthogonal matrix [D, D] (in place; the model computes the same function up to
    rounding). Must run on the dense model, before quantizing.

    A head tied to the embeddings stays tied: the table keeps the original basis and the
    rotation is applied after the lookup and undone in the final norm (two [D, D] products per
    token), as for sliced models (pyengine.slicing.structure).

    Raises:
        RotationError: the family cannot be rotated (pyengine.slicing's blocker), the model is
            already folded (rotated or sliced), or a layer is already quantized.
    """
    adapter = get_adapter(model)
    if not adapter.supports_slicing:
        raise RotationError(f"{adapter.family} models cannot be rotated: {adapter.slicing_blocker}")
    if structure.is_folded(model):
        raise RotationError("the model's norms are already folded (it is rotated or sliced); "
                            "rotate the original dense model")
    try:
        hidden = model.config.hidden_size
        q = random_orthogonal(hidden, _generator(seed))
        n_layers = len(adapter.decoder_layers(model))
        structure.apply_bases(model, [q] * n_layers, [q] * n_layers, q)
    except structure.SlicingError as exc:
        raise RotationError(str(exc)) from None
    # every block reads and writes the same basis: its shortcut Q^T Q is the identity
    for layer in adapter.decoder_layers(model):
        layer.attn_out.shortcut = None
        layer.mlp_out.shortcut = None
    return model


def _value_rows(attn: nn.Module, adapter, n_heads: int, n_kv: int,
                head_dim: int) -> Tuple[nn.Linear, int]:
    """The linear layer that computes the values and the row where they start in it."""
    if "v_proj" in adapter.attn_inputs:
        return attn.get_submodule("v_proj"), 0
    if "qkv_proj" in adapter.attn_inputs:  # rows: queries, keys, values
        return attn.get_submodule("qkv_proj"), (n_heads + n_kv) * head_dim
    raise RotationError(f"{adapter.family}: no value projection to rotate")


def _dense(module: nn.Module, what: str) -> nn.Linear:
    return structure._dense(module, what, RotationError, "rotate")


@torch.no_grad()
def rotate_value_heads(model: nn.Module, seed: int = 0) -> nn.Module:
    """Expresses every attention value head in a random orthogonal basis [head_dim, head_dim]
    (one per layer and key/value head), merged into v_proj's rows and o_proj's columns (in
    place; the model computes the same function up to rounding). Works on dense models,
    folded or sliced or not; must run before quantizing.

    Raises:
        RotationError: the family's attention does not allow it (gemma2: see slicing), or a
            projection is already quantized.
    """
    adapter = get_adapter(model)
    if not adapter.supports_slicing:
        raise RotationError(f"{adapter.family} models cannot be rotated: {adapter.slicing_blocker}")
    config = model.config
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    group = n_heads // n_kv
    generator = _generator(seed)
    for index, layer in enumerate(adapter.decoder_layers(model)):
        attn = (layer.attn_block if isinstance(layer, SlicedDecoderLayer)
                else layer.get_submodule(adapter.attn))
        values, start = _value_rows(attn, adapter, n_heads, n_kv, head_dim)
        values = _dense(values, f"layer {index} value projection")
        out = attn.get_submodule(adapter.attn_output)
        out = _dense(out.proj if isinstance(out, ResidualProjection) else out,
                     f"layer {index} {adapter.attn_output}")
        v_weight = values.weight.detach().to(torch.float64)
        v_bias = None if values.bias is None else values.bias.detach().to(torch.float64)
        o_weight = out.weight.detach().to(torch.float64)
        for kv_head in range(n_kv):
            r = random_orthogonal(head_dim, generator).to(v_weight.device)
            rows = slice(start + kv_head * head_dim, start + (kv_head + 1) * head_dim)
            # v_h' = v_h R  <=>  W_v,h' = R^T W_v,h and b_h' = R^T b_h
            v_weight[rows] = r.T @ v_weight[rows]
            if v_bias is not None:
                v_bias[rows] = r.T @ v_bias[rows]
            # query heads kv_head * group ... read this value head: W_o,j' = W_o,j R
            for q_head in range(kv_head * group, (kv_head + 1) * group):
                cols = slice(q_head * head_dim, (q_head + 1) * head_dim)
                o_weight[:, cols] = o_weight[:, cols] @ r
        values.weight.copy_(v_weight.to(values.weight.dtype))
        if v_bias is not None:
            values.bias.copy_(v_bias.to(values.bias.dtype))
        out.weight.copy_(o_weight.to(out.weight.dtype))
    return model


# The largest Walsh-Hadamard block of the MLP's online rotation (pyengine.ops.hadamard's Triton
# kernel holds blocks of up to 16384; 4096 spreads an outlier over as many channels as needed).
MLP_HADAMARD_MAX_BLOCK = 4096
# Below this block the online rotation would spread outliers too little to pay: a width whose
# largest power-of-two factor is smaller is refused.
MLP_HADAMARD_MIN_BLOCK = 16


def _mlp_input_rows(mlp: nn.Module, adapter, width: int, index: int):
    """(gate linear, gate's first row, up linear, up's first row) of one MLP: two linears, or
    phi3's fused gate_up_proj whose first ``width`` rows are the gate's."""
    if len(adapter.mlp_inputs) == 2:
        gate, up = (_dense(mlp.get_submodule(n), f"layer {index} {n}") for n in adapter.mlp_inputs)
        return gate, 0, up, 0
    fused = _dense(mlp.get_submodule(adapter.mlp_inputs[0]),
                   f"layer {index} {adapter.mlp_inputs[0]}")
    return fused, 0, fused, width


def _permute_rows(linear: nn.Linear, first: int, perm: torch.Tensor,
                  signs: "torch.Tensor | None" = None) -> None:
    """Rows first + i of ``linear`` (weight and bias) become rows first + perm[i], times
    signs[i] when given (in place; the product in float64)."""
    rows = slice(first, first + perm.numel())
    moved = perm.to(linear.weight.device) + first
    w = linear.weight.detach()[moved].to(torch.float64)
    b = None if linear.bias is None else linear.bias.detach()[moved].to(torch.float64)
    if signs is not None:
        w = w * signs.to(w.device).unsqueeze(1)
        b = None if b is None else b * signs.to(b.device)
    linear.weight[rows] = w.to(linear.weight.dtype)
    if b is not None:
        linear.bias[rows] = b.to(linear.bias.dtype)


@torch.no_grad()
def rotate_mlp_inner(model: nn.Module, seed: int = 0,
                     max_block: int = MLP_HADAMARD_MAX_BLOCK) -> nn.Module:
    """Expresses every MLP's inner activation h [n] in a random orthogonal basis applied
    partly in the weights, partly online (in place; the model computes the same function up to
    rounding). Per layer, with a random permutation p and random signs s drawn from ``seed``:

        gate' = gate[p]            up' = s * up[p]            (rows; biases alike)
        h'    = s * h[p]           (what gate' and up' produce)
        z     = T h'               (online: the down projection's hadamard_block)
        down' = T (down[:, p] * s) (each row transformed: T is symmetric and its own inverse)

    so down' z = down h. T is the orthonormal block Walsh-Hadamard transform with blocks of
    b = the largest power of two dividing n, at most ``max_block``.

    The model must be folded (rotated or sliced first: the down projection is a
    ResidualProjection) and dense.

    Raises:
        RotationError: the family does not allow it, the model is not folded, a projection is
            quantized or already transformed, or n has no power-of-two factor of at least
            MLP_HADAMARD_MIN_BLOCK.
    """
    from ..ops.hadamard import butterfly_transform, hadamard_block_for
    adapter = get_adapter(model)
    if not adapter.supports_slicing:
        raise RotationError(f"{adapter.family} models cannot be rotated: {adapter.slicing_blocker}")
    if not structure.is_folded(model):
        raise RotationError("rotate_mlp_inner needs a folded model (rotate the residual stream "
                            "or slice it first)")
    generator = _generator(seed)
    for index, layer in enumerate(adapter.decoder_layers(model)):
        mlp = layer.mlp_block
        out = layer.mlp_out
        if out.hadamard_block:
            raise RotationError(f"layer {index}: the MLP's inner activation is already rotated")
        down = _dense(out.proj, f"layer {index} {adapter.mlp_output}")
        width = down.in_features
        block = hadamard_block_for(width, max_block)
        if block < MLP_HADAMARD_MIN_BLOCK:
            raise RotationError(f"the MLP width {width} has no power-of-two factor of at least "
                                f"{MLP_HADAMARD_MIN_BLOCK} for its online Walsh-Hadamard blocks")
        gate, gate_row, up, up_row = _mlp_input_rows(mlp, adapter, width, index)
        perm = torch.randperm(width, generator=generator)
        signs = torch.randint(0, 2, (width,), generator=generator).to(torch.float64) * 2 - 1

        _permute_rows(gate, gate_row, perm)
        _permute_rows(up, up_row, perm, signs)
        w = down.weight.detach().to(torch.float64)[:, perm.to(down.weight.device)]
        w = butterfly_transform(w * signs.to(w.device), block, torch.float64)  # T on each row
        down.weight.copy_(w.to(down.weight.dtype))
        out.hadamard_block = block
    return model


def rotate_model(model: nn.Module, seed: int = 0, residual: bool = True,
                 values: bool = True, mlp_inner: bool = False) -> nn.Module:
    """:func:`rotate_residual` (unless ``residual`` is False, e.g. for a model sliced with its
    own rotation), :func:`rotate_value_heads` and, when ``mlp_inner``, :func:`rotate_mlp_inner`,
    seeded by ``seed``; returns ``model``."""
    if residual:
        rotate_residual(model, seed)
    if values:
        rotate_value_heads(model, seed + 1)
    if mlp_inner:
        rotate_mlp_inner(model, seed + 2)
    return model

