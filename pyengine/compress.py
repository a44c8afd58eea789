"""Compress Hugging Face decoder models in place: slice (optional), then quantize per layer.

Patching swaps module *instances*: each nn.Linear the recipe names becomes a
:class:`~pyengine.modules.QuantLinear`; nothing global is changed, and
:func:`dequantize_model` gives back a plain model with dense (dequantized) weights.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .models.adapters import get_adapter
from .modules.matryoshka_linear import MatryoshkaLinear
from .modules.fusion import fuse_projections
from .modules.quant_linear import QuantLinear
from .modules.sliced import ResidualProjection
from .qweight import padded_in_features
from .recipe import Recipe
from .utils import progress

RECIPE_ATTR = "pyengine_recipe"


def quantizable_linears(model: nn.Module) -> Iterator[Tuple[str, nn.Module, nn.Module, str]]:
    """(name, linear, parent, attribute) for every linear layer of the decoder layers and the head.

    ``name`` is the module name users write recipes against (for a sliced block's output
    projection, the name of its ResidualProjection, e.g. ``model.layers.0.self_attn.o_proj``);
    ``parent.attribute`` is where the linear (dense or already quantized) sits.
    """
    adapter = get_adapter(model)
    layers_prefix = adapter.layers + "."
    for name, module in model.named_modules():
        if not (name.startswith(layers_prefix) or name == adapter.head):
            continue
        if isinstance(module, ResidualProjection):
            yield name, module.proj, module, "proj"
            continue
        if isinstance(module, (nn.Linear, QuantLinear)):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            if isinstance(parent, ResidualProjection):
                continue  # reported under the projection's name above
            yield name, module, parent, attr


def _check_recipe_names(model: nn.Module, recipe: Recipe) -> None:
    adapter = get_adapter(model)
    for key, cfg in recipe.quant.items():
        if cfg is not None and key != "_default":
            if re.fullmatch(key, adapter.embed):
                raise ValueError(f"recipe pattern {key!r} names the embeddings ({adapter.embed}); "
                                 f"quantizing embeddings is not supported")


def compressed_reason(model: nn.Module) -> Optional[str]:
    """Why ``model`` counts as compressed by pyengine (quantized layers, or the recipe that
    pyengine.compress and pyengine.load leave on it), or None for a model pyengine has not
    compressed. A model that is only sliced by hand (pyengine.slicing) is not compressed."""
    quantized = [name for name, module in model.named_modules() if isinstance(module, QuantLinear)]
    if quantized:
        return f"{len(quantized)} quantized layers such as {quantized[0]!r}"
    if getattr(model, RECIPE_ATTR, None) is not None:
        return "it carries the recipe of an earlier pyengine.compress or pyengine.load"
    return None


def compress(model: nn.Module, recipe: Recipe, calibration=None, *, show_progress: bool = True,
             scale_dtype: Optional[torch.dtype] = None,
             matquant_options: Optional[Mapping[str, Any]] = None, fuse: bool = True) -> nn.Module:
    """Compresses ``model`` in place and returns it.

    Slicing (``recipe.slicing``) runs first, on the dense model: the residual stream of each
    layer is rotated by PCA of calibration activations and cut to its kept width. Then every
    linear layer the recipe names is quantized (RTN, or GPTQ with calibration data). Layers
    whose QuantConfig has ``matryoshka=True`` become MatryoshkaLinear layers holding an int8
    parent (RTN, or MatQuant with calibration data) and serving its int8 slice until
    pyengine.set_precision says otherwise.

    Args:
        model: a Hugging Face causal LM of a supported family (pyengine.supported_architectures()).
        recipe: what to do (pyengine.Recipe).
        calibration: token batches (pyengine.calibration_data) for slicing and GPTQ.
        scale_dtype: dtype of the quantization scales; default: each weight's dtype.
        matquant_options: keyword arguments of
            pyengine.quantizers.matquant.matquant_quantize_model (``weights`` = the slice
            weights lambda, ``steps``, ``lr``, ``grid``, ``learn_codes``, ``compute_device``...).
        fuse: serve the quantized layers that read one input (q/k/v, gate/up) with one op per
            group where they share a format (pyengine.fuse_projections; no weight is copied).
    Raises:
        UnsupportedModelError: the family has no adapter.
        ValueError: a model that is already compressed (quantized layers, or a model from
            pyengine.compress / pyengine.load), calibration that is not token ids of the model's
            vocabulary, or a recipe the model cannot take (slicing without calibration data, ...).
    """
    adapter = get_adapter(model)
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a pyengine.Recipe, got {type(recipe).__name__}")
    already = compressed_reason(model)
    if already:
        raise ValueError(f"the model is already compressed ({already}); compress the original "
                         f"dense model instead")
    if calibration is not None:
        from .calibrate import check_calibration
        check_calibration(model, calibration)
    _check_recipe_names(model, recipe)
    if recipe.slicing is not None:
        _apply_slicing(model, recipe, calibration, show_progress)

    targets = []
    for name, linear, parent, attr in quantizable_linears(model):
        cfg = recipe.config_for(name, is_head=(name == adapter.head))
        if cfg is None or isinstance(linear, QuantLinear):
            continue
        targets.append((name, linear, parent, attr, cfg))
    needs_calibration = [t[0] for t in targets if t[4].method in ("gptq", "matquant")]
    if needs_calibration and calibration is None:
        method = next(t[4].method for t in targets if t[0] == needs_calibration[0])
        raise ValueError(f"method {method!r} needs calibration data (pyengine.calibration_data); "
                         f"layers: {needs_calibration[:3]}{'...' if len(needs_calibration) > 3 else ''}")
    if any(t[4].method == "gptq" for t in targets):
        from .quantizers.gptq import gptq_quantize_model
        gptq_quantize_model(model, {t[0]: t[4] for t in targets if t[4].method == "gptq"},
                            calibration, show_progress=show_progress, scale_dtype=scale_dtype)
    if any(t[4].method == "matquant" for t in targets):
        from .quantizers.matquant import matquant_quantize_model
        matquant_quantize_model(model, {t[0]: t[4] for t in targets if t[4].method == "matquant"},
                                calibration, show_progress=show_progress, scale_dtype=scale_dtype,
                                **dict(matquant_options or {}))
    targets = [t for t in targets if t[4].method == "rtn"]

    for name, linear, parent, attr, cfg in progress(targets, desc="quantizing",
                                                    enabled=show_progress):
        layer_class = MatryoshkaLinear if cfg.matryoshka else QuantLinear
        setattr(parent, attr, layer_class.from_linear(linear, cfg, scale_dtype=scale_dtype))
    setattr(model, RECIPE_ATTR, recipe)
    _untie_if_head_quantized(model)
    if fuse:
        fuse_projections(model)
    return model


def _untie_if_head_quantized(model: nn.Module) -> None:
    adapter = get_adapter(model)
    if isinstance(model.get_submodule(adapter.head), QuantLinear):
        for cfg in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
            if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False


def _apply_slicing(model: nn.Module, recipe: Recipe, calibration, show_progress: bool) -> None:
    from .slicing.structure import is_folded, layer_widths
    adapter = get_adapter(model)
    n_layers = len(adapter.decoder_layers(model))
    if len(recipe.slicing) != n_layers:
        raise ValueError(f"Recipe.slicing has {len(recipe.slicing)} widths but the model has "
                         f"{n_layers} layers")
    if is_folded(model) and layer_widths(model) == list(recipe.slicing):
        return  # already sliced to these widths
    if is_folded(model):
        raise ValueError("the model is already sliced to other widths; slice the original model")
    hidden = model.config.hidden_size
    if max(recipe.slicing) > hidden:
        raise ValueError(f"Recipe.slicing widths must be <= hidden_size={hidden}")
    if calibration is None:
        raise ValueError("slicing needs calibration data to compute its PCA bases "
                         "(pass calibration=pyengine.calibration_data(...))")
    from .slicing.pca import slice_model
    slice_model(model, list(recipe.slicing), calibration, show_progress=show_progress)


def dequantize_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every QuantLinear is an nn.Linear with the dequantized weight
    (in the scales' dtype). The structure (sliced layers included) is otherwise unchanged; the
    original model is not modified."""
    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        if isinstance(module, QuantLinear):
            parent_name, _, attr = name.rpartition(".")
            parent = ref.get_submodule(parent_name) if parent_name else ref
            setattr(parent, attr, module.to_linear())
    if hasattr(ref, RECIPE_ATTR):
        delattr(ref, RECIPE_ATTR)
    return ref


