"""Exports a pyengine checkpoint to formats that stock engines read: compressed-tensors
(``pack-quantized``, as llm-compressor writes it) and GPTQ (as GPTQModel writes it, per-module
``dynamic`` overrides for mixed plans).

    pyengine export --format compressed-tensors CHECKPOINT OUT
    pyengine export --format gptq CHECKPOINT OUT

The export streams: one layer's tensors at a time are read (memory-mapped) from the source
checkpoint, converted and written, so it runs in about one layer's memory plus one output
shard. Nothing is dequantized and requantized where the target can hold the weight as it is:

* codes are copied bit for bit (repacked to the target's word layout);
* scales keep their dtype (GPTQ stores float16: other dtypes are rounded to it, and the
  weight's change is reported);
* both formats store *integer* zero points (compressed-tensors: signed, in
  [-2^(b-1), 2^(b-1)); GPTQ: ``zero - 1`` in b bits, so a zero of 0 is not representable in
  the asymmetric GPTQ that GPTQModel reads). pyengine's quantizers write fractional zero points
  by default; compress with ``integer_zeros`` (``RTNOptions``/``GPTQOptions``, CLI
  ``--integer-zeros``) for an exact export. Otherwise each group whose zero point is not
  representable takes the nearest representable one, its scale refitted by least squares to
  the group's pyengine weights and its codes re-rounded; the report gives how far each layer's
  weights moved.

Written dense (the stock formats quantize linear layers, not embeddings): a quantized token
table, and a quantized output head (a head tied to the table becomes a tied head again:
``tie_word_embeddings``). ``act_bits`` (int8 activations) is a runtime choice those formats
express differently; the export writes weight-only layers and says so. Refused with one line:
Matryoshka layers and sliced or rotated structures (serve them with ``pyengine.vllm``).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..format.packing import pack_codes, unpack_codes
from ..format.qweight import QuantizedWeight
from .checkpoint import ShardWriter
from .checks import (INDEX_NAME, WEIGHTS_NAME, CheckpointError, checkpoint_files,
                     stored_tensors, validate_metadata)
from .export_formats import (FORMATS, ExportError, GPTQFormat, LayerExport, TargetFormat,
                             UnpackedLayer)


EXPORT_FORMATS = tuple(FORMATS)

CONFIG_NAME = "config.json"

# Files of a pyengine checkpoint the export rewrites; every other file (tokenizer, generation
# config, a README) is copied as it is.
_REWRITTEN = (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME)

# Shard size of the exported safetensors files.
MAX_SHARD_BYTES = 4 << 30


@dataclass
class ExportReport:
    """Summary of :func:`export_checkpoint`."""

    format: str
    out: Path
    layers: List[LayerExport] = field(default_factory=list)
    dense: List[str] = field(default_factory=list)       # quantized modules written dense
    act_bits_dropped: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """Every quantized layer written without changing a weight."""
        return all(layer.exact for layer in self.layers)

    def summary(self) -> str:
        """A few lines for the command line."""
        schemes = Counter((layer.bits, layer.group_size, layer.symmetric)
                          for layer in self.layers)
        described = ", ".join(
            f"{count} x int{bits} g{gs}{' sym' if sym else ''}"
            for (bits, gs, sym), count in sorted(schemes.items()))
        lines = [f"wrote {self.out} ({self.format}): {len(self.layers)} quantized linear "
                 f"layers ({described})"]
        moved = [layer for layer in self.layers if not layer.exact]
        if moved:
            worst = max(moved, key=lambda layer: layer.relative_change)
            lines.append(
                f"  {len(moved)} layers changed to fit the format (integer zero points"
                f"{', float16 scales' if self.format == 'gptq' else ''}): at most "
                f"{100 * worst.relative_change:.2f}% of a layer's weight norm ({worst.name}); "
                f"this loses more than quantizing with integer zero points does: compress "
                f"with --integer-zeros for an exact export")
        else:
            lines.append("  every quantized layer written exactly (codes, scales and zeros)")
        if self.dense:
            lines.append(f"  written dense (the format quantizes linear layers only): "
                         f"{', '.join(self.dense)}")
        if self.act_bits_dropped:
            lines.append(f"  {len(self.act_bits_dropped)} layers computed with int8 activations "
                         f"in pyengine are written weight-only")
        lines.extend(f"  {note}" for note in self.notes)
        return "\n".join(lines)


# ---- reading the source ---------------------------------------------------------------------

class _Source:
    """A pyengine checkpoint opened for streaming: config, metadata, and tensors by key."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open
        self.path = path
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            raise CheckpointError(f"{path} has no {CONFIG_NAME}: not a checkpoint directory")
        self.config = json.loads(config_file.read_text())
        self.meta = validate_metadata(self.config.get("quantization_config"), str(config_file))
        files, _ = checkpoint_files(path)
        self.stored = stored_tensors(files)  # {key: file, shape, dtype} from the headers
        self._handles = {f.name: safe_open(str(f), framework="pt") for f in files}
        self._tied = self.meta.get("tied", {})
        self.keys = list(self.stored) + [k for k in self._tied if k not in self.stored]

    def get(self, key: str) -> torch.Tensor:
        stored = self._tied.get(key, key)
        if stored not in self.stored:
            raise CheckpointError(f"{self.path}: tensor {key!r} is missing")
        return self._handles[self.stored[stored].file].get_tensor(stored)

    def shape(self, key: str) -> Tuple[int, ...]:
        return self.stored[self._tied.get(key, key)].shape

    def has(self, key: str) -> bool:
        return self._tied.get(key, key) in self.stored


