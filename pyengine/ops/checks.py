"""Input validation of the public ops: clear errors that name the op and the shapes."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..matryoshka.weight import MatryoshkaView, MatryoshkaWeight
from ..format.qweight import QuantizedWeight

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# What the ops take as a weight: dense, packed, or a Matryoshka slice read from its bit planes.
WEIGHT_TYPES = (torch.Tensor, QuantizedWeight, MatryoshkaView)


def check_activation(op: str, name: str, x: object, k: int,
                     weight: "str | torch.Tensor | QuantizedWeight") -> torch.Tensor:
    """x must be a float tensor with k features on its last dimension; ``weight`` (a weight, or
    a description of what needs the k features) is only put into words for the error."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != k:
        desc = weight if isinstance(weight, str) else weight_desc(weight)
        raise ValueError(f"{op}: {name} has shape {tuple(x.shape)} but {desc} needs "
                         f"{k} features on its last dimension")
    return x


def check_same_device(op: str, x: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def check_bias(op: str, bias: object, n: int, x: torch.Tensor, exact: bool = False) -> None:
    """bias must be a float vector of n entries (at least n when ``exact`` is False: a sliced
    layer reads the first n of a longer bias)."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{op}: bias must be float32, float16 or bfloat16, got {bias.dtype}")
    if bias.dim() != 1 or bias.shape[0] < n or (exact and bias.shape[0] != n):
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)} but the output has {n} "
                         f"features")
    check_same_device(op, x, bias=bias)


def check_weight(op: str, w: object) -> None:
    if isinstance(w, MatryoshkaWeight):
        raise TypeError(f"{op}: a MatryoshkaWeight is served at a precision: pass weight.at(r) "
                        f"(r in 8, 6, 4, 3, 2)")
    if not isinstance(w, WEIGHT_TYPES):
        raise TypeError(f"{op}: weight must be a torch.Tensor, pyengine.QuantizedWeight or "
                        f"MatryoshkaWeight.at(precision), got {type(w).__name__}")
    if isinstance(w, torch.Tensor) and w.dim() != 2:
        raise ValueError(f"{op}: a dense weight must be 2-D [out_features, in_features], got "
                         f"shape {tuple(w.shape)}")


def weight_desc(w: "torch.Tensor | QuantizedWeight | MatryoshkaView") -> str:
    if isinstance(w, QuantizedWeight):
        return f"the {w.bits}-bit weight of shape {tuple(w.shape)}"
    if isinstance(w, MatryoshkaView):
        return (f"the {w.precision}-bit slice of the Matryoshka weight of shape "
                f"{tuple(w.shape)}")
    return f"the weight of shape {tuple(w.shape)}"


def check_dense_dtype(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name} is {t.dtype} but x is {x.dtype}; they must match")


def check_slice(op: str, w: "torch.Tensor | QuantizedWeight | MatryoshkaView", in_dims: int,
                out_dims: int) -> Tuple[int, int]:
    n, k = (int(d) for d in w.shape)
    for name, v, limit in (("in_dims", in_dims, k), ("out_dims", out_dims, n)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
        if not 1 <= v <= limit:
            raise ValueError(f"{op}: {name}={v} is outside 1..{limit} for {weight_desc(w)}")
    if isinstance(w, (QuantizedWeight, MatryoshkaView)) and in_dims != k:
        multiple = 32 if w.group_size == -1 else w.group_size
        if in_dims % multiple:
            what = ("the 32-code packing block of a per-channel weight" if w.group_size == -1
                    else f"the group size {w.group_size}")
            raise ValueError(f"{op}: in_dims={in_dims} must be a multiple of {what} when slicing "
                             f"{weight_desc(w)}")
    return out_dims, in_dims


def check_shortcut(op: str, x: torch.Tensor, residual: object, shortcut: object, n: int) -> None:
    if not isinstance(residual, torch.Tensor) or not isinstance(shortcut, torch.Tensor):
        raise TypeError(f"{op}: residual and shortcut must be torch.Tensors")
    if shortcut.dim() != 2 or shortcut.shape[1] != n:
        raise ValueError(f"{op}: shortcut has shape {tuple(shortcut.shape)} but must be [R, {n}] "
                         f"(R = residual width, {n} = output features)")
    r = shortcut.shape[0]
    if residual.shape[:-1] != x.shape[:-1] or residual.shape[-1] != r:
        raise ValueError(f"{op}: residual has shape {tuple(residual.shape)} but must be "
                         f"{tuple(x.shape[:-1]) + (r,)} (x's leading dimensions, then R={r} "
                         f"from shortcut {tuple(shortcut.shape)})")
    check_dense_dtype(op, "residual", residual, x)
    check_dense_dtype(op, "shortcut", shortcut, x)
    check_same_device(op, x, residual=residual, shortcut=shortcut)


def check_out(op: str, out: object, x: torch.Tensor, n: int) -> None:
    """out must be a contiguous tensor of x's dtype and device shaped like the result."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op}: out must be a torch.Tensor or None, got {type(out).__name__}")
    want = tuple(x.shape[:-1]) + (n,)
    if tuple(out.shape) != want or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"{op}: out must be a contiguous {x.dtype} tensor of shape {want}, got "
                         f"{out.dtype} {tuple(out.shape)}"
                         f"{'' if out.is_contiguous() else ' (not contiguous)'}")
    check_same_device(op, x, out=out)
