"""Compress Hugging Face decoder models in place: slice (optional), then quantize per layer.

Patching swaps module *instances*: each nn.Linear the recipe names becomes a
:class:`~pyengine.nn.QuantLinear`; nothing global is changed, and
:func:`dequantize_model` gives back a plain model with dense (dequantized) weights.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..model.adapters import get_adapter
from ..model.walk import LinearSite, linear_sites
from ..nn.matryoshka_linear import MatryoshkaLinear
from ..nn.fusion import fuse_projections
from ..nn.quant_embedding import QuantEmbedding
from ..nn.quant_linear import QuantLinear
from ..format.qweight import padded_in_features
from ..quant.methods import (MethodOptions, QuantMethod, get_method, method_names,
                             replace_linear, resolve_options)
from ..quant.recipe import Recipe
from ..utils import progress

RECIPE_ATTR = "pyengine_recipe"


def quantizable_linears(model: nn.Module) -> Iterator[LinearSite]:
    """(name, linear, parent, attribute) for every linear layer of the decoder layers and the
    head (pyengine.model.walk.linear_sites: a sliced block's output projection goes by the
    name of its ResidualProjection, e.g. ``model.layers.0.self_attn.o_proj``)."""
    adapter = get_adapter(model)
    layers_prefix = adapter.layers + "."
    for site in linear_sites(model):
        if site.name.startswith(layers_prefix) or site.name == adapter.head:
            yield site


def _check_recipe_names(model: nn.Module, recipe: Recipe) -> None:
    adapter = get_adapter(model)
    for key, cfg in recipe.quant.items():
        if cfg is not None and key != "_default":
            if re.fullmatch(key, adapter.embed):
                raise ValueError(f"recipe pattern {key!r} names the embeddings ({adapter.embed}); "
                                 f"their quantization is Recipe.embeddings (None keeps them dense)")


def compressed_reason(model: nn.Module) -> Optional[str]:
    """Why ``model`` counts as compressed by pyengine (quantized layers, or the recipe that
    pyengine.compress and pyengine.load leave on it), or None for a model pyengine has not
    compressed. A model that is only sliced by hand (pyengine.slicing) is not compressed."""
    quantized = [name for name, module in model.named_modules()
                 if isinstance(module, (QuantLinear, QuantEmbedding))]
    if quantized:
        return f"{len(quantized)} quantized layers such as {quantized[0]!r}"
    if getattr(model, RECIPE_ATTR, None) is not None:
        return "it carries the recipe of an earlier pyengine.compress or pyengine.load"
    return None


def default_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a compressed model holds its dense tensors and scales in, by default: the
    model's own when it is float16 or bfloat16, float16 otherwise."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype if p.dtype in (torch.float16, torch.bfloat16) else torch.float16
    return torch.float16


def compress(model: nn.Module, recipe: Recipe, calibration=None, *, show_progress: bool = True,
             dtype: Optional[torch.dtype] = None, scale_dtype: Optional[torch.dtype] = None,
             options: Optional[Mapping[str, Any]] = None,
             matquant_options: Optional[Mapping[str, Any]] = None, fuse: bool = True) -> nn.Module:
    """Compresses ``model`` in place and returns it.

    Slicing (``recipe.slicing``) runs first, on the dense model: the residual stream of each
    layer is rotated by PCA of calibration activations and cut to its kept width. With
    ``recipe.rotate`` the residual streams (each kept subspace, when sliced) and the attention
    value heads are then turned by random orthogonal matrices merged into the weights
    (pyengine.quant.rotation). Then every
    linear layer the recipe names is quantized (RTN, or GPTQ with calibration data; given
    calibration data, RTN weighs each input's rounding errors by the input's mean square on it,
    layer by layer, so the inputs the model uses most keep the finest steps). Layers
    whose QuantConfig has ``matryoshka=True`` become MatryoshkaLinear layers holding an int8
    parent (RTN, or MatQuant with calibration data) and serving its int8 slice until
    pyengine.set_precision says otherwise. The token embedding table and the output head are
    quantized as ``recipe.embeddings`` says (8-bit RTN by default; a tied pair stays one
    tensor, shared by a QuantEmbedding and the QuantLinear head).

    Everything that stays dense (norms, biases, the shortcut and projection matrices of sliced
    models, layers a recipe keeps dense) is then held in ``dtype``, and the model runs its
    activations in it; slicing and quantizing are computed in the model's own dtype first.

    Args:
        model: a Hugging Face causal LM of a supported family (pyengine.supported_architectures()).
        recipe: what to do (pyengine.Recipe).
        calibration: token batches (pyengine.calibration_data) for slicing, GPTQ, MatQuant,
            and the input weights of RTN (the decoder layers' linears; without it RTN minimises
            the plain weight error).
        dtype: float16, bfloat16 or float32; default (:func:`default_dtype`) the model's dtype
            when it is 16-bit, else float16. float32 only on request.
        scale_dtype: dtype of the quantization scales and zeros; default ``dtype``.
        options: {method name: its options} (pyengine.quant.methods: RTNOptions, GPTQOptions,
            MatQuantOptions, or a mapping of their fields); methods not named run with their
            defaults.
        matquant_options: MatQuant's options as a mapping (the fields of MatQuantOptions:
            ``weights`` = the slice weights lambda, ``steps``, ``lr``, ``grid``,
            ``learn_codes``, ...; plus ``report``, a dict filled with each parent's
            matquant_quantize info, and ``compute_device``); not with ``options["matquant"]``.
        fuse: serve the quantized layers that read one input (q/k/v, gate/up) with one op per
            group where they share a format (pyengine.fuse_projections; no weight is copied).
    Raises:
        UnsupportedModelError: the family has no adapter.
        ValueError: a model that is already compressed (quantized layers, or a model from
            pyengine.compress / pyengine.load), calibration that is not token ids of the model's
            vocabulary, or a recipe the model cannot take (slicing without calibration data, ...).
    """
    dtype, scale_dtype = check_compress_arguments(model, recipe, calibration, dtype,
                                                  scale_dtype)
    if recipe.slicing is not None:
        _apply_slicing(model, recipe, calibration, show_progress)
    if recipe.rotate:
        _apply_rotation(model, recipe)

    targets = quantization_targets(model, recipe)
    check_calibration_needs(targets, calibration)
    resolved, runtime = split_options(options, matquant_options)
    measured = calibrated_rtn_names(model, targets) if calibration is not None else []
    input_weights = quantize_calibrated(model, calibration, targets, measured, resolved,
                                        scale_dtype, show_progress, **runtime)
    rtn_quantize(targets, scale_dtype, show_progress, input_weights, resolved)
    quantize_embeddings(model, recipe, scale_dtype)
    setattr(model, RECIPE_ATTR, recipe)
    _untie_if_head_quantized(model)
    hold_dense_in(model, dtype)
    if fuse:
        fuse_projections(model)
    return model


def check_compress_arguments(model: nn.Module, recipe: Recipe, calibration, dtype, scale_dtype
                             ) -> Tuple[torch.dtype, torch.dtype]:
    """The checks compress runs before changing anything; returns (dtype, scale_dtype) with
    their defaults filled in."""
    get_adapter(model)  # UnsupportedModelError first
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
    dtype = default_dtype(model) if dtype is None else dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got "
                         f"{dtype}")
    return dtype, (dtype if scale_dtype is None else scale_dtype)


QuantTarget = Tuple[str, nn.Module, nn.Module, str, Any]  # name, linear, parent, attr, config


def shares_head_with_table(model: nn.Module, recipe: Recipe) -> bool:
    """A tied table and head stored alike stay one tensor: the embedding's. The head may
    still compute on int8 activations (act_bits changes its product, not its storage)."""
    adapter = get_adapter(model)
    head_cfg = recipe.config_for(adapter.head, is_head=True)
    return (adapter.tied_embeddings(model) and recipe.embeddings is not None
            and head_cfg is not None
            and dataclasses.replace(head_cfg, act_bits=0) == recipe.embeddings)


def quantization_targets(model: nn.Module, recipe: Recipe) -> List[QuantTarget]:
    """The dense linear layers ``recipe`` quantizes, in model order, with their configs (a
    head that shares the quantized table is left to :func:`quantize_embeddings`)."""
    adapter = get_adapter(model)
    shared_head = shares_head_with_table(model, recipe)
    targets = []
    for name, linear, parent, attr in quantizable_linears(model):
        cfg = recipe.config_for(name, is_head=(name == adapter.head))
        if cfg is None or isinstance(linear, QuantLinear) or (shared_head and name == adapter.head):
            continue
        targets.append((name, linear, parent, attr, cfg))
    return targets


def check_calibration_needs(targets: List[QuantTarget], calibration) -> None:
    """ValueError when a target's method needs calibration data and there is none."""
    needs_calibration = [t[0] for t in targets if get_method(t[4].method).needs_calibration]
    if needs_calibration and calibration is None:
        method = next(t[4].method for t in targets if t[0] == needs_calibration[0])
        raise ValueError(f"method {method!r} needs calibration data (pyengine.calibration_data); "
                         f"layers: {needs_calibration[:3]}{'...' if len(needs_calibration) > 3 else ''}")


