"""The CPU row-interleaved layout (QMatmulArgs::interleave = 8): the layout itself, qmatmul_cpu on
it on every instruction-set build (the decode kernel for int8 activations at M <= 8, a canonical
copy everywhere else) against the reference product, and the prepared calls of bind_linear that
use it (with the weight's canonical rows for the other calls)."""

from __future__ import annotations

import itertools
import platform

import pytest
import torch

import pyengine
from pyengine import ops
from pyengine._ext import DTYPE_CODES, extension
from pyengine.backends import CpuBackend, get_backend
from pyengine.backends.cpu import (INTERLEAVE_ROWS, SWITCH_VARIABLES, interleave_rows,
                                  split_3bit_blocks)
from pyengine.format.packing import pack_codes, unpack_codes
from pyengine.ops.act_quant import quantize_activations

from helpers import BITS, DTYPES, assert_matches, packed_operand, poisoned, random_weight

pytestmark = pytest.mark.skipif(get_backend("cpu").unavailable_reason() is not None,
                                reason="pyengine._C (the cpu backend) is not built")

USABLE_ISAS = pyengine.build_info().get("cpu_isas_usable", [])


def test_interleave_rows_puts_eight_rows_side_by_side(rng):
    qw = pyengine.quantize(random_weight(16, 200, rng), 4, 64, clip_search=False)
    words, scales, zeros = interleave_rows(qw.qweight, qw.scales, qw.zeros, 16, 200, 4)
    assert words.shape == (2, 7 * 4, 8)      # ceil(200 / 32) blocks of 4 words; padding left out
    assert scales.shape == zeros.shape == (2, qw.scales.shape[1], 8)
    for n, w in itertools.product(range(16), range(words.shape[1])):
        assert words[n // 8, w, n % 8] == qw.qweight[n, w]
    for n, g in itertools.product(range(16), range(qw.scales.shape[1])):
        assert scales[n // 8, g, n % 8] == qw.scales[n, g]
        assert zeros[n // 8, g, n % 8] == qw.zeros[n, g]
    with pytest.raises(ValueError, match="multiple of 8"):
        interleave_rows(qw.qweight[:12], qw.scales[:12], qw.zeros[:12], 12, 200, 4)


def test_3bit_rows_are_split_into_low_and_high_bit_words(rng, monkeypatch):
    """Each block of 32 3-bit codes c = 16t + 4i + p: words t = 0, 1 hold the low two bits of
    codes 16t + f at bits 2f, word 2 the high bit of code c at bit 8i + 2t + (p & 1) +
    4(p >> 1); interleave_rows interleaves those words (rows converted a few at a time)."""
    monkeypatch.setattr(pyengine.backends.cpu, "SPLIT_ROWS", 5)
    k = 200                                   # 7 blocks, the last one padded
    qw = pyengine.quantize(random_weight(16, k, rng), 3, 32, clip_search=False)
    codes = unpack_codes(qw.qweight, 3)       # [16, 224]
    split = split_3bit_blocks(qw.qweight, k)
    assert split.shape == (16, 7 * 3) and split.dtype == torch.int32
    bits = split.to(torch.int64) & 0xFFFFFFFF
    for n, c in itertools.product(range(16), range(224)):
        block, t, i, p = c // 32, c % 32 // 16, c % 16 // 4, c % 4
        low = int(bits[n, 3 * block + t]) >> 2 * (4 * i + p) & 3
        high = int(bits[n, 3 * block + 2]) >> 8 * i + 2 * t + (p & 1) + 4 * (p >> 1) & 1
        assert low | high << 2 == codes[n, c], (n, c)
    words, _, _ = interleave_rows(qw.qweight, qw.scales, qw.zeros, 16, k, 3)
    assert words.shape == (2, 7 * 3, 8)
    for n, w in itertools.product(range(16), range(words.shape[1])):
        assert words[n // 8, w, n % 8] == split[n, w]


def _interleaved_call(x, qw, n, k, out, act_bits, isa, bias=None, accumulate=False, threads=0):
    words, scales, zeros = interleave_rows(qw.qweight, qw.scales, qw.zeros, n, k, qw.bits)
    extension().qmatmul_cpu(
        x.data_ptr(), DTYPE_CODES[x.dtype], x.stride(0), words.data_ptr(), words.shape[1],
        scales.data_ptr(), 0 if zeros is None else zeros.data_ptr(), DTYPE_CODES[scales.dtype],
        scales.shape[1], 0 if bias is None else bias.data_ptr(),
        DTYPE_CODES[bias.dtype] if bias is not None else 0, out.data_ptr(),
        DTYPE_CODES[out.dtype], out.stride(0), accumulate, x.shape[0], n, k, qw.bits,
        qw.effective_group_size, threads, isa, act_bits, INTERLEAVE_ROWS)


@pytest.mark.parametrize("isa", USABLE_ISAS)
@pytest.mark.parametrize("bits", BITS)
def test_qmatmul_on_interleaved_rows_matches_the_reference(isa, bits, rng):
    """bits x group x scale dtype x symmetry, odd K, M from decode sizes (the interleaved
    kernel with int8 activations) to prefill sizes (a canonical copy), fp32 activations too,
    bias and accumulation, into NaN-poisoned outputs."""
    cases = itertools.product((32, 64, 128, -1), DTYPES, (False, True))
    for case, (group_size, dtype, symmetric) in enumerate(cases):
        n, k = ((24, 200), (40, 576), (8, 1000))[case % 3]
        qw = pyengine.quantize(random_weight(n, k, rng), bits, group_size, symmetric=symmetric,
                               scale_dtype=dtype, clip_search=False)
        dense = qw.dequantize(torch.float32)
        for m, act_bits in ((1, 8), (3, 8), (8, 8), (12, 8), (1, 0)):
            x = (torch.randn(m, k, generator=rng) * 2).to(dtype)
            bias = torch.randn(n, generator=rng).to(dtype) if m % 2 else None
            xq = quantize_activations(x.float()) if act_bits else x.float()
            want = xq @ dense.T + (0 if bias is None else bias.float())
            what = f"{isa} {bits}-bit g{group_size} {dtype} sym={symmetric} M={m} a{act_bits}"
            out = poisoned((m, n), dtype, "cpu")
            _interleaved_call(x, qw, n, k, out, act_bits, isa, bias)
            assert_matches(out.float(), want, dtype, what)
            if m == 3:  # accumulating into the output
                start = torch.randn(m, n, generator=rng).to(dtype)
                acc = start.clone()
                _interleaved_call(x, qw, n, k, acc, act_bits, isa, bias, accumulate=True)
                assert_matches(acc.float(), want + start.float(), dtype, what + " accumulate")


def test_interleaved_rows_must_be_a_multiple_of_eight(rng):
    qw = pyengine.quantize(random_weight(16, 64, rng), 4, 32, clip_search=False)
    x, out = torch.randn(1, 64), torch.empty(1, 12)
    with pytest.raises(ValueError, match="multiple of the row interleave"):
        extension().qmatmul_cpu(x.data_ptr(), 0, 64, qw.qweight.data_ptr(), 8,
                                qw.scales.data_ptr(), qw.zeros.data_ptr(), 0, 2, 0, 0,
                                out.data_ptr(), 0, 12, False, 1, 12, 64, 4, 32, 0, "", 8, 8)


def test_a_prepared_qmatmul_call_checks_what_it_binds(rng):
    """_C.QMatmulCall raises on a bad weight description when it is made, not at a call."""
    qw = pyengine.quantize(random_weight(12, 64, rng), 4, 32, clip_search=False)

    def make(n=12, bits=4, interleave=0, act_bits=0):
        return extension().QMatmulCall(qw.qweight.data_ptr(), 8, qw.scales.data_ptr(),
                                       qw.zeros.data_ptr(), 0, 2, 0, 0, 0, 0, n, 64, bits, 32,
                                       "", act_bits, interleave)

    x, out = torch.randn(2, 64), poisoned((2, 12), torch.float32, "cpu")
    make()(x.data_ptr(), 64, out.data_ptr(), 12, 2, False, 1)
    assert_matches(out, ops.qlinear(x, qw, backend="torch"), torch.float32, "QMatmulCall")
    with pytest.raises(ValueError, match="multiple of the row interleave"):
        make(interleave=8)
    with pytest.raises(ValueError, match="bits must be"):
        make(bits=5)
    with pytest.raises(ValueError, match="act_bits must be"):
        make(act_bits=4)


# per usable build, the code widths its own decode kernel serves on interleaved rows
INTERLEAVED_BITS = pyengine.build_info().get("cpu_interleaved_bits", {})


def test_every_x86_build_has_an_interleaved_decode_kernel():
    """Every x86 build serves every width on interleaved rows (the generic build by SSE2); the
    generic build elsewhere none."""
    for isa in USABLE_ISAS:
        want = [2, 3, 4, 8]
        if isa == "generic" and platform.machine().lower() not in ("x86_64", "amd64"):
            want = []
        assert INTERLEAVED_BITS[isa] == want, isa


@pytest.mark.parametrize("isa", USABLE_ISAS)
def test_bound_int8_activation_calls_use_the_interleaved_layout(isa, rng):
    """bind_linear with act_bits=8 prepares the interleaved copy where the build's decode kernel
    reads it (and says how many bytes it holds); its calls equal qlinear's, at decode and
    prefill M; rows that are not a multiple of 8, and widths the build does not serve there
    (every width in the generic build off x86-64), keep the canonical layout."""
    backend = CpuBackend(isa=isa)
    for bits, n in ((4, 48), (8, 40), (2, 16), (3, 24), (4, 20)):
        k = 300
        qw = pyengine.quantize(random_weight(n, k, rng), bits, 64, clip_search=False,
                               scale_dtype=torch.float16)
        bias = torch.randn(n, generator=rng)
        kernel = backend.bind(packed_operand(qw), n, k, bias, act_bits=8)
        interleaved = n % 8 == 0 and bits in INTERLEAVED_BITS[isa]
        assert (kernel.prepared_bytes > 0) == interleaved, (bits, n)
        packed_bytes = sum(t.numel() * t.element_size() for t in (qw.qweight, qw.scales, qw.zeros)
                           if t is not None)
        # the interleaved copy holds the same codes, scales and zeros, rows padded to eights
        assert kernel.decode_weight_bytes == (kernel.prepared_bytes if interleaved
                                              else packed_bytes), (bits, n)
        if interleaved:
            assert kernel.prepared_bytes >= packed_bytes, (bits, n)
        for m in (1, 5, 11):
            x = torch.randn(m, k, generator=rng)
            out = poisoned((m, n), torch.float32, "cpu")
            kernel(x, out, False)
            want = ops.qlinear(x, qw, bias, act_bits=8, backend="torch")
            assert_matches(out, want, torch.float32, f"{isa} bound {bits}-bit N={n} M={m}")


@pytest.mark.parametrize("isa", [i for i in USABLE_ISAS if INTERLEAVED_BITS.get(i)])
def test_bound_calls_off_the_decode_kernel_read_the_canonical_rows(isa, rng):
    """A prepared interleaved call hands the calls its decode kernel does not serve (M > 8) the
    weight's own canonical rows instead of converting the interleaved copy back on each call:
    with the copy overwritten, the decode sizes go wrong and the prefill sizes stay right, both
    when called and when run by a StepProgram on two threads (whose row slices shift the
    canonical rows as well)."""
    backend = CpuBackend(isa=isa)
    ext = extension()
    for bits in INTERLEAVED_BITS[isa]:
        n, k = 40, 300
        qw = pyengine.quantize(random_weight(n, k, rng), bits, 64, clip_search=False)
        bias = torch.randn(n, generator=rng)
        kernel = backend.bind(packed_operand(qw), n, k, bias, act_bits=8)
        words = kernel.keep[2][0]
        assert words.data_ptr() != qw.qweight.data_ptr()
        words.fill_(-1)                                    # every interleaved code at its top
        for m, program in itertools.product((1, 11), (False, True)):
            x = torch.randn(m, k, generator=rng)
            out = poisoned((m, n), torch.float32, "cpu")
            if program:
                step = ext.StepProgram()
                step.add_call(kernel.native_call, x.data_ptr(), k, out.data_ptr(), n, m, False)
                step.run(0, 2, False)
            else:
                kernel(x, out, False)
            want = ops.qlinear(x, qw, bias, act_bits=8, backend="torch")
            what = f"{isa} {bits}-bit M={m} program={program}"
            if m == 1:  # the decode kernel reads the overwritten copy
                assert not torch.allclose(out, want, rtol=1e-2, atol=1e-2), what
            else:
                assert_matches(out, want, torch.float32, what)


def test_a_prepared_call_checks_its_canonical_rows(rng):
    """QMatmulCall's canonical_* arguments are checked when the call is made."""
    qw = pyengine.quantize(random_weight(16, 64, rng), 4, 32, clip_search=False)
    q, s, z = qw.qweight.data_ptr(), qw.scales.data_ptr(), qw.zeros.data_ptr()

    def make(interleave=8, **canonical):
        rows = dict(canonical_qweight=q, canonical_ldq=8, canonical_scales=s,
                    canonical_zeros=z, canonical_lds=2)
        rows.update(canonical)
        return extension().QMatmulCall(q, 8, s, z, 0, 2, 0, 0, 0, 0, 16, 64, 4, 32, "", 8,
                                       interleave, **rows)

    make()
    bad = ((dict(interleave=0), "not interleaved"),
           (dict(canonical_scales=0), "without their words or scales"),
           (dict(canonical_zeros=0), "differ in zero points"),
           (dict(canonical_ldq=7), "canonical ldq"), (dict(canonical_lds=1), "canonical lds"))
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            make(**change)


@pytest.mark.skipif("avx512" not in USABLE_ISAS or not pyengine.build_info().get("cpu_vnni"),
                    reason="the AVX-512 build's vpdpbusd path needs a CPU with AVX512_VNNI")
@pytest.mark.parametrize("bits", BITS)
def test_vnni_and_pair_sum_paths_give_the_same_bits(bits, rng, monkeypatch):
    """The AVX-512 build's int8-activation kernels with vpdpbusd (the default on a VNNI CPU: for
    8-bit codes on the canonical rows, for every width on the interleaved copy) and without
    (PYENGINE_CPU_VNNI=0: vpmaddubsw pair sums of planes) compute the same integer dot products:
    the outputs agree bit for bit, on the canonical rows and on the interleaved copy, with codes
    at both extremes and the largest activations. (The canonical rows of 2, 3 and 4 bits take the
    pair sums either way: the switch must not change them either.)"""
    n, k = 48, 1000
    for group_size, m in ((32, 1), (128, 3), (-1, 8)):
        w = random_weight(n, k, rng)
        qw = pyengine.quantize(w, bits, group_size, clip_search=False)
        codes = qw.codes()                                  # [n, k]; packed rows pad to 32
        codes[:, : k // 4] = (2 ** bits - 1) * (codes[:, : k // 4] % 2)   # 0 and 2^bits - 1
        qweight = pack_codes(torch.nn.functional.pad(codes, (0, -k % 32)), bits)
        assert qweight.shape == qw.qweight.shape
        qw = pyengine.QuantizedWeight(qweight, qw.scales, qw.zeros, bits=bits,
                                      group_size=group_size, shape=tuple(qw.shape),
                                      method=qw.method)
        x = torch.randn(m, k, generator=rng) * 3
        outs = {}
        for vnni in ("1", "0"):
            monkeypatch.setenv("PYENGINE_CPU_VNNI", vnni)
            assert pyengine.build_info()["cpu_vnni"] == (vnni == "1")
            outs[vnni] = [ops.qlinear(x, qw, act_bits=8, backend="cpu")]
            inter = poisoned((m, n), torch.float32, "cpu")
            _interleaved_call(x, qw, n, k, inter, 8, "avx512")
            outs[vnni].append(inter)
        for a, b in zip(outs["1"], outs["0"]):
            assert torch.isfinite(a).all() and torch.equal(a, b), (bits, group_size, m)
        ref = quantize_activations(x) @ qw.dequantize(torch.float32).T
        for out in outs["1"]:
            assert_matches(out, ref, torch.float32, f"int{bits} g{group_size} M={m}")


def _outputs_under_switches(monkeypatch, x, qw, n, k, isa, threads, switches):
    """The interleaved kernel's output (into a poisoned buffer) for every combination of the
    environment switches: ``switches`` maps a variable (e.g. "PYENGINE_CPU_ZMM") to the values to
    try; the result maps each tuple of values, in the order of ``switches``, to the output.
    Each switch must read back in ``pyengine.build_info()`` as set."""
    outs = {}
    for values in itertools.product(*switches.values()):
        for variable, value in zip(switches, values):
            monkeypatch.setenv(variable, value)
            assert pyengine.build_info()[SWITCH_VARIABLES[variable]] == (value == "1"), variable
        out = poisoned((x.shape[0], n), torch.float32, "cpu")
        _interleaved_call(x, qw, n, k, out, 8, isa, threads=threads)
        outs[values] = out
    return outs


@pytest.mark.skipif("avx512" not in USABLE_ISAS, reason="the 512-bit kernel is the AVX-512 build's")
@pytest.mark.parametrize("bits", BITS)
def test_512_and_256_bit_interleaved_kernels_give_the_same_bits(bits, rng, monkeypatch):
    """The AVX-512 build's interleaved decode kernel on pairs of octets in 512-bit vectors
    (PYENGINE_CPU_ZMM=1, the default on CPUs that run them at full width) and on one octet in
    256-bit vectors (=0), one vector at a time (PYENGINE_CPU_VECTOR_PAIRS=0), computes the same
    sums: equal outputs bit for bit, with vpdpbusd and with the pair sums, for octet counts
    that leave a last octet alone (1, 3, 37) or not (2, 4), M from 1 to 8, one thread and two
    (whose blocks of octets also end in odd ones); and equal to the reference product of the
    quantized activations."""
    vnni_modes = ("1", "0") if pyengine.build_info().get("cpu_vnni") else ("0",)
    monkeypatch.setenv("PYENGINE_CPU_VECTOR_PAIRS", "0")
    for (octets, k, threads), (group_size, m) in zip(
            ((1, 1000, 1), (2, 576, 1), (3, 200, 1), (4, 4096, 2), (37, 4096, 2)),
            ((32, 1), (128, 3), (-1, 8), (64, 2), (128, 1))):
        n = 8 * octets
        qw = pyengine.quantize(random_weight(n, k, rng), bits, group_size, clip_search=False)
        x = torch.randn(m, k, generator=rng) * 3
        outs = _outputs_under_switches(
            monkeypatch, x, qw, n, k, "avx512", threads,
            {"PYENGINE_CPU_VNNI": vnni_modes, "PYENGINE_CPU_ZMM": ("1", "0")})
        what = f"int{bits} g{group_size} M={m} octets={octets} threads={threads}"
        for vnni in vnni_modes:
            wide, narrow = outs[vnni, "1"], outs[vnni, "0"]
            assert torch.isfinite(wide).all() and torch.equal(wide, narrow), what
        ref = quantize_activations(x) @ qw.dequantize(torch.float32).T
        assert_matches(outs[vnni_modes[0], "1"], ref, torch.float32, what)


@pytest.mark.parametrize("isa", [isa for isa in USABLE_ISAS if INTERLEAVED_BITS.get(isa)])
@pytest.mark.parametrize("bits", BITS)
def test_paired_and_single_vector_kernels_give_the_same_bits(isa, bits, rng, monkeypatch):
    """At M = 1 the interleaved decode kernel works on a pair of its vectors
    (PYENGINE_CPU_VECTOR_PAIRS=1, the default: two octets of rows in 256-bit vectors, four in
    the AVX-512 build's 512-bit ones; two octets of 8-bit codes in the generic build) or on one
    (=0), with its weight streams prefetched ahead (PYENGINE_CPU_PREFETCH=1, the default) or
    not: equal outputs bit for bit, with both vector widths of the AVX-512 build, with vpdpbusd
    (on a CPU with it) and with the pair sums, for octet counts that leave octets over after the
    pairs (1, 3, 5, 7, 37) or not (2, 4, 8), one thread and two; and equal to the reference
    product of the quantized activations."""
    if bits not in INTERLEAVED_BITS[isa]:
        pytest.skip(f"the {isa} build reads {bits}-bit codes in their canonical rows")
    vnni_modes = (("1", "0") if isa == "avx512" and pyengine.build_info().get("cpu_vnni")
                  else ("0",))
    zmm_modes = ("1", "0") if isa == "avx512" else ("0",)
    for (octets, k, threads), group_size, symmetric in zip(
            ((1, 1000, 1), (2, 576, 1), (3, 200, 2), (4, 4096, 2), (5, 333, 1), (7, 256, 1),
             (8, 640, 2), (37, 4096, 2)),
            (32, 128, -1, 64, 32, 128, 64, 128), (False, True, False, True, True, False, True,
                                                  False)):
        n = 8 * octets
        qw = pyengine.quantize(random_weight(n, k, rng), bits, group_size, symmetric=symmetric,
                               clip_search=False)
        x = torch.randn(1, k, generator=rng) * 3
        outs = _outputs_under_switches(
            monkeypatch, x, qw, n, k, isa, threads,
            {"PYENGINE_CPU_VNNI": vnni_modes, "PYENGINE_CPU_ZMM": zmm_modes,
             "PYENGINE_CPU_VECTOR_PAIRS": ("1", "0"), "PYENGINE_CPU_PREFETCH": ("1", "0")})
        what = f"{isa} int{bits} g{group_size} octets={octets} threads={threads}"
        first = outs[vnni_modes[0], zmm_modes[0], "1", "1"]
        assert torch.isfinite(first).all(), what
        for vnni, zmm, pairs, prefetch in outs:
            assert torch.equal(outs[vnni, zmm, pairs, prefetch], first), (what, zmm, pairs,
                                                                         prefetch)
        ref = quantize_activations(x) @ qw.dequantize(torch.float32).T
        assert_matches(first, ref, torch.float32, what)
