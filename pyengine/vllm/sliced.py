"""vLLM's model class for pyengine checkpoints whose structure differs from the original model's.

A sliced checkpoint (SliceGPT with per-layer widths, pyengine.slicing) and a rotated one whose
MLPs read their inner activation through the online Walsh-Hadamard transform
(pyengine.quant.rotation) describe their modules in ``quantization_config.structure``
(docs/FORMAT.md). ``pyengine.save`` names such checkpoints' architecture
:data:`pyengine.io.checks.STRUCTURED_ARCHITECTURE` in ``config.json``, and the plugin registers
:class:`PyengineStructuredForCausalLM` for that name, so vLLM builds this class instead of its
stock one. Per decoder layer ``i`` (widths from ``structure.layers[i]``)::

    h   = o_proj.proj(attention(norm(x)))  + (x @ o_proj.shortcut  or x)    # [.., attn_out_width]
    out = down_proj.proj(H(mlp(norm(h))))  + (h @ down_proj.shortcut or h)  # [.., mlp_out_width]

where ``norm`` is RMS normalisation without a scale over the original hidden size (the scales are
folded into the linears that read it; pyengine.nn.sliced.SlicedRMSNorm), ``x`` has
``attn_width`` features and ``h`` ``mlp_width``, and ``H`` is the Walsh-Hadamard transform of
each block of ``mlp_hadamard_block`` inner features (none when 0). The token table is looked
up, then multiplied by ``embed_tokens.projection`` [hidden, embed_width] when the model keeps its
tied table in the original basis (``projected_embeddings``); the final norm then maps the last
stream back through ``norm.projection`` [head_width, hidden] for the head.

The linears are vLLM's parallel layers (fused q/k/v and gate/up, column- and row-parallel
under tensor parallelism) with the plugin's quantization method, so their layers run on
pyengine's ops as in a stock model; shortcuts and projections are dense and held whole by every
rank (the residual stream is replicated), and a row-parallel output is all-reduced before its
shortcut is added. Families: the Llama-like ones pyengine slices (llama, mistral, qwen2,
qwen3).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                               RowParallelLinear)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (ParallelLMHead,
                                                                 VocabParallelEmbedding)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsQuant
from vllm.model_executor.models.utils import extract_layer_index, maybe_prefix
from vllm.sequence import IntermediateTensors

from ..nn.sliced import SlicedRMSNorm
from ..ops.hadamard import hadamard_transform
from .methods import PyengineConfig, PyengineServingError, shard_ids

__all__ = ["PyengineStructuredForCausalLM", "SERVED_FAMILIES"]

# the model_types whose sliced or rotated checkpoints the class builds
SERVED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

def _biases(config: Any) -> Tuple[bool, bool]:
    """(q/k/v bias, o_proj bias) of the family, as transformers builds it."""
    if config.model_type == "qwen2":
        return True, False
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


def _dense(shape: Tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    """A dense matrix every rank holds whole, filled from the checkpoint."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    param.weight_loader = default_weight_loader
    return param


class ResidualOutput(nn.Module):
    """A block's output projection and its shortcut: ``proj(x) + residual @ shortcut`` (or
    ``+ residual`` without one). ``proj`` is row-parallel: its output is all-reduced before the
    (replicated) shortcut term is added."""

    def __init__(self, in_features: int, out_features: int, residual_width: int,
                 has_shortcut: bool, bias: bool, quant_config: Optional[PyengineConfig],
                 dtype: torch.dtype, prefix: str) -> None:
        super().__init__()
        self.proj = RowParallelLinear(input_size=in_features, output_size=out_features,
                                      bias=bias, quant_config=quant_config,
                                      prefix=f"{prefix}.proj")
        if not has_shortcut and residual_width != out_features:
            raise PyengineServingError(f"{prefix}: no shortcut, yet its residual has "
                                       f"{residual_width} features and its output "
                                       f"{out_features}")
        self.shortcut = (_dense((residual_width, out_features), dtype) if has_shortcut
                         else None)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        y, _ = self.proj(x)
        if self.shortcut is None:
            return y + residual
        return y + residual @ self.shortcut.to(residual.dtype)


