"""pyengine's ops: one linear op (``torch.ops.pyengine.qlinear``) for dense, packed and
Matryoshka-plane weights, with its public wrappers, and the quantized embedding lookup
(``qembedding``). Each validates its inputs; the linear op dispatches to a backend (see
pyengine.backends), the lookup runs plain torch operations on every device."""

from .embedding import qembedding, reference_qembedding
from .linear import (backend_for, bind_linear, dequant_matmul, matryoshka_matmul, qlinear,
                     shortcut_matmul, sliced_matmul)

__all__ = ["backend_for", "bind_linear", "dequant_matmul", "matryoshka_matmul", "qembedding",
           "qlinear", "reference_qembedding", "shortcut_matmul", "sliced_matmul"]
