"""Per-layer scores that decide how each decoder layer is compressed.

* ``lim`` (layer input modification): -cos(layer input, layer output), averaged over every
  calibration token. A layer that changes its input a lot scores high: it is *important* and
  keeps more bits.
* ``lr`` (layer redundancy): cos(layer input, layer output) = -lim. A layer whose output stays
  close to its input scores high: it is *redundant* and loses more width under dynamic slicing.
* ``zd`` (z-score distribution): the share of the layer's linear weights whose z-score (against
  the mean and standard deviation of all of that layer's linear weights) has |z| > 1. The seeds'
  convention (layer-wise quantization, Dumitru et al. 2024: "the number of layer weights that are
  much larger than average (smaller is better)") is that a *smaller* share marks a more important
  layer, so :func:`importance` uses -zd for it.

LIM and LR need one layer-by-layer calibration pass; ZD needs only the weights.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .calibrate import LayerInputs, LayerwiseRunner, check_calibration
from .compress import quantizable_linears
from ..model.adapters import get_adapter
from ..nn.quant_linear import QuantLinear
from ..utils import is_int, progress

@torch.no_grad()
def zd_scores(model: nn.Module, only_layer: Optional[int] = None) -> List[float]:
    """Per decoder layer, the share of its linear weights with |z| > 1 (``only_layer``: that
    layer's value alone, in a one-element list; the other layers' weights may be absent)."""
    adapter = get_adapter(model)
    per_layer: Dict[int, List[torch.Tensor]] = {}
    for name, linear, _, _ in quantizable_linears(model):
        index = adapter.layer_index(name)
        if index is None or (only_layer is not None and index != only_layer):
            continue
        w = linear.dequantize(torch.float32) if isinstance(linear, QuantLinear) else linear.weight
        per_layer.setdefault(index, []).append(w.detach().reshape(-1).to(torch.float32))
    indices = (range(len(adapter.decoder_layers(model))) if only_layer is None
               else [only_layer])
    scores = []
    for index in indices:
        w = torch.cat(per_layer[index])
        mean, std = w.mean(), w.std(correction=0)
        scores.append(float(((w - mean).abs() > std).to(torch.float64).mean()))
    return scores


def mean_cosine(inputs: LayerInputs, outputs: LayerInputs) -> float:
    """cos(layer input, layer output) averaged over every calibration token (the LR score)."""
    total, count = 0.0, 0
    for x, y in zip(inputs.hidden, outputs.hidden):
        cos = nn.functional.cosine_similarity(x.to(torch.float32), y.to(torch.float32), dim=-1)
        total += float(cos.sum(dtype=torch.float64))
        count += cos.numel()
    return total / count


@torch.no_grad()
def scores(model: nn.Module, calibration: torch.Tensor, batch_size: int = 1,
           compute_device: Optional[Union[str, torch.device]] = None,
           show_progress: bool = True) -> Dict[str, List[float]]:
    """{"lim": [...], "zd": [...], "lr": [...]}, one value per decoder layer.

    Args:
        calibration: token ids [n_samples, seqlen] (pyengine.calibration_data).
        compute_device: run each layer there (e.g. "cuda") while the model stays where it is.
    Raises:
        ValueError: calibration that is empty, not integer token ids, or outside the model's
            vocabulary.
    """
    check_calibration(model, calibration)
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    runner = LayerwiseRunner(model, calibration, batch_size, compute_device)
    lr = []
    for index, layer, inputs in progress(runner, desc="scores", enabled=show_progress,
                                         total=len(runner), unit="layer"):
        lr.append(mean_cosine(inputs, runner.advance()))
    return {"lim": [-v for v in lr], "zd": zd_scores(model), "lr": lr}


def importance(kind: Union[str, Sequence[float]], layer_scores: Optional[Dict[str, List[float]]],
               n_layers: int, seed: int = 0) -> List[float]:
    """Per-layer importance (higher = more important = keeps more bits).

    ``kind`` is "lim" (the LIM score), "zd" (minus the ZD share, the seeds' convention), "random"
    (a seeded random order) or an explicit list of floats.
    """
    if not isinstance(kind, str):
        values = [float(v) for v in kind]
        if len(values) != n_layers:
            raise ValueError(f"importance list has {len(values)} values for {n_layers} layers")
        return values
    if kind == "random":
        gen = torch.Generator().manual_seed(seed)
        return torch.randperm(n_layers, generator=gen).to(torch.float64).tolist()
    if kind not in ("lim", "zd"):
        raise ValueError(f"importance must be 'lim', 'zd', 'random' or a list of floats, got {kind!r}")
    if layer_scores is None or kind not in layer_scores:
        raise ValueError(f"importance {kind!r} needs scores (pyengine.scores)")
    values = layer_scores[kind]
    return list(values) if kind == "lim" else [-v for v in values]