# ---- integer zero points --------------------------------------------------------------------

def fit_integer_zeros(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      bits: int, zero_range: Tuple[int, int],
                      scale_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor,
                                                         torch.Tensor, int]:
    """The weight's nearest form with integer zero points in ``zero_range`` and scales in
    ``scale_dtype``.

    Groups already in that form are kept as they are. Each other group (zero point not an
    integer in the range, or scale not exact in ``scale_dtype``) tries z' = floor(z) and
    ceil(z) (clamped into the range), each with the scale s' that fits its pyengine weights
    w = (q - z) s best for the codes q' = clamp(round(w / s' + z')): a least-squares slope,
    refitted once after the codes are re-rounded, rounded to ``scale_dtype``; the candidate
    with the smaller squared error wins.

    Args:
        codes: int64 [N, Kp]; scales, zeros: [N, G] (any float dtype), groups of Kp / G codes.
    Returns:
        (codes int64 [N, Kp], scales [N, G] in scale_dtype, zeros fp32 [N, G] integer-valued,
        number of groups changed).
    """
    n, kp = codes.shape
    g = scales.shape[1]
    gs = kp // g
    maxq = (1 << bits) - 1
    s = scales.to(torch.float32)
    z = zeros.to(torch.float32)
    s_stored = s.to(scale_dtype).to(torch.float32)
    keep = (z == z.round().clamp(*zero_range)) & (s == s_stored)
    if bool(keep.all()):
        return codes, scales.to(scale_dtype), z, 0
    q = codes.view(n, g, gs).to(torch.float32)
    w = (q - z.unsqueeze(-1)) * s.unsqueeze(-1)                   # pyengine's weights
    tiny = torch.finfo(scale_dtype).tiny

    def candidate(z_int: torch.Tensor):
        """codes, scale and squared error [N, G] of the best fit with zero points z_int."""
        new_q = q
        for _ in range(2):  # fit the slope for the codes, re-round, fit again
            x = new_q - z_int.unsqueeze(-1)
            spread = x.square().sum(-1)
            fitted = (x * w).sum(-1) / spread.clamp(min=1e-30)
            ok = (spread > 0) & (fitted > 0)
            new_s = torch.where(ok, fitted, s).clamp(min=tiny).to(scale_dtype).to(torch.float32)
            new_q = torch.clamp(torch.round(w / new_s.unsqueeze(-1) + z_int.unsqueeze(-1)),
                                0, maxq)
        error = ((new_q - z_int.unsqueeze(-1)) * new_s.unsqueeze(-1) - w).square().sum(-1)
        return new_q, new_s, error

    best_q, best_s, best_err = candidate(z.floor().clamp(*zero_range))
    best_z = z.floor().clamp(*zero_range)
    up_q, up_s, up_err = candidate(z.ceil().clamp(*zero_range))
    up = up_err < best_err
    best_q = torch.where(up.unsqueeze(-1), up_q, best_q)
    best_s = torch.where(up, up_s, best_s)
    best_z = torch.where(up, z.ceil().clamp(*zero_range), best_z)
    new_q = torch.where(keep.unsqueeze(-1), q, best_q)
    new_s = torch.where(keep, s_stored, best_s)
    new_z = torch.where(keep, z, best_z)
    return (new_q.view(n, kp).to(torch.int64), new_s.to(scale_dtype), new_z,
            int((~keep).sum()))


