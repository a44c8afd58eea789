"""Loading a model from any spec the command line takes: a pyengine checkpoint directory, a
Hugging Face directory, a .gguf file, ``smollm2`` (the embedded default) or a hub id.
Problems the user can fix raise ModelSourceError, one line each."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

SMOLLM2 = "smollm2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelSourceError(ValueError):
    """A model spec that cannot be loaded, for a reason the user can fix (one line)."""


@dataclass
class LoadedModel:
    """A model with its tokenizer (None when the source has none)."""

    model: nn.Module
    tokenizer: Any
    name: str
    compressed: bool  # a checkpoint written by pyengine.save


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def is_checkpoint(path: Path) -> bool:
    """Whether directory ``path`` holds a pyengine checkpoint (its quantization_config, or the
    guard pyengine.save writes, so that a checkpoint with damaged metadata is still read, and
    reported on, by pyengine.load rather than by transformers)."""
    from ..io.checkpoint import is_guard
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    qcfg = config.get("quantization_config")
    return ((isinstance(qcfg, dict) and qcfg.get("quant_method") == "pyengine")
            or is_guard(config.get("transformers_weights")))


def tokenizer_or_none(source: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception:  # noqa: BLE001 - a model without tokenizer files is still a model
        return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse
    try:
        from huggingface_hub import constants
        if constants.HF_HUB_OFFLINE:
            return False
        endpoint = constants.ENDPOINT
    except Exception:  # noqa: BLE001
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_model(spec: str, device: str = "cpu", dtype: Optional[torch.dtype] = None) -> LoadedModel:
    """Loads MODEL as the commands take it: a pyengine checkpoint directory, a Hugging Face
    directory, a .gguf file, ``smollm2`` or a hub id. Problems the user can fix raise
    ModelSourceError."""
    from transformers import AutoModelForCausalLM
    if spec == SMOLLM2:
        from .smollm2 import ModelNotAvailableError, load_smollm2
        try:
            model, tokenizer = load_smollm2(dtype=dtype or torch.float32)
        except ModelNotAvailableError as exc:
            raise ModelSourceError(str(exc)) from None
        return LoadedModel(model.to(device), tokenizer, "SmolLM2-135M-Instruct", False)

    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelSourceError(f"{spec}: a directory without config.json (not a Hugging Face "
                                   f"model nor a pyengine checkpoint)")
        if is_checkpoint(path):
            from .. import CheckpointError, load
            try:
                model = load(path, device=device, dtype=dtype)
            except CheckpointError as exc:
                raise ModelSourceError(str(exc)) from None
            return LoadedModel(model, tokenizer_or_none(str(path)), path.name, True)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto")
        except (OSError, ValueError, KeyError) as exc:
            raise ModelSourceError(f"cannot load {spec}: {_first_line(exc)}") from None
        return LoadedModel(model.to(device).eval(), tokenizer_or_none(str(path)), path.name, False)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(f"{spec}: a file, but not a .gguf; MODEL is a Hugging Face "
                                   f"directory, a .gguf file, 'smollm2' or a hub id")
        import importlib.util
        if importlib.util.find_spec("gguf") is None:
            raise ModelSourceError("reading a .gguf file needs the gguf package "
                                   "(pip install gguf)")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=torch.float32)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelSourceError(f"cannot load {spec}: {_first_line(exc)}") from None
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # the weights are dense now; drop the GGUF loading state
            quantizer.remove_quantization_config(model)
        tokenizer = tokenizer_or_none(str(path.parent), gguf_file=path.name)
        return LoadedModel(model.to(device=device, dtype=dtype or torch.float32).eval(),
                           tokenizer, path.stem, False)
    if not _HUB_ID.match(spec) or spec.startswith((".", "~")):
        raise ModelSourceError(f"{spec}: no such file or directory (MODEL is a Hugging Face "
                               f"directory, a .gguf file, 'smollm2' or a hub id)")
    return _load_from_hub(spec, device, dtype)


def _load_from_hub(spec: str, device: str, dtype: Optional[torch.dtype]) -> LoadedModel:
    from transformers import AutoModelForCausalLM
    kwargs: Dict[str, Any] = dict(dtype=dtype or "auto")
    try:  # the local Hugging Face cache first: no network needed
        model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True, **kwargs)
        return LoadedModel(model.to(device).eval(),
                           tokenizer_or_none(spec, local_files_only=True), spec, False)
    except Exception:  # noqa: BLE001 - not cached: try the hub below
        pass
    if not _hub_reachable():
        raise ModelSourceError(f"{spec}: not a local path, not in the Hugging Face cache, and "
                               f"the hub is unreachable (offline?); give a local Hugging Face "
                               f"directory, a .gguf file or 'smollm2'")
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise ModelSourceError(f"cannot load {spec} from the Hugging Face hub: "
                               f"{_first_line(exc)}") from None
    return LoadedModel(model.to(device).eval(), tokenizer_or_none(spec), spec, False)

