"""The positional argument lists of pyengine._C's kernels (csrc/kernel_args.h), without a GPU.

The bound functions take the lists _C exports by name (QMATMUL_ARG_NAMES, PLANE_ARG_NAMES,
MMA_DECODE_ARG_NAMES, QMatmulCall's QMATMUL_BOUND_ARG_NAMES and QMATMUL_PER_CALL_ARG_NAMES), and
the Python code that builds those arguments as plain tuples per call (pyengine/backends/
_native.py, cpu.py, cuda_layout.py) puts each value where its name says: every builder runs on
tensors whose pointers, strides, sizes and dtype codes tell the arguments apart, and its tuple,
read through _C's names, must hold what each name means. Also: the fragment-native layout's sizes
cuda_layout.py falls back on equal _C's, and the cuda backend's per-operand answer whether its
tensor-core decode kernel takes a weight is cached without hiding the checks of x.
"""

from __future__ import annotations

import re
import types
from typing import List

import pytest
import torch

from pyengine._ext import DTYPE_CODES, extension
from pyengine.backends import cpu as cpu_module
from pyengine.backends import cuda as cuda_module
from pyengine.backends import cuda_layout
from pyengine.backends._native import _plane_pointer_args, packed_kernel_args
from pyengine.backends.base import PackedOperand
from pyengine.backends.cpu import CpuBackend
from pyengine.backends.cuda_layout import MmaWeight, mma_call_args

EXT = extension()
pytestmark = pytest.mark.skipif(EXT is None or not hasattr(EXT, "QMATMUL_ARG_NAMES"),
                                reason="pyengine._C (with its argument lists) is not built")

# Two assignments of dtype codes to (x, scales, bias, out) under which no two of these
# arguments hold the same code in both: a swap of two of them shows in one case or the other.
DTYPE_CASES = [(torch.float16, torch.float32, torch.bfloat16, torch.float32),
               (torch.bfloat16, torch.float16, torch.float32, torch.bfloat16)]


def _parameters(fn) -> List[str]:
    """The parameter names of a bound function or method, from the signature pybind11 writes
    on the first line of its docstring."""
    first = fn.__doc__.splitlines()[0]
    signature = first[first.index("(") + 1:first.rindex(") ->")]
    return re.findall(r"(?:^|, )(\w+):", signature)


def _typed(values) -> list:
    """(type, value) pairs: True and 1 differ."""
    return [(type(v), v) for v in values]


def _check_by_name(names, values, expected: dict) -> None:
    assert len(values) == len(names)
    assert list(names) == list(expected), "the expectation names every argument in order"
    got = dict(zip(names, _typed(values)))
    want = dict(zip(expected, _typed(expected.values())))
    wrong = {name: (got[name], want[name]) for name in names if got[name] != want[name]}
    assert not wrong, f"arguments out of place (got, want): {wrong}"


def test_bound_functions_take_the_exported_lists():
    """Every kernel binding's parameters are its list's names (then its own trailing ones);
    the emulator takes the kernel's list as it is."""
    qmatmul, plane = list(EXT.QMATMUL_ARG_NAMES), list(EXT.PLANE_ARG_NAMES)
    mma = list(EXT.MMA_DECODE_ARG_NAMES)
    bound, per_call = list(EXT.QMATMUL_BOUND_ARG_NAMES), list(EXT.QMATMUL_PER_CALL_ARG_NAMES)
    assert _parameters(EXT.qmatmul_cpu) == qmatmul + ["num_threads", "isa", "act_bits",
                                                      "interleave"]
    assert _parameters(EXT.plane_matmul_cpu) == plane + ["num_threads", "isa"]
    assert _parameters(EXT.mma_decode_emulate) == mma
    assert _parameters(EXT.QMatmulCall.__init__) == ["self"] + bound + [
        "isa", "act_bits", "interleave", "canonical_qweight", "canonical_ldq", "canonical_scales",
        "canonical_zeros", "canonical_lds"]
    assert _parameters(EXT.QMatmulCall.__call__) == ["self"] + per_call + ["num_threads"]
    assert _parameters(EXT.StepProgram.add_call) == ["self", "call"] + per_call
    if hasattr(EXT, "qmatmul_cuda"):
        assert _parameters(EXT.qmatmul_cuda) == qmatmul + ["device", "stream", "kernel"]
        assert _parameters(EXT.plane_matmul_cuda) == plane + ["device", "stream", "kernel"]
        assert _parameters(EXT.qmatmul_cuda_mma) == mma + ["device", "stream"]
    # QMatmulCall splits qmatmul_cpu's arguments into the bound ones and the per-call ones
    assert sorted(bound + per_call) == sorted(qmatmul)
    assert "out_dtype" in mma