_RUNTIME_KEYS = ("report", "compute_device")  # matquant_options entries that are not options


def split_options(options: Optional[Mapping[str, Any]],
                  matquant_options: Optional[Mapping[str, Any]] = None
                  ) -> Tuple[Dict[str, MethodOptions], Dict[str, Any]]:
    """({method name: its options} for every registered method, {"report": ...,
    "compute_device": ...} of the calibrated passes) from compress's ``options`` and its older
    ``matquant_options`` mapping."""
    options = dict(options or {})
    runtime: Dict[str, Any] = {}
    if matquant_options is not None:
        if "matquant" in options:
            raise ValueError("MatQuant's options are given twice: options['matquant'] and "
                             "matquant_options; give one")
        if not isinstance(matquant_options, Mapping):
            raise ValueError(f"matquant_options must be a mapping, got "
                             f"{type(matquant_options).__name__}")
        fields = dict(matquant_options)
        runtime = {k: fields.pop(k) for k in _RUNTIME_KEYS if k in fields}
        options["matquant"] = fields
    return resolve_options(options), runtime


def quantize_calibrated(model: nn.Module, calibration, targets: List[QuantTarget],
                        measured: List[str], options: Mapping[str, MethodOptions],
                        scale_dtype: Optional[torch.dtype], show_progress: bool = False,
                        report: Optional[Dict[str, Any]] = None,
                        compute_device=None) -> Dict[str, torch.Tensor]:
    """Runs each calibrated method the targets use, one layerwise pass per method in the
    registry's order, and measures the inputs of the ``measured`` linears (calibrated RTN) in
    the last pass (after every calibrated layer is in place, as when streaming), or in a pass
    of its own; returns those inputs' mean squares by name."""
    passes = [(m, {t[0]: t[4] for t in targets if t[4].method == m.name})
              for m in map(get_method, method_names()) if m.needs_calibration]
    passes = [(m, configs) for m, configs in passes if configs]
    if measured and not passes:
        passes = [(None, {})]
    input_weights: Dict[str, torch.Tensor] = {}
    for i, (method, configs) in enumerate(passes):
        last = i == len(passes) - 1
        input_weights = layerwise_quantize(
            model, calibration, method, configs, measured if last else [], scale_dtype,
            show_progress, options=options.get(method.name) if method else None,
            compute_device=compute_device, report=report)
    return input_weights


