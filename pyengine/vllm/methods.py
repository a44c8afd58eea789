"""vLLM's quantization method ``"pyengine"``: a pyengine checkpoint's layers on pyengine's ops.

vLLM builds its own model (its parallel linear layers, fused q/k/v and gate/up) and asks the
quantization config, layer by layer, for a method that creates the layer's parameters, loads
checkpoint tensors into them and computes the layer. For every layer a pyengine checkpoint
quantizes (its ``quantization_config.layers``), :class:`PyengineLinearMethod` /
:class:`PyengineEmbeddingMethod`:

1. ``create_weights``: registers one placeholder parameter per stored field (``qweight``, or a
   Matryoshka parent's ``plane_hi`` / ``plane_mid`` / ``plane_lo``; ``scales``; ``zeros`` unless
   symmetric), named as in the checkpoint, so that vLLM's loaders route the checkpoint tensors
   to them. A row-parallel layer whose inputs do not split into whole packed blocks and groups
   is refused here, before anything is read (pyengine.vllm.sharding).
2. the placeholders' ``weight_loader``: keeps this rank's shard of each tensor (rows for q/k/v,
   gate/up and every column-parallel or vocabulary shard, inputs for a row-parallel layer),
   per logical shard of the fused layer.
3. ``process_weights_after_loading``: builds pyengine weights from the shards
   (QuantizedWeight, or MatryoshkaWeight served at its precision), one per run of consecutive
   shards that share a format (a fused layer whose shards share bits and group size is one
   weight: one kernel call), and registers their tensors as the layer's parameters.
4. ``apply``: ``pyengine.ops.qlinear`` (the CPU C++, Triton or CUDA backend pyengine selects for
   the device and dtype), with the layer's ``act_bits``; ``embedding``: ``pyengine.ops.qembedding``.

Layers the checkpoint keeps dense get vLLM's unquantized methods. Sliced checkpoints (and rotated
ones with the MLPs' online Walsh-Hadamard transform) change the model's structure, which vLLM's
stock model classes do not have: they are built by pyengine.vllm.sliced's class, and
:func:`check_servable` refuses them, with one line, in any other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn import Module, Parameter

from vllm.model_executor.layers.linear import (ColumnParallelLinear, LinearBase,
                                               LinearMethodBase, MergedColumnParallelLinear,
                                               QKVParallelLinear, RowParallelLinear,
                                               UnquantizedLinearMethod)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import (QuantizationConfig,
                                                                 QuantizeMethodBase)
from vllm.model_executor.layers.vocab_parallel_embedding import (ParallelLMHead,
                                                                 UnquantizedEmbeddingMethod,
                                                                 VocabParallelEmbedding)
from vllm.model_executor.utils import set_weight_attrs

from ..io.checks import QUANT_METHOD, STRUCTURED_ARCHITECTURE, validate_metadata
from ..matryoshka.weight import PLANE_NAMES, MatryoshkaWeight, check_precision
from ..ops import qembedding, qlinear
from ..format.qweight import FLOAT_DTYPES, QuantizedWeight
from . import PRECISION_ENV
from .sharding import check_input_split, qkv_rows, shard_inputs, shard_rows


class PyengineServingError(ValueError):
    """A pyengine checkpoint (or a layer of it) that the vLLM plugin cannot serve."""


def check_servable(qmeta: Dict[str, Any], where: str = "quantization_config") -> None:
    """Refuses, with one line, a checkpoint whose structure (a sliced model's widths and
    shortcuts, a rotated one's online transform) is served by a stock model class: such
    checkpoints are built by :class:`pyengine.vllm.sliced.PyengineStructuredForCausalLM`, which
    vLLM picks when ``config.json`` names its architecture (``pyengine.save`` does)."""
    if qmeta.get("structure") is not None:
        raise PyengineServingError(
            f"{where}: this pyengine checkpoint changes the model's structure (slicing, or "
            f"rotation with the MLPs' online Walsh-Hadamard transform), which vLLM's model "
            f"class for its family does not have; config.json must name the architecture "
            f"{STRUCTURED_ARCHITECTURE} (pyengine.save writes it: re-save the model with "
            f"pyengine.load and pyengine.save, or pass hf_overrides={{'architectures': "
            f"['{STRUCTURED_ARCHITECTURE}']}} to vLLM)")


def served_precision(entry: Dict[str, Any]) -> int:
    """The precision a Matryoshka layer serves: $PYENGINE_MATRYOSHKA_PRECISION when set, else
    the one its checkpoint entry names."""
    override = os.environ.get(PRECISION_ENV)
    if override:
        try:
            return check_precision(int(override))
        except ValueError as exc:
            raise PyengineServingError(f"${PRECISION_ENV}={override!r}: {exc}") from None
    return check_precision(int(entry["matryoshka"]["precision"]))


@dataclass(frozen=True)
class LayerFormat:
    """What one stored layer is (from its ``quantization_config.layers`` entry)."""

    bits: int
    group_size: int
    symmetric: bool
    scale_dtype: torch.dtype
    in_features: int
    out_features: int
    matryoshka: bool
    precision: int  # the served precision (Matryoshka), else bits
    act_bits: int

    @classmethod
    def from_entry(cls, entry: Dict[str, Any]) -> "LayerFormat":
        matryoshka = "matryoshka" in entry
        bits = int(entry["bits"])
        return cls(bits=bits, group_size=int(entry["group_size"]),
                   symmetric=bool(entry["symmetric"]),
                   scale_dtype=FLOAT_DTYPES[entry["scale_dtype"]],
                   out_features=int(entry["shape"][0]), in_features=int(entry["shape"][1]),
                   matryoshka=matryoshka,
                   precision=served_precision(entry) if matryoshka else bits,
                   act_bits=int(entry.get("act_bits", 0)))

    @property
    def fields(self) -> Tuple[str, ...]:
        codes = PLANE_NAMES if self.matryoshka else ("qweight",)
        return codes + ("scales",) + (() if self.symmetric else ("zeros",))

    def field_dtype(self, field: str) -> torch.dtype:
        return self.scale_dtype if field in ("scales", "zeros") else torch.int32

    def merge_key(self) -> tuple:
        """Shards whose keys are equal concatenate into one weight."""
        return (self.bits, self.group_size, self.symmetric, self.scale_dtype, self.matryoshka,
                self.precision, self.act_bits)


def shard_ids(fused: str, parts: Sequence[str]) -> Sequence[Any]:
    """vLLM's shard ids of the parts of fused module ``fused`` (a ``packed_modules_mapping``
    entry): "q", "k", "v" for q/k/v, else 0, 1, ... (gate/up)."""
    return ("q", "k", "v") if len(parts) == 3 and fused.startswith("qkv") else range(len(parts))


@register_quantization_config(QUANT_METHOD)
class PyengineConfig(QuantizationConfig):
    """A pyengine checkpoint's ``quantization_config`` (docs/FORMAT.md), validated."""

    def __init__(self, qmeta: Dict[str, Any]) -> None:
        super().__init__()
        self.qmeta = qmeta
        self.layers: Dict[str, Dict[str, Any]] = qmeta["layers"]
        self.tied: Dict[str, str] = qmeta.get("tied", {})
        self.built_tables: Dict[str, QuantizedWeight] = {}  # token tables, once loaded
        self.structure: Optional[Dict[str, Any]] = qmeta.get("structure")
        # set by PyengineStructuredForCausalLM, whose layers have the structure's shapes
        self.structure_served = False

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> List[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the Triton and CUDA kernels' bf16 and tensor-core paths (sm_80 and later)

    @staticmethod
    def get_config_filenames() -> List[str]:
        return []  # the quantization_config entry of config.json

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "PyengineConfig":
        return cls(validate_metadata(config, "config.json"))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: Dict[str, Any], user_quant: Optional[str],
                                     hf_config: Any = None) -> Optional[str]:
        if hf_quant_cfg.get("quant_method") == QUANT_METHOD and user_quant in (None,
                                                                               QUANT_METHOD):
            return QUANT_METHOD
        return None

    def layer_entries(self, prefix: str) -> List[Tuple[Any, Optional[Dict[str, Any]]]]:
        """[(vLLM shard id, checkpoint entry or None when dense), ...] of the vLLM module
        ``prefix``: its q/k/v or gate/up parts for a fused module, else itself."""
        parent, _, leaf = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(leaf)
        if not parts:
            return [(None, self.layers.get(prefix))]
        return [(shard_id, self.layers.get(f"{parent}.{part}" if parent else part))
                for shard_id, part in zip(shard_ids(leaf, parts), parts)]

    def token_table(self) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
        """(name, entry) of the checkpoint's quantized token table; (None, None) when dense."""
        tables = [(name, entry) for name, entry in self.layers.items() if "embedding" in entry]
        return tables[0] if tables else (None, None)

    def tied_source(self, prefix: str, fields: Sequence[str]) -> Optional[str]:
        """The layer whose stored tensors ``prefix`` shares (a head tied to the token table:
        the checkpoint stores the pair once and names the head's tensors in ``tied``)."""
        sources = {self.tied.get(f"{prefix}.{field}", "").rpartition(".")[0] for field in fields}
        if len(sources) == 1 and "" not in sources:
            return sources.pop()
        return None

    def get_quant_method(self, layer: Module, prefix: str) -> Optional[QuantizeMethodBase]:
        if self.structure is not None and not self.structure_served:
            check_servable(self.qmeta, "config.json: quantization_config")
        entries = self.layer_entries(prefix)
        quantized = [entry is not None for _, entry in entries]
        if isinstance(layer, VocabParallelEmbedding):  # the embedding table or the head
            name, entry = prefix, entries[0][1]
            if entry is None and not isinstance(layer, ParallelLMHead):
                name, entry = self.token_table()  # some models build their table unnamed
            if entry is None:
                return UnquantizedEmbeddingMethod()
            fmt = LayerFormat.from_entry(entry)
            return PyengineEmbeddingMethod(name, fmt, self, self.tied_source(name, fmt.fields))
        if not isinstance(layer, LinearBase):
            return None
        if not any(quantized):
            return UnquantizedLinearMethod()
        if not all(quantized):
            dense = [str(shard) for (shard, entry) in entries if entry is None]
            raise PyengineServingError(
                f"{prefix}: the checkpoint quantizes some of this fused layer's parts and keeps "
                f"others dense (shards {', '.join(dense)}); vLLM serves a fused layer with one "
                f"method: quantize q/k/v (gate/up) alike")
        return PyengineLinearMethod(prefix, [(shard, LayerFormat.from_entry(entry))
                                             for shard, entry in entries])


