"""pyengine's ops: one linear op (``torch.ops.pyengine.qlinear``) for dense, packed and
Matryoshka-plane weights, with its public wrappers. Each validates its inputs and dispatches to
a backend (see pyengine.backends)."""

from .linear import (backend_for, bind_linear, dequant_matmul, matryoshka_matmul, qlinear, shortcut_matmul,
                     sliced_matmul)

__all__ = ["backend_for", "bind_linear", "dequant_matmul", "matryoshka_matmul", "qlinear", "shortcut_matmul",
           "sliced_matmul"]