def calibrated_rtn_names(model: nn.Module, targets: List[QuantTarget]) -> List[str]:
    """The RTN targets whose inputs calibration data can weigh: plain (not Matryoshka) linears
    inside the decoder layers. The head and Matryoshka parents are quantized unweighed."""
    adapter = get_adapter(model)
    return [t[0] for t in targets if t[4].method == "rtn" and not t[4].matryoshka
            and adapter.layer_index(t[0]) is not None]


def layerwise_quantize(model: nn.Module, calibration: torch.Tensor,
                       method: Optional[QuantMethod], configs: Mapping[str, Any],
                       measured: List[str], scale_dtype: Optional[torch.dtype],
                       show_progress: bool = False, options: Optional[MethodOptions] = None,
                       compute_device=None,
                       report: Optional[Dict[str, Any]] = None) -> Dict[str, torch.Tensor]:
    """One pass over the decoder layers with the calibration data: in each layer, the linears
    of ``configs`` (name -> QuantConfig) are quantized by the calibrated ``method`` (None:
    none) and put in place, then the inputs of the ``measured`` linears are measured (their
    mean squares, fp32 [K]: calibrated RTN's input weights, returned by name, recorded while
    the layer computes its outputs); the layer's outputs feed the next layer. ``options``: the
    method's (default: its defaults; their ``pass_batch_size`` is the pass's batch size)."""
    from .calibrate import LayerwiseRunner
    from ..quant.layerwise import group_by_layer, recording_input_mean_squares
    from ..quant.methods import quantize_layer
    if method is not None:
        options = method.options_type.coerce(options)
    by_layer = group_by_layer(model, configs, method.name if method else "")
    measured_by_layer = group_by_layer(model, dict.fromkeys(measured), "calibrated RTN")
    input_weights: Dict[str, torch.Tensor] = {}
    batch_size = options.pass_batch_size if isinstance(options, MethodOptions) else 1
    runner = LayerwiseRunner(model, calibration, batch_size, compute_device)
    desc = method.name if method is not None else "measuring inputs"
    for index, layer, inputs in progress(runner, desc=desc, enabled=show_progress,
                                         total=len(runner), unit="layer"):
        if by_layer.get(index):
            quantize_layer(model, layer, inputs, method, by_layer[index], options,
                           scale_dtype=scale_dtype, compute_device=runner.compute_device,
                           report=report)
        with recording_input_mean_squares(model, measured_by_layer.get(index, [])) as means:
            runner.advance()
        input_weights.update(means)
    return input_weights


