"""Per-family knowledge of Hugging Face decoder models, one small adapter per family.

An adapter names the modules the engine touches (embeddings, decoder layers, their norms and
linear layers, the final norm and the head) and says what the family allows (slicing needs a
pre-norm block whose norms can be folded into the following linears).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from torch import nn


class UnsupportedModelError(ValueError):
    """The model's family has no adapter."""


@dataclass(frozen=True)
class ModelAdapter:
    family: str
    model_types: Tuple[str, ...]
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    attn: str = "self_attn"                                  # inside a decoder layer
    mlp: str = "mlp"
    attn_inputs: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj")   # inside attn
    attn_output: str = "o_proj"
    mlp_inputs: Tuple[str, ...] = ("gate_proj", "up_proj")          # inside mlp
    mlp_output: str = "down_proj"
    attn_norm: str = "input_layernorm"                       # the norm before attention
    mlp_norm: str = "post_attention_layernorm"               # the norm before the MLP
    norm_offset: float = 0.0                                 # norm scale is (offset + weight)
    supports_slicing: bool = True
    slicing_blocker: str = ""                                # why not, when not

    # ---- module access ----------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def layer_index(self, name: str) -> Optional[int]:
        """The decoder layer a module name belongs to (3 for ``model.layers.3.mlp.up_proj``);
        None for a module outside the decoder layers."""
        prefix = self.layers + "."
        return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None

    def tied_embeddings(self, model: nn.Module) -> bool:
        head = model.get_submodule(self.head)
        embed = model.get_submodule(self.embed)
        return getattr(head, "weight", None) is not None and head.weight is embed.weight


ADAPTERS: Dict[str, ModelAdapter] = {}


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    ADAPTERS[adapter.family] = adapter
    return adapter


register_adapter(ModelAdapter("llama", ("llama",)))
register_adapter(ModelAdapter("mistral", ("mistral",)))
register_adapter(ModelAdapter("qwen2", ("qwen2",)))
register_adapter(ModelAdapter("qwen3", ("qwen3",)))
register_adapter(ModelAdapter("phi3", ("phi3",), attn_inputs=("qkv_proj",),
                              mlp_inputs=("gate_up_proj",)))
register_adapter(ModelAdapter(
    "gemma2", ("gemma2",), mlp_norm="pre_feedforward_layernorm", norm_offset=1.0,
    supports_slicing=False,
    slicing_blocker="gemma2 normalises each block's output before the residual add "
                    "(post-attention and post-feedforward norms), which breaks the rotational "
                    "invariance slicing relies on"))


def supported_architectures() -> List[str]:
    """The model types pyengine can compress, e.g. ["gemma2", "llama", "mistral", ...]."""
    return sorted(t for a in ADAPTERS.values() for t in a.model_types)


def get_adapter(model_or_type) -> ModelAdapter:
    """The adapter of a model (or of a model_type string); UnsupportedModelError if none."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        config = getattr(model_or_type, "config", None)
        model_type = getattr(config, "model_type", None) or type(model_or_type).__name__
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedModelError(f"model type {model_type!r} is not supported; supported: "
                                f"{', '.join(supported_architectures())}")
