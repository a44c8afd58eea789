"""Layer-by-layer passes over calibration data.

Algorithms that measure or transform a model one decoder layer at a time (scores, GPTQ,
SliceGPT's PCA) share this machinery: the hidden states entering the first decoder layer are
captured once (the model runs up to that layer and stops), then each layer is run on the states
the previous layer produced. Memory stays bounded by one layer's activations over the
calibration set, and with ``compute_device`` a model kept on the CPU is processed one layer at a
time on an accelerator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..model.adapters import get_adapter
from ..utils import module_device


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """The states entering one decoder layer, batch by batch.

    hidden: per batch, a tensor [batch, seq, width].
    kwargs: per batch, the keyword arguments the model passes to its decoder layers (attention
        mask, position ids and embeddings...), captured from the model itself.
    """

    hidden: List[torch.Tensor]
    kwargs: List[Dict[str, Any]]

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def vocab_size(model: nn.Module) -> Optional[int]:
    """Rows of the model's input embedding table (its vocabulary), or None when unknown."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None:
        config = getattr(model, "config", None)
        rows = getattr(config, "vocab_size", None)
    return int(rows) if rows else None


def check_token_ids(model: nn.Module, ids: torch.Tensor, what: str) -> None:
    """ValueError unless ``ids`` holds integer token ids inside the model's vocabulary."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{what} must hold integer token ids, got {ids.dtype}")
    if ids.device.type == "meta" or ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    vocab = vocab_size(model)
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueError(f"{what} holds token ids from {lo} to {hi}, outside the model's "
                         f"vocabulary [0, {vocab}) (ids from another tokenizer?)")


def check_calibration(model: nn.Module, calibration: object) -> None:
    """ValueError unless ``calibration`` is a non-empty int tensor [n_samples, seqlen] of the
    model's token ids (what pyengine.calibration_data returns)."""
    if not isinstance(calibration, torch.Tensor):
        raise ValueError(f"calibration must be a tensor of token ids [n_samples, seqlen] "
                         f"(pyengine.calibration_data), got {type(calibration).__name__}")
    if calibration.dim() != 2:
        raise ValueError(f"calibration must be token ids [n_samples, seqlen], got shape "
                         f"{tuple(calibration.shape)}")
    if calibration.numel() == 0:
        raise ValueError(f"calibration is empty (shape {tuple(calibration.shape)}): it needs at "
                         f"least one sample of at least one token")
    check_token_ids(model, calibration, "calibration")


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, calibration: torch.Tensor, batch_size: int = 1,
                               store_device: Optional[torch.device] = None) -> LayerInputs:
    """Runs the model on ``calibration`` (int64 token ids [n, seq]) up to its first decoder layer.

    Returns the hidden states entering that layer and the keyword arguments it receives, kept
    on ``store_device`` (default: where they were produced).
    """
    check_calibration(model, calibration)
    adapter = get_adapter(model)
    first = adapter.decoder_layers(model)[0]
    captured: Dict[str, Any] = {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured["hidden"] = hidden
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = module_device(model)
    inputs = LayerInputs([], [])
    try:
        for start in range(0, calibration.shape[0], batch_size):
            ids = calibration[start:start + batch_size].to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
            else:
                raise RuntimeError("the model finished without reaching its first decoder layer")
            target = store_device or captured["hidden"].device
            inputs.hidden.append(captured["hidden"].to(target))
            inputs.kwargs.append({k: _to(v, target) for k, v in captured["kwargs"].items()})
    finally:
        handle.remove()
    return inputs


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs,
              compute_device: Optional[torch.device] = None) -> LayerInputs:
    """The states leaving ``layer`` for every batch of ``inputs`` (same kwargs), stored where the
    inputs are; the layer runs on ``compute_device`` (default: where its weights are)."""
    device = compute_device or module_device(layer)
    out = LayerInputs([], inputs.kwargs)
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
        result = layer(hidden.to(device), **{k: _to(v, device) for k, v in kwargs.items()})
        result = result[0] if isinstance(result, tuple) else result
        out.hidden.append(result.to(hidden.device))
    return out


class LayerwiseRunner:
    """Walks the decoder layers in order over calibration data.

    Usage::

        runner = LayerwiseRunner(model, calibration)
        for index, layer, inputs in runner:
            ...                       # measure or modify `layer` using `inputs`
            runner.advance()          # run the (possibly modified) layer: next layer's inputs

    ``advance(outputs)`` accepts outputs the caller computed itself.
    """

    def __init__(self, model: nn.Module, calibration: torch.Tensor, batch_size: int = 1,
                 compute_device: Optional["str | torch.device"] = None) -> None:
        self.model = model
        self.layers = get_adapter(model).decoder_layers(model)
        self.compute_device = torch.device(compute_device) if compute_device else None
        self.inputs = capture_first_layer_inputs(model, calibration, batch_size)
        self._index = 0
        self._advanced = True

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        while self._index < len(self.layers):
            if not self._advanced:
                raise RuntimeError("call runner.advance() before moving to the next layer")
            self._advanced = False
            layer = self.layers[self._index]
            moved = self._move(layer)
            yield self._index, layer, self.inputs
            self._index += 1
            if moved is not None:
                layer.to(moved)

    def _move(self, layer: nn.Module) -> Optional[torch.device]:
        if self.compute_device is None:
            return None
        home = module_device(layer)
        if home != self.compute_device:
            layer.to(self.compute_device)
            return home
        return None

    def advance(self, outputs: Optional[LayerInputs] = None) -> LayerInputs:
        """Replaces the current inputs by the current layer's outputs."""
        layer = self.layers[self._index]
        self.inputs = outputs if outputs is not None else run_layer(layer, self.inputs,
                                                                    self.compute_device)
        self._advanced = True
        return self.inputs