@pytest.mark.parametrize("dtypes", DTYPE_CASES, ids=("case0", "case1"))
@pytest.mark.parametrize("with_bias", (True, False))
def test_packed_kernel_args_follow_qmatmul_arg_names(dtypes, with_bias):
    x_dtype, s_dtype, b_dtype, o_dtype = dtypes
    qweight = torch.zeros(48, 12, dtype=torch.int32)          # ldq 12
    scales = torch.zeros(48, 5, dtype=s_dtype)[:, :3]         # lds 5
    zeros = torch.zeros(48, 5, dtype=s_dtype)[:, :3]
    w = PackedOperand(qweight, scales, zeros, 4, 32)
    x = torch.zeros(2, 100, dtype=x_dtype)[:, :96]            # M 2, ldx 100
    target = torch.zeros(2, 44, dtype=o_dtype)[:, :40]        # ldo 44
    bias = torch.zeros(40, dtype=b_dtype) if with_bias else None
    args = packed_kernel_args(x, w, bias, target, True, 40, 96)
    _check_by_name(EXT.QMATMUL_ARG_NAMES, args, dict(
        x=x.data_ptr(), x_dtype=DTYPE_CODES[x_dtype], ldx=100, qweight=qweight.data_ptr(),
        ldq=12, scales=scales.data_ptr(), zeros=zeros.data_ptr(), sz_dtype=DTYPE_CODES[s_dtype],
        lds=5, bias=bias.data_ptr() if with_bias else 0,
        bias_dtype=DTYPE_CODES[b_dtype] if with_bias else 0, out=target.data_ptr(),
        out_dtype=DTYPE_CODES[o_dtype], ldo=44, accumulate=True, M=2, N=40, K=96, bits=4,
        group_size=32))


@pytest.mark.parametrize("dtypes", DTYPE_CASES, ids=("case0", "case1"))
def test_plane_args_follow_plane_arg_names(dtypes):
    x_dtype, s_dtype, b_dtype, _ = dtypes
    hi = torch.zeros(48, 10, dtype=torch.int32)[:, :9]        # ld_hi 10
    mid = torch.zeros(48, 7, dtype=torch.int32)[:, :6]        # ld_mid 7
    lo = torch.zeros(48, 11, dtype=torch.int32)[:, :9]        # ld_lo 11
    scales = torch.zeros(48, 5, dtype=s_dtype)[:, :3]         # lds 5
    zeros = torch.zeros(48, 5, dtype=s_dtype)[:, :3]
    x = torch.zeros(3, 100, dtype=x_dtype)[:, :96]            # M 3, ldx 100
    bias = torch.zeros(40, dtype=b_dtype)
    out, args = _plane_pointer_args("plane_matmul_cpu", "cpu", x, hi, mid, lo, scales, zeros,
                                    bias, 8, 32, 40, 96, None)
    # out is allocated contiguous: ldo = N
    _check_by_name(EXT.PLANE_ARG_NAMES, args, dict(
        x=x.data_ptr(), x_dtype=DTYPE_CODES[x_dtype], ldx=100, plane_hi=hi.data_ptr(), ld_hi=10,
        plane_mid=mid.data_ptr(), ld_mid=7, plane_lo=lo.data_ptr(), ld_lo=11,
        scales=scales.data_ptr(), zeros=zeros.data_ptr(), sz_dtype=DTYPE_CODES[s_dtype], lds=5,
        bias=bias.data_ptr(), bias_dtype=DTYPE_CODES[b_dtype], out=out.data_ptr(),
        out_dtype=DTYPE_CODES[x_dtype], ldo=40, M=3, N=40, K=96, precision=8, group_size=32))


