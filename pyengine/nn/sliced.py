"""Modules of sliced models (SliceGPT with per-layer widths).

In a sliced model every decoder layer reads a residual stream of its own width, expressed in a
rotated basis. The norms' scales are folded into the linear layers that follow them, so a norm
only normalises (and must keep the original model's normalising dimension). Each block's output
projection also maps the incoming residual into the block's output basis through a *shortcut*
matrix, fused into one op: ``y = x @ W^T + b + residual @ shortcut``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import qlinear, shortcut_matmul
from ..ops.hadamard import hadamard_transform
from .quant_linear import QuantLinear


class SlicedRMSNorm(nn.Module):
    """RMS normalisation without a scale: y = x / sqrt(sum(x^2) / normalizer_dim + eps), then
    ``y @ projection`` when the norm has an output projection.

    ``normalizer_dim`` is the original hidden size: a rotated, sliced stream keeps (almost) all of
    the original vector's energy in fewer coordinates, so dividing by the original size keeps the
    original normalisation.

    ``projection`` (buffer, [width, D] or None): the final norm of a model whose head stays tied
    to the unrotated embeddings maps the sliced stream back to the original basis, with the
    norm's scale folded in (Q^T diag(g)), so the head can keep reading the embedding matrix.
    """

    def __init__(self, width: int, normalizer_dim: int, eps: float,
                 projection: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.width = int(width)
        self.normalizer_dim = int(normalizer_dim)
        self.eps = float(eps)
        self.register_buffer("projection", projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.float32)
        mean_square = xf.pow(2).sum(-1, keepdim=True) / self.normalizer_dim
        y = (xf * torch.rsqrt(mean_square + self.eps)).to(x.dtype)
        if self.projection is not None:
            y = y @ self.projection.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        extra = "" if self.projection is None else f", projection={tuple(self.projection.shape)}"
        return (f"width={self.width}, normalizer_dim={self.normalizer_dim}, eps={self.eps}"
                f"{extra}")


class ProjectedEmbedding(nn.Embedding):
    """The token embedding of a sliced model whose head stays tied to it: the table keeps the
    original basis and width ([V, D], shared with the head) and the first layer's basis is
    applied after the lookup: ``embedding(ids) @ projection``, projection [D, w0] (buffer)."""

    def __init__(self, embedding: nn.Embedding, projection: torch.Tensor) -> None:
        super().__init__(embedding.num_embeddings, embedding.embedding_dim,
                         padding_idx=embedding.padding_idx, device="meta",
                         dtype=embedding.weight.dtype)
        self.weight = embedding.weight  # the same Parameter: the head's tie survives
        self.register_buffer("projection", projection)

    @property
    def output_width(self) -> int:
        return self.projection.shape[1]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = super().forward(input_ids)
        return rows @ self.projection.to(rows.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, projection={tuple(self.projection.shape)}"


class ResidualProjection(nn.Module):
    """A block's output projection, applied by the decoder layer together with the residual.

    Sits where the attention's ``o_proj`` or the MLP's ``down_proj`` was; its forward turns the
    block's output into the projection's input (the identity, or the online Walsh-Hadamard
    transform below), so the attention / MLP module returns the projection's input and the
    layer calls :meth:`project` with the residual. ``proj`` is an nn.Linear or a QuantLinear
    [N, K]; ``shortcut`` is None (the residual is already in the output basis and width) or a
    dense [R, N] matrix mapping the residual (width R) into the output basis.

    ``hadamard_block`` (0: none): the projection reads its input through the orthonormal
    Walsh-Hadamard transform of each block of that many features (pyengine.ops.hadamard;
    a rotated MLP's inner activation, pyengine.quant.rotation.rotate_mlp_inner), which
    ``proj``'s columns hold too.
    """

    def __init__(self, proj: nn.Module, shortcut: Optional[torch.Tensor] = None,
                 hadamard_block: int = 0) -> None:
        super().__init__()
        self.proj = proj
        self.register_buffer("shortcut", shortcut)
        self.hadamard_block = int(hadamard_block)

    @property
    def in_features(self) -> int:
        return self.proj.in_features

    @property
    def out_features(self) -> int:
        return self.proj.out_features

    @property
    def residual_width(self) -> int:
        return self.out_features if self.shortcut is None else self.shortcut.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output [..., K] -> the projection's input [..., K]."""
        if self.hadamard_block:
            return hadamard_transform(x, self.hadamard_block)
        return x

    def project(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x [..., K], residual [..., R] -> [..., N]."""
        proj = self.proj
        if self.shortcut is None:
            return proj(x) + residual
        if isinstance(proj, QuantLinear):
            return qlinear(x, proj.op_weight, proj.bias, residual=residual,
                           shortcut=self.shortcut, act_bits=proj.act_bits)
        return shortcut_matmul(x, proj.weight, residual, self.shortcut, proj.bias)

    def extra_repr(self) -> str:
        s = "none" if self.shortcut is None else f"{tuple(self.shortcut.shape)}"
        hadamard = f", hadamard_block={self.hadamard_block}" if self.hadamard_block else ""
        return f"shortcut={s}{hadamard}"


class SlicedDecoderLayer(nn.Module):
    """A pre-norm decoder layer of a sliced model:

        h   = attn_out.project(attn(attn_norm(x)), residual=x)
        out = mlp_out.project(mlp(mlp_norm(h)), residual=h)

    (attn and mlp end in their ResidualProjection's forward, so they return the projections'
    inputs.)

    It keeps the Hugging Face attention and MLP modules (and their attribute names, so module
    names such as ``model.layers.3.self_attn.q_proj`` do not change); their output projections
    are :class:`ResidualProjection` modules.
    """

    def __init__(self, attn: nn.Module, mlp: nn.Module, attn_norm: nn.Module, mlp_norm: nn.Module,
                 names: dict) -> None:
        super().__init__()
        # names: attribute names of the original layer, from the family's adapter
        self._names = dict(names)
        setattr(self, names["attn"], attn)
        setattr(self, names["mlp"], mlp)
        setattr(self, names["attn_norm"], attn_norm)
        setattr(self, names["mlp_norm"], mlp_norm)

    # Accessors by role (the attributes themselves keep the family's names).
    @property
    def attn_block(self) -> nn.Module:
        return self._modules[self._names["attn"]]

    @property
    def mlp_block(self) -> nn.Module:
        return self._modules[self._names["mlp"]]

    @property
    def attn_norm(self) -> nn.Module:
        return self._modules[self._names["attn_norm"]]

    @property
    def mlp_norm(self) -> nn.Module:
        return self._modules[self._names["mlp_norm"]]

    @property
    def attn_out(self) -> ResidualProjection:
        return self.attn_block._modules[self._names["attn_output"]]

    @property
    def mlp_out(self) -> ResidualProjection:
        return self.mlp_block._modules[self._names["mlp_output"]]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:
            raise TypeError("SlicedDecoderLayer takes the hidden states positionally and every "
                            "other argument by keyword")
        residual = hidden_states
        out = self.attn_block(hidden_states=self.attn_norm(hidden_states), **kwargs)
        attn_hidden = out[0] if isinstance(out, tuple) else out
        h = self.attn_out.project(attn_hidden, residual)
        return self.mlp_out.project(self.mlp_block(self.mlp_norm(h)), h)