def predicted_bytes(model: nn.Module) -> int:
    """Bytes the model's weights should take: the canonical packed size of each QuantLinear
    (docs/FORMAT.md; a Matryoshka layer's three planes take 8 bits per code, like its int8
    parent) plus every other parameter and persistent buffer at its dtype."""
    total = 0
    quant_tensors = set()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            n, k, bits = module.out_features, module.in_features, module.bits
            kp = padded_in_features(k, module.group_size)
            groups = 1 if module.group_size == -1 else kp // module.group_size
            per_group = module.scales.element_size() * (1 if module.symmetric else 2)
            total += n * kp * bits // 8 + n * groups * per_group
            if module.bias is not None:
                total += module.bias.numel() * module.bias.element_size()
            stored = (module.stored_tensors() if isinstance(module, MatryoshkaLinear) else
                      (module.qweight, module.scales, module.zeros, module.bias))
            quant_tensors.update(id(t) for t in stored if t is not None)
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in quant_tensors or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def storage_bytes(model: nn.Module) -> int:
    """Bytes of memory actually held by the model's parameters and buffers (shared storages
    counted once)."""
    storages = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        st = t.untyped_storage()
        storages[(st.data_ptr(), t.device)] = st.nbytes()
    return sum(storages.values())


def layer_report(model: nn.Module) -> List[Dict[str, object]]:
    """One row per linear layer: name, kind, bits, group size, shape and bytes (Matryoshka
    layers: kind "matryoshka", bits 8 as stored, and the precision served)."""
    rows = []
    for name, linear, _, _ in quantizable_linears(model):
        if isinstance(linear, QuantLinear):
            row = dict(name=name, kind="quantized", bits=linear.bits,
                       group_size=linear.group_size,
                       shape=[linear.out_features, linear.in_features], bytes=linear.nbytes)
            if isinstance(linear, MatryoshkaLinear):
                row.update(kind="matryoshka", precision=linear.precision)
            rows.append(row)
        else:
            w = linear.weight
            rows.append(dict(name=name, kind="dense", bits=8 * w.element_size(), group_size=None,
                             shape=list(w.shape), bytes=w.numel() * w.element_size()
                             + (0 if linear.bias is None else linear.bias.numel() * linear.bias.element_size())))
    return rows
