"""Building sliced models: fold norms, rotate each residual stream, cut it to its kept width.

The transforms keep the model's function at every step (exactly, up to rounding, while no
dimension is cut), so they can be applied one layer at a time by an algorithm that measures the
partly transformed model in between (the PCA of pyengine.slicing.pca does).

Bases. A basis is a matrix Q [D, w] with orthonormal columns (D = the model's hidden size,
w = the kept width). A residual stream "in basis Q" is the row vector x @ Q of the original
stream x. Linear layers reading the stream get W <- W @ Q; layers writing it get W <- Q^T W; the
shortcut of a block maps its incoming residual (in the block's input basis) into its output basis.

Tied embeddings. When the head shares its weight with the token embeddings, rotating both
would untie them (two [V, w] matrices instead of one [V, D]). Such models keep the table in the
original basis instead: the embedding becomes a ProjectedEmbedding (lookup, then @ Q0 [D, w0])
and the final norm maps the last stream back (@ Q_L^T diag(g) [w_L, D], the norm's scale g
folded in), so the head keeps reading the shared, unrotated table. Exact, and the table is
stored once.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from ..model.adapters import ModelAdapter, get_adapter
from ..nn.quant_linear import QuantLinear
from ..nn.sliced import ProjectedEmbedding, ResidualProjection, SlicedDecoderLayer, SlicedRMSNorm


class SlicingError(ValueError):
    """The model cannot be sliced (family, quantized layers, shapes)."""


def _norm_eps(norm: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        if hasattr(norm, attr):
            return float(getattr(norm, attr))
    raise SlicingError(f"cannot find the epsilon of norm {type(norm).__name__}")


def _dense(linear: nn.Module, what: str, error: type = SlicingError,
           step: str = "slice") -> nn.Linear:
    """``linear`` when it is a dense nn.Linear (the transforms rewrite its weight), else
    ``error`` saying to ``step`` before quantizing."""
    if isinstance(linear, QuantLinear) or not isinstance(linear, nn.Linear):
        raise error(f"{what} must be a dense nn.Linear to be rotated ({step} before "
                    f"quantizing), got {type(linear).__name__}")
    return linear


def _set_weight(linear: nn.Linear, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
    """Replaces the weight (and bias) of ``linear`` and updates its feature counts."""
    linear.weight = nn.Parameter(weight.to(linear.weight.dtype).contiguous(),
                                 requires_grad=linear.weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(linear.bias.dtype).contiguous(),
                                   requires_grad=linear.bias.requires_grad)
    linear.out_features, linear.in_features = linear.weight.shape


def is_folded(model: nn.Module) -> bool:
    """Whether :func:`fold_norms` has run (the layers are SlicedDecoderLayers)."""
    adapter = get_adapter(model)
    return all(isinstance(layer, SlicedDecoderLayer) for layer in adapter.decoder_layers(model))


# ---- step 1: fold the norms ----------------------------------------------------------------------

@torch.no_grad()
def fold_norms(model: nn.Module, project_embeddings: Optional[bool] = None) -> nn.Module:
    """Folds every norm's scale into the linear layers that read its output and turns each
    decoder layer into a :class:`SlicedDecoderLayer` whose output projections add the residual
    (no shortcut yet). The model computes the same function.

    ``project_embeddings`` (default: whether the head is tied to the embeddings): keep the
    embedding table and the head in the original basis, with projections after the lookup and
    in the final norm (module docstring); otherwise the head is untied and gets the final norm's
    scale, and the table and the head are rotated themselves.
    """
    adapter = get_adapter(model)
    if not adapter.supports_slicing:
        raise SlicingError(f"{adapter.family} models cannot be sliced: {adapter.slicing_blocker}")
    if is_folded(model):
        return model
    hidden = model.config.hidden_size
    layers = adapter.decoder_layers(model)
    for i, layer in enumerate(layers):
        attn = layer.get_submodule(adapter.attn)
        mlp = layer.get_submodule(adapter.mlp)
        new_norms = []
        for norm_name, reader_module, reader_names in (
                (adapter.attn_norm, attn, adapter.attn_inputs),
                (adapter.mlp_norm, mlp, adapter.mlp_inputs)):
            norm = layer.get_submodule(norm_name)
            scale = norm.weight.detach().to(torch.float64) + adapter.norm_offset
            for name in reader_names:
                lin = _dense(reader_module.get_submodule(name), f"layer {i} {name}")
                _set_weight(lin, lin.weight.detach().to(torch.float64) * scale)
            new_norms.append(SlicedRMSNorm(hidden, hidden, _norm_eps(norm)))
        for module, out_name in ((attn, adapter.attn_output), (mlp, adapter.mlp_output)):
            out = _dense(module.get_submodule(out_name), f"layer {i} {out_name}")
            setattr(module, out_name, ResidualProjection(out))
        names = dict(attn=adapter.attn, mlp=adapter.mlp, attn_norm=adapter.attn_norm,
                     mlp_norm=adapter.mlp_norm, attn_output=adapter.attn_output,
                     mlp_output=adapter.mlp_output)
        layers[i] = SlicedDecoderLayer(attn, mlp, new_norms[0], new_norms[1], names)

    final = model.get_submodule(adapter.final_norm)
    head = model.get_submodule(adapter.head)
    scale = final.weight.detach().to(torch.float64) + adapter.norm_offset
    if project_embeddings is None:
        project_embeddings = adapter.tied_embeddings(model)
    if project_embeddings:
        embed = model.get_submodule(adapter.embed)
        dtype, device = embed.weight.dtype, embed.weight.device
        _replace(model, adapter.embed, ProjectedEmbedding(
            embed, torch.eye(hidden, dtype=dtype, device=device)))
        _replace(model, adapter.final_norm, SlicedRMSNorm(
            hidden, hidden, _norm_eps(final), projection=torch.diag(scale).to(dtype)))
        return model
    _untie_head(model, adapter)
    head = _dense(head, "the head")
    _set_weight(head, head.weight.detach().to(torch.float64) * scale)
    _replace(model, adapter.final_norm, SlicedRMSNorm(hidden, hidden, _norm_eps(final)))
    return model


def keeps_tied_table(model: nn.Module, embed_width: int, head_width: int) -> bool:
    """Whether slicing ``model`` to these embedding/head widths should keep its tied table in
    the original basis (one [V, D] table + [D, w0] and [w_L, D] projections) rather than rotate
    it into an untied [V, w0] table and [V, w_L] head: true when the model is tied and that is
    fewer elements."""
    adapter = get_adapter(model)
    if not adapter.tied_embeddings(model):
        return False
    vocab = model.get_submodule(adapter.embed).weight.shape[0]
    hidden = model.config.hidden_size
    projected = vocab * hidden + hidden * (embed_width + head_width)
    return projected < vocab * (embed_width + head_width)


def _untie_head(model: nn.Module, adapter: ModelAdapter) -> None:
    if adapter.tied_embeddings(model):
        head = model.get_submodule(adapter.head)
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for cfg in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _check_basis(q: torch.Tensor, hidden: int, what: str) -> torch.Tensor:
    if q.dim() != 2 or q.shape[0] != hidden or not 1 <= q.shape[1] <= hidden:
        raise SlicingError(f"{what}: a basis must be [hidden={hidden}, width <= {hidden}], got "
                           f"{tuple(q.shape)}")
    return q.to(torch.float64)


# ---- step 2: rotate and slice, one stream at a time ---------------------------------------------

@torch.no_grad()
def rotate_embedding(model: nn.Module, basis: torch.Tensor) -> None:
    """Expresses the embedding output in ``basis`` [D, w] (the first layer's input basis)."""
    adapter = get_adapter(model)
    embed = model.get_submodule(adapter.embed)
    q = _check_basis(basis, model.config.hidden_size, "embedding basis").to(embed.weight.device)
    if isinstance(embed, ProjectedEmbedding):
        current = embed.projection.detach().to(torch.float64)  # [D, D] (unrotated) -> [D, w]
        embed.projection = (current @ q).to(embed.weight.dtype).contiguous()
        return
    weight = embed.weight.detach().to(torch.float64) @ q
    embed.weight = nn.Parameter(weight.to(embed.weight.dtype).contiguous(), requires_grad=False)
    embed.embedding_dim = weight.shape[1]


def _layer(model: nn.Module, index: int) -> SlicedDecoderLayer:
    layer = get_adapter(model).decoder_layers(model)[index]
    if not isinstance(layer, SlicedDecoderLayer):
        raise SlicingError("fold_norms(model) must run before rotating layers")
    return layer


@torch.no_grad()
def rotate_inputs(model: nn.Module, index: int, part: str, basis: torch.Tensor) -> None:
    """Makes block ``part`` ("attn" or "mlp") of layer ``index`` read its residual stream in
    ``basis`` [D, w]: its input linears get W @ basis, its norm the width w, and its output
    projection a shortcut basis^T that maps the residual back to the original basis (its output
    stays in the original basis until :func:`rotate_output`)."""
    adapter = get_adapter(model)
    layer = _layer(model, index)
    q = _check_basis(basis, model.config.hidden_size, f"layer {index} {part} basis")
    block = layer.attn_block if part == "attn" else layer.mlp_block
    names = adapter.attn_inputs if part == "attn" else adapter.mlp_inputs
    for name in names:
        lin = _dense(block.get_submodule(name), f"layer {index} {name}")
        _set_weight(lin, lin.weight.detach().to(torch.float64) @ q.to(lin.weight.device))
    norm = layer.attn_norm if part == "attn" else layer.mlp_norm
    norm.width = q.shape[1]
    out = layer.attn_out if part == "attn" else layer.mlp_out
    out.shortcut = q.T.to(out.proj.weight.dtype).to(out.proj.weight.device).contiguous()


@torch.no_grad()
def rotate_output(model: nn.Module, index: int, part: str, basis: torch.Tensor) -> None:
    """Makes block ``part`` of layer ``index`` write its output (and carry its residual) in
    ``basis`` [D, w]: W <- basis^T W, b <- basis^T b, shortcut <- shortcut @ basis."""
    layer = _layer(model, index)
    q = _check_basis(basis, model.config.hidden_size, f"layer {index} {part} output basis")
    out = layer.attn_out if part == "attn" else layer.mlp_out
    lin = _dense(out.proj, f"layer {index} {part} output projection")
    qd = q.to(lin.weight.device)
    bias = None if lin.bias is None else qd.T @ lin.bias.detach().to(torch.float64)
    _set_weight(lin, qd.T @ lin.weight.detach().to(torch.float64), bias)
    current = (torch.eye(q.shape[0], dtype=torch.float64, device=qd.device) if out.shortcut is None
               else out.shortcut.detach().to(torch.float64))
    out.shortcut = (current @ qd).to(lin.weight.dtype).contiguous()


@torch.no_grad()
def rotate_head(model: nn.Module, basis: torch.Tensor) -> None:
    """Makes the final norm and the head read the last layer's output in ``basis`` [D, w]."""
    adapter = get_adapter(model)
    q = _check_basis(basis, model.config.hidden_size, "head basis")
    final = model.get_submodule(adapter.final_norm)
    if final.projection is not None:
        # the head reads the original basis: n(x) @ diag(g) = n(x Q) @ Q^T diag(g)
        current = final.projection.detach().to(torch.float64)
        final.projection = (q.T.to(current.device) @ current).to(final.projection.dtype).contiguous()
        final.width = q.shape[1]
        return
    head = _dense(model.get_submodule(adapter.head), "the head")
    _set_weight(head, head.weight.detach().to(torch.float64) @ q.to(head.weight.device))
    model.get_submodule(adapter.final_norm).width = q.shape[1]


def drop_identity_shortcuts(model: nn.Module, atol: float = 0.0) -> int:
    """Removes shortcuts that are identity matrices (same basis in and out); returns how many.
    With atol=0 only exact identities go."""
    removed = 0
    for layer in get_adapter(model).decoder_layers(model):
        if not isinstance(layer, SlicedDecoderLayer):
            continue
        for out in (layer.attn_out, layer.mlp_out):
            s = out.shortcut
            if s is not None and s.shape[0] == s.shape[1]:
                eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
                if torch.allclose(s, eye, rtol=0, atol=atol):
                    out.shortcut = None
                    removed += 1
    return removed


@torch.no_grad()
def apply_bases(model: nn.Module, attn_bases: Sequence[torch.Tensor],
                mlp_bases: Sequence[torch.Tensor], head_basis: torch.Tensor) -> nn.Module:
    """Folds the norms and rotates/slices the whole model at once.

    Args:
        attn_bases: per layer, the basis [D, w] of the residual stream entering the layer (and
            its attention); the first is also the embedding's.
        mlp_bases: per layer, the basis [D, w'] of the stream entering the MLP.
        head_basis: the basis [D, w''] of the last layer's output (read by the head).
    """
    layers = get_adapter(model).decoder_layers(model)
    if len(attn_bases) != len(layers) or len(mlp_bases) != len(layers):
        raise SlicingError(f"need one attention and one MLP basis per layer ({len(layers)}), got "
                           f"{len(attn_bases)} and {len(mlp_bases)}")
    if not is_folded(model):
        fold_norms(model, keeps_tied_table(model, attn_bases[0].shape[1], head_basis.shape[1]))
    rotate_embedding(model, attn_bases[0])
    for i in range(len(layers)):
        rotate_inputs(model, i, "attn", attn_bases[i])
        rotate_output(model, i, "attn", mlp_bases[i])
        rotate_inputs(model, i, "mlp", mlp_bases[i])
        nxt = attn_bases[i + 1] if i + 1 < len(layers) else head_basis
        rotate_output(model, i, "mlp", nxt)
    rotate_head(model, head_basis)
    return model


def layer_widths(model: nn.Module) -> List[int]:
    """The kept width of each layer's input residual stream."""
    return [layer.attn_norm.width if isinstance(layer, SlicedDecoderLayer)
            else model.config.hidden_size for layer in get_adapter(model).decoder_layers(model)]


# ---- describing and rebuilding the structure (checkpoints) ---------------------------------------

def describe_structure(model: nn.Module) -> Optional[dict]:
    """The shapes that make a sliced model (None for an unsliced one): what a checkpoint needs
    to rebuild the module skeleton before loading tensors."""
    if not is_folded(model):
        return None
    adapter = get_adapter(model)
    layers = []
    for layer in adapter.decoder_layers(model):
        layers.append({
            "attn_width": layer.attn_norm.width, "mlp_width": layer.mlp_norm.width,
            "attn_out_width": layer.attn_out.out_features,
            "mlp_out_width": layer.mlp_out.out_features,
            "attn_shortcut": layer.attn_out.shortcut is not None,
            "mlp_shortcut": layer.mlp_out.shortcut is not None,
            "attn_eps": layer.attn_norm.eps, "mlp_eps": layer.mlp_norm.eps,
            "mlp_hadamard_block": layer.mlp_out.hadamard_block,
        })
    final = model.get_submodule(adapter.final_norm)
    embed = model.get_submodule(adapter.embed)
    # a ProjectedEmbedding, or a QuantEmbedding made from one (it keeps the projection)
    projected = getattr(embed, "projection", None) is not None
    return {
        "hidden_size": model.config.hidden_size,
        "projected_embeddings": projected,
        "embed_width": embed.output_width if projected else embed.embedding_dim,
        "head_width": final.width,
        "final_eps": final.eps,
        "layers": layers,
    }


def _meta_like(t: torch.Tensor, shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=t.dtype, device="meta"), requires_grad=False)


