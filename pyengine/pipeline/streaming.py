"""Compressing a checkpoint on disk one decoder layer at a time, in bounded memory.

:func:`compress_checkpoint` reads a Hugging Face model directory (safetensors, one file or
shards with an index), or a .gguf file (:class:`GGUFSource`: each tensor dequantized to
float32 on its own, as transformers loads the file whole), without loading the model: the
module tree is built on the meta device, and each decoder layer is read from the files,
compressed, written to its own output shard and dropped before the next one is read. The
calibration activations (when the recipe has GPTQ or MatQuant layers, or RTN layers and
calibration data: their inputs weigh RTN's errors) go from layer to layer as in
pyengine.compress. Peak memory is one decoder layer in its source dtype, the calibration
activations, and the embedding table and head.

:func:`stream_scores` measures pyengine.scores the same way (one streamed pass), so a recipe
can be planned (pyengine.plan with ``layer_scores=``) on the meta skeleton
(:meth:`SourceCheckpoint.skeleton`) of a model that does not fit in memory.

The checkpoint written equals, tensor for tensor, what pyengine.compress followed by
pyengine.save writes for the same model, recipe and calibration (without slicing or
rotation, which transform the whole residual stream and run in memory).

An interrupted run resumes: the output directory holds a progress file naming the recipe,
the source and the layers already written (and, for calibrated recipes, the activations that
enter the next layer); a new run with the same arguments starts after the last written layer.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .calibrate import LayerInputs, capture_first_layer_inputs, check_calibration, run_layer
from ..quant.layerwise import input_mean_squares, recording_input_mean_squares
from ..io.checkpoint import (_save_safetensors, _state_for_saving, layer_entries, write_config,
                         write_index)
from ..io.checks import (INDEX_NAME, SAFETENSORS_DTYPES, CheckpointError, StoredTensor,
                        checkpoint_files, stored_tensors, tensor_byte_ranges)
from .compress import (RECIPE_ATTR, _untie_if_head_quantized, calibrated_rtn_names,
                       check_calibration_needs, check_compress_arguments, hold_dense_in,
                       hold_module_dense_in, quantization_targets, quantize_embeddings,
                       rtn_quantize, split_options)
from ..model.adapters import get_adapter
from ..quant.methods import GPTQOptions, get_method, quantize_layer
from ..quant.recipe import Recipe
from ..utils import progress

__all__ = ["GGUFSource", "PROGRESS_NAME", "SourceCheckpoint", "StreamingError",
           "compress_checkpoint", "open_source", "stream_scores"]

# The file in the output directory that records a run's progress (removed when it completes).
PROGRESS_NAME = ".pyengine-compress-progress.json"
_ACTIVATIONS_NAME = ".pyengine-compress-activations.safetensors"

_DTYPES = {name: SAFETENSORS_DTYPES[name] for name in ("F32", "F16", "BF16")}  # computable


class StreamingError(ValueError):
    """A checkpoint or recipe the streamed pipeline cannot take (the message says why and what
    to do instead)."""


class SourceCheckpoint:
    """A Hugging Face model directory of safetensors files, read one module at a time.

    Args:
        path: the directory (``config.json`` and ``model.safetensors`` or sharded
            ``model-*.safetensors`` with ``model.safetensors.index.json``).
    Raises:
        StreamingError: not such a directory, or files that are missing or corrupt.
    """

    def __init__(self, path: "str | os.PathLike") -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise StreamingError(f"{self.path} is not a Hugging Face model directory (no "
                                 f"config.json)")
        try:
            files, _ = checkpoint_files(self.path)
            self.stored = stored_tensors(files)
        except CheckpointError as exc:
            raise StreamingError(f"{self.path}: {exc}") from None
        floating = [s.dtype for s in self.stored.values() if s.dtype in _DTYPES]
        if not floating:
            raise StreamingError(f"{self.path}: no float32, float16 or bfloat16 tensors (a "
                                 f"quantized checkpoint? compress the original model)")
        # the dtype most of the weights are stored in: the dtype the model computes in
        self.dtype = _DTYPES[max(set(floating), key=floating.count)]
        self._ranges: Dict[str, Dict[str, Tuple[int, int]]] = {}  # {file: tensor_byte_ranges}

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors stored in the files."""
        return sum(info.nbytes for info in self.stored.values())

    @staticmethod
    def tensor_bytes(path: "str | os.PathLike") -> int:
        """Bytes of the tensors stored in the safetensors files of directory ``path``."""
        files, _ = checkpoint_files(Path(path))
        return sum(info.nbytes for info in stored_tensors(files).values())

    def fingerprint(self) -> Dict[str, Any]:
        """What identifies the source files (names, sizes, modification times)."""
        entries = {}
        for name in sorted({s.file for s in self.stored.values()}):
            stat = (self.path / name).stat()
            entries[name] = [stat.st_size, int(stat.st_mtime)]
        return {"path": str(self.path.resolve()), "files": entries}

    def skeleton(self) -> nn.Module:
        """The model on the meta device (rotary tables and other non-persistent buffers are
        real), in eval mode, in the source dtype.

        Raises:
            StreamingError: when the files lack tensors the model has (a checkpoint whose
                names transformers converts while loading it) or hold them in other shapes.
        """
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM
        config = self._config()
        if getattr(config, "quantization_config", None) is not None:
            raise StreamingError(f"{self.path} holds a quantized checkpoint "
                                 f"({config.quantization_config.get('quant_method', '?')}); "
                                 f"compress the original model")
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        model.tie_weights()  # tying is skipped on the meta device; the tied keys come from it
        model.eval()
        self._check_keys(model)
        return model

    def _config(self) -> Any:
        """The model's transformers config."""
        from transformers import AutoConfig
        try:
            return AutoConfig.from_pretrained(str(self.path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StreamingError(f"{self.path}/config.json: transformers cannot read it: "
                                 f"{str(exc).strip().splitlines()[0] if str(exc) else exc!r}"
                                 ) from None

    def _check_keys(self, model: nn.Module) -> None:
        state = model.state_dict()
        wanted = set(state.keys())
        self.aliases = _tied_keys(model)
        missing = sorted(wanted - set(self.stored) - set(self.aliases))
        if missing:
            raise StreamingError(
                f"{self.path}: the files lack {len(missing)} tensors the model has, such as "
                f"{missing[0]!r} (names transformers converts while loading?); compress it in "
                f"memory instead (pyengine.compress, or `pyengine compress` without "
                f"--sequential)")
        for key in wanted & set(self.stored):
            shape = tuple(state[key].shape)
            if tuple(self.stored[key].shape) != shape:
                raise StreamingError(f"{self.path}: {key!r} is stored with shape "
                                     f"{list(self.stored[key].shape)}, the model's config "
                                     f"gives {list(shape)}")

    def _map(self, key: str) -> torch.Tensor:
        """Tensor ``key`` over a private, copy-on-write mapping of its bytes in its file (pages
        are read when touched; the mapping ends when the tensor and its views are freed)."""
        info = self.stored[key]
        file = self.path / info.file
        if info.file not in self._ranges:
            try:
                self._ranges[info.file] = tensor_byte_ranges(file)
            except CheckpointError as exc:
                raise StreamingError(str(exc)) from None
        begin, end = self._ranges[info.file][key]
        dtype = SAFETENSORS_DTYPES[info.dtype]
        if end - begin != info.nbytes:
            raise StreamingError(f"cannot read {file} (truncated or corrupt?): {key!r} holds "
                                 f"{end - begin} bytes, its shape and dtype need {info.nbytes}")
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        mapped, offset = _map_bytes(file, begin, end)
        # torch.frombuffer holds a reference to the mapping for as long as the tensor lives
        flat = torch.frombuffer(mapped, dtype=dtype, count=info.nbytes // dtype.itemsize,
                                offset=offset)
        return flat.view(info.shape)

    def materialize(self, model: nn.Module, prefix: Optional[str],
                    device: "str | torch.device" = "cpu") -> None:
        """Reads from the files every tensor of ``model`` whose key starts with ``prefix + "."``
        (``prefix`` None: every tensor outside the decoder layers) and puts it in its module, on
        ``device``, in its stored dtype."""
        layers = get_adapter(model).layers + "."
        keys = [k for k in model.state_dict().keys()
                if (k.startswith(prefix + ".") if prefix is not None
                    else not k.startswith(layers))]
        # Each tensor is read through a mapping of its own byte range (not of its whole file, as
        # safetensors' readers do): a tensor's pages then leave memory when it is freed, though
        # a neighbour read from the same file lives on (compress_checkpoint drops the dense head
        # once it is quantized, then quantizes the embedding table, and both are often in one
        # file), and the address space the run maps is that of the tensors alive, not of files.
        loaded: Dict[str, torch.Tensor] = {}
        for key in keys:
            if key in self.stored:  # not a tied alias
                loaded[key] = self._map(key).to(device)
        for key in keys:
            if key not in loaded:  # a tied key: the very tensor of its source
                continue
            _set_tensor(model, key, loaded[key])
        for alias, source in self.aliases.items():
            if alias in keys or source in keys:
                _share_tensor(model, alias, source)


def _map_bytes(file: Path, begin: int, end: int) -> Tuple[mmap.mmap, int]:
    """A private, copy-on-write mapping of bytes [begin, end) of ``file`` and the offset of
    ``begin`` in it (mappings start at a multiple of the allocation granularity)."""
    start = begin - begin % mmap.ALLOCATIONGRANULARITY
    try:
        with open(file, "rb") as f:
            return mmap.mmap(f.fileno(), end - start, offset=start,
                             access=mmap.ACCESS_COPY), begin - start
    except (OSError, ValueError) as exc:
        raise StreamingError(f"cannot read {file}: {exc}") from None


class GGUFSource(SourceCheckpoint):
    """A .gguf file read one tensor at a time: each tensor is mapped, dequantized to float32
    and renamed as transformers does when it loads the file whole
    (``from_pretrained(dir, gguf_file=...)``: the same names, the same reordering of llama's
    q/k rows), so that a model built from it computes in float32 like the in-memory path's.

    Args:
        path: the .gguf file.
    Raises:
        StreamingError: no gguf package, a file transformers cannot read, or a tensor it
            cannot place.
    """

    def __init__(self, path: "str | os.PathLike") -> None:
        self.file = Path(path)
        self.path = self.file.parent
        try:
            from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map
            from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS,
                                                                  TensorProcessor)
        except ImportError:
            raise StreamingError("reading a .gguf file needs the gguf package (pip install "
                                 "gguf)") from None
        try:
            reader = GGUFReader(str(self.file))
            field = reader.fields["general.architecture"]
            architecture = bytes(field.parts[field.data[0]]).decode()
            # (type, item dtype, item shape, first byte, bytes, shape) of each stored tensor
            self._gguf = {t.name: (t.tensor_type, t.data.dtype, tuple(t.data.shape),
                                   int(t.data_offset), int(t.n_bytes),
                                   tuple(int(d) for d in reversed(t.shape.tolist())))
                          for t in reader.tensors}
            del reader  # and its mapping of the whole file
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise StreamingError(f"cannot read {self.file}: {exc}") from None
        self.dtype = torch.float32  # dequantized, as the in-memory path loads it
        self._hf_config = self._read_config()  # parsed once (the metadata holds the vocabulary)
        config = self._hf_config.to_dict()
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)
        self._parsed = {"config": config}
        # {key: GGUF name}: gguf's own map of the file's architecture, from the model's keys
        arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == architecture), None)
        if arch is None:
            raise StreamingError(f"{self.file}: architecture {architecture!r} is unknown to the "
                                 f"installed gguf package")
        names = get_tensor_name_map(arch, self._hf_config.num_hidden_layers)
        self._gguf_names: Dict[str, str] = {}
        for key in self._meta_model().state_dict():
            base, _, suffix = key.rpartition(".")
            name = names.get_name(base) if suffix in ("weight", "bias") else None
            if name is not None and f"{name}.{suffix}" in self._gguf:
                self._gguf_names[key] = f"{name}.{suffix}"
        self.stored = {key: StoredTensor(self.file.name, self._gguf[name][5], "F32")
                       for key, name in self._gguf_names.items()}
        if not self.stored:
            raise StreamingError(f"{self.file}: no tensor of the file maps to the model "
                                 f"transformers builds for it")

    def _read_config(self) -> Any:
        from transformers import AutoConfig
        try:
            return AutoConfig.from_pretrained(str(self.path), gguf_file=self.file.name)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StreamingError(f"{self.file}: transformers cannot read its config: "
                                 f"{str(exc).strip().splitlines()[0] if str(exc) else exc!r}"
                                 ) from None

    def _config(self) -> Any:
        import copy
        return copy.deepcopy(self._hf_config)

    def _meta_model(self) -> nn.Module:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(self._config(), dtype=self.dtype)

    def _map(self, key: str) -> torch.Tensor:
        """Tensor ``key``, dequantized from its own mapping of the file, float32 [shape]."""
        import numpy as np
        from gguf import dequantize
        name = self._gguf_names[key]
        qtype, item_dtype, item_shape, begin, nbytes, shape = self._gguf[name]
        mapped, offset = _map_bytes(self.file, begin, begin + nbytes)
        items = np.frombuffer(mapped, dtype=item_dtype, count=int(np.prod(item_shape)),
                              offset=offset).reshape(item_shape)
        weights = dequantize(items, qtype)
        weights = self._processor.process(weights=weights, name=name,
                                          tensor_key_mapping=None,
                                          parsed_parameters=self._parsed).weights
        # a copy: float types dequantize to views of the mapping, which is then released
        tensor = torch.from_numpy(np.array(weights, dtype=np.float32, order="C", copy=True))
        if tuple(tensor.shape) != shape:
            raise StreamingError(f"{self.file}: {name} dequantizes to "
                                 f"{list(tensor.shape)}, not {list(shape)}")
        return tensor