@pytest.mark.parametrize("dtypes", DTYPE_CASES, ids=("case0", "case1"))
def test_mma_call_args_follow_mma_decode_arg_names(dtypes):
    x_dtype, _, b_dtype, o_dtype = dtypes
    w = MmaWeight(frag=torch.zeros(4, dtype=torch.int32), params=torch.zeros(4), bits=4, n=150,
                  k=384, tiles=10, iterations=6, groups=12, gshift=5, units=2)
    x = torch.zeros(3, 400, dtype=x_dtype)[:, :384]           # M 3, ldx 400
    target = torch.zeros(3, 160, dtype=o_dtype)[:, :150]      # ldo 160
    bias = torch.zeros(150, dtype=b_dtype)
    args = mma_call_args(x, w, bias, target, True)
    _check_by_name(EXT.MMA_DECODE_ARG_NAMES, args, dict(
        frag=w.frag.data_ptr(), params=w.params.data_ptr(), x=x.data_ptr(),
        x_dtype=DTYPE_CODES[x_dtype], ldx=400, bias=bias.data_ptr(),
        bias_dtype=DTYPE_CODES[b_dtype], out=target.data_ptr(), out_dtype=DTYPE_CODES[o_dtype],
        ldo=160, accumulate=True, M=3, N=150, K=384, bits=4, tiles=10, iterations=6, groups=12,
        gshift=5, units=2))


def test_cpu_bind_follows_the_qmatmul_call_lists(monkeypatch):
    """CpuBackend.bind's QMatmulCall arguments, and those of each call of the kernel it
    returns, through a stand-in QMatmulCall that records them."""
    class Recorder:
        def __init__(self, *args):
            self.bound, self.calls = args, []

        def __call__(self, *args):
            self.calls.append(args)

    monkeypatch.setattr(cpu_module, "extension", lambda: types.SimpleNamespace(
        QMatmulCall=Recorder))
    qweight = torch.zeros(48, 12, dtype=torch.int32)
    scales = torch.zeros(48, 5, dtype=torch.bfloat16)[:, :3]
    zeros = torch.zeros(48, 5, dtype=torch.bfloat16)[:, :3]
    bias = torch.zeros(40)
    kernel = CpuBackend(isa="avx9").bind(PackedOperand(qweight, scales, zeros, 4, 32), 40, 96,
                                         bias, dtype=torch.float16)
    call = kernel.native_call
    _check_by_name(EXT.QMATMUL_BOUND_ARG_NAMES + ("isa", "act_bits", "interleave"), call.bound,
                   dict(qweight=qweight.data_ptr(), ldq=12, scales=scales.data_ptr(),
                        zeros=zeros.data_ptr(), sz_dtype=2, lds=5, bias=bias.data_ptr(),
                        bias_dtype=0, x_dtype=1, out_dtype=1, N=40, K=96, bits=4, group_size=32,
                        isa="avx9", act_bits=0, interleave=0))
    x = torch.zeros(3, 100, dtype=torch.float16)[:, :96]
    target = torch.zeros(3, 44, dtype=torch.float16)[:, :40]
    kernel(x, target, True, threads=7)
    _check_by_name(EXT.QMATMUL_PER_CALL_ARG_NAMES + ("num_threads",), call.calls[0],
                   dict(x=x.data_ptr(), ldx=100, out=target.data_ptr(), ldo=44, M=3,
                        accumulate=True, num_threads=7))


