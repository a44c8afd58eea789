"""The canonical quantized weight (docs/FORMAT.md).

A :class:`QuantizedWeight` holds a linear layer's weight W[N, K] (N output channels, K input
features) as b-bit codes packed along K, plus one scale (and, for asymmetric weights, one zero
point) per group of ``group_size`` consecutive inputs of each output channel:

    W[n, k] ~= (q[n, k] - z[n, g]) * s[n, g],   g = k // group_size

Symmetric weights store no zeros: their zero point is 2^(bits-1).
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .packing import BLOCK_CODES, SUPPORTED_BITS, padded_length, unpack_codes

SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)
FORMAT_NAME = "pyengine.quantized_weight"
FORMAT_VERSION = 1
# The float dtypes of scales, zeros and activations, by the names checkpoints and options use
FLOAT_DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                        "bfloat16": torch.bfloat16}
DTYPE_NAMES: Dict[torch.dtype, str] = {dtype: name for name, dtype in FLOAT_DTYPES.items()}
SCALE_DTYPES = tuple(FLOAT_DTYPES.values())


def padded_in_features(k: int, group_size: int) -> int:
    """Stored row length in codes: K rounded up to the packing block and to the group size."""
    return padded_length(k, BLOCK_CODES if group_size == -1 else max(group_size, BLOCK_CODES))


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                      bits: int, group_size: int, n: int, k: int) -> torch.Tensor:
    """Reference dequantization of the sub-block W[:n, :k] of a packed weight, in fp32.

    Args:
        qweight: int32 [N_stored, words]; scales, zeros: [N_stored, G] (zeros None: symmetric).
        group_size: codes per scale (the padded row length for a per-channel weight).
        n, k: rows and columns wanted (n <= N_stored, k <= stored codes per row).
    Returns:
        fp32 tensor [n, k].
    """
    words = padded_length(k, BLOCK_CODES) * bits // 32
    codes = unpack_codes(qweight[:n, :words], bits, k).to(torch.float32)  # [n, k]
    s = per_element(scales[:n].to(torch.float32), group_size, k)
    z = (float(1 << (bits - 1)) if zeros is None
         else per_element(zeros[:n].to(torch.float32), group_size, k))
    return (codes - z) * s


def per_element(per_group: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """A per-group tensor [N, G] spread over the elements it covers: [N, k], column j taking
    group j // group_size (group_size: codes per group, the padded row length for a
    per-channel weight)."""
    group_of_k = torch.arange(k, device=per_group.device) // group_size
    return per_group[:, group_of_k]


class OpCacheNotCopied:
    """Base of the weight classes whose ``_op_cache`` holds what pyengine's ops derive from
    their tensors (pointers into them, prepared native calls): a copy (copy, deepcopy, pickle)
    starts with a fresh cache, ``self._fresh_op_cache()``, instead of the original's."""

    __slots__ = ()

    @staticmethod
    def _fresh_op_cache():
        return None

    def __getstate__(self):
        return None, {name: getattr(self, name) for name in self.__slots__ if name != "_op_cache"}

    def __setstate__(self, state) -> None:
        for name, value in state[1].items():
            setattr(self, name, value)
        self._op_cache = self._fresh_op_cache()


