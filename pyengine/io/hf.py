"""Loading pyengine checkpoints with ``AutoModelForCausalLM.from_pretrained``.

pyengine registers a quantization config and an HfQuantizer under the method name "pyengine".
From the checkpoint's metadata the quantizer rebuilds, on the meta-device model that
transformers creates, the sliced structure and the QuantLinear modules, and checks the
checkpoint's metadata and tensors exactly as pyengine.load does (pyengine.io.checks:
format version, missing, unexpected and misshapen tensors are errors); transformers then loads
the tensors into them.

A pyengine checkpoint's config.json carries a ``transformers_weights`` guard
(pyengine.io.checkpoint.TRANSFORMERS_GUARD) that transformers rejects, so loading one without
pyengine registered fails with a message saying so; the quantizer removes the guard from the
config before transformers looks for the weights (with a transformers that lacks the hook used
for this, the guard stays and from_pretrained fails loudly: pyengine.load still works).

Registration is explicit: :func:`register_with_transformers`
(``pyengine.register_with_transformers()``) registers, and ``import pyengine`` calls it when
transformers is already imported (importing transformers' quantizer machinery costs seconds, so
``import pyengine`` never does it on its own); pyengine.load registers too. The guard's message
says what to call.
"""

from __future__ import annotations

import sys
import threading

_registered = False
_lock = threading.Lock()


def register_with_transformers() -> None:
    """Registers pyengine's quantization method with transformers (idempotent)."""
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from .checkpoint import QUANT_METHOD, apply_compressed_structure, finish_loading, is_guard
    from .checks import CheckpointError, check_checkpoint, validate_metadata

    class PyengineConfig(QuantizationConfigMixin):
        """The ``quantization_config`` of a pyengine checkpoint (the dict pyengine.save wrote)."""

        def __init__(self, **kwargs):
            self.quant_method = QUANT_METHOD
            self.metadata = {k: v for k, v in kwargs.items() if k != "quant_method"}

        @classmethod
        def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
            config = cls(**config_dict)
            return (config, kwargs) if return_unused_kwargs else config

        def to_dict(self):
            return {"quant_method": QUANT_METHOD, **self.metadata}

        def to_json_string(self, use_diff: bool = True) -> str:
            import json
            return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    class PyengineHfQuantizer(HfQuantizer):
        """Rebuilds pyengine's modules before transformers loads a pre-quantized checkpoint."""

        requires_calibration = True  # pyengine checkpoints are loaded, not made, here

        def update_attn_implementation(self, config):
            # The one hook that sees the model config before transformers resolves the weights
            # files: take the guard out so that it reads model.safetensors (or the index).
            if is_guard(getattr(config, "transformers_weights", None)):
                del config.transformers_weights
            return super().update_attn_implementation(config)

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            from pathlib import Path
            if not checkpoint_files:
                raise CheckpointError("from_pretrained did not say which files it loads, so "
                                      "pyengine cannot check them; use pyengine.load(DIR)")
            directory = Path(checkpoint_files[0]).parent
            where = str(directory / "config.json")
            qmeta = validate_metadata(self.quantization_config.to_dict(), where)
            apply_compressed_structure(model, qmeta, where)
            # the same checks as pyengine.load, on the files transformers is about to read
            check_checkpoint(model, directory, qmeta["tied"], checkpoint_files)
            # tensors saved once are tied again after loading (retie below): not "missing"
            import re
            ignored = set(model._keys_to_ignore_on_load_missing or ())
            model._keys_to_ignore_on_load_missing = ignored | {
                f"^{re.escape(alias)}$" for alias in qmeta["tied"]}
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            # the tail pyengine.load runs too: weight views rebuilt, tied keys tied, fused
            finish_loading(model, self.quantization_config.to_dict().get("tied") or {})
            return model

        def is_serializable(self, safe_serialization=None):
            return False  # save with pyengine.save

        @property
        def is_trainable(self) -> bool:
            return False

    register_quantization_config(QUANT_METHOD)(PyengineConfig)
    register_quantizer(QUANT_METHOD)(PyengineHfQuantizer)


def register_if_transformers_imported() -> None:
    """:func:`register_with_transformers` when transformers is already imported (what
    ``import pyengine`` runs); nothing otherwise."""
    if "transformers" in sys.modules:
        register_with_transformers()
