"""Random-weight Hugging Face models of each supported family: tiny ones for tests, real shapes
for speed measurements (never for quality)."""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

# Tiny shapes: several layers, GQA, an intermediate size that is not a multiple of every group.
TINY: Dict[str, Any] = dict(vocab_size=160, hidden_size=64, intermediate_size=96,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=256)

# Layer shapes of real models (weights random): for speed measurements only.
SHAPES: Dict[str, Dict[str, Any]] = {
    "tiny": TINY,
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=2048, tie_word_embeddings=True),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           max_position_embeddings=2048),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rope_theta=500000.0),
}


def _config(family: str, overrides: Dict[str, Any]):
    import transformers as tf
    classes = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "qwen3": tf.Qwen3Config, "gemma2": tf.Gemma2Config, "phi3": tf.Phi3Config}
    if family not in classes:
        raise ValueError(f"no random-model recipe for {family!r}; families: {sorted(classes)}")
    kwargs = dict(overrides)
    kwargs.setdefault("pad_token_id", 0)
    kwargs.setdefault("bos_token_id", 1)
    kwargs.setdefault("eos_token_id", 2)
    if family in ("gemma2", "qwen3"):
        kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    if family == "gemma2":
        kwargs.setdefault("query_pre_attn_scalar", kwargs["head_dim"])
    return classes[family](**kwargs)


def random_model(family: str = "llama", shape: str = "tiny", dtype: torch.dtype = torch.float32,
                 seed: int = 0, device: "str | torch.device | None" = None,
                 **overrides) -> nn.Module:
    """A causal LM of ``family`` with random weights, in eval mode.

    Args:
        family: llama, mistral, qwen2, qwen3, gemma2 or phi3.
        shape: a key of SHAPES ("tiny" for tests, e.g. "llama-3-8b" for speed runs).
        device: where the weights are created and initialised (default CPU); "cuda" builds a
            large model directly on the GPU.
        overrides: config fields to change (e.g. num_hidden_layers=2).
    """
    from transformers import AutoModelForCausalLM
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; shapes: {sorted(SHAPES)}")
    config = _config(family, {**SHAPES[shape], **overrides})
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name or "layernorm" in name:
                # non-trivial norm scales, so folding them is actually tested
                base = 0.0 if family == "gemma2" else 1.0
                p.copy_(base + 0.2 * torch.randn_like(p))
    return model.eval()