# ---- the formats ----------------------------------------------------------------------------

# ---- the export -----------------------------------------------------------------------------

def _refuse_structure(meta: Dict[str, Any], source: Path) -> None:
    plugin = "serve it with pyengine's vLLM plugin (pip install pyengine[vllm]) instead"
    if meta.get("structure") is not None:
        raise ExportError(f"{source} is a sliced or rotated model (its layers' shapes or an "
                          f"online transform differ from the architecture's): stock engines "
                          f"cannot run it; {plugin}")
    matryoshka = [name for name, e in meta["layers"].items() if e.get("matryoshka")]
    if matryoshka:
        raise ExportError(f"{source} holds Matryoshka layers ({len(matryoshka)}, e.g. "
                          f"{matryoshka[0]}): stock formats have no nested-precision weights; "
                          f"{plugin}, or re-compress at one precision")


def export_checkpoint(source: "str | Path", out: "str | Path", format: str = "compressed-tensors",
                      *, progress: bool = False,
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> ExportReport:
    """Writes the pyengine checkpoint ``source`` to directory ``out`` in ``format``
    (:data:`EXPORT_FORMATS`), layer by layer (see the module doc for what changes).

    Returns the :class:`ExportReport`. Raises ExportError (a ValueError) when the format cannot
    hold the model, CheckpointError when ``source`` is not a valid pyengine checkpoint, and
    FileExistsError when ``out`` is a non-empty directory or the source itself.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose from {EXPORT_FORMATS}")
    source, out = Path(source), Path(out)
    if out.exists() and (out.resolve() == source.resolve() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty: choose a new directory")
    src = _Source(source)
    meta = src.meta
    _refuse_structure(meta, source)
    fmt = FORMATS[format]()
    report = ExportReport(format=format, out=out)

    layer_entries = meta["layers"]
    embeddings = {name for name, e in layer_entries.items() if e.get("embedding")}
    heads = {name for name, e in layer_entries.items()
             if not e.get("embedding") and name.rpartition(".")[2] == "lm_head"}
    tied_head = _head_tied_to_table(meta, heads, embeddings)
    linears = [name for name in layer_entries if name not in embeddings and name not in heads]

    # check every layer the format must hold before writing anything
    for name in linears:
        e = layer_entries[name]
        fmt.check(name, e["bits"], e["group_size"], tuple(e["shape"]))

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _write(src, out, fmt, report, linears, embeddings, heads, tied_head, progress,
               max_shard_bytes)
    except BaseException:
        # an interrupted or failed export leaves no half-written checkpoint behind
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for item in out.iterdir():
                item.unlink()
        raise
    report.notes.extend(_format_notes(fmt, report))
    return report


def _write(src: _Source, out: Path, fmt: TargetFormat, report: ExportReport,
           linears: List[str], embeddings, heads, tied_head: Optional[bool], progress: bool,
           max_shard_bytes: int) -> None:
    """The body of :func:`export_checkpoint`: tensors, config and the other files."""
    meta, layer_entries, source = src.meta, src.meta["layers"], src.path
    writer = ShardWriter(out, max_shard_bytes, producer="pyengine.export")
    consumed = set()
    names = linears
    if progress:
        from tqdm import tqdm
        names = tqdm(linears, desc=f"export {fmt.name}", unit="layer")
    for name in names:
        e = layer_entries[name]
        layer, keys = _read_layer(src, name, e)
        consumed.update(keys)
        exported = _convert(fmt, layer, report)
        for suffix, tensor in fmt.tensors(exported).items():
            writer.add(f"{name}.{suffix}", tensor)
        if e.get("act_bits"):
            report.act_bits_dropped.append(name)

    # quantized tables and heads: dense, in the dtype the model computes in
    dense_dtype = _model_dtype(src.config)
    for name in sorted(embeddings | heads):
        e = layer_entries[name]
        keys = _layer_keys(name, e)
        consumed.update(keys)
        if name in heads and tied_head:
            continue  # the stock engine ties it to the table again
        dtype = getattr(torch, e["embedding"]["dtype"]) if e.get("embedding") else dense_dtype
        stored = QuantizedWeight(src.get(f"{name}.qweight"), src.get(f"{name}.scales"),
                                 None if e["symmetric"] else src.get(f"{name}.zeros"),
                                 bits=e["bits"], group_size=e["group_size"],
                                 shape=tuple(e["shape"]))
        writer.add(f"{name}.weight", stored.dequantize(dtype))  # the rows pyengine looks up
        layer_bias = src.get(f"{name}.bias") if e.get("bias") else None
        if layer_bias is not None:
            writer.add(f"{name}.bias", layer_bias)
        report.dense.append(name)

    # everything else (norms, dense layers, a dense table) as stored; a tensor pyengine stored
    # once for two keys is written under both, except a dense head the config ties anyway
    config = {k: v for k, v in src.config.items() if k != "transformers_weights"}
    if tied_head:
        config["tie_word_embeddings"] = True
    tied = meta.get("tied", {})
    for key in src.keys:
        if key in consumed or key in tied:
            continue
        writer.add(key, src.get(key))
    for dropped, kept in tied.items():
        if dropped in consumed or kept in consumed:
            continue
        if dropped.rpartition(".")[0].rpartition(".")[2] == "lm_head" and config.get(
                "tie_word_embeddings"):
            continue
        writer.add(dropped, src.get(kept))
    writer.finish()

    config["quantization_config"] = fmt.quantization_config(
        report.layers, _dense_linears(src, layer_entries))
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if isinstance(fmt, GPTQFormat):
        (out / "quantize_config.json").write_text(
            json.dumps(config["quantization_config"], indent=2) + "\n")
    for item in source.iterdir():
        if item.is_file() and item.name not in _REWRITTEN and not item.name.endswith(
                ".safetensors"):
            shutil.copy2(item, out / item.name)


def _head_tied_to_table(meta: Dict[str, Any], heads, embeddings) -> Optional[bool]:
    """True when a quantized head shares its tensors with the quantized table (``tied``),
    False when there is a quantized head of its own, None when the head is not quantized."""
    if not heads:
        return None
    tied = meta.get("tied", {})
    return all(f"{head}.qweight" in tied and tied[f"{head}.qweight"].rsplit(".", 1)[0]
               in embeddings for head in heads)


def _model_dtype(config: Dict[str, Any]) -> torch.dtype:
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _dense_linears(src: _Source, entries: Dict[str, Any]) -> List[str]:
    """Names of the model's 2-D ``.weight`` tensors inside decoder layers (dense linears a
    recipe kept), which the stock config must leave unquantized."""
    names = []
    for key in src.keys:
        if not key.endswith(".weight") or ".layers." not in key:
            continue
        module = key[: -len(".weight")]
        if module in entries:
            continue
        if len(src.shape(key)) == 2:
            names.append(module)
    return sorted(names)


def _layer_keys(name: str, entry: Dict[str, Any]) -> List[str]:
    """The stored keys of quantized layer ``name``."""
    return ([f"{name}.qweight", f"{name}.scales"]
            + ([] if entry["symmetric"] else [f"{name}.zeros"])
            + ([f"{name}.bias"] if entry.get("bias") else []))


def _read_layer(src: _Source, name: str, entry: Dict[str, Any]) -> Tuple[UnpackedLayer, List[str]]:
    keys = _layer_keys(name, entry)
    zeros = None if entry["symmetric"] else src.get(f"{name}.zeros")
    bias = src.get(f"{name}.bias") if entry.get("bias") else None
    if src.has(f"{name}.projection"):
        raise ExportError(f"{name} has a projection (a sliced table): stock engines cannot run "
                          f"it; serve it with pyengine's vLLM plugin")
    codes = unpack_codes(src.get(f"{name}.qweight"), entry["bits"])
    layer = UnpackedLayer(name, entry["bits"], entry["group_size"], entry["symmetric"],
                          tuple(entry["shape"]), codes, src.get(f"{name}.scales"), zeros, bias)
    return layer, keys


def _convert(fmt: TargetFormat, layer: UnpackedLayer, report: ExportReport) -> UnpackedLayer:
    """The layer as the format holds it (integer zeros, the format's scale dtype), with the
    change recorded in ``report``."""
    scale_dtype = fmt.scale_dtype or layer.scales.dtype
    record = LayerExport(layer.name, layer.bits, layer.group_size, layer.symmetric, exact=True)
    report.layers.append(record)
    if layer.symmetric:
        zeros = torch.full_like(layer.scales, float(1 << (layer.bits - 1)), dtype=torch.float32)
        zero_range = (1 << (layer.bits - 1),) * 2
    else:
        zeros = layer.zeros
        zero_range = (fmt.lowest_zero, (1 << layer.bits) - 1)
    codes, scales, int_zeros, moved = fit_integer_zeros(layer.codes, layer.scales, zeros,
                                                        layer.bits, zero_range, scale_dtype)
    if moved:
        before = _as_weight(layer, layer.codes, layer.scales, layer.zeros).dequantize(
            torch.float32)
        after = _as_weight(layer, codes, scales, int_zeros).dequantize(torch.float32)
        record.exact = False
        record.moved_groups = moved
        record.relative_change = float((after - before).norm() / before.norm().clamp(min=1e-30))
    return UnpackedLayer(layer.name, layer.bits, layer.group_size, layer.symmetric, layer.shape,
                         codes, scales, None if layer.symmetric else int_zeros, layer.bias)


def fitted_weight(qw: QuantizedWeight, format: str = "compressed-tensors",
                  name: str = "") -> Tuple[QuantizedWeight, LayerExport]:
    """The weight as ``format`` will hold it (integer zero points, the format's scale dtype:
    what :func:`export_checkpoint` writes for it), in pyengine's format, and the
    :class:`LayerExport` record of the change. Lets a caller measure an export's effect (e.g.
    perplexity) with pyengine's own kernels before writing it."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose from {EXPORT_FORMATS}")
    layer = UnpackedLayer(name, qw.bits, qw.group_size, qw.symmetric, tuple(qw.shape),
                          unpack_codes(qw.qweight, qw.bits), qw.scales, qw.zeros, None)
    report = ExportReport(format=format, out=Path())
    out = _convert(FORMATS[format](), layer, report)
    return _as_weight(out, out.codes, out.scales, out.zeros, qw.method), report.layers[0]