def rtn_quantize(targets: List[QuantTarget], scale_dtype: Optional[torch.dtype],
                 show_progress: bool = False,
                 input_weights: Optional[Mapping[str, torch.Tensor]] = None,
                 options: Optional[Mapping[str, MethodOptions]] = None) -> None:
    """Replaces each target of an uncalibrated method (RTN) by its QuantLinear (or
    MatryoshkaLinear); ``input_weights``: name -> [in_features], the inputs' costs of the
    linears that have them (pyengine.quantize's ``input_weights``); ``options``: {method name:
    its options} (a method not named: its defaults)."""
    targets = [t for t in targets if not get_method(t[4].method).needs_calibration]
    input_weights, options = input_weights or {}, options or {}
    for name, linear, parent, attr, cfg in progress(targets, desc="quantizing",
                                                    enabled=show_progress and bool(targets)):
        method = get_method(cfg.method)
        weight = method.quantize_linear(linear, cfg,
                                        method.options_type.coerce(options.get(cfg.method)),
                                        scale_dtype, input_weights.get(name))
        replace_linear(parent, attr, weight, cfg)


def quantize_embeddings(model: nn.Module, recipe: Recipe,
                        scale_dtype: Optional[torch.dtype]) -> None:
    """Recipe.embeddings: the token table becomes a QuantEmbedding (and a tied head quantized
    alike the QuantLinear that shares its tensors)."""
    if recipe.embeddings is None:
        return
    adapter = get_adapter(model)
    shared_head = shares_head_with_table(model, recipe)
    embed = model.get_submodule(adapter.embed)
    table = QuantEmbedding.from_embedding(embed, recipe.embeddings, scale_dtype=scale_dtype)
    head = model.get_submodule(adapter.head)
    _set_module(model, adapter.embed, table)
    if shared_head:
        head_cfg = recipe.config_for(adapter.head, is_head=True)
        _set_module(model, adapter.head, table.tied_head(head.bias, act_bits=head_cfg.act_bits))


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, module)


@torch.no_grad()
def hold_dense_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Converts every floating-point parameter and persistent buffer of ``model`` to ``dtype``
    except the scales and zeros of quantized layers (tied tensors stay one tensor;
    non-persistent buffers such as rotary frequencies keep their precision) and makes ``dtype`` the dtype of the model's activations (its config's dtype and
    the rows its quantized embedding returns)."""
    hold_module_dense_in(model, dtype)
    for cfg in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
        if cfg is not None:
            cfg.dtype = dtype


@torch.no_grad()
def hold_module_dense_in(root: nn.Module, dtype: torch.dtype) -> None:
    """The tensor part of :func:`hold_dense_in` for ``root`` and its submodules (a decoder
    layer compressed on its own): every floating-point parameter and persistent buffer but
    the quantized layers' scales and zeros in ``dtype``, quantized embeddings' rows too."""
    converted: Dict[int, torch.Tensor] = {}
    for module in root.modules():
        quantized = isinstance(module, (QuantLinear, QuantEmbedding))
        for name, p in list(module._parameters.items()):
            if (p is None or not p.is_floating_point() or p.dtype == dtype
                    or (quantized and name in ("scales", "zeros"))):  # those keep scale_dtype
                continue
            if id(p) not in converted:
                converted[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
            module._parameters[name] = converted[id(p)]
        for name, b in list(module._buffers.items()):
            if (b is None or not b.is_floating_point() or b.dtype == dtype
                    or name in module._non_persistent_buffers_set
                    or (quantized and name in ("scales", "zeros"))):  # those keep scale_dtype
                continue
            if id(b) not in converted:
                converted[id(b)] = b.to(dtype)
            module._buffers[name] = converted[id(b)]
        if isinstance(module, QuantEmbedding):
            module.dtype = dtype
        if quantized:
            module._refresh_weight()


def _untie_if_head_quantized(model: nn.Module) -> None:
    """A quantized head or table is tied (if at all) through pyengine's own sharing, not
    through transformers' tie_word_embeddings (which would look for dense weights)."""
    adapter = get_adapter(model)
    if (isinstance(model.get_submodule(adapter.head), QuantLinear)
            or isinstance(model.get_submodule(adapter.embed), QuantEmbedding)):
        for cfg in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
            if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False


