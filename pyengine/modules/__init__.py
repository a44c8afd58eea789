"""nn.Modules that patched models are made of."""

from .quant_linear import QuantLinear
from .sliced import ResidualProjection, SlicedDecoderLayer, SlicedRMSNorm

__all__ = ["QuantLinear", "ResidualProjection", "SlicedDecoderLayer", "SlicedRMSNorm"]
