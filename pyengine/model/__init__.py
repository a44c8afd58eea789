"""Model families (adapters) and model sources."""

from .adapters import (ADAPTERS, ModelAdapter, UnsupportedModelError, get_adapter,
                       register_adapter, supported_architectures)

__all__ = ["ADAPTERS", "ModelAdapter", "UnsupportedModelError", "get_adapter",
           "register_adapter", "supported_architectures"]
