"""Serving pyengine checkpoints with vLLM (``pip install pyengine[vllm]``).

vLLM loads this plugin through the ``vllm.general_plugins`` entry point that pyengine's package
declares; :func:`register` adds the quantization method ``"pyengine"`` (pyengine.vllm.methods),
which vLLM then picks for any checkpoint directory written by ``pyengine.save`` (its
``config.json`` names ``quant_method: "pyengine"``)::

    vllm serve ./smollm2-pyengine          # or LLM("./smollm2-pyengine") in Python

Each quantized linear layer, the token table and the head run on pyengine's ops (the CPU C++,
Triton or CUDA backend pyengine selects for the device), with mixed bits per layer, any group
size, fused q/k/v and gate/up, tensor-parallel shards (pyengine.vllm.sharding) and Matryoshka
layers served at the precision their checkpoint names, or at $PYENGINE_MATRYOSHKA_PRECISION.
Sliced and rotated checkpoints (a ``structure`` in their config, and the architecture name
``PyengineStructuredForCausalLM``) are built by the model class the plugin registers for that
name (pyengine.vllm.sliced).

``import pyengine`` never imports this package (nor vLLM); only vLLM's plugin loader (or an
explicit ``import pyengine.vllm``) does.
"""

from __future__ import annotations

__all__ = ["PRECISION_ENV", "register"]

# The environment variable that overrides the precision Matryoshka layers serve.
PRECISION_ENV = "PYENGINE_MATRYOSHKA_PRECISION"


def register() -> None:
    """vLLM's general-plugin hook: registers the ``"pyengine"`` quantization method and the
    model class of sliced and rotated checkpoints (idempotent: vLLM calls it in every process
    it starts)."""
    from . import methods  # noqa: F401  (the import registers the method)
    from vllm import ModelRegistry
    from ..io.checks import STRUCTURED_ARCHITECTURE
    if STRUCTURED_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # by name: vLLM imports the class when a checkpoint asks for it
        ModelRegistry.register_model(STRUCTURED_ARCHITECTURE,
                                     "pyengine.vllm.sliced:PyengineStructuredForCausalLM")