class GroupedWeight(OpCacheNotCopied):
    """What the grouped quantized weights (QuantizedWeight, the Matryoshka parent) have alike:
    ``shape`` [N, K], per-group ``scales`` and ``zeros`` (None: symmetric), ``group_size`` (-1:
    one group per row) and ``method``, checked and kept by :meth:`_set_groups`, with the
    descriptive properties, ``repr``, the scales' conversion and serialisation built on them.
    Subclasses give ``padded_in_features``, ``device``, ``bits`` and ``_BITS_FIELD`` (the
    name ``repr`` gives ``bits``)."""

    __slots__ = ()

    _BITS_FIELD = "bits"

    # ---- construction ---------------------------------------------------------------------
    @staticmethod
    def _grouping(shape: Tuple[int, int], group_size: int) -> Tuple[int, int, int, int]:
        """(N, K, Kp, G) of a weight of ``shape`` stored in groups of ``group_size``: Kp the
        stored row length (:func:`padded_in_features`), G the groups per row. ValueError for a
        group size not in SUPPORTED_GROUP_SIZES."""
        n, k = (int(d) for d in shape)
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
        kp = padded_in_features(k, group_size)
        return n, k, kp, 1 if group_size == -1 else kp // group_size

    def _set_groups(self, codes_name: str, codes: Sequence[torch.Tensor], scales: torch.Tensor,
                    zeros: Optional[torch.Tensor], group_size: int, n: int, k: int, n_groups: int,
                    method: str) -> None:
        """Checks the scales (float [n, n_groups] in a SCALE_DTYPES dtype), the zeros (None, or
        the scales' dtype and shape) and that they and the packed ``codes`` (``codes_name`` in
        the message) are on one device, then keeps scales, zeros, group_size, shape [n, k] and
        method. ValueError naming what is wrong."""
        if scales.dtype not in SCALE_DTYPES or tuple(scales.shape) != (n, n_groups):
            raise ValueError(f"scales must be float32/float16/bfloat16 of shape {(n, n_groups)}, "
                             f"got {scales.dtype} {tuple(scales.shape)}")
        if zeros is not None and (zeros.dtype != scales.dtype or zeros.shape != scales.shape):
            raise ValueError(f"zeros must match scales ({scales.dtype} {tuple(scales.shape)}), "
                             f"got {zeros.dtype} {tuple(zeros.shape)}")
        devices = {t.device for t in (*codes, scales, zeros) if t is not None}
        if len(devices) != 1:
            raise ValueError(f"{codes_name}, scales and zeros must be on one device, got {devices}")
        self.scales = scales
        self.zeros = zeros
        self.group_size = int(group_size)
        self.shape = torch.Size((n, k))
        self.method = str(method)

    # ---- descriptive properties -----------------------------------------------------------
    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def effective_group_size(self) -> int:
        """Codes per scale: group_size, or the padded row length for per-channel weights."""
        return self.padded_in_features if self.group_size == -1 else self.group_size

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the scales (and zeros)."""
        return self.scales.dtype

    def __repr__(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return (f"{type(self).__name__}(shape={tuple(self.shape)}, "
                f"{self._BITS_FIELD}={self.bits}, group_size={self.group_size}, {kind}, "
                f"scales={DTYPE_NAMES[self.dtype]}, device={self.device}, "
                f"method={self.method!r})")

    # ---- conversions and serialisation ----------------------------------------------------
    def _scales_to(self, device: Optional[torch.device | str],
                   dtype: Optional[torch.dtype]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(scales, zeros) on ``device`` in ``dtype`` (None: unchanged; the same tensors when
        nothing changes), for ``to``. ValueError for a dtype not in SCALE_DTYPES."""
        if dtype is not None and dtype not in SCALE_DTYPES:
            raise ValueError(f"scale dtype must be one of {SCALE_DTYPES}, got {dtype}")
        s = self.scales.to(device=device, dtype=dtype)
        z = None if self.zeros is None else self.zeros.to(device=device, dtype=dtype)
        return s, z

    def _groups_dict(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """The tensors ("scales", and "zeros" when asymmetric) and the metadata (group_size,
        symmetric, shape, scale_dtype, method) that every grouped weight's ``to_dict`` holds."""
        tensors = {"scales": self.scales}
        if self.zeros is not None:
            tensors["zeros"] = self.zeros
        meta = {
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "shape": [int(self.shape[0]), int(self.shape[1])],
            "scale_dtype": DTYPE_NAMES[self.dtype],
            "method": self.method,
        }
        return tensors, meta


class QuantizedWeight(GroupedWeight):
    """A quantized linear weight in the canonical packed format.

    Tensors (all on one device):
        qweight: int32 [N, Kp * bits / 32], Kp = :func:`padded_in_features` (K, group_size);
                 codes packed along K (docs/FORMAT.md). Codes past K are padding (stored as 0)
                 and never contribute to a product.
        scales:  float [N, G] in ``dtype`` (fp32, fp16 or bf16), G = Kp / group_size, or 1 for a
                 per-channel weight (group_size = -1).
        zeros:   float [N, G], same dtype, zero points (any finite value); None when
                 symmetric (zero point 2^(bits-1)).
    """

    # _op_cache: what pyengine's ops derive from this weight for eager calls (its backend
    # operand); the tensors above are fixed for the object's life, so it never goes stale.
    __slots__ = ("qweight", "scales", "zeros", "bits", "group_size", "shape", "method",
                 "_op_cache")

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                 *, bits: int, group_size: int, shape: Tuple[int, int], method: str = "rtn") -> None:
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
        n, k, kp, n_groups = self._grouping(shape, group_size)
        if qweight.dtype != torch.int32 or tuple(qweight.shape) != (n, kp * bits // 32):
            raise ValueError(f"qweight must be int32 of shape {(n, kp * bits // 32)} for a "
                             f"{bits}-bit weight of shape {(n, k)}, got {qweight.dtype} "
                             f"{tuple(qweight.shape)}")
        self._set_groups("qweight", (qweight,), scales, zeros, group_size, n, k, n_groups, method)
        self.qweight = qweight
        self.bits = int(bits)
        self._op_cache = None

    # ---- descriptive properties (symmetric, in / out_features, effective_group_size, dtype,
    # repr: GroupedWeight) -----------------------------------------------------------------------
    @property
    def padded_in_features(self) -> int:
        """Stored codes per row (K padded to the packing block and group size)."""
        return self.qweight.shape[1] * 32 // self.bits

    @property
    def num_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        """Bytes of the packed codes, scales and zeros."""
        return sum(t.numel() * t.element_size()
                   for t in (self.qweight, self.scales, self.zeros) if t is not None)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight of the unpadded [N, K] matrix, scales and zeros included."""
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    # ---- conversions ------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Unpacked codes, int64 [N, K]."""
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense weight [N, K], computed in fp32 and returned in ``dtype`` (default: the
        scales' dtype)."""
        w = dequantize_packed(self.qweight, self.scales, self.zeros, self.bits,
                              self.effective_group_size, *self.shape)
        return w.to(dtype or self.dtype)

    def to(self, device: Optional[torch.device | str] = None,
           dtype: Optional[torch.dtype] = None) -> "QuantizedWeight":
        """A copy on ``device`` with scales/zeros in ``dtype`` (self when nothing changes)."""
        s, z = self._scales_to(device, dtype)
        q = self.qweight.to(device) if device is not None else self.qweight
        if q is self.qweight and s is self.scales and z is self.zeros:
            return self
        return QuantizedWeight(q, s, z, bits=self.bits, group_size=self.group_size,
                               shape=tuple(self.shape), method=self.method)

    # ---- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """A flat dict of tensors ("qweight", "scales", and "zeros" when asymmetric) and
        JSON-able metadata; :meth:`from_dict` inverts it."""
        groups, group_meta = self._groups_dict()
        tensors = {"qweight": self.qweight, **groups}
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "bits": self.bits, **group_meta}
        json.dumps(meta)  # metadata must stay JSON-able
        return tensors, meta

    @classmethod
    def from_dict(cls, tensors: Dict[str, torch.Tensor], metadata: Dict[str, Any]) -> "QuantizedWeight":
        """Rebuilds a weight from :meth:`to_dict` output; raises ValueError on a foreign or
        newer format, or on tensors that do not match the metadata."""
        if metadata.get("format") != FORMAT_NAME:
            raise ValueError(f"not a pyengine quantized weight (format={metadata.get('format')!r})")
        if int(metadata.get("version", -1)) > FORMAT_VERSION:
            raise ValueError(f"quantized weight format version {metadata.get('version')} is newer "
                             f"than this pyengine understands ({FORMAT_VERSION})")
        missing = [key for key in ("qweight", "scales") if key not in tensors]
        if missing:
            raise ValueError(f"quantized weight tensors missing: {missing}")
        symmetric = bool(metadata["symmetric"])
        zeros = tensors.get("zeros")
        if symmetric and zeros is not None:
            raise ValueError("metadata says symmetric but a 'zeros' tensor is present")
        if not symmetric and zeros is None:
            raise ValueError("metadata says asymmetric but the 'zeros' tensor is missing")
        return cls(tensors["qweight"], tensors["scales"], zeros, bits=int(metadata["bits"]),
                   group_size=int(metadata["group_size"]), shape=tuple(metadata["shape"]),
                   method=str(metadata.get("method", "rtn")))