@torch.no_grad()
def build_skeleton(model: nn.Module, desc: dict) -> nn.Module:
    """Turns a freshly built model (weights on the meta device) into the sliced skeleton that
    ``desc`` (from :func:`describe_structure`) describes; the tensors are loaded afterwards."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    if len(desc["layers"]) != len(layers) or desc["hidden_size"] != model.config.hidden_size:
        raise SlicingError("the checkpoint's sliced structure does not match the model config")
    projected = bool(desc.get("projected_embeddings", False))
    fold_norms(model, project_embeddings=projected)
    hidden = model.config.hidden_size
    embed = model.get_submodule(adapter.embed)
    if projected:
        embed.projection = torch.empty(hidden, desc["embed_width"], dtype=embed.weight.dtype,
                                       device="meta")
    else:
        embed.weight = _meta_like(embed.weight, (embed.weight.shape[0], desc["embed_width"]))
        embed.embedding_dim = desc["embed_width"]
    for layer, d in zip(layers, desc["layers"]):
        for part, width, out_width, has_shortcut, eps in (
                ("attn", d["attn_width"], d["attn_out_width"], d["attn_shortcut"], d["attn_eps"]),
                ("mlp", d["mlp_width"], d["mlp_out_width"], d["mlp_shortcut"], d["mlp_eps"])):
            block = layer.attn_block if part == "attn" else layer.mlp_block
            names = adapter.attn_inputs if part == "attn" else adapter.mlp_inputs
            for name in names:
                lin = block.get_submodule(name)
                _set_weight(lin, _meta_like(lin.weight, (lin.weight.shape[0], width)))
            norm = layer.attn_norm if part == "attn" else layer.mlp_norm
            norm.width, norm.eps = width, eps
            out = layer.attn_out if part == "attn" else layer.mlp_out
            lin = out.proj
            bias = None if lin.bias is None else _meta_like(lin.bias, (out_width,))
            _set_weight(lin, _meta_like(lin.weight, (out_width, lin.weight.shape[1])), bias)
            out.shortcut = (torch.empty(width, out_width, dtype=lin.weight.dtype, device="meta")
                            if has_shortcut else None)
        block = int(d.get("mlp_hadamard_block", 0))
        if block and layer.mlp_out.in_features % block:
            raise SlicingError(f"mlp_hadamard_block {block} does not divide the MLP width "
                               f"{layer.mlp_out.in_features}")
        layer.mlp_out.hadamard_block = block
    final = model.get_submodule(adapter.final_norm)
    final.width, final.eps = desc["head_width"], desc["final_eps"]
    if projected:
        final.projection = torch.empty(desc["head_width"], hidden, dtype=embed.weight.dtype,
                                       device="meta")
    else:
        head = model.get_submodule(adapter.head)
        _set_weight(head, _meta_like(head.weight, (head.weight.shape[0], desc["head_width"])))
    return model
