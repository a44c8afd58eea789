"""SliceGPT's rotation: PCA of each residual stream on calibration data, layer by layer.

Each basis is computed on the partly sliced model, so later layers see the signals the earlier
(already rotated and cut) layers really produce:

1. fold the norms (structure.fold_norms); capture the embeddings' output; its principal
   directions are the basis of layer 0's input; rotate and cut the embeddings;
2. for each layer: rotate its attention inputs to the current basis; run the attention half
   (output still in the original basis); the PCA of that signal gives the MLP-input basis;
   rotate the attention output and the MLP inputs to it; run the MLP half; the PCA of its output
   gives the next layer's basis; rotate the MLP output to it;
3. the last basis is the head's.

PCA here is the eigendecomposition of the uncentred second moment X^T X, accumulated in float64
over every calibration token; a basis keeps the leading ``width`` eigenvectors.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from ..pipeline.calibrate import LayerInputs, LayerwiseRunner
from ..model.adapters import get_adapter
from ..quant.rotation import random_orthogonal
from ..utils import progress
from . import structure


@torch.no_grad()
def principal_basis(signals: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eigenvectors of sum_x x^T x (float64), strongest first: [D, D]."""
    dim = signals[0].shape[-1]
    moment = torch.zeros(dim, dim, dtype=torch.float64, device=signals[0].device)
    for x in signals:
        flat = x.reshape(-1, dim).to(torch.float64)
        moment += flat.T @ flat
    eigenvalues, eigenvectors = torch.linalg.eigh(moment)
    return eigenvectors.flip(-1)


def _project(signals: Sequence[torch.Tensor], basis: torch.Tensor) -> List[torch.Tensor]:
    return [(x.to(torch.float64) @ basis.to(x.device)).to(x.dtype) for x in signals]


@torch.no_grad()
def _attention_half(layer, inputs: LayerInputs) -> List[torch.Tensor]:
    out = []
    for x, kwargs in zip(inputs.hidden, inputs.kwargs):
        result = layer.attn_block(hidden_states=layer.attn_norm(x), **kwargs)
        a = result[0] if isinstance(result, tuple) else result
        out.append(layer.attn_out.project(a, x))
    return out


@torch.no_grad()
def _mlp_half(layer, hidden: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    return [layer.mlp_out.project(layer.mlp_block(layer.mlp_norm(h)), h) for h in hidden]


@torch.no_grad()
def slice_model(model: nn.Module, widths: Sequence[int], calibration: torch.Tensor,
                batch_size: int = 1, show_progress: bool = True,
                rotation_seed: Optional[int] = None) -> nn.Module:
    """Rotates every residual stream of ``model`` by PCA and cuts layer i's to ``widths[i]``
    (in place). The last layer's output and the head keep ``widths[-1]``.

    Args:
        widths: one kept width per decoder layer (<= hidden size).
        calibration: token ids [n_samples, seqlen].
        rotation_seed: when given, each kept subspace is also turned by a random orthogonal
            matrix of its width (drawn in order from a generator with this seed): the same
            subspace is kept, in a basis whose coordinates mix the principal directions, which
            spreads outlier channels before quantizing (pyengine.quant.rotation).
    """
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    hidden = model.config.hidden_size
    widths = [int(w) for w in widths]
    if len(widths) != len(layers) or not all(1 <= w <= hidden for w in widths):
        raise ValueError(f"need {len(layers)} widths in 1..{hidden}, got {widths}")
    if not structure.is_folded(model):
        structure.fold_norms(model, structure.keeps_tied_table(model, widths[0], widths[-1]))
    generator = None if rotation_seed is None else torch.Generator().manual_seed(int(rotation_seed))

    def kept(signals, width: int) -> torch.Tensor:
        basis = principal_basis(signals)[:, :width]
        if generator is not None:
            basis = basis @ random_orthogonal(width, generator).to(basis)
        return basis

    runner = LayerwiseRunner(model, calibration, batch_size)
    basis = kept(runner.inputs.hidden, widths[0])
    structure.rotate_embedding(model, basis)
    runner.inputs.hidden = _project(runner.inputs.hidden, basis)

    for index, layer, inputs in progress(runner, desc="slicing", enabled=show_progress,
                                         total=len(runner), unit="layer"):
        width = widths[index]
        next_width = widths[index + 1] if index + 1 < len(layers) else widths[-1]
        structure.rotate_inputs(model, index, "attn", basis)
        mid = _attention_half(layer, inputs)                      # original basis
        mid_basis = kept(mid, width)
        structure.rotate_output(model, index, "attn", mid_basis)
        structure.rotate_inputs(model, index, "mlp", mid_basis)
        out = _mlp_half(layer, _project(mid, mid_basis))          # original basis
        basis = kept(out, next_width)
        structure.rotate_output(model, index, "mlp", basis)
        runner.advance(LayerInputs(_project(out, basis), inputs.kwargs))
    structure.rotate_head(model, basis)
    return model
