"""pyengine's one linear op, ``torch.ops.pyengine.qlinear``, and its public wrappers.

    y[..., n] = x[..., :k] @ W[:n, :k]^T (+ bias[:n]) (+ residual @ shortcut)

for every weight kind the backends serve (pyengine.backends.base):

* dense: a float tensor [N, K] (x's dtype);
* packed: a :class:`~pyengine.QuantizedWeight` (canonical packed codes, docs/FORMAT.md);
* planes: ``MatryoshkaWeight.at(r)``, the r-bit slice of an int8 parent read from its bit
  planes (only those the slice needs).

n, k default to the weight's shape; smaller values read the top-left block in place (a sliced
layer). ``residual @ shortcut`` is a sliced model's projection of the residual stream, fused into
the epilogue. ``act_bits=8`` quantizes x to int8 per block of 32 first (pyengine/ops/act_quant.py:
the product is that of the quantized activations); backends with an integer path for it (the cpu
backend) use it, the others run their exact kernels on the quantized activations. The op picks a backend per call (pyengine.backends.select_backend: device,
activation dtype, weight kind and bits), has a fake implementation (it traces under
``torch.compile(fullgraph=True)``) and one autograd formula: gradients for x, bias, residual,
shortcut and a dense weight; packed codes, planes, scales and zeros get none.

The public functions validate their arguments with errors that name the function and the shapes,
then either call the op or, for a plain eager call with nothing needing autograd, its
implementation directly (the same result without the dispatcher's few microseconds, which add up
over the hundreds of small matmuls of one decoding step). A plain eager call of a quantized weight
on a backend with prepared calls (the cpu backend) is bound once, after its first validated call,
and later calls with the same activation dtype, act_bits, bias and backend go straight to that
prepared kernel call (:func:`_prepared_call`: a few attribute checks instead of the validation and
argument assembly).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..backends import (BackendError, Operand, PackedOperand, PlaneOperand, reference_weight,
                        select_backend)
from ..backends.base import DECODE_MAX_M
from ..matryoshka.weight import MatryoshkaView, MatryoshkaWeight
from ..format.qweight import QuantizedWeight
from . import checks
from .act_quant import check_act_bits, quantize_activations

Tensor = torch.Tensor
Weight = Union[Tensor, QuantizedWeight, MatryoshkaView]


# ---- weights as the op's tensors ------------------------------------------------------------------

def _weight_fields(weight: Weight) -> tuple:
    """(kind, weight, scales, zeros, plane_mid, plane_lo, bits, group_size): a public weight
    object spelled as the op's arguments (for planes, ``weight`` is plane_hi and bits is the
    slice's precision; group_size as stored)."""
    if isinstance(weight, QuantizedWeight):
        return ("packed", weight.qweight, weight.scales, weight.zeros, None, None, weight.bits,
                weight.group_size)
    if isinstance(weight, MatryoshkaView):
        parent = weight.parent
        hi, mid, lo = weight.planes
        return ("planes", hi, parent.scales, parent.zeros, mid, lo, weight.precision,
                parent.group_size)
    return ("dense", weight, None, None, None, None, 0, 0)


def _operand(kind: str, weight: Tensor, scales: Optional[Tensor], zeros: Optional[Tensor],
             plane_mid: Optional[Tensor], plane_lo: Optional[Tensor], bits: int,
             group_size: int) -> Operand:
    """The backends' operand of the op's weight arguments (group size made effective: the
    padded row length of a per-channel weight)."""
    if kind == "packed":
        padded_row = weight.shape[1] * 32 // bits
        return PackedOperand(weight, scales, zeros, bits,
                             padded_row if group_size == -1 else group_size)
    if kind == "planes":
        padded_row = weight.shape[1] * 32 // 3  # plane_hi holds 3 bits of every code
        return PlaneOperand(weight, plane_mid, plane_lo, scales, zeros, bits,
                            padded_row if group_size == -1 else group_size)
    return weight