def _apply_slicing(model: nn.Module, recipe: Recipe, calibration, show_progress: bool) -> None:
    from ..slicing.structure import is_folded, layer_widths
    adapter = get_adapter(model)
    n_layers = len(adapter.decoder_layers(model))
    if len(recipe.slicing) != n_layers:
        raise ValueError(f"Recipe.slicing has {len(recipe.slicing)} widths but the model has "
                         f"{n_layers} layers")
    if is_folded(model) and layer_widths(model) == list(recipe.slicing):
        if recipe.rotate:
            raise ValueError("Recipe.rotate with slicing: the model is already sliced (without "
                             "the rotation); compress the original dense model")
        return  # already sliced to these widths
    if is_folded(model):
        raise ValueError("the model is already sliced to other widths; slice the original model")
    hidden = model.config.hidden_size
    if max(recipe.slicing) > hidden:
        raise ValueError(f"Recipe.slicing widths must be <= hidden_size={hidden}")
    if calibration is None:
        raise ValueError("slicing needs calibration data to compute its PCA bases "
                         "(pass calibration=pyengine.calibration_data(...))")
    from ..slicing.pca import slice_model
    slice_model(model, list(recipe.slicing), calibration, show_progress=show_progress,
                rotation_seed=recipe.rotation_seed if recipe.rotate else None)


def _apply_rotation(model: nn.Module, recipe: Recipe) -> None:
    """Recipe.rotate: the residual rotation (done by _apply_slicing for a sliced recipe), the
    value heads' rotation and, with Recipe.online_hadamard, the MLPs' inner rotation."""
    from ..quant.rotation import rotate_model
    rotate_model(model, recipe.rotation_seed, residual=recipe.slicing is None,
                 mlp_inner=recipe.online_hadamard)


def dequantize_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every QuantLinear is an nn.Linear with the dequantized weight
    (in the scales' dtype) and a QuantEmbedding an nn.Embedding (a ProjectedEmbedding when it
    has a projection) with the dequantized table (in the rows' dtype). The structure (sliced
    layers included) is otherwise unchanged; the original model is not modified."""
    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            parent_name, _, attr = name.rpartition(".")
            parent = ref.get_submodule(parent_name) if parent_name else ref
            dense = (module.to_linear() if isinstance(module, QuantLinear)
                     else module.to_embedding())
            setattr(parent, attr, dense)
    if hasattr(ref, RECIPE_ATTR):
        delattr(ref, RECIPE_ATTR)
    return ref


def _packed_bytes(module: nn.Module) -> int:
    """The canonical size of a quantized layer's or table's codes, scales and zeros."""
    n, k, bits = module.out_features, module.in_features, module.bits
    kp = padded_in_features(k, module.group_size)
    groups = 1 if module.group_size == -1 else kp // module.group_size
    per_group = module.scales.element_size() * (1 if module.symmetric else 2)
    return n * kp * bits // 8 + n * groups * per_group


def predicted_bytes(model: nn.Module) -> int:
    """Bytes the model's weights should take: the canonical packed size of each QuantLinear and
    QuantEmbedding (docs/FORMAT.md; a Matryoshka layer's three planes take 8 bits per code,
    like its int8 parent; a table shared by a tied head counted once) plus every other
    parameter and persistent buffer at its dtype."""
    total = 0
    quant_tensors = set()
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            stored = (module.stored_tensors() if isinstance(module, MatryoshkaLinear) else
                      (module.qweight, module.scales, module.zeros))
            if id(stored[0]) not in quant_tensors:  # a tied head shares the table's tensors
                total += _packed_bytes(module)
            quant_tensors.update(id(t) for t in stored if t is not None)
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in quant_tensors or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def weight_count(model: nn.Module) -> Dict[str, int]:
    """Weights the model holds: ``model``: every element of its matrices and vectors (a
    quantized matrix counts its N x K weights, a tensor shared by tied modules once);
    ``linears``: those of the decoder layers' linear layers."""
    adapter = get_adapter(model)
    quant_tensors, seen, total = set(), set(), 0
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            stored = (module.stored_tensors() if isinstance(module, MatryoshkaLinear) else
                      (module.qweight, module.scales, module.zeros))
            if id(stored[0]) not in quant_tensors:
                total += module.out_features * module.in_features
            quant_tensors.update(id(t) for t in stored if t is not None)
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in quant_tensors and id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    linears = sum(r["shape"][0] * r["shape"][1] for r in layer_report(model)
                  if r["name"].startswith(adapter.layers + "."))
    return {"model": total, "linears": linears}


