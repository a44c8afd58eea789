"""Saving and loading compressed models: safetensors + JSON, never pickle.

A checkpoint directory holds the Hugging Face ``config.json`` (with a ``quantization_config``
whose ``quant_method`` is ``"pyengine"``: the recipe, every quantized layer's format metadata
and, for sliced models, the sliced structure), ``generation_config.json`` when the model has one,
and the tensors in ``model.safetensors`` (or shards with an index, as Hugging Face writes them).
A Matryoshka layer stores its int8 parent once (three bit planes, scales, zeros); its layer
entry adds ``"matryoshka": {"layout", "parent_bits", "precision"}``, the precision it serves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from .compress import RECIPE_ATTR
from .models.adapters import get_adapter
from .modules.fusion import fuse_projections
from .modules.matryoshka_linear import MatryoshkaLinear
from .modules.quant_linear import QuantLinear
from .recipe import Recipe

QUANT_METHOD = "pyengine"
CHECKPOINT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint directory is missing, truncated, or does not match its own metadata."""


def quantization_metadata(model: nn.Module) -> Dict[str, Any]:
    """The ``quantization_config`` entry describing a compressed model."""
    from .slicing.structure import describe_structure
    recipe = getattr(model, RECIPE_ATTR, None) or Recipe()
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            layers[name] = {
                "bits": module.bits, "group_size": module.group_size,
                "symmetric": module.symmetric, "shape": [module.out_features, module.in_features],
                "scale_dtype": str(module.scales.dtype).replace("torch.", ""),
                "method": module.method, "bias": module.bias is not None,
            }
            if isinstance(module, MatryoshkaLinear):
                layers[name]["matryoshka"] = module.checkpoint_info()
    return {
        "quant_method": QUANT_METHOD,
        "format_version": CHECKPOINT_VERSION,
        "recipe": recipe.to_dict(),
        "layers": layers,
        "structure": describe_structure(model),
    }


def _state_for_saving(model: nn.Module):
    """The state dict with tied duplicates removed: {key: tensor}, {dropped key: kept key}."""
    tensors, aliases, seen = {}, {}, {}
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        t = t.detach().contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger storage (fused projections): save its own bytes
        tensors[key] = t
    return tensors, aliases


def save(model: nn.Module, path: "str | os.PathLike", max_shard_bytes: int = 4 << 30) -> Path:
    """Writes a compressed (or plain) model of a supported family to directory ``path``.

    Returns the directory. Tensors go to safetensors files (sharded above ``max_shard_bytes``),
    everything else to JSON.
    """
    from safetensors.torch import save_file
    get_adapter(model)  # fail early on unsupported models
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("model*.safetensors")) + [out / INDEX_NAME]:
        if old.exists():
            old.unlink()
    tensors, aliases = _state_for_saving(model)
    meta = quantization_metadata(model)
    meta["tied"] = aliases

    config = model.config
    previous = getattr(config, "quantization_config", None)
    config.quantization_config = meta
    try:
        config.save_pretrained(out)
    finally:
        if previous is None:
            del config.quantization_config
        else:
            config.quantization_config = previous
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out)

    shards, current, size = [], {}, 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t.cpu()
        size += nbytes
    shards.append(current)
    file_meta = {"format": "pt", "producer": "pyengine"}
    if len(shards) == 1:
        save_file(shards[0], str(out / WEIGHTS_NAME), metadata=file_meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata=file_meta)
            weight_map.update({key: name for key in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / INDEX_NAME).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return out


def _retie(model: nn.Module, aliases: Dict[str, str]) -> None:
    """Makes each tied key's module hold the very Parameter (or buffer) of its source key, as in
    the model that was saved (assigning one tensor to two keys gives two Parameters)."""
    for alias, source in aliases.items():
        alias_module, _, alias_attr = alias.rpartition(".")
        source_module, _, source_attr = source.rpartition(".")
        src = model.get_submodule(source_module)
        dst = model.get_submodule(alias_module)
        if source_attr in src._parameters and alias_attr in dst._parameters:
            dst._parameters[alias_attr] = src._parameters[source_attr]
        elif source_attr in src._buffers and alias_attr in dst._buffers:
            dst._buffers[alias_attr] = src._buffers[source_attr]


def _files_and_keys(path: Path) -> Dict[str, str]:
    """{tensor key: safetensors file} of a checkpoint directory."""
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid index: {exc}") from None
        return dict(weight_map)
    single = path / WEIGHTS_NAME
    if not single.exists():
        raise CheckpointError(f"no {WEIGHTS_NAME} (or {INDEX_NAME}) in {path}")
    from safetensors import safe_open
    try:
        with safe_open(str(single), framework="pt") as f:
            return {key: WEIGHTS_NAME for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {single}: {exc}") from None


def _read_tensors(path: Path, keys: Dict[str, str], device: torch.device) -> Dict[str, torch.Tensor]:
    from safetensors import safe_open
    by_file: Dict[str, list] = {}
    for key, file in keys.items():
        by_file.setdefault(file, []).append(key)
    tensors = {}
    for file, file_keys in by_file.items():
        full = path / file
        try:
            with safe_open(str(full), framework="pt", device=str(device)) as f:
                for key in file_keys:
                    tensors[key] = f.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"cannot read {full} (truncated or corrupt?): {exc}") from None
    return tensors


def _skeleton(config, qmeta: Dict[str, Any]) -> nn.Module:
    """The model's module tree with parameters on the meta device, compressed structure applied."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    config = type(config).from_dict({k: v for k, v in config.to_dict().items()
                                     if k != "quantization_config"})
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    apply_compressed_structure(model, qmeta)
    return model


def apply_compressed_structure(model: nn.Module, qmeta: Dict[str, Any]) -> nn.Module:
    """Rebuilds, on a model whose weights are still on the meta device, the sliced structure and
    the QuantLinear modules a checkpoint's metadata describes."""
    from .slicing.structure import build_skeleton
    if qmeta.get("structure"):
        build_skeleton(model, qmeta["structure"])
    for name, info in qmeta.get("layers", {}).items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the checkpoint quantizes {name!r}, which this model does not "
                                  f"have") from None
        target_parent, attr = name.rpartition(".")[0], name.rpartition(".")[2]
        parent = model.get_submodule(target_parent) if target_parent else model
        from .modules.sliced import ResidualProjection
        if isinstance(module, ResidualProjection):
            parent, attr = module, "proj"
        n, k = info["shape"]
        if "matryoshka" in info:
            setattr(parent, attr, _matryoshka_skeleton(name, info))
            continue
        setattr(parent, attr, QuantLinear(
            k, n, bias=info["bias"], bits=info["bits"], group_size=info["group_size"],
            symmetric=info["symmetric"], dtype=_DTYPES[info["scale_dtype"]], device="meta",
            method=info.get("method", "rtn")))
    setattr(model, RECIPE_ATTR, Recipe.from_dict(qmeta.get("recipe", {})))
    return model