def test_emulator_takes_the_kernel_arguments_and_writes_float32():
    """mma_decode_emulate takes qmatmul_cuda_mma's list whole (no argument dropped on the
    way); its output is float32, and another out_dtype is refused."""
    k, n = 64, 16
    mw = cuda_layout.repack_mma(torch.zeros(n, k * 4 // 32, dtype=torch.int32),
                                torch.ones(n, 1), None, 4, k, n, k)
    x = torch.ones(1, k, dtype=torch.float16)
    out = torch.full((1, n), float("nan"))
    cuda_layout.mma_decode_emulate(x, mw, out=out)  # codes 0, symmetric zero 8: -8 * k each
    assert torch.equal(out, torch.full((1, n), -8.0 * k))
    args = dict(zip(EXT.MMA_DECODE_ARG_NAMES, mma_call_args(x, mw, None, out, False)))
    with pytest.raises(ValueError, match="writes float32"):
        EXT.mma_decode_emulate(**{**args, "out_dtype": DTYPE_CODES[torch.float16]})


def test_layout_constants_fallback_matches_the_extension(monkeypatch):
    """cuda_layout's own copy of the layout's sizes (used when _C is missing) equals
    _C.mma_layout_constants(), which cuda_layout reads when _C loads; its module constants
    come from there."""
    assert EXT.mma_layout_constants() == cuda_layout.FALLBACK_LAYOUT_CONSTANTS
    assert cuda_layout.layout_constants() == cuda_layout.FALLBACK_LAYOUT_CONSTANTS
    c = cuda_layout.layout_constants()
    assert (cuda_layout.STEPS, cuda_layout.WORDS, cuda_layout.FRAG_TAIL) == (
        c["steps"], c["words"], c["frag_tail"])
    assert (cuda_layout.MMA_BITS, cuda_layout.TILE_ROWS, cuda_layout.MAX_M,
            cuda_layout.ONE_GROUP_SHIFT) == (c["bits"], c["tile_rows"], c["max_m"],
                                             c["one_group_shift"])
    with pytest.raises(AttributeError):
        cuda_layout.NO_SUCH_CONSTANT
    # without the extension: the fallback copy
    monkeypatch.setattr(cuda_layout, "extension", lambda: None)
    assert cuda_layout.layout_constants.__wrapped__() is cuda_layout.FALLBACK_LAYOUT_CONSTANTS
    # the units per iteration the kernel's instantiations serve at group size 128
    assert {b: cuda_layout.mma_units(b, 128, 4096) for b in (2, 3, 4, 8)} == {
        2: 2, 3: 2, 4: 1, 8: 1}
    assert cuda_layout.mma_units(3, 128, 128) == 1      # one group covers k


def test_mma_refusal_caches_the_operand_part(monkeypatch):
    """The answer that depends on the weight and k is worked out once per operand and k;
    the checks of x (M, dtype) and of the extension still run at every call."""
    monkeypatch.setattr(cuda_module, "extension", lambda: types.SimpleNamespace())
    asked = []

    def counting(bits, group_size, k):
        asked.append((bits, group_size, k))
        return cuda_layout.mma_unsupported_reason(bits, group_size, k)

    monkeypatch.setattr(cuda_module, "mma_unsupported_reason", counting)
    qweight = torch.zeros(32, 512 * 4 // 32, dtype=torch.int32)
    odd = PackedOperand(qweight, torch.ones(32, 6), None, 4, 96)
    x = torch.zeros(1, 512, dtype=torch.float16)
    for _ in range(3):
        assert "power-of-two" in cuda_module.mma_refusal(x, odd, 32, 512)
    assert asked == [(4, 96, 512)]
    # one group covers k = 96: the weight is served, this (stand-in) build lacks the kernel
    assert "built without it" in cuda_module.mma_refusal(x, odd, 32, 96)
    assert len(asked) == 2
    # x's checks come first, whatever is cached
    assert "M <= 16" in cuda_module.mma_refusal(torch.zeros(17, 512).half(), odd, 32, 512)
    assert "float16 / bfloat16" in cuda_module.mma_refusal(torch.zeros(1, 512), odd, 32, 512)
    good = PackedOperand(qweight, torch.ones(32, 4), None, 4, 128)
    for _ in range(2):
        assert "built without it" in cuda_module.mma_refusal(x, good, 32, 512)
    assert len(asked) == 3
