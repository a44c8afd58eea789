"""The Matryoshka weight: one int8 parent whose top bits serve int6/int4/int3/int2 slices.

Slice rule (docs/FORMAT.md, "Matryoshka weights"). For a parent code ``q`` in [0, 255] and a
precision ``r`` in (8, 6, 4, 3, 2), with ``m = 8 - r``:

    c_r(q)   = min(floor(q / 2^m + 1/2), 2^r - 1)          the r-bit slice code
             = min(((q >> (7 - r)) + 1) >> 1, 2^r - 1)     (r < 8; c_8 = q)
    w_r      = (c_r(q) * 2^m - z) * s                      dequantized with the parent's s, z

``round`` in the design formula ``clamp(round(q / 2^m), 0, 2^r - 1) * 2^m`` is round half *up*
(codes are non-negative, so ties go away from zero). That rule needs only the top ``r + 1``
bits of ``q`` (the top ``r`` bits plus the carry bit below them); round-half-to-even would need
every lower bit to detect a tie.

Storage: the parent codes are split into three bit planes, each packed with the canonical
LSB-first packing of docs/FORMAT.md (so the existing 2- and 3-bit unpackers read them)::

    q = hi << 5 | mid << 3 | lo
    plane_hi   bits 7..5 of q   3-bit codes   int32 [N, Kp * 3 / 32]
    plane_mid  bits 4..3 of q   2-bit codes   int32 [N, Kp * 2 / 32]
    plane_lo   bits 2..0 of q   3-bit codes   int32 [N, Kp * 3 / 32]

A slice reads the planes holding its top ``r + 1`` bits: int2 reads plane_hi (3/8 of the
parent's code bytes), int3 and int4 read plane_hi and plane_mid (5/8), int6 and int8 read all
three.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple

import torch

from ..format.packing import pack_codes, unpack_codes
from ..format.qweight import GroupedWeight, QuantizedWeight, padded_in_features

PARENT_BITS = 8
PRECISIONS = (8, 6, 4, 3, 2)
FORMAT_NAME = "pyengine.matryoshka_weight"
FORMAT_VERSION = 1
LAYOUT = "hi3-mid2-lo3"
PLANE_NAMES = ("plane_hi", "plane_mid", "plane_lo")
PLANE_BITS = {"plane_hi": 3, "plane_mid": 2, "plane_lo": 3}   # bits of q held by each plane
PLANE_SHIFT = {"plane_hi": 5, "plane_mid": 3, "plane_lo": 0}  # lowest bit of q in each plane

# Planes an r-bit slice reads: those covering bits 7 .. 7 - r of the parent code.
PLANES_READ: Dict[int, Tuple[str, ...]] = {
    2: ("plane_hi",),
    3: ("plane_hi", "plane_mid"),
    4: ("plane_hi", "plane_mid"),
    6: ("plane_hi", "plane_mid", "plane_lo"),
    8: ("plane_hi", "plane_mid", "plane_lo"),
}


def check_precision(precision: object) -> int:
    """``precision`` as an int; ValueError unless it is one of PRECISIONS."""
    if isinstance(precision, bool) or not isinstance(precision, int) or precision not in PRECISIONS:
        raise ValueError(f"Matryoshka precision must be one of {PRECISIONS}, got {precision!r}")
    return int(precision)


def slice_codes(q: torch.Tensor, precision: int) -> torch.Tensor:
    """The r-bit slice codes ``c_r = min(floor(q / 2^(8-r) + 1/2), 2^r - 1)`` of parent codes.

    Args:
        q: integer tensor (any shape) of parent codes in [0, 255].
        precision: r in (8, 6, 4, 3, 2).
    Returns:
        int64 tensor of q's shape, values in [0, 2^r).
    """
    r = check_precision(precision)
    q = q.to(torch.int64)
    if r == PARENT_BITS:
        return q
    return torch.clamp(((q >> (7 - r)) + 1) >> 1, max=(1 << r) - 1)


def split_planes(q: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Parent codes [N, Kp] (Kp a multiple of 32) -> {plane name: packed int32 plane}."""
    q = q.to(torch.int64)
    planes = {}
    for name in PLANE_NAMES:
        bits = PLANE_BITS[name]
        planes[name] = pack_codes((q >> PLANE_SHIFT[name]) & ((1 << bits) - 1), bits)
    return planes


