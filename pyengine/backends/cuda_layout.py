"""The fragment-native layout of the CUDA tensor-core decode kernel (csrc/mma_frag.h describes
it; csrc/cuda/decode_mma.cuh runs it): a canonical packed weight (docs/FORMAT.md) repacked once
so that each lane of a warp loads its mma.sync A fragments with 16-byte loads, and its scales and
zeros turned into fp32 (s, -s * z) pairs per 16-row tile and group.

The repack runs on the weight's device with torch operations (any device; the tests run it on
the CPU and check the layout through the kernel's host emulation,
``pyengine._C.mma_decode_emulate``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, NamedTuple, Optional

import torch

from .._ext import DTYPE_CODES, extension
from ..format.packing import as_int32_bits, unpack_codes

# The layout's sizes as csrc/mma_frag.h sets them, the keys of pyengine._C.mma_layout_constants():
# code widths it holds, mma steps (16 inputs each) per iteration and 32-bit words per lane per
# iteration (per width), weight rows per tile, most tokens per call, readable iterations after
# the last tile, and the gshift meaning "one group covers K". _C's values are read when it
# loads; this copy stands in without it (tests/backends/test_native_args.py checks the two
# agree).
FALLBACK_LAYOUT_CONSTANTS: Dict[str, Any] = {
    "bits": (2, 3, 4, 8),
    "steps": {2: 16, 3: 16, 4: 4, 8: 2},
    "words": {2: 8, 3: 12, 4: 4, 8: 4},
    "step_k": 16,
    "tile_rows": 16,
    "max_m": 16,
    "frag_tail": 8,
    "one_group_shift": 62,
}
# Module attributes read from layout_constants() on first use (``__getattr__`` below), so that
# importing this module does not load the extension.
_CONSTANT_NAMES = {"MMA_BITS": "bits", "STEPS": "steps", "WORDS": "words",
                   "TILE_ROWS": "tile_rows", "MAX_M": "max_m", "FRAG_TAIL": "frag_tail",
                   "ONE_GROUP_SHIFT": "one_group_shift"}
_CHUNK_CODE_BITS = 1 << 24                 # repack in row chunks of about this many code bits


@functools.lru_cache(maxsize=None)
def layout_constants() -> Dict[str, Any]:
    """The layout's sizes (keys as :data:`FALLBACK_LAYOUT_CONSTANTS`): from
    ``pyengine._C.mma_layout_constants()`` when the extension loads, else the fallback copy."""
    ext = extension()
    if ext is None or not hasattr(ext, "mma_layout_constants"):
        return FALLBACK_LAYOUT_CONSTANTS
    return ext.mma_layout_constants()


def __getattr__(name: str) -> Any:
    """MMA_BITS, STEPS, WORDS, TILE_ROWS, MAX_M, FRAG_TAIL, ONE_GROUP_SHIFT: the entries of
    :func:`layout_constants`, kept as plain module attributes after the first read."""
    key = _CONSTANT_NAMES.get(name)
    if key is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = layout_constants()[key]
    globals()[name] = value
    return value


def iteration_k(bits: int) -> int:
    """Inputs per iteration of the kernel: 16 * STEPS[bits]."""
    c = layout_constants()
    return c["step_k"] * c["steps"][bits]


def mma_units(bits: int, group_size: int, k: int) -> int:
    """Units per iteration (MmaDecodeArgs::units) of a ``bits``-wide weight of ``k`` inputs in
    groups of ``group_size``: 1 when a group spans an iteration or covers k, else the groups
    one iteration holds."""
    ik = iteration_k(bits)
    return 1 if group_size >= k else ik // min(ik, group_size)


class MmaWeight(NamedTuple):
    """A packed weight's first ``n`` rows and ``k`` inputs in the fragment-native layout.

    frag: int32 [tiles, iterations, 32, WORDS[bits]] (the codes, zero past n and k), a view of a
    buffer FRAG_TAIL iterations longer;
    params: float32 [tiles, groups, 8, 4]: for lane group g of tile t the rows 16t + g and
    16t + g + 8 as (s, -s * z, s, -s * z); zero past n and past the groups of k.
    """

    frag: torch.Tensor
    params: torch.Tensor
    bits: int
    n: int
    k: int
    tiles: int
    iterations: int
    groups: int
    gshift: int
    units: int

    @property
    def nbytes(self) -> int:
        """Bytes held on the device (the codes with their tail, and the params)."""
        return (self.frag.untyped_storage().nbytes()
                + self.params.numel() * self.params.element_size())


def mma_unsupported_reason(bits: int, group_size: int, k: int) -> Optional[str]:
    """None when the layout holds a weight of this width and grouping, else why not."""
    widths = layout_constants()["bits"]
    if bits not in widths:
        return f"bits must be one of {widths}, got {bits}"
    if group_size >= k:
        return None  # one group covers the inputs (per channel, or a short sliced call)
    if group_size < 32 or group_size & (group_size - 1):
        return (f"the tensor-core decode kernel takes power-of-two group sizes (>= 32) or one "
                f"group per row, got group_size={group_size}")
    return None


def _lane_code_index(bits: int, device: torch.device) -> torch.Tensor:
    """[32, STEPS * 8]: for lane l and entry ((s * 4 + r) * 2 + h) the index of its code in a
    16 x (16 * STEPS) block of one iteration (row * 16 * STEPS + column), from the PTX A
    fragment coordinates (csrc/mma_frag.h: a_row, a_col)."""
    steps = layout_constants()["steps"][bits]
    lane = torch.arange(32).view(32, 1, 1, 1)
    s = torch.arange(steps).view(1, steps, 1, 1)
    r = torch.arange(4).view(1, 1, 4, 1)
    h = torch.arange(2).view(1, 1, 1, 2)
    row = (lane >> 2) + 8 * (r & 1)
    col = 16 * s + 2 * (lane & 3) + h + 8 * (r >> 1)
    return (row * (16 * steps) + col).reshape(32, steps * 8).to(device)


def repack_mma(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
               bits: int, group_size: int, n: int, k: int) -> MmaWeight:
    """The first n rows and k inputs of a canonical packed weight in the fragment-native layout.

    Args:
        qweight: int32 [N >= n, words] (docs/FORMAT.md). scales, zeros: [N, G] (zeros None:
            symmetric, zero point 2^(bits-1)). group_size: codes per scale (the padded row for
            per-channel weights).
    Raises:
        ValueError: for a width or grouping the layout does not hold (mma_unsupported_reason).
    """
    why = mma_unsupported_reason(bits, group_size, k)
    if why is not None:
        raise ValueError(f"repack_mma: {why}")
    if n < 1 or k < 1 or n > qweight.shape[0] or k > qweight.shape[1] * 32 // bits:
        raise ValueError(f"repack_mma: n={n}, k={k} outside the stored weight "
                         f"{tuple(qweight.shape)} of {bits}-bit codes")
    s = scales[:n].to(torch.float32)
    z = None if zeros is None else zeros[:n].to(torch.float32)
    return _repack(lambda r0, r1: unpack_codes(qweight[r0:r1], bits, k), s, z,
                   float(2 ** (bits - 1)), bits, group_size, n, k)


def repack_mma_planes(plane_hi: torch.Tensor, plane_mid: Optional[torch.Tensor],
                      plane_lo: Optional[torch.Tensor], scales: torch.Tensor,
                      zeros: Optional[torch.Tensor], precision: int, group_size: int, n: int,
                      k: int) -> MmaWeight:
    """The r-bit slice of a Matryoshka parent (bit planes, docs/FORMAT.md) in the
    fragment-native layout: W_r = (c_r * 2^(8-r) - z) * s = (c_r - z / 2^(8-r)) * (s * 2^(8-r)),
    so the slice codes c_r are stored as codes of r bits (r = 2, 3, 4) or 8 bits (r = 6, 8)
    with fp32 scale s * 2^(8-r) and zero z / 2^(8-r). Only the planes the slice needs are read
    (the others may be None)."""
    from ..matryoshka.weight import PARENT_BITS, slice_codes_from_planes
    bits = precision if precision in (2, 3, 4) else 8
    why = mma_unsupported_reason(bits, group_size, k)
    if why is not None:
        raise ValueError(f"repack_mma_planes: {why}")
    unit = float(1 << (PARENT_BITS - precision))
    planes = {"plane_hi": plane_hi, "plane_mid": plane_mid, "plane_lo": plane_lo}
    s = scales[:n].to(torch.float32) * unit
    z = None if zeros is None else zeros[:n].to(torch.float32) / unit

    def codes(r0: int, r1: int) -> torch.Tensor:
        rows = {name: (None if p is None else p[r0:r1]) for name, p in planes.items()}
        return slice_codes_from_planes(rows, precision, k)

    return _repack(codes, s, z, float(1 << (PARENT_BITS - 1)) / unit, bits, group_size, n, k)


def _repack(codes_of, s: torch.Tensor, z: Optional[torch.Tensor], symmetric_zero: float,
            bits: int, group_size: int, n: int, k: int) -> MmaWeight:
    """The layout from ``codes_of(r0, r1)`` (int64 [r1 - r0, k], codes of rows r0..r1) and the
    fp32 scales s / zeros z ([n, >= groups]; z None: ``symmetric_zero`` everywhere)."""
    ext = extension()
    c = layout_constants()
    tile_rows = c["tile_rows"]
    device = s.device
    steps, words, ik = c["steps"][bits], c["words"][bits], iteration_k(bits)
    iterations = math.ceil(k / ik)
    kp = iterations * ik
    tiles = math.ceil(n / tile_rows)
    one_group = group_size >= k
    gshift = c["one_group_shift"] if one_group else group_size.bit_length() - 1
    units = mma_units(bits, group_size, k)
    groups = 1 if one_group else math.ceil(kp / group_size)

    index = _lane_code_index(bits, device)
    positions = torch.tensor(ext.mma_code_positions(bits), dtype=torch.int64,
                             device=device).view(steps * 8, bits)
    word_of = (positions // 32).reshape(-1)
    shift_of = (positions % 32).view(1, 1, 1, steps * 8, bits)
    bit_index = torch.arange(bits, device=device, dtype=torch.int64)

    # The kernel prefetches up to FRAG_TAIL iterations past a tile's end: the buffer has them.
    storage = torch.zeros(tiles * iterations + c["frag_tail"], 32, words, dtype=torch.int32,
                          device=device)
    frag = storage[: tiles * iterations].view(tiles, iterations, 32, words)
    chunk_tiles = max(1, _CHUNK_CODE_BITS // (tile_rows * kp * bits))
    for t0 in range(0, tiles, chunk_tiles):
        t1 = min(tiles, t0 + chunk_tiles)
        r0, r1 = t0 * tile_rows, min(n, t1 * tile_rows)
        codes = torch.zeros((t1 - t0) * tile_rows, kp, dtype=torch.int64, device=device)
        codes[: r1 - r0, :k] = codes_of(r0, r1)
        block = (codes.view(t1 - t0, tile_rows, iterations, ik)
                 .permute(0, 2, 1, 3).reshape(t1 - t0, iterations, tile_rows * ik))
        lane_codes = block[:, :, index]                       # [t, it, 32, steps * 8]
        bit_values = ((lane_codes.unsqueeze(-1) >> bit_index) & 1) << shift_of
        packed = torch.zeros(t1 - t0, iterations, 32, words, dtype=torch.int64, device=device)
        packed.index_add_(-1, word_of, bit_values.reshape(t1 - t0, iterations, 32, -1))
        frag[t0:t1] = as_int32_bits(packed)

    used = 1 if one_group else math.ceil(k / group_size)
    s = s[:, :used]
    z = z[:, :used] if z is not None else torch.full_like(s, symmetric_zero)
    pairs = torch.zeros(tiles * tile_rows, groups, 2, dtype=torch.float32, device=device)
    pairs[:n, :used, 0] = s
    pairs[:n, :used, 1] = -(s * z)
    # row 16t + 8 * half + g  ->  params[t, group, g, 2 * half + (0: s, 1: -s z)]
    params = (pairs.view(tiles, 2, 8, groups, 2).permute(0, 3, 2, 1, 4)
              .reshape(tiles, groups, 8, 4).contiguous())
    return MmaWeight(frag, params, bits, n, k, tiles, iterations, groups, gshift, units)


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def mma_call_args(x: torch.Tensor, w: MmaWeight, bias: Optional[torch.Tensor],
                  target: torch.Tensor, accumulate: bool) -> tuple:
    """The arguments of ``qmatmul_cuda_mma`` and ``mma_decode_emulate`` up to ``units``
    (pointers, strides, dtype codes, sizes: ``_C.MMA_DECODE_ARG_NAMES``) for x [M, >= k]
    (stride(-1) == 1) into target [M, n]."""
    return (w.frag.data_ptr(), w.params.data_ptr(), x.data_ptr(), DTYPE_CODES[x.dtype],
            x.stride(0), _ptr(bias), DTYPE_CODES[bias.dtype] if bias is not None else 0,
            target.data_ptr(), DTYPE_CODES[target.dtype], target.stride(0), accumulate,
            x.shape[0], w.n, w.k, w.bits, w.tiles, w.iterations, w.groups, w.gshift, w.units)


def mma_decode_emulate(x: torch.Tensor, w: MmaWeight, bias: Optional[torch.Tensor] = None,
                       out: Optional[torch.Tensor] = None,
                       accumulate: bool = False) -> torch.Tensor:
    """The tensor-core decode kernel replayed on the host (pyengine._C.mma_decode_emulate): out
    (float32 [M, n], allocated when None) (+)= x[:, :k] @ W^T (+ bias). x: CPU float16 / bfloat16
    [M <= 16, >= k]; w: an MmaWeight on the CPU. Returns out."""
    if x.dtype not in (torch.float16, torch.bfloat16) or x.device.type != "cpu":
        raise ValueError(f"mma_decode_emulate: x must be a CPU float16 / bfloat16 tensor, got "
                         f"{x.dtype} on {x.device}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    if out is None:
        out = torch.empty(x.shape[0], w.n, dtype=torch.float32)
    # the emulator takes the kernel's arguments; it writes float32 (out_dtype must say so)
    extension().mma_decode_emulate(*mma_call_args(x, w, bias, out, accumulate))
    return out
