"""The ``cpu`` backend: C++ kernels of pyengine._C (OpenMP, SIMD chosen at run time).

Packed weights run on ``qmatmul_cpu`` (decode paths for small M, a tiled path above; with
``act_bits=8``, integer dot products on int8 activations, csrc/cpu/act8_kernels.cpp); Matryoshka
slices on ``plane_matmul_cpu``, which reads only the bit planes the slice needs; dense weights
(sliced or shortcut calls on unquantized matrices) go to the vendor BLAS through torch on a
strided view, without copying the weight.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

import torch

from .._ext import DTYPE_CODES, extension, extension_error
from ..format.packing import BLOCK_CODES, as_int32_bits, unpack_codes
from ._native import (dense_matmul_blas, packed_kernel_args, packed_weight_args,
                      plane_kernel_call, plane_kernel_unavailable_reason, plane_matmul_cpu,
                      run_native)
from .base import Backend, LinearCase, PackedOperand
from .huge_pages import weight_copy


ISA_VARIABLE = "PYENGINE_CPU_ISA"
# The interleaved decode kernel's run-time switches (read at every call; "0" turns one off,
# "1" on): each environment variable and the pyengine.build_info() key that reports it.
SWITCH_VARIABLES = {"PYENGINE_CPU_ZMM": "cpu_zmm",  # 512-bit vectors (AVX-512 build)
                    "PYENGINE_CPU_VNNI": "cpu_vnni",  # vpdpbusd (AVX-512 build, AVX512_VNNI)
                    "PYENGINE_CPU_VECTOR_PAIRS": "cpu_vector_pairs",  # two streams at M = 1
                    "PYENGINE_CPU_PREFETCH": "cpu_prefetch"}  # prefetch at M = 1 (not zmm)
INTERLEAVE_ROWS = 8  # rows side by side in the row-interleaved layout (QMatmulArgs::interleave)
SPLIT_ROWS = 256  # rows per pass of split_3bit_blocks


def split_3bit_blocks(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """The 3-bit codes of packed rows in the interleaved copy's block layout (docs/FORMAT.md,
    "CPU row-interleaved layout"): int32 [n, W], W = ceil(k / 32) * 3, from canonical 3-bit
    words ``qweight`` int32 [n, >= W]. Each block of 32 codes c = 16t + 4i + p (t < 2, i < 4,
    p < 4) keeps its three words, now: word t (t = 0, 1) the low two bits of codes 16t .. 16t +
    15 at bits [2(4i + p), 2(4i + p) + 2) (the 2-bit packing), word 2 their high bits, that of
    code c at bit 8i + 2t + (p & 1) + 4(p >> 1), so that the decode kernel can merge a low
    word's fields and the high bits into nibbles with one shift of each (act8_kernels.cpp,
    rows8_nibbles3). Rows are converted SPLIT_ROWS at a time (the codes as int64 of a whole
    large weight would take 8 bytes per weight)."""
    n = qweight.shape[0]
    blocks = -(-k // BLOCK_CODES)
    field = torch.arange(16, dtype=torch.int64)          # 4i + p within a low word
    t = torch.arange(2, dtype=torch.int64).unsqueeze(-1)
    i, p = field // 4, field % 4
    high_bit = 8 * i + 2 * t + (p & 1) + 4 * (p >> 1)    # [2, 16]: bit of code 16t + 4i + p
    out = torch.empty(n, 3 * blocks, dtype=torch.int32)
    for r0 in range(0, n, SPLIT_ROWS):
        codes = unpack_codes(qweight[r0:r0 + SPLIT_ROWS, : 3 * blocks], 3)
        codes = codes.reshape(-1, blocks, 2, 16)
        low = ((codes & 3) << (2 * field)).sum(-1)       # [rows, blocks, 2]: words 0 and 1
        high = ((codes >> 2) << high_bit).sum((-2, -1))  # [rows, blocks]: word 2
        words = torch.cat([low, high.unsqueeze(-1)], -1).reshape(-1, 3 * blocks)
        out[r0:r0 + SPLIT_ROWS] = as_int32_bits(words)
    return out


def interleave_rows(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                    n: int, k: int, bits: int) -> tuple:
    """The first ``n`` rows of a packed weight in the CPU row-interleaved layout (csrc/common.h,
    docs/FORMAT.md): (words int32 [n / 8, W, 8], scales [n / 8, G, 8], zeros like scales or
    None), W = ceil(k / 32) * bits words per row (the words past them, padding of the stored
    rows, are left out so that a call reads one unbroken stream), G the stored groups. Word w of
    row 8o + r is words[o, w, r]: that of the packed row for 2, 4 and 8 bits, of
    :func:`split_3bit_blocks` for 3 bits; n must be a multiple of 8."""
    if n % INTERLEAVE_ROWS:
        raise ValueError(f"interleave_rows: {n} rows are not a multiple of {INTERLEAVE_ROWS}")
    words = -(-k // 32) * bits
    rows = split_3bit_blocks(qweight[:n], k) if bits == 3 else qweight

    def side_by_side(t: torch.Tensor, cols: int) -> torch.Tensor:
        return (t[:n, :cols].reshape(n // INTERLEAVE_ROWS, INTERLEAVE_ROWS, cols)
                .transpose(1, 2).contiguous())

    groups = scales.shape[1]
    return (side_by_side(rows, words), side_by_side(scales, groups),
            None if zeros is None else side_by_side(zeros, groups))


@functools.lru_cache(maxsize=None)
def interleaved_bits(isa: str) -> tuple:
    """The code widths whose decode calls the ``isa`` build runs on the row-interleaved layout
    (``pyengine.build_info()["cpu_interleaved_bits"]``, fixed for the process); () for a build
    this CPU cannot run."""
    ext = extension()
    served = ext.build_info().get("cpu_interleaved_bits", {}) if ext is not None else {}
    return tuple(served.get(isa, ()))


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, isa: Optional[str] = None) -> None:
        # isa: "" picks the widest instruction set of this CPU; tests name each one. None: the
        # environment variable PYENGINE_CPU_ISA (e.g. avx2, to measure that build on a CPU with
        # AVX-512), else "".
        self.isa = os.environ.get(ISA_VARIABLE, "").strip() if isa is None else isa

    @functools.lru_cache(maxsize=None)
    def unavailable_reason(self) -> Optional[str]:
        ext = extension()
        if ext is None:
            return f"pyengine._C is not available ({extension_error()})"
        if self.isa:
            usable = ext.build_info().get("cpu_isas_usable", [])
            if self.isa not in usable:
                source = f"{ISA_VARIABLE}={self.isa}" if self.isa == os.environ.get(
                    ISA_VARIABLE, "").strip() else f"isa {self.isa!r}"
                why = (f"{source}: this CPU and build run the instruction sets "
                       f"{', '.join(usable)}")
                warnings.warn(f"pyengine: the cpu backend is off ({why})", stacklevel=2)
                return why
        return None

    def unsupported_reason(self, case: LinearCase) -> Optional[str]:
        if case.device_type != "cpu":
            return f"the cpu backend runs CPU tensors only, got device {case.device_type}"
        if case.dtype not in DTYPE_CODES:
            return f"unsupported activation dtype {case.dtype}"
        if case.kind == "planes":
            return plane_kernel_unavailable_reason()
        return None

    def priority(self, case: LinearCase) -> float:
        return 10.0

    def native_act_bits(self, weight, act_bits):
        # qmatmul_cpu quantizes the activations itself: integer dot products for 2-, 3-, 4- and
        # 8-bit weights at decode sizes, the exact kernels on the quantized activations otherwise
        return isinstance(weight, PackedOperand)

    def selected_isa(self) -> str:
        """The instruction-set build this backend's calls run."""
        ext = extension()
        return self.isa or (ext.build_info().get("cpu_isa_selected", "") if ext else "")

    def interleaves(self, weight, n, act_bits) -> bool:
        """Whether :meth:`bind` prepares ``weight`` in the row-interleaved layout: int8
        activations on packed weights with a multiple of 8 rows, at a width whose decode calls
        this backend's build runs on that layout (``build_info()["cpu_interleaved_bits"]``: 2,
        3, 4 and 8 bits in every x86 build, the generic one included; none in the generic
        build elsewhere, where the copy would only be read back in the canonical layout)."""
        if act_bits != 8 or not isinstance(weight, PackedOperand) or n % INTERLEAVE_ROWS:
            return False
        return weight.bits in interleaved_bits(self.selected_isa())

    def bind(self, weight, n, k, bias, act_bits=0, dtype=torch.float32, layout_copy=True):
        if not isinstance(weight, PackedOperand):
            return None
        ext = extension()
        if bias is not None:
            bias = bias.contiguous()
        interleave = (INTERLEAVE_ROWS if layout_copy and self.interleaves(weight, n, act_bits)
                      else 0)
        prepared, canonical = (), {}
        wargs = packed_weight_args(weight)  # the weight's own rows
        if interleave:
            # decode reads the rows in eights side by side: a copy in that layout
            # (in huge pages where the OS has them: the decode kernel streams it, huge_pages.py)
            prepared = tuple(None if t is None else weight_copy(t) for t in interleave_rows(
                weight.qweight, weight.scales, weight.zeros, n, k, weight.bits))
            # the weight's own rows, for the calls the interleaved kernel does not serve (prefill
            # sizes): read in place instead of converted back per call
            q_ptr, ldq, s_ptr, z_ptr, _, lds = wargs
            canonical = dict(canonical_qweight=q_ptr, canonical_ldq=ldq, canonical_scales=s_ptr,
                             canonical_zeros=z_ptr, canonical_lds=lds)
            words, scales, zeros = prepared
            wargs = (words.data_ptr(), words.shape[1], scales.data_ptr(),
                     0 if zeros is None else zeros.data_ptr(), DTYPE_CODES[scales.dtype],
                     scales.shape[1])
        code = DTYPE_CODES[dtype]
        call = ext.QMatmulCall(*wargs, 0 if bias is None else bias.data_ptr(),
                               DTYPE_CODES[bias.dtype] if bias is not None else 0, code, code,
                               n, k, weight.bits, weight.group_size, self.isa, act_bits,
                               interleave, **canonical)
        get_threads = torch.get_num_threads

        def kernel(x, target, accumulate, threads=None):
            # x, target: [M, k] / [M, n] in dtype, rows contiguous (any row stride); threads:
            # at most this many (default: torch's)
            call(x.data_ptr(), x.stride(0), target.data_ptr(), target.stride(0), x.shape[0],
                 accumulate, get_threads() if threads is None else threads)

        kernel.native_call = call  # what a decode-step program records (decoder.py)
        kernel.keep = (weight, bias, prepared)  # the memory the pointers in `call` read
        # memory the prepared call holds besides the weight itself
        kernel.prepared_bytes = sum(t.numel() * t.element_size() for t in prepared
                                    if t is not None)
        # weight bytes one decode-size call streams: the interleaved copy where it holds one,
        # else the packed codes, scales and zeros (for bandwidth figures, profile_decode_step)
        kernel.decode_weight_bytes = kernel.prepared_bytes or sum(
            t.numel() * t.element_size() for t in (weight.qweight, weight.scales, weight.zeros)
            if t is not None)
        return kernel

    def matmul(self, x, weight, n, k, bias, residual, shortcut, out=None, act_bits=0):
        if isinstance(weight, torch.Tensor):
            return dense_matmul_blas(x, weight, n, k, bias, residual, shortcut, out)
        threads, isa = torch.get_num_threads(), self.isa
        if isinstance(weight, PackedOperand):
            ext = extension()

            def launch(target, accumulate):  # num_threads, isa, act_bits by position (cheaper)
                ext.qmatmul_cpu(*packed_kernel_args(x, weight, bias, target, accumulate, n, k),
                                threads, isa, act_bits)

            return run_native(launch, x, n, residual, shortcut, out, accumulates=True)

        kernel = functools.partial(plane_matmul_cpu, isa=isa, num_threads=threads)
        return run_native(lambda target, _: plane_kernel_call(kernel, x, weight, bias, target, n,
                                                              k),
                          x, n, residual, shortcut, out, accumulates=False)