def _plane_codes(plane: torch.Tensor, name: str, k: Optional[int]) -> torch.Tensor:
    return unpack_codes(plane, PLANE_BITS[name], k)


def top_bits_from_planes(planes: Dict[str, Optional[torch.Tensor]], n_bits: int,
                         k: Optional[int] = None) -> torch.Tensor:
    """``q >> (8 - n_bits)`` (the top ``n_bits`` bits of each parent code), reading only the
    planes that hold them.

    Args:
        planes: {plane name: packed int32 plane}; planes not needed may be missing or None.
        n_bits: 1..8.
        k: if given, only the first k codes of each row.
    Returns:
        int64 [N, k or Kp].
    """
    top = None
    covered = 0  # bits of q (from the top) assembled so far
    for name in PLANE_NAMES:
        if covered >= n_bits:
            break
        plane = planes.get(name)
        if plane is None:
            raise ValueError(f"the top {n_bits} bits of the parent codes need {name}")
        bits = PLANE_BITS[name]
        codes = _plane_codes(plane, name, k)
        take = min(bits, n_bits - covered)
        codes = codes >> (bits - take)
        top = codes if top is None else (top << take) | codes
        covered += take
    return top


def slice_codes_from_planes(planes: Dict[str, Optional[torch.Tensor]], precision: int,
                            k: Optional[int] = None) -> torch.Tensor:
    """The r-bit slice codes read from the bit planes (only the planes of PLANES_READ[r]).

    Returns int64 [N, k or Kp], equal to ``slice_codes(parent codes, r)``.
    """
    r = check_precision(precision)
    if r == PARENT_BITS:
        return top_bits_from_planes(planes, PARENT_BITS, k)
    u = top_bits_from_planes(planes, r + 1, k)          # top r bits and the carry bit below
    return torch.clamp((u + 1) >> 1, max=(1 << r) - 1)


def dequantize_planes(planes: Dict[str, Optional[torch.Tensor]], scales: torch.Tensor,
                      zeros: Optional[torch.Tensor], precision: int, group_size: int, n: int,
                      k: int) -> torch.Tensor:
    """Reference dequantization of the r-bit slice ``(c_r * 2^(8-r) - z) * s`` of W[:n, :k], in
    fp32, reading only the planes the slice needs.

    Args:
        planes: packed planes (int32 [N_stored, words]); unneeded ones may be None.
        scales, zeros: [N_stored, G] (zeros None: symmetric, zero point 128).
        group_size: codes per scale (the padded row length for a per-channel weight).
    Returns:
        fp32 tensor [n, k].
    """
    r = check_precision(precision)
    rows = {name: (None if p is None else p[:n]) for name, p in planes.items()}
    codes = slice_codes_from_planes(rows, r, k)
    values = (codes << (PARENT_BITS - r)).to(torch.float32)
    group_of_k = torch.arange(k, device=scales.device) // group_size
    s = scales[:n].to(torch.float32)[:, group_of_k]
    z = float(1 << (PARENT_BITS - 1)) if zeros is None else zeros[:n].to(torch.float32)[:, group_of_k]
    return (values - z) * s


def canonical_slice(planes: Dict[str, Optional[torch.Tensor]], scales: torch.Tensor,
                    zeros: Optional[torch.Tensor], precision: int, group_size: int,
                    shape: Tuple[int, int], method: str = "rtn") -> QuantizedWeight:
    """The r-bit slice of a planar parent as a canonical QuantizedWeight (new packed tensors),
    built from the planes PLANES_READ[r] only. See :meth:`MatryoshkaWeight.slice`.

    Args:
        planes: packed planes (int32 [N, words]); unneeded ones may be missing or None.
        scales, zeros: the parent's [N, G] (zeros None: symmetric).
        group_size: as stored (-1 per channel); shape: (N, K).
    """
    r = check_precision(precision)
    n, k = (int(d) for d in shape)
    kp = padded_in_features(k, group_size)
    codes = torch.zeros(n, kp, dtype=torch.int64, device=scales.device)
    c = slice_codes_from_planes(planes, r, k)
    if r in (2, 3, 4):
        m = PARENT_BITS - r
        codes[:, :k] = c
        new_scales = scales * float(1 << m)
        if not bool(torch.isfinite(new_scales).all()):
            raise ValueError(f"the {r}-bit slice's scales (parent scales * {1 << m}) overflow "
                             f"{scales.dtype}")
        new_zeros = None if zeros is None else zeros / float(1 << m)
        bits = r
    else:
        codes[:, :k] = c << (PARENT_BITS - r)
        new_scales = scales.clone()
        new_zeros = None if zeros is None else zeros.clone()
        bits = PARENT_BITS
    return QuantizedWeight(pack_codes(codes, bits), new_scales, new_zeros, bits=bits,
                           group_size=group_size, shape=(n, k), method=method)