def open_source(path: "str | os.PathLike") -> SourceCheckpoint:
    """The reader of a model on disk: :class:`GGUFSource` for a .gguf file, else
    :class:`SourceCheckpoint` (a directory of safetensors files)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return GGUFSource(path)
    return SourceCheckpoint(path)


def _tied_keys(model: nn.Module) -> Dict[str, str]:
    """{key: key it shares its tensor with} among the model's parameters (the tied head)."""
    seen: Dict[int, str] = {}
    aliases: Dict[str, str] = {}
    for key, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases[key] = seen[id(param)]
        else:
            seen[id(param)] = key
    return aliases


def _owner(model: nn.Module, key: str) -> Tuple[nn.Module, str]:
    module_name, _, attr = key.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module, attr = _owner(model, key)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


def _share_tensor(model: nn.Module, alias: str, source: str) -> None:
    src_module, src_attr = _owner(model, source)
    dst_module, dst_attr = _owner(model, alias)
    dst_module._parameters[dst_attr] = src_module._parameters[src_attr]


def _release(module: nn.Module) -> None:
    """Drops the tensors of ``module`` (back to the meta device)."""
    module.to("meta")


def _return_freed_memory() -> None:
    """Gives the memory freed by a finished layer back to the system (glibc keeps freed blocks
    of tens of MB in its heap, so the process would otherwise grow layer after layer)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _calibration_digest(calibration: Optional[torch.Tensor]) -> Optional[str]:
    if calibration is None:
        return None
    ids = calibration.detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha256(ids.numpy().tobytes() + str(tuple(ids.shape)).encode()).hexdigest()


@torch.no_grad()
def compress_checkpoint(source: "str | os.PathLike", out: "str | os.PathLike", recipe: Recipe,
                        calibration: Optional[torch.Tensor] = None, *,
                        dtype: Optional[torch.dtype] = None,
                        scale_dtype: Optional[torch.dtype] = None,
                        device: Optional["str | torch.device"] = None,
                        options: Optional[Mapping[str, Any]] = None,
                        matquant_options: Optional[Mapping[str, Any]] = None,
                        batch_size: int = 1, damp: Optional[float] = None, resume: bool = True,
                        show_progress: bool = True) -> Path:
    """Compresses the model in directory (or .gguf file) ``source`` into checkpoint ``out`` one
    decoder layer at a time, and returns ``out``.

    Every argument means what it means for pyengine.compress (``dtype``, ``scale_dtype``,
    ``options``, ``matquant_options``; ``damp`` is GPTQ's damping of every layer, None: each
    QuantConfig's ``damp``, the same as ``options={"gptq": GPTQOptions(damp=...)}``); ``out``
    is what pyengine.save writes (one shard per decoder layer and one for the rest, with an
    index), loadable with pyengine.load.

    Args:
        source: a Hugging Face model directory of safetensors files.
        out: the output directory (created; earlier weights files in it are replaced).
        recipe: a Recipe without slicing and rotation (those run in memory: pyengine.compress).
        calibration: token ids [n_samples, seqlen] for GPTQ or MatQuant layers (and, given,
            the input weights of RTN layers, as in pyengine.compress).
        device: where each decoder layer is computed (e.g. "cuda": one layer at a time is
            moved there; the activations stay there too); default CPU.
        resume: continue an interrupted run of the same source, recipe and calibration from
            the progress file in ``out`` (False: start over).
    Raises:
        StreamingError: a source the streamed pipeline cannot read, or a recipe with slicing,
            rotation, or both GPTQ and MatQuant layers.
        ValueError: what pyengine.compress raises on the recipe and calibration.
    """
    src = open_source(source)
    model = src.skeleton()
    adapter = get_adapter(model)
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a pyengine.Recipe, got {type(recipe).__name__}")
    if recipe.slicing is not None or recipe.rotate:
        raise StreamingError("slicing and rotation transform the whole residual stream; they "
                             "run in memory (pyengine.compress), not layer by layer")
    if calibration is not None:
        check_calibration(model, calibration)
    dtype, scale_dtype = check_compress_arguments(model, recipe, None, dtype, scale_dtype)
    targets = quantization_targets(model, recipe)
    check_calibration_needs(targets, calibration)
    layers_prefix = adapter.layers + "."
    layer_targets: Dict[int, list] = {}
    other_targets = []
    for target in targets:
        index = adapter.layer_index(target[0])
        if index is not None:
            layer_targets.setdefault(index, []).append(target)
        else:
            other_targets.append(target)
    calibrated_methods = sorted({t[4].method for t in targets
                                 if get_method(t[4].method).needs_calibration})
    del targets  # each layer's linears are dropped with the layer (layer_targets.pop below)
    if len(calibrated_methods) > 1:
        raise StreamingError(f"a recipe with layers of several calibrated methods "
                             f"({', '.join(calibrated_methods)}) runs in memory "
                             f"(pyengine.compress): each method takes its own pass there")
    if damp is not None:
        if options is not None and "gptq" in options:
            raise ValueError("GPTQ's damping is given twice: damp and options['gptq']; give one")
        options = {**dict(options or {}), "gptq": GPTQOptions(damp=damp)}
    resolved, runtime = split_options(options, matquant_options)
    # calibrated RTN: with calibration data, RTN layers weigh their inputs (as compress does)
    measured = (set(calibrated_rtn_names(model, [t for ts in layer_targets.values() for t in ts]))
                if calibration is not None else set())
    calibrated = [i for i, ts in layer_targets.items()
                  if any(get_method(t[4].method).needs_calibration or t[0] in measured
                         for t in ts)]
    last_calibrated = max(calibrated, default=-1)
    device = runtime.get("compute_device", device)
    compute = torch.device(device) if device is not None else torch.device("cpu")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layers = adapter.decoder_layers(model)
    n_layers = len(layers)
    shard = [f"model-{i:05d}-of-{n_layers + 1:05d}.safetensors" for i in range(1, n_layers + 2)]
    run = {"source": src.fingerprint(), "recipe": recipe.to_dict(),
           "dtype": str(dtype), "scale_dtype": str(scale_dtype),
           "calibration": _calibration_digest(calibration),
           "options": {name: o.to_dict() for name, o in resolved.items()},
           "batch_size": batch_size}
    done, written_layers = _start(out, run, shard, resume, last_calibrated)
    if done and show_progress:
        print(f"resuming: {done} of {n_layers} layers already written in {out}",
              file=sys.stderr)

    # the embeddings (and the rest outside the layers) stay for the calibration pass
    inputs: Optional[LayerInputs] = None
    if last_calibrated >= done:
        src.materialize(model, None)
        inputs = capture_first_layer_inputs(model, calibration, batch_size,
                                            store_device=compute)
        if done:
            inputs = _read_activations(out, inputs, compute)
    for i in progress(range(done, n_layers), desc="compressing", enabled=show_progress,
                      total=n_layers - done, unit="layer"):
        layer = layers[i]
        src.materialize(model, f"{adapter.layers}.{i}", compute)
        here = layer_targets.pop(i, [])
        for name in calibrated_methods:
            configs = {t[0]: t[4] for t in here if t[4].method == name}
            if configs:
                quantize_layer(model, layer, inputs, get_method(name), configs, resolved[name],
                               scale_dtype=scale_dtype, compute_device=compute,
                               report=runtime.get("report"))
        measured_here = [t[0] for t in here if t[0] in measured]
        if i < last_calibrated:  # the next calibrated layer needs this one's outputs
            with recording_input_mean_squares(model, measured_here) as input_weights:
                inputs = run_layer(layer, inputs, compute)
        else:
            input_weights = input_mean_squares(model, layer, inputs, measured_here, compute)
        rtn_quantize(here, scale_dtype, input_weights=input_weights, options=resolved)
        hold_module_dense_in(layer, dtype)
        tensors = {f"{adapter.layers}.{i}.{key}": t for key, t in
                   _state_for_saving(layer)[0].items()}
        _save_safetensors({k: t.cpu() for k, t in tensors.items()}, out / shard[i],
                          {"format": "pt", "producer": "pyengine"})
        written_layers.update(layer_entries(layer, f"{adapter.layers}.{i}"))
        _release(layer)
        for target in here:  # the dense linears the quantized ones replaced
            _release(target[1])
        del tensors, here
        _return_freed_memory()
        if inputs is not None and i < last_calibrated:
            _write_activations(out, inputs, i + 1)
        _record(out, run, i + 1, written_layers)
    inputs = None

    src.materialize(model, None)
    rtn_quantize(other_targets, scale_dtype, options=resolved)
    for target in other_targets:
        _release(target[1])
    del other_targets
    quantize_embeddings(model, recipe, scale_dtype)
    setattr(model, RECIPE_ATTR, recipe)
    _untie_if_head_quantized(model)
    hold_dense_in(model, dtype)  # the layers are on the meta device: only the rest converts
    tensors, aliases = _state_for_saving(
        model, include=lambda key: not key.startswith(layers_prefix))
    _save_safetensors({k: t.cpu() for k, t in tensors.items()}, out / shard[n_layers],
                      {"format": "pt", "producer": "pyengine"})
    del tensors
    write_config(model, out, aliases, layers=written_layers)
    written = stored_tensors([out / name for name in shard])
    write_index(out, {key: info.file for key, info in written.items()},
                sum(info.nbytes for info in written.values()))
    _finish(out)
    return out


def _start(out: Path, run: Dict[str, Any], shard: List[str], resume: bool,
           last_calibrated: int) -> Tuple[int, Dict[str, Any]]:
    """(decoder layers already written by an interrupted run of ``run``, their entries of
    ``quantization_config.layers``): (0, {}) when there is none, when ``resume`` is False, or
    when what the run left cannot be trusted; then earlier weights files are removed."""
    progress_file = out / PROGRESS_NAME
    if resume and progress_file.exists():
        try:
            recorded = json.loads(progress_file.read_text())
        except (OSError, ValueError):
            recorded = {}
        done = recorded.get("layers_written", 0)
        entries = recorded.get("layers", {})
        if (recorded.get("run") == json.loads(json.dumps(run)) and isinstance(done, int)
                and 0 < done < len(shard) and isinstance(entries, dict)
                and all((out / shard[i]).exists() for i in range(done))
                # a calibrated layer still to do needs the activations entering layer `done`
                and (done > last_calibrated or _activations_layer(out) == done)):
            return done, entries
    for old in list(out.glob("model*.safetensors")) + [out / INDEX_NAME, out / PROGRESS_NAME,
                                                      out / _ACTIVATIONS_NAME]:
        if old.exists():
            old.unlink()
    return 0, {}


def _record(out: Path, run: Dict[str, Any], layers_written: int,
            entries: Dict[str, Any]) -> None:
    """Writes the progress file (atomically): the run, the layers written and their entries
    of ``quantization_config.layers``."""
    tmp = out / (PROGRESS_NAME + ".tmp")
    tmp.write_text(json.dumps({"run": run, "layers_written": layers_written,
                               "layers": entries}, indent=1))
    os.replace(tmp, out / PROGRESS_NAME)


def _finish(out: Path) -> None:
    for name in (PROGRESS_NAME, _ACTIVATIONS_NAME):
        if (out / name).exists():
            (out / name).unlink()


def _write_activations(out: Path, inputs: LayerInputs, layer: int) -> None:
    """Saves the activations entering decoder layer ``layer`` (atomically; the index is in
    the file's metadata, so a file and a progress file that disagree are detected)."""
    from safetensors.torch import save_file
    tmp = out / (_ACTIVATIONS_NAME + ".tmp")
    save_file({str(b): h.detach().cpu().contiguous() for b, h in enumerate(inputs.hidden)},
              str(tmp), metadata={"layer": str(layer)})
    os.replace(tmp, out / _ACTIVATIONS_NAME)


def _activations_layer(out: Path) -> Optional[int]:
    """The decoder layer whose inputs the saved activations are (None: no readable file)."""
    from safetensors import safe_open
    try:
        with safe_open(str(out / _ACTIVATIONS_NAME), framework="pt") as f:
            return int((f.metadata() or {}).get("layer", -1))
    except Exception:  # missing, truncated or foreign: not resumable  # noqa: BLE001
        return None


def _read_activations(out: Path, inputs: LayerInputs, device: torch.device) -> LayerInputs:
    from safetensors.torch import load_file
    saved = load_file(str(out / _ACTIVATIONS_NAME), device=str(device))
    if len(saved) != len(inputs.hidden):
        raise StreamingError(f"{out / _ACTIVATIONS_NAME} does not match the calibration data; "
                             f"run again with resume=False")
    return LayerInputs([saved[str(b)] for b in range(len(saved))], inputs.kwargs)


@torch.no_grad()
def stream_scores(source: "str | os.PathLike", calibration: torch.Tensor, batch_size: int = 1,
                  device: Optional["str | torch.device"] = None,
                  show_progress: bool = True) -> Dict[str, List[float]]:
    """pyengine.scores of the model in directory ``source`` (or .gguf file), reading one
    decoder layer at a time: {"lim": [...], "zd": [...], "lr": [...]}, one value per decoder
    layer."""
    from .scores import mean_cosine, zd_scores
    src = open_source(source)
    model = src.skeleton()
    check_calibration(model, calibration)
    adapter = get_adapter(model)
    compute = torch.device(device) if device is not None else torch.device("cpu")
    src.materialize(model, None)
    inputs = capture_first_layer_inputs(model, calibration, batch_size, store_device=compute)
    layers = adapter.decoder_layers(model)
    lr: List[float] = []
    zd: List[float] = []
    for i in progress(range(len(layers)), desc="scores", enabled=show_progress,
                      total=len(layers), unit="layer"):
        src.materialize(model, f"{adapter.layers}.{i}", compute)
        outputs = run_layer(layers[i], inputs, compute)
        lr.append(mean_cosine(inputs, outputs))
        zd.extend(zd_scores(model, only_layer=i))
        inputs = outputs
        _release(layers[i])
    return {"lim": [-v for v in lr], "zd": zd, "lr": lr}