def _eager_operand(weight: Weight, kind: str, w: Tensor, scales: Optional[Tensor],
                   zeros: Optional[Tensor], plane_mid: Optional[Tensor],
                   plane_lo: Optional[Tensor], bits: int, group_size: int) -> Operand:
    """The operand of a public weight object for an eager call, kept on the object (its
    tensors never change), so that it and what backends derive from it (PackedOperand.native)
    are built once per weight rather than per call."""
    if kind == "packed":
        operand = weight._op_cache
        if operand is None:
            operand = weight._op_cache = _operand(kind, w, scales, zeros, None, None, bits,
                                                  group_size)
        return operand
    if kind == "planes":
        cache = weight.parent._op_cache
        operand = cache.get(bits)
        if operand is None:
            operand = cache[bits] = _operand(kind, w, scales, zeros, plane_mid, plane_lo, bits,
                                             group_size)
        return operand
    return w


def _describe_call(kind: str, bits: int, group_size: int, m: int, n: int, k: int,
                   act_bits: int = 0) -> str:
    weight = {"dense": "dense", "packed": f"{bits}-bit packed",
              "planes": f"{bits}-bit Matryoshka slice"}[kind]
    group = "" if kind == "dense" else f", group_size={group_size}"
    acts = f", act_bits={act_bits}" if act_bits else ""
    return f"qlinear(M={m}, N={n}, K={k}, {weight}{group}{acts})"


# ---- the implementation ---------------------------------------------------------------------------

