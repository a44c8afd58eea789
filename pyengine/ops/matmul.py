"""The matmul ops of pyengine: dequant_matmul, sliced_matmul and shortcut_matmul.

Each public function validates its inputs and calls one ``torch.library`` custom op
(``torch.ops.pyengine.*``) whose implementation picks a backend (pyengine.backends) at run time.
The custom ops have fake (meta) implementations, so they trace under
``torch.compile(fullgraph=True)``, and autograd formulas for the floating-point inputs (the
activations, bias, residual, shortcut and dense weights; quantized codes have no gradient).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..backends import QuantTensors, reference_weight, select_backend_for
from ..qweight import QuantizedWeight
from . import checks

Tensor = torch.Tensor


# ---- shared implementation --------------------------------------------------------------------

def _effective_group_size(qweight: Tensor, bits: int, group_size: int) -> int:
    return qweight.shape[1] * 32 // bits if group_size == -1 else group_size


def _weight_operand(weight: Tensor, scales: Optional[Tensor], zeros: Optional[Tensor], bits: int,
                    group_size: int) -> "QuantTensors | Tensor":
    if bits == 0:
        return weight
    return QuantTensors(weight, scales, zeros, bits,
                        _effective_group_size(weight, bits, group_size))


def _execute(op: str, x: Tensor, weight: Tensor, scales: Optional[Tensor],
             zeros: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
             shortcut: Optional[Tensor], bits: int, group_size: int, n: int, k: int,
             backend: Optional[str]) -> Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    res2 = None
    if residual is not None:
        res2 = residual.reshape(-1, residual.shape[-1])
        if res2.shape[0] and res2.stride(-1) != 1:
            res2 = res2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    impl = select_backend_for(op, x.device.type, x.dtype, bits, group_size if bits else 0, m, n,
                              k, residual is not None, backend)
    w = _weight_operand(weight, scales, zeros, bits, group_size)
    out = impl.matmul(x2, w, n, k, bias, res2, shortcut)
    return out.view(*lead, n)


def eager_call_ok(*tensors: Optional[Tensor]) -> bool:
    """Whether a call may skip its custom op and run the implementation directly: a plain eager
    call on plain tensors (not under torch.compile / export / torch.jit.trace or a functorch
    transform such as vmap, no tensor subclass such as a fake or functional tensor) with nothing
    that needs autograd. Results are the same either way; the direct call saves the dispatcher's
    few microseconds, which add up over the hundreds of small matmuls of one decoding step.
    Tracing, compiling, transforms and training keep the op."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch._C._are_functorch_transforms_active()):
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not Tensor and type(t) is not torch.nn.Parameter:
            return False
        if grad and t.requires_grad:
            return False
    return True


def _fake(x: Tensor, n: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], n)


# ---- custom ops -------------------------------------------------------------------------------

@torch.library.custom_op("pyengine::dequant_matmul", mutates_args=())
def _dequant_matmul_op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor],
                       bias: Optional[Tensor], bits: int, group_size: int, n: int, k: int,
                       backend: Optional[str] = None) -> Tensor:
    return _execute("dequant_matmul", x, qweight, scales, zeros, bias, None, None, bits,
                    group_size, n, k, backend)


@_dequant_matmul_op.register_fake
def _(x, qweight, scales, zeros, bias, bits, group_size, n, k, backend=None):
    return _fake(x, n)


@torch.library.custom_op("pyengine::sliced_matmul", mutates_args=())
def _sliced_matmul_op(x: Tensor, weight: Tensor, scales: Optional[Tensor], zeros: Optional[Tensor],
                      bias: Optional[Tensor], bits: int, group_size: int, in_dims: int,
                      out_dims: int, backend: Optional[str] = None) -> Tensor:
    return _execute("sliced_matmul", x, weight, scales, zeros, bias, None, None, bits,
                    group_size, out_dims, in_dims, backend)


@_sliced_matmul_op.register_fake
def _(x, weight, scales, zeros, bias, bits, group_size, in_dims, out_dims, backend=None):
    return _fake(x, out_dims)


@torch.library.custom_op("pyengine::shortcut_matmul", mutates_args=())
def _shortcut_matmul_op(x: Tensor, weight: Tensor, scales: Optional[Tensor],
                        zeros: Optional[Tensor], residual: Tensor, shortcut: Tensor,
                        bias: Optional[Tensor], bits: int, group_size: int, n: int, k: int,
                        backend: Optional[str] = None) -> Tensor:
    return _execute("shortcut_matmul", x, weight, scales, zeros, bias, residual, shortcut, bits,
                    group_size, n, k, backend)


