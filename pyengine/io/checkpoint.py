"""Saving and loading compressed models: safetensors + JSON, never pickle.

A checkpoint directory holds the Hugging Face ``config.json`` (with a ``quantization_config``
whose ``quant_method`` is ``"pyengine"``: the recipe, every quantized layer's format metadata
and, for sliced models, the sliced structure), ``generation_config.json`` when the model has one,
and the tensors in ``model.safetensors`` (or shards with an index, as Hugging Face writes them).
A Matryoshka layer stores its int8 parent once (three bit planes, scales, zeros); its layer
entry adds ``"matryoshka": {"layout", "parent_bits", "precision"}``, the precision it serves.
``config.json`` also holds, as ``transformers_weights``, a sentence that names no weights file
(:data:`TRANSFORMERS_GUARD`): transformers without pyengine registered refuses the checkpoint.

Both load paths, :func:`load` and ``from_pretrained`` (pyengine.io.hf), check the
checkpoint with pyengine.io.checks before reading any weight.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from .checks import (CHECKPOINT_VERSION, INDEX_NAME, QUANT_METHOD, STRUCTURED_ARCHITECTURE,
                                WEIGHTS_NAME, CheckpointError, check_checkpoint, validate_metadata)
from ..pipeline.compress import RECIPE_ATTR
from ..model.adapters import get_adapter
from ..nn.fusion import fuse_projections
from ..nn.matryoshka_linear import MatryoshkaLinear
from ..nn.quant_embedding import QuantEmbedding
from ..nn.quant_linear import QuantLinear
from ..format.qweight import FLOAT_DTYPES
from ..quant.recipe import Recipe

__all__ = ["CHECKPOINT_VERSION", "CheckpointError", "QUANT_METHOD", "TRANSFORMERS_GUARD",
           "apply_compressed_structure", "finish_loading", "is_guard", "load",
           "quantization_metadata", "retie", "save", "ShardWriter"]

# Written as ``transformers_weights`` (the weights file transformers should read) into
# config.json. transformers refuses a value that names no .safetensors file, with a ValueError
# that quotes it, so a checkpoint loaded by transformers *without* pyengine imported fails loudly
# instead of loading random weights into plain nn.Linear layers (transformers skips quantization
# methods it does not know). pyengine's HfQuantizer removes the field before transformers looks
# for the weights; pyengine.load ignores it.
TRANSFORMERS_GUARD = ("this is a pyengine checkpoint: run `import pyengine; "
                      "pyengine.register_with_transformers()` before from_pretrained, or load "
                      "it with pyengine.load(DIR)")
# The guards earlier pyengine versions wrote (recognised, and removed, like the current one).
_EARLIER_GUARDS = ("this is a pyengine checkpoint: run `import pyengine` before "
                   "from_pretrained, or load it with pyengine.load(DIR)",)


def is_guard(value: Any) -> bool:
    """Whether ``value`` (a config's ``transformers_weights``) is a guard pyengine.save wrote."""
    return value == TRANSFORMERS_GUARD or value in _EARLIER_GUARDS


def quantization_metadata(model: nn.Module) -> Dict[str, Any]:
    """The ``quantization_config`` entry describing a compressed model."""
    from ..slicing.structure import describe_structure
    recipe = getattr(model, RECIPE_ATTR, None) or Recipe()
    layers = layer_entries(model)
    # the lowest format version that describes the checkpoint, so older readers take it
    version = 2 if any("embedding" in entry for entry in layers.values()) else 1
    return {
        "quant_method": QUANT_METHOD,
        "format_version": version,
        "recipe": recipe.to_dict(),
        "layers": layers,
        "structure": describe_structure(model),
    }


def layer_entries(root: nn.Module, prefix: str = "") -> Dict[str, Dict[str, Any]]:
    """``quantization_config.layers`` entries of the quantized modules under ``root``, named
    as in the model when ``root`` is its submodule ``prefix``."""
    layers: Dict[str, Dict[str, Any]] = {}
    for name, module in root.named_modules(prefix=prefix):
        if isinstance(module, QuantLinear):
            layers[name] = {
                "bits": module.bits, "group_size": module.group_size,
                "symmetric": module.symmetric, "shape": [module.out_features, module.in_features],
                "scale_dtype": str(module.scales.dtype).replace("torch.", ""),
                "method": module.method, "bias": module.bias is not None,
            }
            if module.act_bits:
                layers[name]["act_bits"] = module.act_bits
            if isinstance(module, MatryoshkaLinear):
                layers[name]["matryoshka"] = module.checkpoint_info()
        elif isinstance(module, QuantEmbedding):
            layers[name] = {
                "bits": module.bits, "group_size": module.group_size,
                "symmetric": module.symmetric,
                "shape": [module.num_embeddings, module.embedding_dim],
                "scale_dtype": str(module.scales.dtype).replace("torch.", ""),
                "method": module.method, "bias": False,
                "embedding": {"dtype": str(module.dtype).replace("torch.", "")},
            }
    return layers


def _state_for_saving(model: nn.Module, include: Optional[Callable[[str], bool]] = None):
    """The state dict (the keys ``include`` accepts, default all) with tied duplicates removed:
    {key: tensor}, {dropped key: kept key}."""
    tensors, aliases, seen = {}, {}, {}
    for key, t in model.state_dict().items():
        if include is not None and not include(key):
            continue
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
    everything else to JSON; every file gets the mode the process umask gives new files.
    ``config.json`` carries a ``transformers_weights`` guard (:data:`TRANSFORMERS_GUARD`) that
    makes ``from_pretrained`` fail loudly when pyengine is not imported.
    """
    get_adapter(model)  # fail early on unsupported models
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("model*.safetensors")) + [out / INDEX_NAME]:
        if old.exists():
            old.unlink()
    tensors, aliases = _state_for_saving(model)
    write_config(model, out, aliases)
    writer = ShardWriter(out, max_shard_bytes)
    for key, t in tensors.items():
        writer.add(key, t)
    writer.finish()
    return out


class ShardWriter:
    """Writes tensors, in the order added, into safetensors shards of at most ``max_bytes``
    each (a larger tensor gets a shard of its own), as a shard fills: one file is
    ``model.safetensors``; several are ``model-0000i-of-0000n.safetensors`` with the index.
    ``producer`` goes into each file's metadata."""

    def __init__(self, out: Path, max_bytes: int, producer: str = "pyengine") -> None:
        self.out, self.max_bytes = out, max_bytes
        self.metadata = {"format": "pt", "producer": producer}
        self.files: List[Path] = []
        self.weight_map: Dict[str, str] = {}
        self.total = 0
        self._current: Dict[str, torch.Tensor] = {}
        self._size = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._current and self._size + nbytes > self.max_bytes:
            self._flush()
        self._current[key] = tensor.detach().cpu().contiguous()
        self._size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        # numbered as written; the final names need the count, known once all are written
        file = self.out / f"model-part-{len(self.files) + 1:05d}.safetensors"
        _save_safetensors(self._current, file, self.metadata)
        self.weight_map.update({key: file.name for key in self._current})
        self.files.append(file)
        self._current, self._size = {}, 0

    def finish(self) -> None:
        """Writes the last shard, names the files and writes the index."""
        if self._current or not self.files:
            self._flush()
        if len(self.files) == 1:
            self.files[0].rename(self.out / WEIGHTS_NAME)
            return
        renamed = {}
        for i, file in enumerate(self.files, 1):
            name = f"model-{i:05d}-of-{len(self.files):05d}.safetensors"
            file.rename(self.out / name)
            renamed[file.name] = name
        write_index(self.out, {k: renamed[v] for k, v in self.weight_map.items()}, self.total)


def write_config(model: nn.Module, out: Path, aliases: Dict[str, str],
                 layers: Optional[Dict[str, Any]] = None) -> None:
    """Writes ``config.json`` (the model's config with its ``quantization_config`` and the
    :data:`TRANSFORMERS_GUARD`) and ``generation_config.json`` when the model has one.
    ``aliases``: {tied key not stored: the stored key holding its tensor}. The quantized
    layers may sit on the meta device (only their formats are read). ``layers``: entries of
    ``quantization_config.layers`` for modules the model no longer holds quantized (layers a
    resumed sequential run wrote before), merged in module order."""
    meta = quantization_metadata(model)
    if layers:
        merged = {**meta["layers"], **layers}
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        meta["layers"] = dict(sorted(merged.items(), key=lambda kv: order.get(kv[0], -1)))
    meta["tied"] = dict(aliases)
    config = model.config
    previous = getattr(config, "quantization_config", None)
    previous_architectures = getattr(config, "architectures", None)
    config.quantization_config = meta
    if meta.get("structure") is not None:  # vLLM builds such models with the plugin's class
        config.architectures = [STRUCTURED_ARCHITECTURE]
    try:
        config.save_pretrained(out)
    finally:
        config.architectures = previous_architectures
        if previous is None:
            del config.quantization_config
        else:
            config.quantization_config = previous
    _add_transformers_guard(out / "config.json")
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out)


