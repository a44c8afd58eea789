"""The target formats of pyengine.io.export: how each lays out one quantized linear layer's
tensors and describes the model in its ``quantization_config``.

* compressed-tensors ``pack-quantized`` (as llm-compressor writes it);
* GPTQ (``checkpoint_format: "gptq"``, GPTQModel's v1 layout, per-module ``dynamic``
  overrides for mixed plans).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..format.packing import BLOCK_CODES, as_int32_bits, pack_codes, padded_length


class ExportError(ValueError):
    """A checkpoint the chosen format cannot hold (the message says why and what to do)."""


@dataclass
class LayerExport:
    """What the export did to one quantized linear layer."""

    name: str
    bits: int
    group_size: int
    symmetric: bool
    exact: bool                  # written without changing any weight
    moved_groups: int = 0        # groups whose zero point (and scale) had to change
    relative_change: float = 0.0  # ||w' - w|| / ||w|| of the dequantized weights


@dataclass
class UnpackedLayer:
    """One quantized linear as the source holds it, unpacked."""

    name: str
    bits: int
    group_size: int
    symmetric: bool
    shape: Tuple[int, int]
    codes: torch.Tensor            # int64 [N, Kp]
    scales: torch.Tensor           # [N, G]
    zeros: Optional[torch.Tensor]  # [N, G] or None (symmetric)
    bias: Optional[torch.Tensor]


def _pack_along_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs integer values [R, C] in [0, 2^bits) along dim 1 in pyengine's block layout
    (docs/FORMAT.md), which is also GPTQ's for every width: int32 [R, C * bits / 32]. C must
    be a multiple of 32 // bits (of 32 for 3 bits)."""
    r, c = values.shape
    per_word = BLOCK_CODES if bits == 3 else 32 // bits
    if c % per_word:
        raise ExportError(f"cannot pack {c} values of {bits} bits into whole 32-bit words")
    padded = torch.zeros(r, padded_length(c), dtype=torch.int64)
    padded[:, :c] = values
    return pack_codes(padded, bits)[:, : c * bits // 32].contiguous()


def _pack_ct(values: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' packing of unsigned values [R, C] along dim 1: ``32 // bits``
    values per int32 word, value j of a word at bits [j * bits, (j + 1) * bits), the last word
    zero-padded (3 bits: 10 values per word, its top 2 bits unused). int32 [R, ceil(C / (32 //
    bits))]."""
    per_word = 32 // bits
    r, c = values.shape
    words = -(-c // per_word)
    padded = torch.zeros(r, words * per_word, dtype=torch.int64)
    padded[:, :c] = values
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    packed = (padded.view(r, words, per_word) << shifts).sum(-1)
    return as_int32_bits(packed)


class TargetFormat:
    """What each target format writes; subclasses fill in the tensors and the config."""

    name = ""
    scale_dtype: Optional[torch.dtype] = None  # None: keep the stored dtype
    lowest_zero = 0  # the smallest asymmetric zero point the format can store

    def check(self, name: str, bits: int, group_size: int, shape: Tuple[int, int]) -> None:
        """ExportError when the format cannot hold a layer of this shape. Both formats
        derive the group of input k as k // group_size over the unpadded inputs (readers
        infer the group size from the scales' shape), so the inputs must fill whole groups."""
        k = shape[1]
        if group_size != -1 and k % group_size:
            raise ExportError(
                f"{name}: {self.name} needs the input size to be a multiple of the group size "
                f"({k} inputs, groups of {group_size}); compress with a group size dividing "
                f"{k} (e.g. --group-size {_dividing_group(k)})")

    def tensors(self, layer: UnpackedLayer) -> Dict[str, torch.Tensor]:
        """{suffix: tensor} stored under the layer's module name (integer zero points and
        the format's scale dtype already)."""
        raise NotImplementedError

    def quantization_config(self, layers: List[LayerExport],
                            dense_linears: List[str]) -> Dict[str, Any]:
        """The ``quantization_config`` of config.json for these quantized layers, with the
        linear layers kept dense left unquantized."""
        raise NotImplementedError


class CompressedTensorsFormat(TargetFormat):
    """compressed-tensors ``pack-quantized``: ``weight_packed`` int32 [N, ceil(K / (32 /
    bits))] (codes along K), ``weight_scale`` [N, G], ``weight_zero_point`` int32 [ceil(N / (32
    / bits)), G] (signed zero points packed along N; asymmetric only), ``weight_shape`` int64
    [2]. Values are signed, q - 2^(b-1), stored with that offset added back: the stored bits are
    pyengine's codes."""

    name = "compressed-tensors"

    def tensors(self, layer: UnpackedLayer) -> Dict[str, torch.Tensor]:
        n, k = layer.shape
        out = {
            "weight_packed": _pack_ct(layer.codes[:, :k], layer.bits),
            "weight_scale": layer.scales.contiguous(),
            "weight_shape": torch.tensor([n, k], dtype=torch.int64),
        }
        if not layer.symmetric:
            # zero points as signed values z - 2^(b-1), packed like the weights (offset added
            # back) but along the output dimension: packed row i holds outputs i*c .. i*c+c-1
            zero_codes = layer.zeros.to(torch.int64)  # integers in [0, 2^bits) already
            out["weight_zero_point"] = _pack_ct(zero_codes.t().contiguous(),
                                                layer.bits).t().contiguous()
        if layer.bias is not None:
            out["bias"] = layer.bias
        return out

    def quantization_config(self, layers: List[LayerExport],
                            dense_linears: List[str]) -> Dict[str, Any]:
        by_scheme: Dict[Tuple[int, int, bool], List[str]] = {}
        for layer in layers:
            by_scheme.setdefault((layer.bits, layer.group_size, layer.symmetric),
                                 []).append(layer.name)
        groups = {}
        for i, ((bits, gs, sym), names) in enumerate(sorted(by_scheme.items())):
            groups[f"group_{i}"] = {
                "targets": names,
                "weights": {
                    "num_bits": bits, "type": "int", "symmetric": sym,
                    "strategy": "channel" if gs == -1 else "group",
                    "group_size": None if gs == -1 else gs,
                    "dynamic": False, "actorder": None, "block_structure": None,
                    "observer": "minmax", "observer_kwargs": {},
                },
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": sorted(set(dense_linears) | {"lm_head"}),
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "sparsity_config": {},
            "transform_config": {},
        }


class GPTQFormat(TargetFormat):
    """GPTQ (``checkpoint_format: "gptq"``, GPTQModel's v1 layout): ``qweight`` int32 [K *
    bits / 32, N] (codes along K in blocks of 32, the same bit layout as pyengine's),
    ``scales`` float16 [G, N], ``qzeros`` int32 [G, N * bits / 32] (zero - 1 in b bits, packed
    along N), ``g_idx`` int32 [K] (k // group_size)."""

    name = "gptq"
    scale_dtype = torch.float16
    lowest_zero = 1  # stored as zero - 1 in b bits

    def check(self, name: str, bits: int, group_size: int, shape: Tuple[int, int]) -> None:
        super().check(name, bits, group_size, shape)
        n, k = shape
        if k % BLOCK_CODES:
            raise ExportError(f"{name}: GPTQ packs inputs in blocks of 32; {k} inputs "
                              f"are not a multiple")
        per_word = BLOCK_CODES if bits == 3 else 32 // bits
        if n % per_word:
            raise ExportError(f"{name}: GPTQ packs the zero points of {per_word} outputs "
                              f"per word; {n} outputs are not a multiple")

    def tensors(self, layer: UnpackedLayer) -> Dict[str, torch.Tensor]:
        n, k = layer.shape
        words = k * layer.bits // 32
        qweight = _pack_along_rows(layer.codes[:, :k], layer.bits)[:, :words]
        gs = k if layer.group_size == -1 else layer.group_size
        zeros = (torch.full_like(layer.scales, float(1 << (layer.bits - 1)), dtype=torch.float32)
                 if layer.zeros is None else layer.zeros.to(torch.float32))
        # v1 stores zero - 1 (readers add the 1 back); 0 is not representable, see the module
        stored_zeros = (zeros.to(torch.int64) - 1) & ((1 << layer.bits) - 1)
        out = {
            "qweight": qweight.t().contiguous(),
            "scales": layer.scales.to(torch.float16).t().contiguous(),
            "qzeros": _pack_along_rows(stored_zeros.t().contiguous(), layer.bits),
            "g_idx": (torch.arange(k, dtype=torch.int32) // gs).to(torch.int32),
        }
        if layer.bias is not None:
            out["bias"] = layer.bias.to(torch.float16)
        return out

    def quantization_config(self, layers: List[LayerExport],
                            dense_linears: List[str]) -> Dict[str, Any]:
        schemes = Counter((layer.bits, layer.group_size, layer.symmetric) for layer in layers)
        (bits, gs, sym), _ = schemes.most_common(1)[0]
        dynamic: Dict[str, Dict[str, Any]] = {}
        for pattern, (b, g, s) in _fused_patterns(layers):
            if (b, g, s) != (bits, gs, sym):
                dynamic[f"+:{pattern}"] = {"bits": b, "group_size": g, "sym": s}
        for name in dense_linears:
            dynamic[f"-:^{re.escape(name)}$"] = {}
        return {
            "quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits,
            "group_size": gs, "sym": sym, "desc_act": False, "lm_head": False,
            "dynamic": dynamic or None, "pack_dtype": "int32", "true_sequential": True,
            "quantizer": ["pyengine"],
        }


# vLLM loads q/k/v and gate/up as one fused linear, named by these suffixes: a dynamic
# override written for the parts must also match the fused name.
_FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                "gate_up_proj": ("gate_proj", "up_proj")}


def _fused_patterns(layers: List[LayerExport]):
    """(regex, scheme) per quantized linear, one regex for each set of parts vLLM fuses when
    they share a scheme (matching the parts' names and the fused name)."""
    scheme = {layer.name: (layer.bits, layer.group_size, layer.symmetric) for layer in layers}
    done = set()
    for layer in layers:
        if layer.name in done:
            continue
        parent, _, leaf = layer.name.rpartition(".")
        for fused, parts in _FUSED_PARTS.items():
            names = [f"{parent}.{p}" for p in parts]
            if leaf in parts and all(scheme.get(nm) == scheme[layer.name] for nm in names):
                done.update(names)
                alternatives = "|".join(parts + (fused,))
                yield f"^{re.escape(parent)}\\.(?:{alternatives})$", scheme[layer.name]
                break
        else:
            done.add(layer.name)
            yield f"^{re.escape(layer.name)}$", scheme[layer.name]


def _dividing_group(k: int) -> str:
    """The largest supported group size dividing k, or -1 (one scale per output)."""
    return next((str(g) for g in (128, 64, 32) if k % g == 0), "-1")


FORMATS: Dict[str, Callable[[], TargetFormat]] = {
    "compressed-tensors": CompressedTensorsFormat, "gptq": GPTQFormat}