# ---- loading -------------------------------------------------------------------------------------

def _source_rows(layer: Module, shard_id: Any, fmt: LayerFormat) -> Tuple[int, int, int]:
    """(first row, rows, rows with padding) of the checkpoint tensor of ``shard_id`` that this
    rank holds."""
    if isinstance(layer, VocabParallelEmbedding):
        idx = layer.shard_indices
        size = idx.org_vocab_end_index - idx.org_vocab_start_index
        return idx.org_vocab_start_index, size, layer.num_embeddings_per_partition
    if isinstance(layer, QKVParallelLinear):
        start, size = qkv_rows(shard_id, layer.tp_rank, layer.num_heads, layer.num_kv_heads,
                               layer.num_kv_head_replicas, layer.head_size, layer.v_head_size)
        return start, size, size
    if isinstance(layer, MergedColumnParallelLinear):
        size = layer.output_sizes[shard_id] // layer.tp_size
        return layer.tp_rank * size, size, size
    if isinstance(layer, ColumnParallelLinear):
        size = layer.output_size_per_partition
        return layer.tp_rank * size, size, size
    return 0, fmt.out_features, fmt.out_features  # row-parallel and replicated: every row


def _input_split(layer: Module, prefix: str, fmt: LayerFormat) -> Tuple[int, int]:
    """(first input, inputs) this rank holds of a layer (all of them unless row-parallel)."""
    if isinstance(layer, RowParallelLinear) and layer.tp_size > 1:
        per_rank = check_input_split(prefix, fmt.in_features, layer.tp_size, fmt.group_size)
        return layer.tp_rank * per_rank, per_rank
    return 0, fmt.in_features