def write_index(out: Path, weight_map: Dict[str, str], total_bytes: int) -> None:
    """Writes the index of a sharded checkpoint: {key: shard file name} and the bytes in all."""
    (out / INDEX_NAME).write_text(json.dumps(
        {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=1))


def _add_transformers_guard(config_file: Path) -> None:
    """Adds TRANSFORMERS_GUARD to a written config.json (config.save_pretrained drops a
    ``transformers_weights`` attribute, so it is added to the file)."""
    data = json.loads(config_file.read_text())
    data["transformers_weights"] = TRANSFORMERS_GUARD
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not atomic across threads)
    os.umask(mask)
    return mask


def _save_safetensors(tensors: Dict[str, torch.Tensor], file: Path,
                      metadata: Dict[str, str]) -> None:
    """safetensors.save_file, then the mode of a newly created file (safetensors writes a 0600
    temporary file and renames it, so the file would otherwise be private to its owner)."""
    from safetensors.torch import save_file
    save_file(tensors, str(file), metadata=metadata)
    os.chmod(file, 0o666 & ~_umask())


def finish_loading(model: nn.Module, aliases: Dict[str, str], fuse: bool = True) -> None:
    """What both load paths (pyengine.load and from_pretrained's HfQuantizer) do once the
    tensors are in the model: each quantized layer's weight view is rebuilt from its buffers,
    tied keys hold their source's very tensor again (:func:`retie`), and the projections that
    read one input are fused (``fuse``; pyengine.fuse_projections)."""
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            module._refresh_weight()
    retie(model, aliases)
    if fuse:
        fuse_projections(model)