@_shortcut_matmul_op.register_fake
def _(x, weight, scales, zeros, residual, shortcut, bias, bits, group_size, n, k, backend=None):
    return _fake(x, n)


# ---- autograd ---------------------------------------------------------------------------------
# y = x W[:n, :k]^T + bias[:n] + residual @ shortcut. Gradients flow to x, bias, residual,
# shortcut and a dense weight; quantized codes, scales and zeros get none.

def _grad_linear(ctx, grad: Tensor, names) -> dict:
    needs = dict(zip(names, ctx.needs_input_grad))
    x, weight, scales, zeros, bias, residual, shortcut = ctx.saved_tensors
    bits, gs, n, k = ctx.bits, ctx.group_size, ctx.n, ctx.k
    w = _weight_operand(weight, scales, zeros, bits, gs)
    g2 = grad.reshape(-1, n).to(torch.float32)
    grads = {}
    if needs["x"]:
        gx = g2 @ reference_weight(w, n, k)
        grads["x"] = gx.to(x.dtype).view(x.shape)
    if needs["weight"] and bits == 0:
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        gw[:n, :k] = g2.T @ x.reshape(-1, k).to(torch.float32)
        grads["weight"] = gw.to(weight.dtype)
    if bias is not None and needs["bias"]:
        gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        gb[:n] = g2.sum(dim=0)
        grads["bias"] = gb.to(bias.dtype)
    if residual is not None and needs["residual"]:
        grads["residual"] = (g2 @ shortcut.to(torch.float32).T).to(residual.dtype).view(residual.shape)
    if shortcut is not None and needs["shortcut"]:
        r2 = residual.reshape(-1, residual.shape[-1]).to(torch.float32)
        grads["shortcut"] = (r2.T @ g2).to(shortcut.dtype)
    return grads


def _save(ctx, x, weight, scales, zeros, bias, residual, shortcut, bits, gs, n, k):
    ctx.save_for_backward(x, weight, scales, zeros, bias, residual, shortcut)
    ctx.bits, ctx.group_size, ctx.n, ctx.k = bits, gs, n, k


_DQ_NAMES = ("x", "weight", "scales", "zeros", "bias", "bits", "group_size", "n", "k", "backend")


def _dq_setup(ctx, inputs, output):
    x, qweight, scales, zeros, bias, bits, gs, n, k, _ = inputs
    _save(ctx, x, qweight, scales, zeros, bias, None, None, bits, gs, n, k)


def _dq_backward(ctx, grad):
    g = _grad_linear(ctx, grad, _DQ_NAMES)
    return g.get("x"), None, None, None, g.get("bias"), None, None, None, None, None


_SL_NAMES = ("x", "weight", "scales", "zeros", "bias", "bits", "group_size", "in_dims",
             "out_dims", "backend")


def _sl_setup(ctx, inputs, output):
    x, weight, scales, zeros, bias, bits, gs, in_dims, out_dims, _ = inputs
    _save(ctx, x, weight, scales, zeros, bias, None, None, bits, gs, out_dims,
          in_dims)


def _sl_backward(ctx, grad):
    g = _grad_linear(ctx, grad, _SL_NAMES)
    return g.get("x"), g.get("weight"), None, None, g.get("bias"), None, None, None, None, None


_SC_NAMES = ("x", "weight", "scales", "zeros", "residual", "shortcut", "bias", "bits",
             "group_size", "n", "k", "backend")


def _sc_setup(ctx, inputs, output):
    x, weight, scales, zeros, residual, shortcut, bias, bits, gs, n, k, _ = inputs
    _save(ctx, x, weight, scales, zeros, bias, residual, shortcut, bits, gs,
          n, k)


def _sc_backward(ctx, grad):
    g = _grad_linear(ctx, grad, _SC_NAMES)
    return (g.get("x"), g.get("weight"), None, None, g.get("residual"), g.get("shortcut"),
            g.get("bias"), None, None, None, None, None)


_dequant_matmul_op.register_autograd(_dq_backward, setup_context=_dq_setup)
_sliced_matmul_op.register_autograd(_sl_backward, setup_context=_sl_setup)
_shortcut_matmul_op.register_autograd(_sc_backward, setup_context=_sc_setup)


# ---- public API -------------------------------------------------------------------------------

def _unpack(w: "Tensor | QuantizedWeight"):
    """(weight tensor, scales, zeros, bits, group_size); bits = 0 marks a dense weight."""
    if isinstance(w, QuantizedWeight):
        return w.qweight, w.scales, w.zeros, w.bits, w.group_size
    return w, None, None, 0, 0


