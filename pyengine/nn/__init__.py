"""nn.Modules that patched models are made of."""

from .quant_embedding import QuantEmbedding
from .quant_linear import QuantLinear
from .sliced import ResidualProjection, SlicedDecoderLayer, SlicedRMSNorm

__all__ = ["QuantEmbedding", "QuantLinear", "ResidualProjection", "SlicedDecoderLayer", "SlicedRMSNorm"]
