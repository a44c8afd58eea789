"""Random-weight Hugging Face models of each supported family: tiny ones for tests, real shapes
for speed measurements (never for quality)."""

from __future__ import annotations

import os
from pathlib import Path
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


@torch.no_grad()
def save_random_checkpoint(path: "str | os.PathLike", family: str = "llama", shape: str = "tiny",
                           dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                           max_shard_bytes: int = 2 << 30, **overrides) -> Path:
    """Writes a random-weight model of ``family`` and ``shape`` as a Hugging Face directory
    (config.json and sharded safetensors with an index) without holding the model in memory:
    one decoder layer at a time is made (weights N(0, 0.02), norm scales 1 + 0.2 N(0, 1) as in
    :func:`random_model`), written and dropped. For speed and memory measurements of models
    larger than memory (never for quality). Returns the directory."""
    import json

    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; shapes: {sorted(SHAPES)}")
    config = _config(family, {**SHAPES[shape], **overrides})
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    layers = model.get_submodule("model.layers")
    groups = [(f"model.layers.{i}.", layer) for i, layer in enumerate(layers)]
    groups.append(("", model))  # what is left: embeddings, final norm, head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    weight_map, shard, shard_bytes, total, files = {}, {}, 0, 0, []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"part-{len(files):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            files.append((name, list(shard)))
            shard, shard_bytes = {}, 0

    for prefix, module in groups:
        for name, p in module.named_parameters():
            key = prefix + name
            if prefix == "" and key.startswith("model.layers."):
                continue
            if tied and key == "lm_head.weight":
                continue
            t = torch.empty(p.shape, dtype=torch.float32)
            if "norm" in name:
                t.normal_(generator=gen).mul_(0.2).add_(0.0 if family == "gemma2" else 1.0)
            else:
                t.normal_(0.0, 0.02, generator=gen)
            t = t.to(dtype)
            nbytes = t.numel() * t.element_size()
            if shard and shard_bytes + nbytes > max_shard_bytes:
                flush()
            shard[key] = t
            shard_bytes += nbytes
            total += nbytes
    flush()
    for i, (name, keys) in enumerate(files, 1):  # Hugging Face's shard names
        final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        os.replace(out / name, out / final)
        weight_map.update({key: final for key in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.dtype = dtype
    config.save_pretrained(out)
    return out