def retie(model: nn.Module, aliases: Dict[str, str]) -> None:
    """Makes each tied key's module hold the very Parameter (or buffer) of its source key, as in
    the model that was saved (assigning one tensor to two keys gives two Parameters)."""
    for alias, source in aliases.items():
        alias_module, _, alias_attr = alias.rpartition(".")
        source_module, _, source_attr = source.rpartition(".")
        src = model.get_submodule(source_module)
        dst = model.get_submodule(alias_module)
        if source_attr in src._parameters:
            tensor, kind = src._parameters[source_attr], "_parameters"
        elif source_attr in src._buffers:
            tensor, kind = src._buffers[source_attr], "_buffers"
        else:
            continue
        if alias_attr not in dst._parameters and alias_attr not in dst._buffers:
            continue
        # the alias becomes what the source is (a tied head's scales: the table's parameter)
        dst._parameters.pop(alias_attr, None)
        dst._buffers.pop(alias_attr, None)
        getattr(dst, kind)[alias_attr] = tensor
        if isinstance(dst, (QuantLinear, QuantEmbedding)):
            dst._refresh_weight()  # a tied head's table: its weight view must see it


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


def _fused_buffers(model: nn.Module, stored: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """{key: the rows of a fused buffer it is read into} for the tensors of every layer group
    pyengine.fuse_projections will fuse in ``model`` (a skeleton on the meta device): each
    group's qweight, scales, zeros and bias get one buffer, members' rows back to back."""
    from .checks import SAFETENSORS_DTYPES
    from ..nn.fusion import fusable_groups
    names = {id(m): name for name, m in model.named_modules()}
    views: Dict[str, torch.Tensor] = {}
    for members in fusable_groups(model):
        for attr in ("qweight", "scales", "zeros", "bias"):
            keys = [f"{names[id(m)]}.{attr}" for m in members]
            if not all(key in stored for key in keys):
                continue
            shapes = [tuple(stored[key].shape) for key in keys]
            dtypes = {stored[key].dtype for key in keys}
            if len(dtypes) != 1 or len({shape[1:] for shape in shapes}) != 1:
                continue  # check_checkpoint has refused this already; read it plainly
            rows = sum(shape[0] for shape in shapes)
            buffer = torch.empty((rows,) + shapes[0][1:],
                                 dtype=SAFETENSORS_DTYPES[dtypes.pop()])
            start = 0
            for key, shape in zip(keys, shapes):
                views[key] = buffer[start:start + shape[0]]
                start += shape[0]
    return views


def _read_into(path: Path, targets: Dict[str, "tuple[str, torch.Tensor]"]) -> None:
    """Reads tensors of safetensors files straight into given contiguous CPU tensors:
    {key: (file name in ``path``, destination)}, with plain reads (no memory map)."""
    import struct
    by_file: Dict[str, list] = {}
    for key, (file, dest) in targets.items():
        by_file.setdefault(file, []).append((key, dest))
    for file, entries in by_file.items():
        full = path / file
        try:
            with open(full, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
                entries.sort(key=lambda e: header[e[0]]["data_offsets"][0])
                for key, dest in entries:
                    begin, end = header[key]["data_offsets"]
                    raw = dest.view(torch.uint8).reshape(-1)
                    if end - begin != raw.numel():
                        raise ValueError(f"{key} holds {end - begin} bytes, expected "
                                         f"{raw.numel()}")
                    f.seek(8 + header_len + begin)
                    if f.readinto(memoryview(raw.numpy())) != raw.numel():
                        raise ValueError(f"{key} is cut short")
        except (OSError, ValueError, KeyError, struct.error) as exc:
            raise CheckpointError(f"cannot read {full} (truncated or corrupt?): {exc}") from None


def _skeleton(config, qmeta: Dict[str, Any], where: str) -> nn.Module:
    """The model's module tree with parameters on the meta device, compressed structure applied."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    config = type(config).from_dict({k: v for k, v in config.to_dict().items()
                                     if k not in ("quantization_config", "transformers_weights")})
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    apply_compressed_structure(model, qmeta, where)
    return model


def apply_compressed_structure(model: nn.Module, qmeta: Dict[str, Any],
                               where: Optional[str] = None) -> nn.Module:
    """Rebuilds, on a model whose weights are still on the meta device, the sliced structure and
    the QuantLinear modules a checkpoint's metadata describes.

    ``qmeta`` is checked first (checks.validate_metadata); ``where`` names the config
    file in messages (default: the model's ``config.name_or_path``/config.json). Raises
    CheckpointError on metadata that is malformed or does not fit the model.
    """
    from ..nn.sliced import ResidualProjection
    from ..slicing.structure import SlicingError, build_skeleton
    if where is None:
        where = f"{getattr(model.config, 'name_or_path', '') or 'checkpoint'}/config.json"
    qmeta = validate_metadata(qmeta, where)
    if qmeta["structure"]:
        try:
            build_skeleton(model, qmeta["structure"])
        except SlicingError as exc:
            raise CheckpointError(f"{where}: quantization_config.structure: {exc}") from None
    for name, info in qmeta["layers"].items():
        field = f"{where}: quantization_config.layers[{name!r}]"
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{field}: the checkpoint quantizes {name!r}, which this model "
                                  f"does not have") from None
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if "embedding" in info:
            setattr(parent, attr, _embedding_skeleton(module, info, field))
            continue
        if isinstance(module, ResidualProjection):
            parent, attr = module, "proj"
        elif not isinstance(module, nn.Linear):
            raise CheckpointError(f"{field}: {name!r} is a {type(module).__name__}, not a linear "
                                  f"layer")
        n, k = info["shape"]
        if "matryoshka" in info:
            layer: QuantLinear = _matryoshka_skeleton(info)
        else:
            layer = QuantLinear(
                k, n, bias=info["bias"], bits=info["bits"], group_size=info["group_size"],
                symmetric=info["symmetric"], dtype=FLOAT_DTYPES[info["scale_dtype"]],
                device="meta", method=info["method"], act_bits=info["act_bits"])
        setattr(parent, attr, layer)
    setattr(model, RECIPE_ATTR, Recipe.from_dict(qmeta["recipe"]))
    return model


def _embedding_skeleton(module: nn.Module, info: Dict[str, Any], field: str) -> QuantEmbedding:
    """The QuantEmbedding (on the meta device) that replaces the nn.Embedding ``module``."""
    if not isinstance(module, nn.Embedding):
        raise CheckpointError(f"{field}: a quantized embedding table, but the model's module "
                              f"there is a {type(module).__name__}, not an embedding")
    want = [module.num_embeddings, module.weight.shape[1]]
    if list(info["shape"]) != want:
        raise CheckpointError(f"{field}.shape is {info['shape']}, but the model's embedding "
                              f"table is {want}")
    table = QuantEmbedding(want[0], want[1], info["bits"], info["group_size"],
                           info["symmetric"], dtype=FLOAT_DTYPES[info["scale_dtype"]],
                           device="meta", method=info["method"], padding_idx=module.padding_idx,
                           output_dtype=FLOAT_DTYPES[info["embedding"]["dtype"]])
    table.projection = getattr(module, "projection", None)  # a sliced model's ProjectedEmbedding
    return table


def _matryoshka_skeleton(info: Dict[str, Any]) -> MatryoshkaLinear:
    from ..matryoshka.weight import PARENT_BITS
    n, k = info["shape"]
    return MatryoshkaLinear(k, n, bias=info["bias"], group_size=info["group_size"],
                            symmetric=info["symmetric"], dtype=FLOAT_DTYPES[info["scale_dtype"]],
                            device="meta", method=info["method"],
                            precision=info["matryoshka"].get("precision", PARENT_BITS))


def load(path: "str | os.PathLike", device: Optional["str | torch.device"] = None,
         dtype: Optional[torch.dtype] = None, fuse: bool = True) -> nn.Module:
    """Loads a directory written by :func:`save`.

    The module tree is built on the meta device and the tensors are read straight onto
    ``device`` (default CPU) and assigned, so no weight is held twice. ``dtype`` converts every
    floating-point tensor (scales included). ``fuse``: serve the quantized layers that read one
    input with one op per group (pyengine.fuse_projections). The model runs in the dtype it
    was saved in (pyengine.compress holds dense tensors in float16 by default); ``dtype``
    (float32, say, where a CPU runs 16-bit matmuls slowly) changes it.

    Raises:
        CheckpointError: before any model is returned, on a missing, truncated or malformed
            checkpoint: metadata that is malformed or newer than this pyengine, tensors missing,
            unexpected, or of another shape or dtype than the metadata says (the checks of
            pyengine.io.checks, which from_pretrained runs too).
    """
    from transformers import AutoConfig
    from .hf import register_with_transformers
    register_with_transformers()  # from_pretrained works in this process from now on
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} is not a checkpoint directory (no config.json)")
    try:  # the metadata is read and checked from the file itself, before transformers sees it
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_file}: cannot read it as JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object, got "
                              f"{type(raw).__name__}")
    qmeta = validate_metadata(raw.get("quantization_config"), str(config_file))
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{config_file}: transformers cannot read it: "
                              f"{type(exc).__name__}: {first}") from None
    device = torch.device(device) if device is not None else torch.device("cpu")

    model = _skeleton(config, qmeta, str(config_file))
    aliases = qmeta["tied"]
    stored = check_checkpoint(model, path, aliases)
    # the layers fusion will serve as one op are read straight into their fused buffers (so
    # fusing copies nothing); the other tensors are memory-mapped
    direct = (_fused_buffers(model, stored) if fuse and device.type == "cpu" and dtype is None
              else {})
    tensors = _read_tensors(path, {key: t.file for key, t in stored.items()
                                   if key not in direct}, device)
    _read_into(path, {key: (stored[key].file, t) for key, t in direct.items()})
    tensors.update(direct)
    if dtype is not None:
        tensors = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in tensors.items()}
    for alias, source in aliases.items():
        tensors[alias] = tensors[source]
    model.load_state_dict(tensors, strict=True, assign=True)
    model.to(device)
    finish_loading(model, aliases, fuse)
    if dtype is not None:
        model.config.dtype = dtype
        for module in model.modules():
            if isinstance(module, QuantEmbedding):
                module.dtype = dtype  # its rows follow the activations
    model.eval()
    return model
