"""pyengine: compressed LLM inference on custom kernels.

Importing pyengine never initialises CUDA and never fails because the compiled extension
(pyengine._C) or triton is missing: the ``torch`` backend always works. Hugging Face
integration (transformers) is imported only when a function needs it.
"""

from __future__ import annotations

from . import ops
from ._ext import build_info
from ._version import __version__
from .backends import BackendError, available_backends, known_backends
from .io.checkpoint import CheckpointError, load, save
from .pipeline.compress import (bits_per_weight, compress, dequantize_model, layer_report,
                                predicted_bytes, storage_bytes)
from .pipeline.data import calibration_data
from .decoder import Decoder, DecoderUnsupported, decoder_blocker, generate
from .evaluate import perplexity
from .io.hf import register_if_transformers_imported as _register_if_transformers_imported
from .io.hf import register_with_transformers
from .matryoshka import MatryoshkaWeight, get_precision, set_precision
from .model.adapters import UnsupportedModelError, supported_architectures
from .nn import QuantEmbedding, QuantLinear
from .nn.fusion import fuse_projections
from .nn.matryoshka_linear import MatryoshkaLinear
from .pipeline.plan import plan
from .format.qweight import QuantizedWeight
from .quant.rtn import quantize
from .quant.recipe import QuantConfig, Recipe
from .pipeline.scores import scores

_register_if_transformers_imported()

__all__ = [
    "BackendError", "CheckpointError", "Decoder", "DecoderUnsupported", "MatryoshkaLinear",
    "MatryoshkaWeight", "QuantConfig", "QuantEmbedding", "QuantLinear", "QuantizedWeight",
    "Recipe", "UnsupportedModelError", "__version__", "available_backends", "bits_per_weight",
    "build_info", "calibration_data", "compress", "decoder_blocker", "dequantize_model",
    "fuse_projections", "generate", "get_precision", "known_backends", "layer_report", "load",
    "ops", "perplexity", "plan", "predicted_bytes", "quantize", "register_with_transformers",
    "save", "scores", "set_precision", "storage_bytes", "supported_architectures",
]