def _matryoshka_skeleton(name: str, info: Dict[str, Any]) -> MatryoshkaLinear:
    from .matryoshka.weight import LAYOUT, PARENT_BITS
    mat = info["matryoshka"]
    if mat.get("layout") != LAYOUT or int(mat.get("parent_bits", -1)) != PARENT_BITS:
        raise CheckpointError(f"{name!r} is a Matryoshka layer with layout {mat.get('layout')!r} / "
                              f"parent bits {mat.get('parent_bits')!r}; this pyengine reads "
                              f"{LAYOUT!r} / {PARENT_BITS}")
    n, k = info["shape"]
    return MatryoshkaLinear(k, n, bias=info["bias"], group_size=info["group_size"],
                            symmetric=info["symmetric"], dtype=_DTYPES[info["scale_dtype"]],
                            device="meta", method=info.get("method", "rtn"),
                            precision=int(mat.get("precision", PARENT_BITS)))


def load(path: "str | os.PathLike", device: Optional["str | torch.device"] = None,
         dtype: Optional[torch.dtype] = None, fuse: bool = True) -> nn.Module:
    """Loads a directory written by :func:`save`.

    The module tree is built on the meta device and the tensors are read straight onto
    ``device`` (default CPU) and assigned, so no weight is held twice. ``dtype`` converts every
    floating-point tensor (scales included). Raises CheckpointError on a missing, truncated or
    mismatched checkpoint, before any model is returned. ``fuse``: serve the quantized layers
    that read one input with one op per group (pyengine.fuse_projections).
    """
    from transformers import AutoConfig
    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} is not a checkpoint directory (no config.json)")
    config = AutoConfig.from_pretrained(str(path))
    qmeta = getattr(config, "quantization_config", None)
    if hasattr(qmeta, "to_dict"):
        qmeta = qmeta.to_dict()
    if not isinstance(qmeta, dict) or qmeta.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path} was not written by pyengine.save (no pyengine "
                              f"quantization_config in config.json)")
    if int(qmeta.get("format_version", 0)) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {qmeta.get('format_version')}, newer "
                              f"than this pyengine ({CHECKPOINT_VERSION})")
    device = torch.device(device) if device is not None else torch.device("cpu")

    model = _skeleton(config, qmeta)
    expected = model.state_dict()
    aliases = dict(qmeta.get("tied", {}))
    keys = _files_and_keys(path)
    missing = sorted(set(expected) - set(keys) - set(aliases))
    unexpected = sorted(set(keys) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match its metadata: missing "
                              f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                              f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    tensors = _read_tensors(path, keys, device)
    bad = [f"{k}: {tuple(t.shape)} != {tuple(expected[k].shape)}" for k, t in tensors.items()
           if tuple(t.shape) != tuple(expected[k].shape)]
    if bad:
        raise CheckpointError(f"checkpoint {path} has tensors of the wrong shape: {bad[:5]}")
    if dtype is not None:
        tensors = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in tensors.items()}
    for alias, source in aliases.items():
        tensors[alias] = tensors[source]
    model.load_state_dict(tensors, strict=True, assign=True)
    _retie(model, aliases)
    model.to(device)
    if fuse:
        fuse_projections(model)
    if dtype is not None:
        model.config.dtype = dtype
    model.eval()
    return model