def _execute(x: Tensor, operand: Operand, kind: str, bits: int, group_size: int, n: int, k: int,
             bias: Optional[Tensor], residual: Optional[Tensor], shortcut: Optional[Tensor],
             backend: Optional[str], out: Optional[Tensor] = None,
             act_bits: int = 0) -> Tensor:
    """The op's body: 2-D views, the backend for this call, its matmul on ``operand``. Writes
    into ``out`` ([..., n], contiguous, x's dtype) when given."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n) if out is None else out
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    try:
        impl = select_backend((x.device.type, x.dtype, kind, bits, m <= DECODE_MAX_M), backend)
    except BackendError as exc:
        raise BackendError(f"{_describe_call(kind, bits, group_size, m, n, k, act_bits)}: "
                           f"{exc}") from None
    res2 = None
    if residual is not None:
        res2 = residual.reshape(m, residual.shape[-1])
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()  # kernels read the bias through a bare pointer
    out2 = None if out is None else out.view(m, n)
    if act_bits and not impl.native_act_bits(operand, act_bits):
        # The exact kernel on the quantized activations, kept in fp32 (rounding x^ to a 16-bit
        # dtype would change the product); the result is converted to x's dtype.
        y = impl.matmul(quantize_activations(x2), operand, n, k, bias,
                        None if res2 is None else res2.to(torch.float32),
                        None if shortcut is None else shortcut.to(torch.float32))
        y = y.to(x.dtype) if out2 is None else out2.copy_(y)
    else:
        y = impl.matmul(x2, operand, n, k, bias, res2, shortcut, out2, act_bits)
    return y.view(*lead, n) if out is None else out


def eager_call_ok(*tensors: Optional[Tensor]) -> bool:
    """Whether a call may skip the custom op and run its implementation directly: a plain eager
    call on plain tensors (not under torch.compile / export / torch.jit.trace or a functorch
    transform such as vmap, no tensor subclass such as a fake or functional tensor) with nothing
    that needs autograd. Results are the same either way. Tracing, compiling, transforms and
    training keep the op."""
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


# ---- the custom op --------------------------------------------------------------------------------

@torch.library.custom_op("pyengine::qlinear", mutates_args=())
def _qlinear_op(x: Tensor, weight: Tensor, scales: Optional[Tensor], zeros: Optional[Tensor],
                plane_mid: Optional[Tensor], plane_lo: Optional[Tensor], bias: Optional[Tensor],
                residual: Optional[Tensor], shortcut: Optional[Tensor], kind: str, bits: int,
                group_size: int, n: int, k: int, backend: Optional[str] = None,
                act_bits: int = 0) -> Tensor:
    return _execute(x, _operand(kind, weight, scales, zeros, plane_mid, plane_lo, bits,
                                group_size),
                    kind, bits, group_size, n, k, bias, residual, shortcut, backend,
                    act_bits=act_bits)


@_qlinear_op.register_fake
def _(x, weight, scales, zeros, plane_mid, plane_lo, bias, residual, shortcut, kind, bits,
      group_size, n, k, backend=None, act_bits=0):
    return x.new_empty(*x.shape[:-1], n)


# y = x W[:n, :k]^T + bias[:n] + residual @ shortcut. Gradients flow to x, bias, residual,
# shortcut and a dense weight; quantized codes, planes, scales and zeros get none. With
# act_bits, x's gradient passes the activation rounding straight through (as if unquantized).

def _setup_context(ctx, inputs, output):
    (x, weight, scales, zeros, plane_mid, plane_lo, bias, residual, shortcut, kind, bits,
     group_size, n, k, _backend, _act_bits) = inputs
    ctx.save_for_backward(x, weight, scales, zeros, plane_mid, plane_lo, bias, residual,
                          shortcut)
    ctx.kind, ctx.bits, ctx.group_size, ctx.n, ctx.k = kind, bits, group_size, n, k


def _backward(ctx, grad):
    x, weight, scales, zeros, plane_mid, plane_lo, bias, residual, shortcut = ctx.saved_tensors
    needs = ctx.needs_input_grad
    kind, n, k = ctx.kind, ctx.n, ctx.k
    g2 = grad.reshape(-1, n).to(torch.float32)
    gx = gw = gb = gr = gs = None
    if needs[0]:
        w = reference_weight(_operand(kind, weight, scales, zeros, plane_mid, plane_lo, ctx.bits,
                                      ctx.group_size), n, k)
        gx = (g2 @ w).to(x.dtype).view(x.shape)
    if needs[1] and kind == "dense":
        gw32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        gw32[:n, :k] = g2.T @ x.reshape(-1, k).to(torch.float32)
        gw = gw32.to(weight.dtype)
    if bias is not None and needs[6]:
        gb32 = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        gb32[:n] = g2.sum(dim=0)
        gb = gb32.to(bias.dtype)
    if residual is not None and needs[7]:
        gr = (g2 @ shortcut.to(torch.float32).T).to(residual.dtype).view(residual.shape)
    if shortcut is not None and needs[8]:
        r2 = residual.reshape(-1, residual.shape[-1]).to(torch.float32)
        gs = (r2.T @ g2).to(shortcut.dtype)
    return gx, gw, None, None, None, None, gb, gr, gs, None, None, None, None, None, None, None


_qlinear_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public API -----------------------------------------------------------------------------------

def _linear(op: str, x: Tensor, weight: Weight, bias: Optional[Tensor],
            residual: Optional[Tensor], shortcut: Optional[Tensor], in_dims: Optional[int],
            out_dims: Optional[int], out: Optional[Tensor], backend: Optional[str],
            act_bits: int = 0) -> Tensor:
    """Validates one call (errors name ``op``) and runs it."""
    checks.check_weight(op, weight)
    kind, w, scales, zeros, plane_mid, plane_lo, bits, group_size = _weight_fields(weight)
    if act_bits:
        check_act_bits(act_bits, f"{op}: act_bits")
        if kind == "dense":
            raise ValueError(f"{op}: act_bits applies to quantized weights, not to a dense one")
    sliced = in_dims is not None or out_dims is not None
    if sliced:
        n_all, k_all = (int(d) for d in weight.shape)
        n, k = checks.check_slice(op, weight, k_all if in_dims is None else in_dims,
                                  n_all if out_dims is None else out_dims)
        checks.check_activation(op, "x", x, k, f"in_dims={k}")
    else:
        n, k = (int(d) for d in weight.shape)
        checks.check_activation(op, "x", x, k, weight)
    checks.check_same_device(op, x, weight=w)
    if kind == "dense":
        checks.check_dense_dtype(op, "weight", w, x)
    checks.check_bias(op, bias, n, x, exact=not sliced)
    if residual is not None or shortcut is not None:
        checks.check_shortcut(op, x, residual, shortcut, n)
    if out is not None:
        checks.check_out(op, out, x, n)
    if eager_call_ok(x, w, scales, zeros, plane_mid, plane_lo, bias, residual, shortcut, out):
        operand = _eager_operand(weight, kind, w, scales, zeros, plane_mid, plane_lo, bits,
                                 group_size)
        y = _execute(x, operand, kind, bits, group_size, n, k, bias, residual, shortcut,
                     backend, out, act_bits)
        if (kind == "packed" and not sliced and residual is None and out is None
                and x.device.type == "cpu"):
            _bind_validated(x, weight, bias, backend, act_bits)
        return y
    y = _qlinear_op(x, w, scales, zeros, plane_mid, plane_lo, bias, residual, shortcut, kind,
                    bits, group_size, n, k, backend, act_bits)
    if out is None:
        return y
    if torch.is_grad_enabled() and y.requires_grad:
        raise RuntimeError(f"{op}: out= does not support automatic differentiation (an input "
                           f"requires grad); call it without out=")
    return out.copy_(y)


def _prepared_key(x: Tensor, bits: int, backend: Optional[str], act_bits: int) -> tuple:
    """What a prepared call of a packed weight is bound to besides its bias: the backend the
    call selects (the request, else $PYENGINE_BACKEND, else the best), the activation dtype and
    act_bits."""
    return (select_backend(("cpu", x.dtype, "packed", bits), backend), x.dtype, act_bits)


def _prepared_call(x: Tensor, weight: Weight, bias: Optional[Tensor], backend: Optional[str],
                   act_bits: int) -> Optional[Tensor]:
    """y = x W^T + bias through the weight's prepared kernel call when this is a plain eager CPU
    call like one already validated (see :func:`_bind_validated`): same activation dtype,
    act_bits, bias object and selected backend, x contiguous with K columns, nothing needing
    autograd, no tracing or transform. None otherwise: the caller then runs the full path, which
    validates the call (and raises what it raises)."""
    if type(weight) is not QuantizedWeight or type(x) is not Tensor or not x.is_cpu:
        return None
    operand = weight._op_cache
    if operand is None or not operand.bound or not x.is_contiguous() or x.ndim < 1:
        return None
    n, k = weight.shape
    if x.shape[-1] != k:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    if (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch._C._are_functorch_transforms_active()):
        return None
    entry = operand.bound.get(_prepared_key(x, weight.bits, backend, act_bits))
    if entry is None or entry[0] is not bias or entry[1] is None:
        return None
    call = entry[1]
    x2 = x if x.ndim == 2 else x.view(-1, k)
    m = x2.shape[0]
    if m == 0:
        return None
    y = torch.empty(m, n, dtype=x.dtype)
    call(x2.data_ptr(), k, y.data_ptr(), n, m, False, torch.get_num_threads())
    return y if x.ndim == 2 else y.view(*x.shape[:-1], n)


def _bind_validated(x: Tensor, weight: QuantizedWeight, bias: Optional[Tensor],
                    backend: Optional[str], act_bits: int) -> None:
    """After a validated plain eager call of a whole quantized weight on the CPU: binds the
    weight's prepared kernel call for calls like it (:func:`_prepared_call`), once per selected
    backend, activation dtype and act_bits (the latest bias wins). The call holds no copy of the
    weight (no layout of its own: an eager caller keeps the weight it passes)."""
    operand = weight._op_cache
    key = _prepared_key(x, weight.bits, backend, act_bits)
    entry = operand.bound.get(key)
    if entry is not None and entry[0] is bias:
        return
    impl, call = key[0], None
    if not (act_bits and not impl.native_act_bits(operand, act_bits)) and (
            bias is None or bias.is_contiguous()):
        n, k = weight.shape
        kernel = impl.bind(operand, n, k, bias, act_bits, dtype=x.dtype, layout_copy=False)
        call = getattr(kernel, "native_call", None)
    # The call points into the operand's tensors and the bias (contiguous: itself), which the
    # operand and the entry keep alive; the kernel (which refers to the operand) is not kept, so
    # that a weight dropped by its owner is freed at once, not by the cycle collector. No call
    # (a backend without prepared calls): remembered too, so that it is not asked again.
    operand.bound[key] = (bias, call)


def qlinear(x: Tensor, weight: Weight, bias: Optional[Tensor] = None, *,
            residual: Optional[Tensor] = None, shortcut: Optional[Tensor] = None,
            in_dims: Optional[int] = None, out_dims: Optional[int] = None,
            out: Optional[Tensor] = None, backend: Optional[str] = None,
            act_bits: int = 0) -> Tensor:
    """y = x @ W[:out_dims, :in_dims]^T (+ bias[:out_dims]) (+ residual @ shortcut).

    Args:
        x: [..., in_dims] float32 / float16 / bfloat16.
        weight: a dense tensor [N, K] in x's dtype, a QuantizedWeight [N, K], or
            ``MatryoshkaWeight.at(r)`` (the r-bit slice of an int8 parent, read from its bit
            planes), on x's device.
        bias: [N] (at least out_dims entries when slicing) or None.
        residual, shortcut: [..., R] (x's leading dimensions) and [R, out_dims], both in x's
            dtype, or both None.
        in_dims, out_dims: read only the block W[:out_dims, :in_dims] (default: all of W). For
            quantized weights in_dims must be K or a multiple of the group size (of 32 for a
            per-channel weight).
        out: [..., out_dims] contiguous in x's dtype to write the result into, or None. Not
            with autograd.
        backend: "cuda", "triton", "cpu", "torch", or None for the best available
            ($PYENGINE_BACKEND overrides None); an explicit backend never falls back silently.
        act_bits: 0, or 8 to quantize x to int8 per block of 32 along K first (quantized
            weights only; pyengine.ops.act_quant).
    Returns:
        y: [..., out_dims] in x's dtype (``out`` when given).
    """
    if residual is None and shortcut is None and in_dims is None and out_dims is None \
            and out is None:
        y = _prepared_call(x, weight, bias, backend, act_bits)
        if y is not None:
            return y
    return _linear("qlinear", x, weight, bias, residual, shortcut, in_dims, out_dims, out,
                   backend, act_bits)


def dequant_matmul(x: Tensor, qweight: QuantizedWeight, bias: Optional[Tensor] = None,
                   backend: Optional[str] = None) -> Tensor:
    """y = x @ dequant(W)^T + bias: :func:`qlinear` for a QuantizedWeight.

    Args:
        x: [..., K] float32 / float16 / bfloat16.
        qweight: QuantizedWeight of shape [N, K] on x's device.
        bias: [N] or None.
        backend: as for :func:`qlinear`.
    Returns:
        y: [..., N] in x's dtype.
    """
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"dequant_matmul: qweight must be a pyengine.QuantizedWeight, got "
                        f"{type(qweight).__name__} (dense weights: use torch.nn.functional.linear)")
    y = _prepared_call(x, qweight, bias, backend, 0)
    if y is not None:
        return y
    return _linear("dequant_matmul", x, qweight, bias, None, None, None, None, None, backend)


def sliced_matmul(x: Tensor, w: Weight, in_dims: int, out_dims: int,
                  backend: Optional[str] = None, bias: Optional[Tensor] = None) -> Tensor:
    """y = x @ W[:out_dims, :in_dims]^T (+ bias[:out_dims]), reading only that block of W in
    place: :func:`qlinear` with in_dims and out_dims.

    Args:
        x: [..., in_dims] float32 / float16 / bfloat16.
        w: dense [N, K] (x's dtype), QuantizedWeight or MatryoshkaWeight.at(r) [N, K], with
            N >= out_dims and K >= in_dims. For quantized weights in_dims must be K or a
            multiple of the group size (of 32 for a per-channel weight).
        bias: [>= out_dims] or None.
    Returns:
        y: [..., out_dims] in x's dtype. The weight is not copied.
    """
    return _linear("sliced_matmul", x, w, bias, None, None, in_dims, out_dims, None, backend)


def shortcut_matmul(x: Tensor, w: Weight, residual: Tensor, shortcut: Tensor,
                    bias: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """y = x @ W^T + residual @ shortcut (+ bias): a sliced block's output projection fused with
    the projection of its residual stream to the next width (:func:`qlinear` with a shortcut).

    Args:
        x: [..., K] float32 / float16 / bfloat16.
        w: dense [N, K] (x's dtype), QuantizedWeight or MatryoshkaWeight.at(r) [N, K].
        residual: [..., R] with x's leading dimensions and dtype.
        shortcut: dense [R, N] in x's dtype.
        bias: [N] or None.
    Returns:
        y: [..., N] in x's dtype.
    """
    if residual is None or shortcut is None:
        raise TypeError("shortcut_matmul: residual and shortcut must be torch.Tensors")
    return _linear("shortcut_matmul", x, w, bias, residual, shortcut, None, None, None, backend)


def matryoshka_matmul(x: Tensor, weight: MatryoshkaWeight, precision: int,
                      bias: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """y = x @ W_r^T + bias, W_r the r-bit slice of a Matryoshka parent (docs/FORMAT.md), read
    from the planes it needs (PLANES_READ[r]): ``qlinear(x, weight.at(precision), bias)``.

    Args:
        x: [..., K] float32 / float16 / bfloat16.
        weight: MatryoshkaWeight [N, K] on x's device.
        precision: r in (8, 6, 4, 3, 2).
        bias: [N] or None.
        backend: as for :func:`qlinear`: None picks the plane kernels of the cpu backend for CPU
            tensors and of triton (else cuda) for CUDA tensors, the torch reference where none
            is built.
    Returns:
        y: [..., N] in x's dtype.
    """
    if not isinstance(weight, MatryoshkaWeight):
        raise TypeError(f"matryoshka_matmul: weight must be a MatryoshkaWeight, got "
                        f"{type(weight).__name__}")
    return _linear("matryoshka_matmul", x, weight.at(precision), bias, None, None, None, None,
                   None, backend)


def bind_linear(weight: Weight, bias: Optional[Tensor] = None, *, act_bits: int = 0,
                device: "torch.device | str" = "cpu", dtype: torch.dtype = torch.float32,
                backend: Optional[str] = None, layout_copy: bool = True):
    """A prepared call of the kernel :func:`qlinear` would run for activations of ``dtype`` on
    ``device``: ``kernel(x, target, accumulate, threads=None)`` with x [M, K] and target [M, N]
    contiguous in ``dtype``, writing ``x W^T + bias`` into target (or adding it when
    ``accumulate``), on at most ``threads`` threads (None: torch.get_num_threads()). Pointers,
    strides and sizes of the weight are bound once, so a call costs one native call; nothing is
    validated per call (the caller owns the shapes). None when the selected backend has no
    prepared form for this weight (then call :func:`qlinear`). ``layout_copy``: the call may
    hold a copy of the weight in a layout its kernel reads faster (the cpu backend's
    row-interleaved int8-activation layers; its bytes are ``kernel.prepared_bytes``)."""
    checks.check_weight("bind_linear", weight)
    kind, w, scales, zeros, plane_mid, plane_lo, bits, group_size = _weight_fields(weight)
    if kind != "packed" or not eager_call_ok(w, scales, zeros, bias):
        return None
    if act_bits:
        check_act_bits(act_bits, "bind_linear: act_bits")
    impl = select_backend((torch.device(device).type, dtype, kind, bits), backend)
    operand = _eager_operand(weight, kind, w, scales, zeros, plane_mid, plane_lo, bits,
                             group_size)
    if act_bits and not impl.native_act_bits(operand, act_bits):
        return None
    n, k = (int(d) for d in weight.shape)
    if bias is not None:
        checks.check_bias("bind_linear", bias, n, torch.empty(0, k, dtype=dtype, device=device),
                          exact=True)
    return impl.bind(operand, n, k, bias, act_bits, dtype=dtype, layout_copy=layout_copy)


def backend_for(x: Tensor, weight: Weight, backend: Optional[str] = None) -> str:
    """The name of the backend :func:`qlinear` runs for activations like ``x`` and ``weight``
    with ``backend`` ($PYENGINE_BACKEND when None); BackendError as the call would raise."""
    checks.check_weight("backend_for", weight)
    kind, _, _, _, _, _, bits, _ = _weight_fields(weight)
    rows = x.numel() // max(1, x.shape[-1]) if x.dim() else 1
    return select_backend((x.device.type, x.dtype, kind, bits, rows <= DECODE_MAX_M),
                          backend).name


__all__ = ["backend_for", "bind_linear", "dequant_matmul", "eager_call_ok", "matryoshka_matmul", "qlinear",
           "shortcut_matmul", "sliced_matmul"]