def _as_weight(layer: UnpackedLayer, codes: torch.Tensor, scales: torch.Tensor,
               zeros: Optional[torch.Tensor], method: str = "rtn") -> QuantizedWeight:
    """pyengine's weight of ``layer``'s format holding these codes [N, Kp], scales and zeros
    [N, G] (zeros ignored when symmetric)."""
    return QuantizedWeight(pack_codes(codes, layer.bits), scales,
                           None if layer.symmetric else zeros.to(scales.dtype), bits=layer.bits,
                           group_size=layer.group_size, shape=layer.shape, method=method)


def _format_notes(fmt: TargetFormat, report: ExportReport) -> List[str]:
    notes = []
    if isinstance(fmt, GPTQFormat):
        bits = {layer.bits for layer in report.layers}
        asym = any(not layer.symmetric for layer in report.layers)
        if asym or bits - {4, 8}:
            notes.append("vLLM's GPTQ loader takes symmetric 4- and 8-bit layers only; "
                         "GPTQModel reads every width; for vLLM with asymmetric 4-bit layers "
                         "export --format compressed-tensors")
    else:
        if {layer.bits for layer in report.layers} - {4, 8}:
            notes.append("vLLM's CPU kernel serves 4-bit compressed-tensors weights only (its "
                         "GPU kernels more); every width is valid compressed-tensors, which "
                         "its library decompresses")
    return notes