def bits_per_weight(model: nn.Module) -> Dict[str, float]:
    """Stored bits per weight: ``model``: 8 x :func:`storage_bytes` over every weight the model
    holds (:func:`weight_count`: embeddings, head, norms, shortcuts and the rest included);
    ``linears``: 8 x bytes of the decoder layers' linear layers (codes, scales, zeros, biases)
    over their weights."""
    adapter = get_adapter(model)
    counts = weight_count(model)
    linear_bytes = sum(r["bytes"] for r in layer_report(model)
                       if r["name"].startswith(adapter.layers + "."))
    return {"model": 8.0 * storage_bytes(model) / max(counts["model"], 1),
            "linears": 8.0 * linear_bytes / max(counts["linears"], 1)}


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
    """One row per linear layer, then one for the token embedding: name, kind, bits, group
    size, shape and bytes (Matryoshka layers: kind "matryoshka", bits 8 as stored, and the
    precision served; a head sharing the embedding's table: ``tied_to`` names the embedding,
    and the bytes are counted on the embedding's row only)."""
    adapter = get_adapter(model)
    embed = model.get_submodule(adapter.embed)
    rows = []
    for name, linear, _, _ in quantizable_linears(model):
        if (isinstance(linear, QuantLinear) and isinstance(embed, QuantEmbedding)
                and getattr(linear, "qweight", None) is embed.qweight):  # Matryoshka: planes
            rows.append(dict(name=name, kind="quantized", bits=linear.bits,
                             group_size=linear.group_size,
                             shape=[linear.out_features, linear.in_features],
                             bytes=0 if linear.bias is None
                             else linear.bias.numel() * linear.bias.element_size(),
                             tied_to=adapter.embed))
            continue
        if isinstance(linear, QuantLinear):
            row = dict(name=name, kind="quantized", bits=linear.bits,
                       group_size=linear.group_size,
                       shape=[linear.out_features, linear.in_features], bytes=linear.nbytes)
            if isinstance(linear, MatryoshkaLinear):
                row.update(kind="matryoshka", precision=linear.precision)
            rows.append(row)
        else:
            w = linear.weight
            row = dict(name=name, kind="dense", bits=8 * w.element_size(), group_size=None,
                       shape=list(w.shape), bytes=w.numel() * w.element_size()
                       + (0 if linear.bias is None else linear.bias.numel() * linear.bias.element_size()))
            if name == adapter.head and w is getattr(embed, "weight", None):
                row.update(bytes=row["bytes"] - w.numel() * w.element_size(), tied_to=adapter.embed)
            rows.append(row)
    if isinstance(embed, QuantEmbedding):
        rows.append(dict(name=adapter.embed, kind="quantized", bits=embed.bits,
                         group_size=embed.group_size, shape=[embed.num_embeddings,
                                                             embed.embedding_dim],
                         bytes=embed.nbytes))
    else:
        w = embed.weight
        rows.append(dict(name=adapter.embed, kind="dense", bits=8 * w.element_size(),
                         group_size=None, shape=list(w.shape), bytes=w.numel() * w.element_size()))
    return rows