def dequant_matmul(x: Tensor, qweight: QuantizedWeight, bias: Optional[Tensor] = None,
                   backend: Optional[str] = None) -> Tensor:
    """y = x @ dequant(W)^T + bias.

    Args:
        x: [..., K] float32 / float16 / bfloat16.
        qweight: QuantizedWeight of shape [N, K] on x's device.
        bias: [N] (any of the three float dtypes) or None.
        backend: "cuda", "triton", "cpu", "torch", or None for the best available
            ($PYENGINE_BACKEND overrides None).
    Returns:
        y: [..., N] in x's dtype.
    """
    op = "dequant_matmul"
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"{op}: qweight must be a pyengine.QuantizedWeight, got "
                        f"{type(qweight).__name__} (dense weights: use torch.nn.functional.linear)")
    n, k = qweight.shape
    checks.check_activation(op, "x", x, k, qweight)
    checks.check_same_device(op, x, qweight=qweight.qweight)
    checks.check_bias(op, bias, n, x, exact=True)
    if eager_call_ok(x, qweight.qweight, qweight.scales, qweight.zeros, bias):
        return _execute(op, x, qweight.qweight, qweight.scales, qweight.zeros, bias, None, None,
                        qweight.bits, qweight.group_size, n, k, backend)
    return _dequant_matmul_op(x, qweight.qweight, qweight.scales, qweight.zeros, bias,
                              qweight.bits, qweight.group_size, n, k, backend)


def sliced_matmul(x: Tensor, w: "Tensor | QuantizedWeight", in_dims: int, out_dims: int,
                  backend: Optional[str] = None, bias: Optional[Tensor] = None) -> Tensor:
    """y = x @ W[:out_dims, :in_dims]^T (+ bias[:out_dims]), reading only that block of W.

    Args:
        x: [..., in_dims] float32 / float16 / bfloat16.
        w: dense tensor [N, K] (x's dtype) or QuantizedWeight [N, K], with N >= out_dims and
            K >= in_dims. For a quantized weight, in_dims must be a multiple of the group size
            (of 32 for a per-channel weight) unless it is K.
        bias: [>= out_dims] or None.
    Returns:
        y: [..., out_dims] in x's dtype. The weight is not copied.
    """
    op = "sliced_matmul"
    checks.check_weight(op, w)
    out_dims, in_dims = checks.check_slice(op, w, in_dims, out_dims)
    checks.check_activation(op, "x", x, in_dims, f"in_dims={in_dims}")
    weight, scales, zeros, bits, gs = _unpack(w)
    checks.check_same_device(op, x, weight=weight)
    if bits == 0:
        checks.check_dense_dtype(op, "w", weight, x)
    checks.check_bias(op, bias, out_dims, x)
    if eager_call_ok(x, weight, scales, zeros, bias):
        return _execute(op, x, weight, scales, zeros, bias, None, None, bits, gs, out_dims,
                        in_dims, backend)
    return _sliced_matmul_op(x, weight, scales, zeros, bias, bits, gs, in_dims, out_dims, backend)


def shortcut_matmul(x: Tensor, w: "Tensor | QuantizedWeight", residual: Tensor, shortcut: Tensor,
                    bias: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """y = x @ W^T + residual @ shortcut (+ bias): a sliced block's output projection fused with
    the projection of its residual stream to the next width.

    Args:
        x: [..., K] float32 / float16 / bfloat16.
        w: dense [N, K] (x's dtype) or QuantizedWeight [N, K].
        residual: [..., R] with x's leading dimensions and dtype.
        shortcut: dense [R, N] in x's dtype.
        bias: [N] or None.
    Returns:
        y: [..., N] in x's dtype.
    """
    op = "shortcut_matmul"
    checks.check_weight(op, w)
    n, k = (int(d) for d in w.shape)
    checks.check_activation(op, "x", x, k, w)
    weight, scales, zeros, bits, gs = _unpack(w)
    checks.check_same_device(op, x, weight=weight)
    if bits == 0:
        checks.check_dense_dtype(op, "w", weight, x)
    checks.check_shortcut(op, x, residual, shortcut, n)
    checks.check_bias(op, bias, n, x, exact=True)
    if eager_call_ok(x, weight, scales, zeros, residual, shortcut, bias):
        return _execute(op, x, weight, scales, zeros, bias, residual, shortcut, bits, gs, n, k,
                        backend)
    return _shortcut_matmul_op(x, weight, scales, zeros, residual, shortcut, bias, bits, gs, n, k,
                               backend)