class MatryoshkaWeight(GroupedWeight):
    """An int8 parent weight W[N, K] stored as three bit planes, served at r in (8, 6, 4, 3, 2).

    Tensors (one device):
        plane_hi:  int32 [N, Kp * 3 / 32]  bits 7..5 of the parent codes (3-bit packing)
        plane_mid: int32 [N, Kp * 2 / 32]  bits 4..3 (2-bit packing)
        plane_lo:  int32 [N, Kp * 3 / 32]  bits 2..0 (3-bit packing)
        scales:    float [N, G] (fp32 / fp16 / bf16), the parent's scales
        zeros:     float [N, G], same dtype, the parent's zero points; None when symmetric
                   (zero point 128)
    Kp = padded_in_features(K, group_size); padding codes are 0 in every plane.
    """

    # _op_cache: {precision: backend operand} that pyengine's ops derive for eager calls; the
    # tensors are fixed for the object's life, so it never goes stale.
    __slots__ = ("plane_hi", "plane_mid", "plane_lo", "scales", "zeros", "group_size", "shape",
                 "method", "_op_cache")

    def __init__(self, plane_hi: torch.Tensor, plane_mid: torch.Tensor, plane_lo: torch.Tensor,
                 scales: torch.Tensor, zeros: Optional[torch.Tensor], *, group_size: int,
                 shape: Tuple[int, int], method: str = "rtn") -> None:
        n, k, kp, n_groups = self._grouping(shape, group_size)
        planes = (plane_hi, plane_mid, plane_lo)
        for name, plane in zip(PLANE_NAMES, planes):
            want = (n, kp * PLANE_BITS[name] // 32)
            if plane.dtype != torch.int32 or tuple(plane.shape) != want:
                raise ValueError(f"{name} must be int32 of shape {want} for a Matryoshka weight of "
                                 f"shape {(n, k)}, got {plane.dtype} {tuple(plane.shape)}")
        self._set_groups("planes", planes, scales, zeros, group_size, n, k, n_groups, method)
        self.plane_hi = plane_hi
        self.plane_mid = plane_mid
        self.plane_lo = plane_lo
        self._op_cache = {}

    _fresh_op_cache = staticmethod(dict)  # copies start with an empty cache (OpCacheNotCopied)

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, parent: QuantizedWeight) -> "MatryoshkaWeight":
        """Splits an 8-bit canonical weight into bit planes (same scales and zeros)."""
        if parent.bits != PARENT_BITS:
            raise ValueError(f"a Matryoshka parent must be an 8-bit weight, got {parent.bits} bits")
        codes = unpack_codes(parent.qweight, PARENT_BITS)  # [N, Kp], padding codes are 0
        planes = split_planes(codes)
        return cls(planes["plane_hi"], planes["plane_mid"], planes["plane_lo"], parent.scales,
                   parent.zeros, group_size=parent.group_size, shape=tuple(parent.shape),
                   method=parent.method)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                   *, group_size: int, shape: Tuple[int, int],
                   method: str = "rtn") -> "MatryoshkaWeight":
        """From parent codes: integer [N, K] or [N, Kp] in [0, 255] (codes past K are ignored
        and stored as 0)."""
        n, k = (int(d) for d in shape)
        kp = padded_in_features(k, group_size)
        if codes.dim() != 2 or codes.shape[0] != n or codes.shape[1] not in (k, kp):
            raise ValueError(f"codes must be [{n}, {k}] or [{n}, {kp}], got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 255):
            raise ValueError("parent codes must lie in [0, 255]")
        padded = torch.zeros(n, kp, dtype=torch.int64, device=codes.device)
        padded[:, :k] = codes[:, :k].to(torch.int64)
        planes = split_planes(padded)
        return cls(planes["plane_hi"], planes["plane_mid"], planes["plane_lo"], scales, zeros,
                   group_size=group_size, shape=(n, k), method=method)

    # ---- descriptive properties (symmetric, in / out_features, effective_group_size, dtype,
    # repr: GroupedWeight) -----------------------------------------------------------------------
    bits = PARENT_BITS  # stored bits per code
    _BITS_FIELD = "parent_bits"

    @property
    def padded_in_features(self) -> int:
        return self.plane_mid.shape[1] * 16

    @property
    def device(self) -> torch.device:
        return self.plane_hi.device

    def planes(self) -> Dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in PLANE_NAMES}

    def planes_for(self, precision: int) -> Dict[str, torch.Tensor]:
        """The planes an r-bit slice reads (PLANES_READ[r])."""
        return {name: getattr(self, name) for name in PLANES_READ[check_precision(precision)]}

    @property
    def nbytes(self) -> int:
        """Bytes of the planes, scales and zeros (the parent, stored once)."""
        return sum(t.numel() * t.element_size() for t in
                   (self.plane_hi, self.plane_mid, self.plane_lo, self.scales, self.zeros)
                   if t is not None)

    def code_bytes_read(self, precision: int) -> int:
        """Bytes of packed codes an r-bit forward reads (the planes of PLANES_READ[r])."""
        return sum(p.numel() * p.element_size() for p in self.planes_for(precision).values())

    # ---- conversions ------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """The parent codes, int64 [N, K]."""
        return top_bits_from_planes(self.planes(), PARENT_BITS, self.in_features)

    def slice_codes(self, precision: int) -> torch.Tensor:
        """The r-bit slice codes c_r, int64 [N, K], read from the planes the slice needs."""
        return slice_codes_from_planes(self.planes_for(precision), precision, self.in_features)

    def dequantize(self, precision: int = PARENT_BITS,
                   dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The r-bit slice's dense weight ``(c_r * 2^(8-r) - z) * s`` [N, K], computed in fp32
        and returned in ``dtype`` (default: the scales' dtype)."""
        w = dequantize_planes(self.planes_for(precision), self.scales, self.zeros, precision,
                              self.effective_group_size, *self.shape)
        return w.to(dtype or self.dtype)

    def parent(self) -> QuantizedWeight:
        """The parent as an 8-bit canonical weight (a new packed tensor)."""
        return self.slice(PARENT_BITS)

    def at(self, precision: int) -> "MatryoshkaView":
        """The r-bit slice as an operand of the ops (``pyengine.ops.qlinear``): the parent's
        tensors and the precision, nothing copied; the ops read only PLANES_READ[r]. (Compare
        :meth:`slice`, which assembles a canonical QuantizedWeight in new tensors.)"""
        return MatryoshkaView(self, precision)

    def slice(self, precision: int) -> QuantizedWeight:
        """The r-bit slice as a canonical QuantizedWeight that dequantizes to exactly
        :meth:`dequantize` (r) in fp32, so every backend serves it. Its tensors are new.

        * r = 2, 3, 4: an r-bit weight with codes c_r, scales ``s * 2^(8-r)`` and zeros
          ``z / 2^(8-r)`` (symmetric: the canonical zero point 2^(r-1) = 128 / 2^(8-r)).
          Both are exact (multiplying by a power of two), so ``(c - z') * s' = (c * 2^m - z) * s``
          with one rounding, as the parent-unit formula.
        * r = 6: there is no 6-bit canonical format: an 8-bit weight with codes ``c_6 * 4`` and
          the parent's scales and zeros.
        * r = 8: the parent itself.
        """
        return canonical_slice(self.planes_for(precision), self.scales, self.zeros, precision,
                               self.group_size, tuple(self.shape), self.method)

    def to(self, device: Optional[torch.device | str] = None,
           dtype: Optional[torch.dtype] = None) -> "MatryoshkaWeight":
        """A copy on ``device`` with scales/zeros in ``dtype`` (self when nothing changes)."""
        s, z = self._scales_to(device, dtype)
        planes = [getattr(self, name).to(device) if device is not None else getattr(self, name)
                  for name in PLANE_NAMES]
        if all(p is getattr(self, name) for p, name in zip(planes, PLANE_NAMES)) and \
                s is self.scales and z is self.zeros:
            return self
        return MatryoshkaWeight(*planes, s, z, group_size=self.group_size,
                                shape=tuple(self.shape), method=self.method)

    # ---- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """A flat dict of tensors (the three planes, "scales", and "zeros" when asymmetric) and
        JSON-able metadata; :meth:`from_dict` inverts it. There is one parent: no per-precision
        tensors."""
        groups, group_meta = self._groups_dict()
        tensors = {**self.planes(), **groups}
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "parent_bits": PARENT_BITS,
                "layout": LAYOUT, **group_meta}
        json.dumps(meta)
        return tensors, meta

    @classmethod
    def from_dict(cls, tensors: Dict[str, torch.Tensor],
                  metadata: Dict[str, Any]) -> "MatryoshkaWeight":
        """Rebuilds a weight from :meth:`to_dict` output; ValueError on a foreign or newer format,
        another plane layout, or tensors that do not match the metadata."""
        if metadata.get("format") != FORMAT_NAME:
            raise ValueError(f"not a pyengine Matryoshka weight (format={metadata.get('format')!r})")
        if int(metadata.get("version", -1)) > FORMAT_VERSION:
            raise ValueError(f"Matryoshka weight format version {metadata.get('version')} is newer "
                             f"than this pyengine understands ({FORMAT_VERSION})")
        if metadata.get("layout", LAYOUT) != LAYOUT or int(metadata.get("parent_bits", 8)) != 8:
            raise ValueError(f"unknown Matryoshka layout {metadata.get('layout')!r} / parent bits "
                             f"{metadata.get('parent_bits')!r} (this pyengine reads {LAYOUT}, 8)")
        missing = [key for key in PLANE_NAMES + ("scales",) if key not in tensors]
        if missing:
            raise ValueError(f"Matryoshka weight tensors missing: {missing}")
        symmetric = bool(metadata["symmetric"])
        zeros = tensors.get("zeros")
        if symmetric != (zeros is None):
            raise ValueError("metadata 'symmetric' disagrees with the presence of a 'zeros' tensor")
        return cls(*(tensors[name] for name in PLANE_NAMES), tensors["scales"], zeros,
                   group_size=int(metadata["group_size"]), shape=tuple(metadata["shape"]),
                   method=str(metadata.get("method", "rtn")))


class MatryoshkaView:
    """The r-bit slice of a :class:`MatryoshkaWeight` as the ops take it: ``parent.at(r)``.

    Nothing is copied; ``planes`` holds the parent's plane_hi, plane_mid and plane_lo where the
    slice reads them (PLANES_READ[r]) and None where it does not, so no kernel is handed bytes
    the slice does not need.
    """

    __slots__ = ("parent", "precision", "planes")

    def __init__(self, parent: MatryoshkaWeight, precision: int) -> None:
        if not isinstance(parent, MatryoshkaWeight):
            raise TypeError(f"a MatryoshkaView needs a MatryoshkaWeight, got {type(parent).__name__}")
        self.parent = parent
        self.precision = check_precision(precision)
        read = PLANES_READ[self.precision]
        self.planes = tuple(getattr(parent, name) if name in read else None
                            for name in PLANE_NAMES)

    @property
    def shape(self) -> torch.Size:
        return self.parent.shape

    @property
    def bits(self) -> int:
        """The slice's precision r (bits per weight the slice serves)."""
        return self.precision

    @property
    def group_size(self) -> int:
        return self.parent.group_size

    @property
    def device(self) -> torch.device:
        return self.parent.device

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The slice's dense weight [N, K] (see :meth:`MatryoshkaWeight.dequantize`)."""
        return self.parent.dequantize(self.precision, dtype)

    def __repr__(self) -> str:
        return f"MatryoshkaView(precision={self.precision}, parent={self.parent!r})"
