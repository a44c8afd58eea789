"""Matryoshka quantization: one int8 parent per layer, served at 8, 6, 4, 3 or 2 bits.

* :mod:`.weight`: the slice rule, the bit-plane storage, :class:`MatryoshkaWeight` and its
  operand :class:`MatryoshkaView` (``weight.at(r)``);
* :mod:`.precision`: :func:`set_precision` / :func:`get_precision` (Mix'n'Match).

The matmul is pyengine's one linear op (``pyengine.ops.qlinear(x, weight.at(r))``;
:func:`matryoshka_matmul` is its wrapper, re-exported here). The layer is
:class:`pyengine.nn.matryoshka_linear.MatryoshkaLinear`; parents are made by
``pyengine.compress`` with ``QuantConfig(bits=8, matryoshka=True, method="rtn" | "matquant")``
(MatQuant: pyengine.quant.matquant). docs/FORMAT.md specifies slices and storage.
"""

from .precision import get_precision, matryoshka_layers, set_precision
from .weight import (LAYOUT, PARENT_BITS, PLANES_READ, PRECISIONS, MatryoshkaView,
                     MatryoshkaWeight, canonical_slice, check_precision, slice_codes,
                     split_planes)

__all__ = [
    "LAYOUT", "PARENT_BITS", "PLANES_READ", "PRECISIONS", "MatryoshkaView", "MatryoshkaWeight",
    "canonical_slice", "check_precision", "get_precision", "matryoshka_layers",
    "matryoshka_matmul", "set_precision", "slice_codes", "split_planes",
]


def __getattr__(name: str):
    # matryoshka_matmul lives with the other ops; imported on first use because pyengine.ops
    # itself imports this package's weight module.
    if name == "matryoshka_matmul":
        from ..ops import matryoshka_matmul
        return matryoshka_matmul
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
