"""pyengine's ops: one linear op (``torch.ops.pyengine.qlinear``) for dense, packed and
Matryoshka-plane weights, with its public wrappers, the quantized embedding lookup
(``qembedding``) and the online Walsh-Hadamard transform (``hadamard_transform``, what a rotated
MLP applies to down_proj's input). Each validates its inputs; the linear op dispatches to a
backend (see pyengine.backends), the transform to its C++ / Triton / torch implementation, the
lookup runs plain torch operations on every device."""

from .embedding import qembedding, reference_qembedding
from .hadamard import hadamard_transform, reference_hadamard
from .linear import (backend_for, bind_linear, dequant_matmul, matryoshka_matmul, qlinear,
                     shortcut_matmul, sliced_matmul)

__all__ = ["backend_for", "bind_linear", "dequant_matmul", "hadamard_transform",
           "matryoshka_matmul", "qembedding", "qlinear", "reference_hadamard",
           "reference_qembedding", "shortcut_matmul", "sliced_matmul"]
