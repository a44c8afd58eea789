"""Validation of pyengine checkpoints, shared by both load paths.

``pyengine.load(DIR)`` and ``AutoModelForCausalLM.from_pretrained(DIR)`` (through the HfQuantizer
of pyengine.io.hf) run the same checks before any weight is read:

1. :func:`validate_metadata`: the ``quantization_config`` of ``config.json`` (format version,
   every layer entry's fields and their types, the tied aliases, the recipe, the sliced
   structure);
2. :func:`check_tensors`: the tensors the safetensors files hold (read from their headers only)
   against the module skeleton the metadata describes: none missing, none unexpected, every
   shape and dtype as expected, every tied alias pointing at a stored tensor.

Every problem raises :class:`CheckpointError`, one line naming the file, the layer and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..format.qweight import FLOAT_DTYPES
from ..utils import is_int

QUANT_METHOD = "pyengine"
# 1: quantized linear layers; 2: also quantized embedding tables (layer entries with an
# "embedding" field). pyengine.save writes the lowest version that describes the checkpoint.
CHECKPOINT_VERSION = 2
WEIGHTS_NAME = "model.safetensors"
# The architecture config.json names for a checkpoint with a structure (sliced, or rotated with
# an online transform): vLLM's stock model classes cannot hold it, and the vLLM plugin registers
# its own class (pyengine.vllm.sliced) under this name. transformers builds models from
# model_type, which keeps the family's.
STRUCTURED_ARCHITECTURE = "PyengineStructuredForCausalLM"
INDEX_NAME = "model.safetensors.index.json"

# safetensors' dtype names (as its headers spell them) and the torch dtypes they load as.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}

# The fields of a layer entry (quantization_config.layers[name]); "method", "matryoshka",
# "act_bits" and "embedding" (version 2: the entry is a quantized embedding table) are optional.
_LAYER_FIELDS = ("bits", "group_size", "symmetric", "shape", "scale_dtype", "bias")
_OPTIONAL_LAYER_FIELDS = ("method", "matryoshka", "act_bits", "embedding")
_STRUCTURE_FIELDS = {"hidden_size": "width", "embed_width": "width", "head_width": "width",
                     "final_eps": "eps", "layers": "list"}
_STRUCTURE_LAYER_FIELDS = {"attn_width": "width", "mlp_width": "width",
                           "attn_out_width": "width", "mlp_out_width": "width",
                           "attn_shortcut": "bool", "mlp_shortcut": "bool",
                           "attn_eps": "eps", "mlp_eps": "eps"}


class CheckpointError(ValueError):
    """A checkpoint directory is missing, truncated, or does not match its own metadata."""


# ---- metadata ------------------------------------------------------------------------------------

def validate_metadata(qmeta: Any, where: str) -> Dict[str, Any]:
    """Checks a checkpoint's ``quantization_config`` and returns it with defaults filled in
    (``tied`` {}, ``recipe`` {}, ``structure`` None, each layer's ``method`` "rtn").

    Args:
        qmeta: the ``quantization_config`` entry of ``config.json`` (a dict).
        where: the config file, for messages (e.g. ``"ckpt/config.json"``).
    Raises:
        CheckpointError: naming ``where``, the layer and the field at fault.
    """
    field = f"{where}: quantization_config"
    if qmeta is None:
        raise CheckpointError(f"{where} has no quantization_config: not written by pyengine.save")
    if not isinstance(qmeta, Mapping):
        raise CheckpointError(f"{field} must be a mapping, got {type(qmeta).__name__} (not "
                              f"written by pyengine.save?)")
    if qmeta.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{field}.quant_method is {qmeta.get('quant_method')!r}, not "
                              f"{QUANT_METHOD!r}: not written by pyengine.save")
    version = qmeta.get("format_version")
    if version is None:
        raise CheckpointError(f"{field}.format_version is missing")
    if not is_int(version):
        raise CheckpointError(f"{field}.format_version must be an integer, got {version!r}")
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{field}.format_version is {version}, newer than this pyengine "
                              f"reads ({CHECKPOINT_VERSION}): upgrade pyengine")
    if version < 1:
        raise CheckpointError(f"{field}.format_version must be >= 1, got {version}")

    layers = qmeta.get("layers", {})
    if not isinstance(layers, Mapping):
        raise CheckpointError(f"{field}.layers must map module names to layer entries, got "
                              f"{type(layers).__name__}")
    checked_layers = {str(name): _validate_layer(name, entry, f"{field}.layers[{name!r}]")
                      for name, entry in layers.items()}
    tables = [name for name, entry in checked_layers.items() if "embedding" in entry]
    if tables and version < 2:
        raise CheckpointError(f"{field}.layers[{tables[0]!r}] is a quantized embedding table, "
                              f"which format_version {version} does not have (2 or later)")

    tied = qmeta.get("tied", {})
    if not isinstance(tied, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise CheckpointError(f"{field}.tied must map tensor names to tensor names, got "
                              f"{tied!r:.80}")

    recipe = qmeta.get("recipe", {})
    if recipe is None:
        recipe = {}
    from ..quant.recipe import Recipe
    try:
        if not isinstance(recipe, Mapping):
            raise TypeError(f"a mapping is expected, got {type(recipe).__name__}")
        Recipe.from_dict(recipe)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{field}.recipe: {exc}") from None

    structure = qmeta.get("structure")
    if structure is not None:
        _validate_structure(structure, f"{field}.structure")
    return {**qmeta, "layers": checked_layers, "tied": dict(tied), "recipe": dict(recipe),
            "structure": structure}


def _validate_layer(name: Any, entry: Any, field: str) -> Dict[str, Any]:
    from ..format.packing import SUPPORTED_BITS
    from ..format.qweight import SUPPORTED_GROUP_SIZES
    from ..quant.methods import method_names
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{field}: layer names must be non-empty strings")
    if not isinstance(entry, Mapping):
        raise CheckpointError(f"{field} must be a mapping of layer fields, got "
                              f"{type(entry).__name__}")
    missing = [f for f in _LAYER_FIELDS if f not in entry]
    if missing:
        raise CheckpointError(f"{field}: field {missing[0]!r} is missing"
                              + (f" (and {missing[1:]})" if len(missing) > 1 else ""))
    unknown = sorted(set(entry) - set(_LAYER_FIELDS) - set(_OPTIONAL_LAYER_FIELDS))
    if unknown:
        raise CheckpointError(f"{field}: unknown fields {unknown} (written by a newer pyengine?)")
    bits, group_size = entry["bits"], entry["group_size"]
    if not is_int(bits) or bits not in SUPPORTED_BITS:
        raise CheckpointError(f"{field}.bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if not is_int(group_size) or group_size not in SUPPORTED_GROUP_SIZES:
        raise CheckpointError(f"{field}.group_size must be one of {SUPPORTED_GROUP_SIZES}, got "
                              f"{group_size!r}")
    for flag in ("symmetric", "bias"):
        if not isinstance(entry[flag], bool):
            raise CheckpointError(f"{field}.{flag} must be true or false, got {entry[flag]!r}")
    shape = entry["shape"]
    if (not isinstance(shape, (list, tuple)) or len(shape) != 2
            or not all(is_int(d) and d >= 1 for d in shape)):
        raise CheckpointError(f"{field}.shape must be [out_features, in_features] (two positive "
                              f"integers), got {shape!r}")
    if entry["scale_dtype"] not in FLOAT_DTYPES:
        raise CheckpointError(f"{field}.scale_dtype must be one of {sorted(FLOAT_DTYPES)}, got "
                              f"{entry['scale_dtype']!r}")
    method = entry.get("method", "rtn")
    if method not in method_names():
        raise CheckpointError(f"{field}.method must be one of {method_names()}, got {method!r}")
    act_bits = entry.get("act_bits", 0)
    if not is_int(act_bits) or act_bits not in (0, 8):
        raise CheckpointError(f"{field}.act_bits must be 0 or 8, got {act_bits!r}")
    checked = {**entry, "shape": [int(shape[0]), int(shape[1])], "method": method,
               "act_bits": int(act_bits)}
    if "matryoshka" in entry:
        if act_bits:
            raise CheckpointError(f"{field}: a Matryoshka layer takes no act_bits")
        _validate_matryoshka(entry["matryoshka"], bits, f"{field}.matryoshka")
    if "embedding" in entry:
        emb = entry["embedding"]
        if not isinstance(emb, Mapping) or set(emb) != {"dtype"}:
            raise CheckpointError(f"{field}.embedding must be a mapping with one field, dtype "
                                  f"(the dtype of the rows it returns), got {emb!r:.80}")
        if emb["dtype"] not in FLOAT_DTYPES:
            raise CheckpointError(f"{field}.embedding.dtype must be one of "
                                  f"{sorted(FLOAT_DTYPES)}, got {emb['dtype']!r}")
        if entry["bias"] or act_bits or "matryoshka" in entry or method != "rtn":
            raise CheckpointError(f"{field}: a quantized embedding table has no bias, act_bits "
                                  f"or Matryoshka parent and is made by method 'rtn'")
    return checked


def _validate_matryoshka(mat: Any, bits: int, field: str) -> None:
    from ..matryoshka.weight import LAYOUT, PARENT_BITS, PRECISIONS
    if not isinstance(mat, Mapping):
        raise CheckpointError(f"{field} must be a mapping, got {type(mat).__name__}")
    if mat.get("layout") != LAYOUT or mat.get("parent_bits") != PARENT_BITS:
        raise CheckpointError(f"{field}: layout {mat.get('layout')!r} / parent_bits "
                              f"{mat.get('parent_bits')!r}; this pyengine reads {LAYOUT!r} / "
                              f"{PARENT_BITS}")
    if bits != PARENT_BITS:
        raise CheckpointError(f"{field}: a Matryoshka layer stores {PARENT_BITS}-bit parents, but "
                              f"the layer's bits are {bits}")
    precision = mat.get("precision", PARENT_BITS)
    if not is_int(precision) or precision not in PRECISIONS:
        raise CheckpointError(f"{field}.precision must be one of {PRECISIONS}, got {precision!r}")


def _check_structure_value(value: Any, kind: str, field: str) -> None:
    if kind == "width" and not (is_int(value) and value >= 1):
        raise CheckpointError(f"{field} must be a positive integer, got {value!r}")
    if kind == "bool" and not isinstance(value, bool):
        raise CheckpointError(f"{field} must be true or false, got {value!r}")
    if kind == "eps" and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                              and math.isfinite(value) and value >= 0):
        raise CheckpointError(f"{field} must be a finite number >= 0, got {value!r}")
    if kind == "list" and not isinstance(value, list):
        raise CheckpointError(f"{field} must be a list, got {type(value).__name__}")


def _validate_structure(structure: Any, field: str) -> None:
    if not isinstance(structure, Mapping):
        raise CheckpointError(f"{field} must be a mapping or null, got "
                              f"{type(structure).__name__}")
    for key, kind in _STRUCTURE_FIELDS.items():
        if key not in structure:
            raise CheckpointError(f"{field}.{key} is missing")
        _check_structure_value(structure[key], kind, f"{field}.{key}")
    if not isinstance(structure.get("projected_embeddings", False), bool):
        raise CheckpointError(f"{field}.projected_embeddings must be true or false")
    hidden = structure["hidden_size"]
    for key in ("embed_width", "head_width"):
        if structure[key] > hidden:
            raise CheckpointError(f"{field}.{key} is {structure[key]}, more than hidden_size "
                                  f"{hidden}")
    for i, layer in enumerate(structure["layers"]):
        where = f"{field}.layers[{i}]"
        if not isinstance(layer, Mapping):
            raise CheckpointError(f"{where} must be a mapping, got {type(layer).__name__}")
        for key, kind in _STRUCTURE_LAYER_FIELDS.items():
            if key not in layer:
                raise CheckpointError(f"{where}.{key} is missing")
            _check_structure_value(layer[key], kind, f"{where}.{key}")
        block = layer.get("mlp_hadamard_block", 0)  # optional: 0 or a power of two
        if not (is_int(block) and block >= 0 and block & (block - 1) == 0):
            raise CheckpointError(f"{where}.mlp_hadamard_block must be 0 or a power of two, "
                                  f"got {block!r}")
        for key in ("attn_width", "mlp_width"):
            if layer[key] > hidden:
                raise CheckpointError(f"{where}.{key} is {layer[key]}, more than hidden_size "
                                      f"{hidden}")


# ---- tensors -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredTensor:
    """What a safetensors header says about one tensor: its file, shape and dtype name."""

    file: str
    shape: Tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        count = 1
        for d in self.shape:
            count *= d
        return count * torch.empty((), dtype=SAFETENSORS_DTYPES[self.dtype]).element_size()


def stored_tensors(files: Sequence["str | Path"]) -> Dict[str, StoredTensor]:
    """{key: StoredTensor} of safetensors ``files``, read from their headers (no tensor data).

    Raises CheckpointError on a file that is missing, truncated or not safetensors, and on a
    key stored in two files.
    """
    from safetensors import safe_open
    found: Dict[str, StoredTensor] = {}
    for file in files:
        file = Path(file)
        try:
            with safe_open(str(file), framework="pt") as f:
                entries = {key: f.get_slice(key) for key in f.keys()}
                infos = {key: (tuple(int(d) for d in s.get_shape()), str(s.get_dtype()))
                         for key, s in entries.items()}
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {file} (truncated or corrupt?): "
                                  f"{str(exc).strip().splitlines()[0] if str(exc) else exc!r}"
                                  ) from None
        for key, (shape, dtype) in infos.items():
            if key in found:
                raise CheckpointError(f"tensor {key!r} is stored twice: in {found[key].file} and "
                                      f"{file.name}")
            found[key] = StoredTensor(file.name, shape, dtype)
    return found


def tensor_byte_ranges(file: "str | Path") -> Dict[str, Tuple[int, int]]:
    """{key: (first byte, end byte)} of each tensor's data in safetensors ``file``, as offsets
    from the start of the file.

    A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
    (``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": ...}``), then the
    data; ``data_offsets`` count from the first byte after the header, so the file offsets are
    ``8 + n + begin`` and ``8 + n + end``.

    Raises CheckpointError on a file that is not safetensors or is shorter than its header says.
    """
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < header_len <= size - 8:
                raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
            header = json.loads(f.read(header_len))
        data_start = 8 + header_len
        ranges: Dict[str, Tuple[int, int]] = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            begin, end = (int(v) for v in entry["data_offsets"])
            if not 0 <= begin <= end <= size - data_start:
                raise ValueError(f"tensor {key!r} ends past the end of the file")
            ranges[key] = (data_start + begin, data_start + end)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read {file} (truncated or corrupt?): {exc}") from None
    return ranges


def checkpoint_files(path: Path) -> Tuple[List[Path], Optional[Dict[str, str]]]:
    """The safetensors files of checkpoint directory ``path`` and, when it is sharded, the
    index's {key: file} map (checked: a mapping of names to files inside ``path``)."""
    index, single = path / INDEX_NAME, path / WEIGHTS_NAME
    if index.exists() and single.exists():
        raise CheckpointError(f"{path} holds both {WEIGHTS_NAME} and {INDEX_NAME}; keep one")
    if single.exists():
        return [single], None
    if not index.exists():
        raise CheckpointError(f"no {WEIGHTS_NAME} (or {INDEX_NAME}) in {path}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index} is not a valid index: {type(exc).__name__}: "
                              f"{exc}") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
    files = []
    for name in sorted(set(weight_map.values())):
        file = path / name
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise CheckpointError(f"{index}: weight_map names {name!r}, not a .safetensors file "
                                  f"of {path}")
        if not file.is_file():
            raise CheckpointError(f"{index}: weight_map names {name}, which is not in {path}")
        files.append(file)
    return files, dict(weight_map)


def check_index(index_map: Mapping[str, str], stored: Mapping[str, StoredTensor],
                where: str) -> None:
    """Every key of a sharded checkpoint's index is in the file the index names, and every
    stored key is in the index."""
    for key, file in index_map.items():
        if key not in stored:
            raise CheckpointError(f"{where}: the index puts tensor {key!r} in {file}, which does "
                                  f"not hold it")
        if stored[key].file != file:
            raise CheckpointError(f"{where}: the index puts tensor {key!r} in {file}, but it is "
                                  f"in {stored[key].file}")
    unlisted = sorted(set(stored) - set(index_map))
    if unlisted:
        raise CheckpointError(f"{where}: {stored[unlisted[0]].file} holds {_describe(unlisted[0])}"
                              f", which the index does not list ({len(unlisted)} such)")


def _describe(key: str) -> str:
    module, _, name = key.rpartition(".")
    return f"tensor {name!r} of {module!r}" if module else f"tensor {key!r}"


def _some(keys: Sequence[str]) -> str:
    return (f" ({len(keys) - 1} more: {list(keys[1:4])}{'...' if len(keys) > 4 else ''})"
            if len(keys) > 1 else "")


def check_tensors(model: nn.Module, stored: Mapping[str, StoredTensor],
                  aliases: Mapping[str, str], where: str) -> None:
    """Checks stored tensors against the module skeleton ``model`` (weights on the meta device,
    compressed structure applied) before any of them is read.

    Args:
        stored: what the safetensors headers hold (:func:`stored_tensors`).
        aliases: the checkpoint's tied keys, {dropped key: stored key}.
        where: the checkpoint directory, for messages.
    Raises:
        CheckpointError: a tensor missing, unexpected, of the wrong shape or dtype, or a tied
            alias naming a tensor the model or the checkpoint does not have.
    """
    from ..nn.quant_embedding import QuantEmbedding
    from ..nn.quant_linear import QuantLinear
    expected = model.state_dict()
    for alias, source in aliases.items():
        field = f"{where}/config.json: quantization_config.tied[{alias!r}]"
        if alias not in expected:
            raise CheckpointError(f"{field}: the model has no tensor {alias!r}")
        if source not in stored:
            raise CheckpointError(f"{field} = {source!r}: the checkpoint holds no such tensor")
        if alias in stored:
            raise CheckpointError(f"{field}: {alias!r} is tied to {source!r} but also stored "
                                  f"(in {stored[alias].file})")
        if tuple(expected[alias].shape) != stored[source].shape:
            raise CheckpointError(f"{field} = {source!r}: shape {stored[source].shape} does not "
                                  f"fit {alias!r} {tuple(expected[alias].shape)}")
    files = sorted({t.file for t in stored.values()}) or [WEIGHTS_NAME]
    missing = sorted(set(expected) - set(stored) - set(aliases))
    if missing:
        holder = (f"{files[0]} lacks" if len(files) == 1
                  else f"none of its {len(files)} safetensors files holds")
        raise CheckpointError(f"checkpoint {where}: {holder} {_describe(missing[0])}"
                              f"{_some(missing)}")
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        first = unexpected[0]
        raise CheckpointError(f"checkpoint {where}: {stored[first].file} holds "
                              f"{_describe(first)}, which the metadata does not describe"
                              f"{_some(unexpected)}")
    # tensors of quantized layers must have exactly the dtype the metadata gives (int32 codes,
    # scales in scale_dtype); other floating-point tensors (biases included) may be stored in
    # any float dtype
    exact = {f"{name}.{key}" for name, module in model.named_modules()
             if isinstance(module, (QuantLinear, QuantEmbedding))
             for key, _ in module.state_dict().items() if key not in ("bias", "projection")}
    for key in sorted(stored):
        t, want = stored[key], expected[key]
        if t.shape != tuple(want.shape):
            raise CheckpointError(f"checkpoint {where}: {t.file}: {_describe(key)} has the wrong "
                                  f"shape {t.shape}: the metadata says {tuple(want.shape)}")
        got = SAFETENSORS_DTYPES.get(t.dtype)
        if got is None or (got != want.dtype and (key in exact or not want.is_floating_point()
                                                  or not got.is_floating_point)):
            shown = t.dtype if got is None else str(got).replace("torch.", "")
            raise CheckpointError(f"checkpoint {where}: {t.file}: {_describe(key)} is {shown}, "
                                  f"expected {str(want.dtype).replace('torch.', '')}")


def check_checkpoint(model: nn.Module, directory: Path, aliases: Mapping[str, str],
                     files: Optional[Sequence["str | Path"]] = None) -> Dict[str, StoredTensor]:
    """The tensor checks of both load paths: the checkpoint files of ``directory`` (and its
    index, when sharded), then :func:`check_tensors` against the skeleton ``model``.

    ``files``: the files the caller is about to read (from_pretrained resolves its own list);
    they must be the files the checkpoint consists of. Returns {key: StoredTensor}.
    """
    ours, index_map = checkpoint_files(directory)
    if files is not None and sorted(Path(f).name for f in files) != sorted(f.name for f in ours):
        raise CheckpointError(f"checkpoint {directory}: the loader reads "
                              f"{sorted(Path(f).name for f in files)}, but the checkpoint "
                              f"consists of {sorted(f.name for f in ours)}")
    stored = stored_tensors(ours)
    if index_map is not None:
        check_index(index_map, stored, str(directory / INDEX_NAME))
    check_tensors(model, stored, aliases, str(directory))
    return stored
