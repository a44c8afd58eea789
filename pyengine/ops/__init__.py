"""pyengine's ops: each public function validates its inputs and calls one torch custom op
(``torch.ops.pyengine.<name>``) that dispatches to a backend (see pyengine.backends)."""

from .matmul import dequant_matmul, shortcut_matmul, sliced_matmul

__all__ = ["dequant_matmul", "shortcut_matmul", "sliced_matmul"]
