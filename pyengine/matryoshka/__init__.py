"""Matryoshka quantization: one int8 parent per layer, served at 8, 6, 4, 3 or 2 bits.

* :mod:`.weight`: the slice rule, the bit-plane storage and :class:`MatryoshkaWeight`;
* :mod:`.op`: the plane-layout matmul op (``torch.ops.pyengine.matryoshka_matmul``);
* :mod:`.precision`: :func:`set_precision` / :func:`get_precision` (Mix'n'Match).

The layer is :class:`pyengine.modules.matryoshka_linear.MatryoshkaLinear`; parents are made by
``pyengine.compress`` with ``QuantConfig(bits=8, matryoshka=True, method="rtn" | "matquant")``
(MatQuant: pyengine.quantizers.matquant). docs/FORMAT.md specifies slices and storage.
"""

from .op import matryoshka_matmul
from .precision import get_precision, matryoshka_layers, set_precision
from .weight import (LAYOUT, PARENT_BITS, PLANES_READ, PRECISIONS, MatryoshkaWeight,
                     canonical_slice, check_precision, slice_codes, sliced_parent_codes,
                     split_planes)

__all__ = [
    "LAYOUT", "PARENT_BITS", "PLANES_READ", "PRECISIONS", "MatryoshkaWeight", "canonical_slice",
    "check_precision", "get_precision", "matryoshka_layers", "matryoshka_matmul",
    "set_precision", "slice_codes", "sliced_parent_codes", "split_planes",
]