def _mergeable_runs(shards: List[Tuple[Any, LayerFormat]]) -> List[List[Tuple[Any, LayerFormat]]]:
    """Consecutive shards of one format, in order: each run becomes one weight (the rows of its
    shards stacked), so a fused layer whose parts share a format is one kernel call."""
    runs: List[List[Tuple[Any, LayerFormat]]] = []
    for shard, fmt in shards:
        if runs and runs[-1][0][1].merge_key() == fmt.merge_key():
            runs[-1].append((shard, fmt))
        else:
            runs.append([(shard, fmt)])
    return runs


class _ShardedMethod(QuantizeMethodBase):
    """Placeholder parameters, per-shard loading and the pyengine weights built from them,
    shared by the linear and the embedding method."""

    def __init__(self, prefix: str, shards: List[Tuple[Any, LayerFormat]]) -> None:
        self.prefix = prefix
        self.shards = shards
        self.formats = dict(shards)

    def _register(self, layer: Module, output_partition_sizes: Sequence[int],
                  input_size_per_partition: int) -> None:
        """Checks the layer vLLM built against the checkpoint's entries (before anything is
        read), then registers the placeholders."""
        k_start, k_size = _input_split(layer, self.prefix, self.shards[0][1])
        if any(fmt.in_features != self.shards[0][1].in_features for _, fmt in self.shards):
            raise PyengineServingError(f"{self.prefix}: its parts read different input widths "
                                       f"in the checkpoint")
        if k_size != input_size_per_partition:
            raise PyengineServingError(
                f"{self.prefix}: vLLM gives this rank {input_size_per_partition} inputs, the "
                f"checkpoint's layer has {k_size} per rank (config.json does not match it?)")
        for (shard, fmt), size in zip(self.shards, output_partition_sizes):
            start, rows, padded = _source_rows(layer, shard, fmt)
            if padded != size or start + rows > fmt.out_features:
                raise PyengineServingError(
                    f"{self.prefix}: vLLM expects {size} output rows"
                    f"{'' if shard is None else f' of part {shard!r}'} on this rank (rows "
                    f"{start}..{start + rows} of the whole), the checkpoint stores "
                    f"{fmt.out_features} (config.json does not match it?)")
        layer.pyengine_loaded = {shard: {} for shard, _ in self.shards}
        layer.pyengine_input_range = (k_start, k_size)
        fields = sorted({f for _, fmt in self.shards for f in fmt.fields})
        for field in fields:
            dtype = next(fmt.field_dtype(field) for _, fmt in self.shards if field in fmt.fields)
            param = Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
            set_weight_attrs(param, {"weight_loader": self._loader(layer, field)})
            layer.register_parameter(field, param)

    def _loader(self, layer: Module, field: str):
        def load(param: Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
            if shard_id not in self.formats:
                raise PyengineServingError(f"{self.prefix}.{field}: unexpected shard "
                                           f"{shard_id!r} (expected {list(self.formats)})")
            fmt = self.formats[shard_id]
            start, size, padded = _source_rows(layer, shard_id, fmt)
            tensors = shard_rows({field: loaded}, start, size, padded)
            k_start, k_size = layer.pyengine_input_range
            if k_size != fmt.in_features:
                tensors = shard_inputs(tensors, fmt.bits, fmt.group_size, k_start, k_size)
            layer.pyengine_loaded[shard_id][field] = tensors[field].to(param.device)
        return load

    def _build(self, layer: Module) -> List[Tuple[Any, int]]:
        """[(pyengine weight or view, act_bits), ...] of the layer's runs of mergeable shards,
        their tensors registered as the layer's parameters in place of the placeholders."""
        loaded = layer.pyengine_loaded
        for shard, fmt in self.shards:
            missing = [f for f in fmt.fields if f not in loaded[shard]]
            if missing:
                raise PyengineServingError(f"{self.prefix}: the checkpoint has no "
                                           f"{', '.join(missing)} for shard {shard!r}")
        for name in {f for _, fmt in self.shards for f in fmt.fields}:
            delattr(layer, name)
        k_size = layer.pyengine_input_range[1]
        weights = []
        for i, run in enumerate(_mergeable_runs(self.shards)):
            fmt = run[0][1]
            tensors = {f: torch.cat([loaded[shard][f] for shard, _ in run])
                       if len(run) > 1 else loaded[run[0][0]][f] for f in fmt.fields}
            rows = int(tensors["scales"].shape[0])
            for field, tensor in tensors.items():
                layer.register_parameter(field if i == 0 else f"{field}_{i}",
                                         Parameter(tensor, requires_grad=False))
            zeros = tensors.get("zeros")
            if fmt.matryoshka:
                parent = MatryoshkaWeight(*(tensors[f] for f in PLANE_NAMES), tensors["scales"],
                                          zeros, group_size=fmt.group_size, shape=(rows, k_size))
                weights.append((parent.at(fmt.precision), fmt.act_bits))
            else:
                weights.append((QuantizedWeight(tensors["qweight"], tensors["scales"], zeros,
                                                bits=fmt.bits, group_size=fmt.group_size,
                                                shape=(rows, k_size)), fmt.act_bits))
        del layer.pyengine_loaded
        return weights


class PyengineLinearMethod(_ShardedMethod, LinearMethodBase):
    """A quantized linear layer (fused or not, any parallel kind) on pyengine.ops.qlinear."""

    def create_weights(self, layer: Module, input_size_per_partition: int,
                       output_partition_sizes: List[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        if len(output_partition_sizes) != len(self.shards):
            raise PyengineServingError(
                f"{self.prefix}: vLLM fuses {len(output_partition_sizes)} parts here, the "
                f"checkpoint names {len(self.shards)}")
        self._register(layer, output_partition_sizes, input_size_per_partition)

    def process_weights_after_loading(self, layer: Module) -> None:
        layer.pyengine_weights = self._build(layer)

    def apply(self, layer: Module, x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        weights = layer.pyengine_weights
        if len(weights) == 1:
            weight, act_bits = weights[0]
            return qlinear(x, weight, bias, act_bits=act_bits)
        y = torch.cat([qlinear(x, weight, act_bits=act_bits) for weight, act_bits in weights],
                      dim=-1)
        return y if bias is None else y + bias


class PyengineEmbeddingMethod(_ShardedMethod):
    """A quantized token table (``embedding``) or output head (``apply``): this rank's
    vocabulary rows, padded to its partition. A head stored as the table's tensors (a tied
    pair) loads nothing and reads the table's weight."""

    def __init__(self, name: str, fmt: LayerFormat, config: "PyengineConfig",
                 tied_to: Optional[str] = None) -> None:
        super().__init__(name, [(None, fmt)])
        self.config = config
        self.tied_to = tied_to

    def create_weights(self, layer: Module, input_size_per_partition: int,
                       output_partition_sizes: List[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        if self.formats[None].matryoshka:
            raise PyengineServingError(f"{self.prefix}: a Matryoshka table is not supported")
        if self.tied_to is None:
            self._register(layer, output_partition_sizes, input_size_per_partition)

    def tie_weights(self, layer: Module, embed_tokens: Module) -> Module:
        """vLLM ties the head to the table (a config with tie_word_embeddings): the head then
        reads the table's weight."""
        method = getattr(embed_tokens, "quant_method", None)
        if not isinstance(method, PyengineEmbeddingMethod):
            raise PyengineServingError(f"{self.prefix}: tied to a token table the checkpoint "
                                       f"does not quantize")
        if self.tied_to is None:
            for name in self.formats[None].fields:
                delattr(layer, name)
        self.tied_to = method.prefix
        return layer

    def process_weights_after_loading(self, layer: Module) -> None:
        if self.tied_to is None:
            ((weight, _),) = self._build(layer)
            self.config.built_tables[self.prefix] = weight
            layer.pyengine_weight = weight

    def _weight(self, layer: Module) -> QuantizedWeight:
        if self.tied_to is None:
            return layer.pyengine_weight
        weight = self.config.built_tables.get(self.tied_to)
        if weight is None:
            raise PyengineServingError(f"{self.prefix}: its tied table {self.tied_to} is not "
                                       f"loaded in this process (pipeline parallel?)")
        return weight

    def embedding(self, layer: Module, ids: torch.Tensor) -> torch.Tensor:
        return qembedding(ids, self._weight(layer), dtype=layer.params_dtype)

    def apply(self, layer: Module, x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return qlinear(x, self._weight(layer), bias)


__all__ = ["LayerFormat", "PyengineConfig", "PyengineEmbeddingMethod",
           "PyengineLinearMethod", "PyengineServingError", "check_servable",
           "served_precision", "shard_ids"]
