"""The backend interface: the dispatch key, the weight operands and the one linear method.

A backend computes, for 2-D activations x[M, K'] (last dimension contiguous):

    out[M, n] = x[:, :k] @ W[:n, :k]^T (+ bias[:n]) (+ residual[M, R] @ shortcut[R, n])

where W is one of three weight kinds, and n, k may be smaller than the stored weight (a sliced
call reads the top-left block in place):

* ``"dense"``: a float tensor [N, K];
* ``"packed"``: a canonical quantized weight (:class:`PackedOperand`, docs/FORMAT.md);
* ``"planes"``: the r-bit slice of a Matryoshka int8 parent read from its bit planes
  (:class:`PlaneOperand`), only the planes the slice needs.

Backends write into a caller-provided output when one is given (tests poison it to catch
unwritten elements).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import torch

WEIGHT_KINDS = ("dense", "packed", "planes")
DECODE_MAX_M = 16  # LinearCase.decode: calls with at most this many activation rows


class LinearCase(NamedTuple):
    """The dispatch key: what backends read to say whether (and how well) they serve a call.
    Sizes are not part of it, but for ``decode``: whether the call has at most DECODE_MAX_M
    activation rows (the cuda backend's tensor-core decode kernel serves those and ranks itself
    by it); errors name the sizes."""

    device_type: str            # "cpu", "cuda", ...
    dtype: torch.dtype          # activation dtype
    kind: str                   # "dense", "packed" or "planes"
    bits: int                   # packed: 2/3/4/8; planes: the slice's precision; dense: 0
    decode: bool = False        # M <= DECODE_MAX_M

    def describe(self) -> str:
        if self.kind == "dense":
            weight = "a dense weight"
        elif self.kind == "packed":
            weight = f"a {self.bits}-bit packed weight"
        else:
            weight = f"the {self.bits}-bit slice of a Matryoshka parent (bit planes)"
        return f"{weight} with {self.dtype} activations on {self.device_type}"


class PackedOperand:
    """The tensors and layout of a canonical quantized weight, as the ops hand it to backends.

    ``native`` is free for the backend that runs it to cache what it derives from the tensors
    (pointers, strides): an operand is immutable, and the ops keep one per weight object for
    eager calls (see pyengine.ops.linear), so that work is done once per weight. ``bound``: the
    ops' prepared calls of it for plain eager calls (pyengine.ops.linear._prepared_call).
    ``layouts``: copies of the weight in a backend's own layout (docs/FORMAT.md allows them), made
    once and kept with the operand, keyed by the backend's choice (e.g. ("mma", n, k)); also
    small answers that follow from the operand alone (e.g. ("mma refusal", k): whether the cuda
    backend's tensor-core decode kernel takes its width and grouping).
    """

    __slots__ = ("qweight", "scales", "zeros", "bits", "group_size", "native", "bound",
                 "layouts")
    kind = "packed"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: Optional[torch.Tensor], bits: int, group_size: int) -> None:
        self.qweight = qweight          # int32 [N_stored, words]
        self.scales = scales            # [N_stored, G]
        self.zeros = zeros              # [N_stored, G] or None (symmetric)
        self.bits = bits
        self.group_size = group_size    # effective codes per scale (the padded row if per channel)
        self.native = None
        self.bound = {}
        self.layouts = {}


class PlaneOperand:
    """The r-bit slice of a Matryoshka parent stored as bit planes (docs/FORMAT.md): the planes
    the slice does not read are None, so no backend can touch their bytes. ``native`` and
    ``layouts``: as for PackedOperand."""

    __slots__ = ("plane_hi", "plane_mid", "plane_lo", "scales", "zeros", "precision",
                 "group_size", "native", "layouts")
    kind = "planes"

    def __init__(self, plane_hi: torch.Tensor, plane_mid: Optional[torch.Tensor],
                 plane_lo: Optional[torch.Tensor], scales: torch.Tensor,
                 zeros: Optional[torch.Tensor], precision: int, group_size: int) -> None:
        self.plane_hi = plane_hi        # int32 [N_stored, Kp * 3 / 32], bits 7..5
        self.plane_mid = plane_mid      # int32 [N_stored, Kp * 2 / 32], bits 4..3 (r >= 3)
        self.plane_lo = plane_lo        # int32 [N_stored, Kp * 3 / 32], bits 2..0 (r >= 6)
        self.scales = scales            # [N_stored, G], the parent's
        self.zeros = zeros              # [N_stored, G] or None (symmetric, zero point 128)
        self.precision = precision      # r in 8, 6, 4, 3, 2
        self.group_size = group_size    # effective codes per scale
        self.native = None
        self.layouts = {}


Operand = Union[torch.Tensor, PackedOperand, PlaneOperand]


def operand_kind(weight: Operand) -> str:
    """"dense", "packed" or "planes"."""
    return "dense" if isinstance(weight, torch.Tensor) else weight.kind


# kernel(x [M, k] contiguous, target [M, n] contiguous, accumulate, threads=None): target =
# x W^T + bias, or target += x W^T + bias when accumulate (activations and target in one dtype),
# on at most `threads` threads (None: torch.get_num_threads())
BoundKernel = Callable[..., None]


class Backend:
    """Base class of backends. Subclasses set ``name`` and implement the methods below."""

    name: str = ""

    def unavailable_reason(self) -> Optional[str]:
        """None when this backend can run in this process, else why not (one line)."""
        raise NotImplementedError

    def unsupported_reason(self, case: LinearCase) -> Optional[str]:
        """None when this backend serves ``case``, else why not (one line)."""
        raise NotImplementedError

    def priority(self, case: LinearCase) -> float:
        """Higher wins when ``backend=None``; only asked for cases the backend supports."""
        return 0.0

    def native_act_bits(self, weight: Operand, act_bits: int) -> bool:
        """Whether :meth:`matmul` quantizes the activations itself (``act_bits``, see
        pyengine.ops.act_quant) for this weight; when not, the op passes it the quantized
        activations in fp32 and act_bits 0."""
        return False

    def bind(self, weight: Operand, n: int, k: int, bias: Optional[torch.Tensor],
             act_bits: int = 0, dtype: torch.dtype = torch.float32,
             layout_copy: bool = True) -> Optional["BoundKernel"]:
        """A prepared call of this backend's kernel on ``weight`` for activations and targets of
        ``dtype`` (everything but the activations and the output bound once), for loops that
        call one layer many times (pyengine.Decoder, eager pyengine.ops.qlinear calls); None
        when the backend has none (callers use :meth:`matmul`). ``layout_copy``: the call may
        hold a copy of the weight in a layout of its own where its kernel reads that faster
        (more memory; the copy's bytes are the kernel's ``prepared_bytes``; the bytes of weight
        one decode-size call reads are its ``decode_weight_bytes``)."""
        return None

    def matmul(self, x: torch.Tensor, weight: Operand, n: int, k: int,
               bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
               shortcut: Optional[torch.Tensor], out: Optional[torch.Tensor] = None,
               act_bits: int = 0) -> torch.Tensor:
        """out[M, n] = x[:, :k] @ W[:n, :k]^T (+ bias[:n]) (+ residual @ shortcut).

        Args:
            x: [M, >=k] activations (fp32/fp16/bf16), stride(-1) == 1.
            weight: a dense [>=n, >=k] tensor with stride(-1) == 1, a PackedOperand or a
                PlaneOperand (every tensor with stride(-1) == 1).
            bias: [>=n], contiguous, or None. residual: [M, R] or None. shortcut: [R, n] or None.
            out: [M, n] in x's dtype, contiguous, to write into (allocated when None).
            act_bits: 0, or 8 where :meth:`native_act_bits` says so.
        Returns:
            out.
        """
        raise NotImplementedError