class StructuredAttention(nn.Module):
    """Attention reading a stream of ``width`` features and writing ``out_width``."""

    def __init__(self, config: Any, layer: Dict[str, Any], vllm_config: VllmConfig,
                 dtype: torch.dtype, prefix: str) -> None:
        super().__init__()
        quant_config = vllm_config.quant_config
        tp_size = get_tensor_model_parallel_world_size()
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", total_heads)
        if total_heads % tp_size or (total_kv_heads % tp_size if total_kv_heads >= tp_size
                                     else tp_size % total_kv_heads):
            raise PyengineServingError(f"{prefix}: {total_heads} heads and {total_kv_heads} "
                                       f"key/value heads do not split over {tp_size} ranks")
        self.num_heads = total_heads // tp_size
        self.num_kv_heads = max(1, total_kv_heads // tp_size)
        self.head_dim = (getattr(config, "head_dim", None)
                         or config.hidden_size // total_heads)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        qkv_bias, o_bias = _biases(config)
        self.qkv_proj = QKVParallelLinear(hidden_size=layer["attn_width"],
                                          head_size=self.head_dim, total_num_heads=total_heads,
                                          total_num_kv_heads=total_kv_heads, bias=qkv_bias,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = ResidualOutput(total_heads * self.head_dim, layer["attn_out_width"],
                                     layer["attn_width"], layer["attn_shortcut"], o_bias,
                                     quant_config, dtype, f"{prefix}.o_proj")
        self.head_norms = config.model_type == "qwen3"
        if self.head_norms:  # qwen3 normalises each head of q and k (weights of their own)
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.rotary_emb = get_rope(self.head_dim,
                                   max_position=getattr(config, "max_position_embeddings", 8192),
                                   rope_parameters=getattr(config, "rope_parameters", None),
                                   is_neox_style=True)
        sliding_window = None
        layer_types = getattr(config, "layer_types", None)
        if layer_types and layer_types[extract_layer_index(prefix)] == "sliding_attention":
            sliding_window = config.sliding_window
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5,
                              num_kv_heads=self.num_kv_heads,
                              cache_config=vllm_config.cache_config, quant_config=quant_config,
                              per_layer_sliding_window=sliding_window, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [tokens, width] (normalised) -> the attention's output [tokens, heads x head_dim]
        of this rank's heads (o_proj's input)."""
        qkv, _ = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.head_norms:
            q = self.q_norm(q.reshape(-1, self.num_heads, self.head_dim)).reshape(q.shape)
            k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim)).reshape(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        return self.attn(q, k, v)


class StructuredMLP(nn.Module):
    """The gated MLP reading ``mlp_width`` features and writing ``mlp_out_width``, its inner
    activation through the Walsh-Hadamard transform of ``mlp_hadamard_block`` features."""

    def __init__(self, config: Any, layer: Dict[str, Any], vllm_config: VllmConfig,
                 dtype: torch.dtype, prefix: str) -> None:
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise PyengineServingError(f"{prefix}: activation {config.hidden_act!r}; the "
                                       f"structured model class runs silu MLPs")
        quant_config = vllm_config.quant_config
        inner = config.intermediate_size
        self.hadamard_block = int(layer.get("mlp_hadamard_block", 0))
        tp_size = get_tensor_model_parallel_world_size()
        # each rank transforms the blocks of its own slice of the inner features
        if self.hadamard_block and (inner // tp_size) % self.hadamard_block:
            raise PyengineServingError(
                f"{prefix}: the MLP's {inner} inner features split over {tp_size} ranks are "
                f"{inner // tp_size} per rank, not whole Walsh-Hadamard blocks of "
                f"{self.hadamard_block}; use a tensor-parallel size that keeps whole blocks")
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = MergedColumnParallelLinear(
            input_size=layer["mlp_width"], output_sizes=[inner] * 2, bias=bias,
            quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.act_fn = SiluAndMul()
        self.down_proj = ResidualOutput(inner, layer["mlp_out_width"], layer["mlp_width"],
                                        layer["mlp_shortcut"], bias, quant_config, dtype,
                                        f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [tokens, mlp_width] (normalised) -> down_proj's input [tokens, inner / ranks]."""
        gate_up, _ = self.gate_up_proj(x)
        inner = self.act_fn(gate_up)
        if self.hadamard_block:
            inner = hadamard_transform(inner, self.hadamard_block)
        return inner


class StructuredDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer: Dict[str, Any], vllm_config: VllmConfig,
                 dtype: torch.dtype, prefix: str) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.input_layernorm = SlicedRMSNorm(layer["attn_width"], hidden, layer["attn_eps"])
        self.self_attn = StructuredAttention(config, layer, vllm_config, dtype,
                                             f"{prefix}.self_attn")
        self.post_attention_layernorm = SlicedRMSNorm(layer["mlp_width"], hidden,
                                                      layer["mlp_eps"])
        self.mlp = StructuredMLP(config, layer, vllm_config, dtype, f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.self_attn.o_proj(self.self_attn(positions, self.input_layernorm(x)), x)
        return self.mlp.down_proj(self.mlp(self.post_attention_layernorm(h)), h)


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "inputs_embeds": 0})
class StructuredModel(nn.Module):
    """The embedding, the decoder layers and the final norm (``model.*`` in the checkpoint)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        structure = vllm_config.quant_config.qmeta["structure"]
        dtype = vllm_config.model_config.dtype
        hidden = config.hidden_size
        self.projected = bool(structure.get("projected_embeddings", False))
        embed_dim = hidden if self.projected else structure["embed_width"]
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, embed_dim,
                                                   quant_config=vllm_config.quant_config,
                                                   prefix=f"{prefix}.embed_tokens")
        if self.projected:  # [hidden, embed_width]: the first layer's basis after the lookup
            self.embed_tokens.projection = _dense((hidden, structure["embed_width"]), dtype)
        self.layers = nn.ModuleList(
            StructuredDecoderLayer(config, layer, vllm_config, dtype, f"{prefix}.layers.{i}")
            for i, layer in enumerate(structure["layers"]))
        # [head_width, hidden] back to the original basis for the head, when projected
        projection = (torch.empty(structure["head_width"], hidden, dtype=dtype)
                      if self.projected else None)
        self.norm = SlicedRMSNorm(structure["head_width"], hidden, structure["final_eps"],
                                  projection=projection)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.embed_tokens(input_ids)
        if self.projected:
            rows = rows @ self.embed_tokens.projection.to(rows.dtype)
        return rows

    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor,
                intermediate_tensors: Optional[IntermediateTensors] = None,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        for layer in self.layers:
            x = layer(positions, x)
        return self.norm(x)


class PyengineStructuredForCausalLM(nn.Module, SupportsQuant):
    """vLLM's model for a pyengine checkpoint with a ``structure`` (module docstring)."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                              "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        if not isinstance(quant_config, PyengineConfig) or quant_config.structure is None:
            raise PyengineServingError(
                "PyengineStructuredForCausalLM serves pyengine checkpoints with a "
                "quantization_config.structure; this one has none (serve it with vLLM's model "
                "class for its family: restore config.json's architectures)")
        if config.model_type not in SERVED_FAMILIES:
            raise PyengineServingError(
                f"a sliced or rotated {config.model_type} checkpoint: the vLLM plugin serves "
                f"those of {', '.join(SERVED_FAMILIES)}; serve it with pyengine.load")
        if get_pp_group().world_size > 1:
            raise PyengineServingError("pipeline parallelism is not supported for sliced or "
                                       "rotated pyengine checkpoints; use tensor parallelism")
        quant_config.structure_served = True  # the linears of this class match the structure
        self.config = config
        self.model = StructuredModel(vllm_config=vllm_config,
                                     prefix=maybe_prefix(prefix, "model"))
        structure = quant_config.structure
        head_in = config.hidden_size if self.model.projected else structure["head_width"]
        self.lm_head = ParallelLMHead(config.vocab_size, head_in, quant_config=quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size,
                                                scale=getattr(config, "logit_scale", 1.0))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor,
                intermediate_tensors: Optional[IntermediateTensors] = None,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> Set[str]:
        """Routes each checkpoint tensor to its parameter (q/k/v and gate/up into their fused
        layers, by shard); raises when a shortcut or projection the structure names is
        missing."""
        # (vLLM's fused parameter, the checkpoint's part, vLLM's shard id)
        stacked = [(f".{fused}", f".{part}", shard_id)
                   for fused, parts in self.packed_modules_mapping.items()
                   for shard_id, part in zip(shard_ids(fused, parts), parts)]
        params = dict(self.named_parameters())
        buffers = dict(self.named_buffers())  # the final norm's projection
        loaded: Set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name in buffers:
                buffers[name].copy_(tensor)
                loaded.add(name)
                continue
            for fused, part, shard_id in stacked:
                if part in name:
                    target = name.replace(part, fused)
                    param = params[target]
                    param.weight_loader(param, tensor, shard_id)
                    break
            else:
                if name not in params:
                    if self.config.tie_word_embeddings and name.startswith("lm_head."):
                        continue  # the head reads the table's tensors
                    raise PyengineServingError(f"the checkpoint's tensor {name!r} has no place "
                                               f"in the structure config.json describes")
                target, param = name, params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(target)
        dense = [name for name in [*params, *buffers]
                 if name.endswith((".shortcut", ".projection")) and name not in loaded]
        if dense:
            raise PyengineServingError(f"the checkpoint has no {dense[0]} (and {len(dense) - 1} "
                                       f"more), which its structure names")
        return loaded
