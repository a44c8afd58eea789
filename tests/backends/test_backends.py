"""Every compiled backend against the pure-torch reference, with poisoned outputs.

CPU backends are checked once per instruction-set build this CPU can run (avx512, avx2,
generic); the CUDA backends run the same checks when a GPU is present.
"""

import functools
import itertools

import pytest
import torch

import pyengine

from helpers import (BITS, QUANT_CASE_IDS, QUANT_CASES, check_against_reference, native_backends,
                     packed_operand, random_weight, shortcut_inputs)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = [pytest.param(b, d, id=label) for d in DEVICES for label, b in native_backends(d)]

# (M, K, N): every M of {1, 3, 17, 123}, K of {576, 1536, 100} and N of {1536, 576, 33}.
SHAPE_GRID = list(itertools.product((1, 3, 17, 123), (576, 1536, 100), (1536, 576, 33)))
# Three shapes per case, rotated by case number: a decode, a small and a prefill M.
DECODE = [s for s in SHAPE_GRID if s[0] in (1, 3)]
SMALL = [s for s in SHAPE_GRID if s[0] == 17]
PREFILL = [s for s in SHAPE_GRID if s[0] == 123]


def _shapes_for(case: int):
    return [DECODE[case % len(DECODE)], SMALL[(case * 5) % len(SMALL)],
            PREFILL[(case * 7) % len(PREFILL)]]


@functools.lru_cache(maxsize=None)
def _quantized(n, k, bits, group_size, symmetric, scale_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = random_weight(n, k, gen)
    return pyengine.quantize(w, bits, group_size, symmetric, scale_dtype=scale_dtype,
                             clip_search=False)


_SESSION_SEED = int(torch.randint(0, 2**31 - 1, (1,)).item())


def _check(backend, x, weight, n, k, dtype, what, bias=None, residual=None, shortcut=None):
    """backend.matmul into a NaN-poisoned output against the reference."""
    check_against_reference(
        lambda out: backend.matmul(x, weight, n, k, bias, residual, shortcut, out=out),
        x, weight, n, k, dtype, what, bias, residual, shortcut)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", range(len(QUANT_CASES)), ids=QUANT_CASE_IDS)
def test_quantized_matmul_matches_reference(backend, device, case, rng):
    bits, group_size, dtype = QUANT_CASES[case]
    symmetric = case % 2 == 1
    scale_dtype = (torch.float16, torch.bfloat16, torch.float32)[case % 3]
    for m, k, n in _shapes_for(case):
        qw = _quantized(n, k, bits, group_size, symmetric, scale_dtype, _SESSION_SEED).to(device)
        x = torch.randn(m, k, generator=rng).to(device=device, dtype=dtype)
        bias = torch.randn(n, generator=rng).to(device=device, dtype=dtype) if m % 2 else None
        _check(backend, x, packed_operand(qw), n, k, dtype,
               f"M={m} K={k} N={n} bits={bits} g={group_size} sym={symmetric} {dtype}", bias)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 128, False), (3, 32, True)])
def test_every_shape_of_the_grid(backend, device, bits, group_size, symmetric, rng):
    for m, k, n in SHAPE_GRID:
        qw = _quantized(n, k, bits, group_size, symmetric, torch.float16, _SESSION_SEED).to(device)
        x = torch.randn(m, k, generator=rng).to(device=device, dtype=torch.float16)
        _check(backend, x, packed_operand(qw), n, k, torch.float16,
               f"M={m} K={k} N={n} bits={bits} g={group_size}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bits", BITS)
def test_every_decode_batch_size(backend, device, bits, rng):
    """Every M of the decode paths (1..8 on the CPU, where rows are taken in tiles and M in
    blocks) and a few past them, with N not a multiple of any tile and K not of a chunk."""
    for n, k, group_size in ((37, 1100, 32), (9, 576, 64), (130, 100, -1)):
        qw = _quantized(n, k, bits, group_size, bits % 2 == 1, torch.float16,
                        _SESSION_SEED).to(device)
        for m in list(range(1, 10)) + [16, 17]:
            x = torch.randn(m, k, generator=rng).to(device)
            bias = torch.randn(n, generator=rng).to(device) if m % 3 == 0 else None
            _check(backend, x, packed_operand(qw), n, k, torch.float32,
                   f"M={m} K={k} N={n} bits={bits} g={group_size}", bias)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_sliced_block_of_a_quantized_weight(backend, device, bits, group_size, rng):
    n, k = 200, 512
    qw = _quantized(n, k, bits, group_size, False, torch.float16, _SESSION_SEED).to(device)
    in_dims = 256 if group_size != -1 else 320
    for m, out_dims in ((1, 150), (5, 200), (33, 77)):
        x = torch.randn(m, in_dims, generator=rng).to(device=device, dtype=torch.bfloat16)
        bias = torch.randn(n, generator=rng).to(device=device, dtype=torch.bfloat16)
        _check(backend, x, packed_operand(qw), out_dims, in_dims, torch.bfloat16,
               f"slice [{out_dims}, {in_dims}] of {bits}-bit [{n}, {k}] M={m}", bias)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("quantized", [True, False])
def test_shortcut_matmul(backend, device, quantized, rng):
    n, k, r = 96, 160, 72
    for m, dtype in ((1, torch.float32), (4, torch.float16), (19, torch.bfloat16)):
        if quantized:
            weight = packed_operand(_quantized(n, k, 4, 32, False, dtype, _SESSION_SEED).to(device))
        else:
            weight = random_weight(n, k, rng, dtype).to(device)
        x, residual, shortcut, bias = shortcut_inputs(rng, m, n, k, r, dtype, device)
        _check(backend, x, weight, n, k, dtype, f"shortcut M={m} {dtype}", bias,
               residual, shortcut)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dense_sliced_matmul(backend, device, rng):
    w = random_weight(300, 260, rng).to(device)
    for m, out_dims, in_dims in ((1, 300, 260), (7, 123, 45), (64, 1, 1)):
        x = torch.randn(m, in_dims, generator=rng).to(device)
        _check(backend, x, w, out_dims, in_dims, torch.float32,
               f"dense slice [{out_dims}, {in_dims}] M={m}")


def test_there_is_a_compiled_cpu_backend_to_check():
    """The checks above are vacuous without a compiled backend: a build that lost _C fails
    here instead of passing with nothing checked."""
    assert any(label.startswith("cpu-") for label, _ in native_backends("cpu")), (
        f"no compiled CPU backend: {pyengine.build_info().get('extension_error')}")


_GUARD_PAGE_SCRIPT = r"""
import ctypes, itertools, mmap, sys
import torch
import pyengine
from pyengine.backends import CpuBackend, PackedOperand, reference_matmul

# Each weight's packed codes are copied to the very end of a readable region that a PROT_NONE
# page follows: a kernel that reads one word past the weight's last row crashes this process
# (the last case printed names the culprit).
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
page = mmap.PAGESIZE
isa = sys.argv[1]
gen = torch.Generator().manual_seed(int(sys.argv[2]))
for bits, group_size, (m, k) in itertools.product(
        (2, 3, 4, 8), (32, -1), ((1, 100), (1, 576), (3, 200), (5, 96), (17, 100), (40, 576))):
    print(f"{isa} {bits}-bit g{group_size} M={m} K={k}", flush=True)
    n = 37
    qw = pyengine.quantize(torch.randn(n, k, generator=gen) * 0.05, bits, group_size,
                           clip_search=False)
    nbytes = qw.qweight.numel() * 4
    span = (nbytes + page - 1) // page * page + page
    region = mmap.mmap(-1, span, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    assert libc.mprotect(base + span - page, page, 0) == 0, ctypes.get_errno()
    start = span - page - nbytes
    guarded = torch.frombuffer(memoryview(region)[start:start + nbytes], dtype=torch.int32)
    guarded = guarded.view(qw.qweight.shape)
    guarded.copy_(qw.qweight)
    operand = PackedOperand(guarded, qw.scales, qw.zeros, bits, qw.effective_group_size)
    x = torch.randn(m, k, generator=gen)
    out = CpuBackend(isa=isa).matmul(x, operand, n, k, None, None, None)
    ref = reference_matmul(x, operand, n, k)
    err = float((out - ref).norm() / ref.norm())
    assert err < 1e-4, err
    del guarded, operand
print("ok")
"""


@pytest.mark.parametrize("isa", pyengine.build_info().get("cpu_isas_usable", []))
def test_cpu_kernels_never_read_past_the_last_row(isa, tmp_path):
    """The decode and prefill paths read a row's last, partial chunk in place when the words
    after it still belong to the weight (the next rows'), and copy it otherwise: with the
    weight's last word right before an unreadable page, every bit width, M and K still runs."""
    import subprocess
    import sys
    script = tmp_path / "guard.py"
    script.write_text(_GUARD_PAGE_SCRIPT)
    run = subprocess.run([sys.executable, str(script), isa, str(_SESSION_SEED)],
                         capture_output=True, text=True, timeout=600)
    last_case = (run.stdout.strip().splitlines() or ["(none)"])[-1]
    assert run.returncode == 0 and last_case == "ok", (
        f"exit {run.returncode} at {last_case}: {run.stderr[-2000:]}")


def test_the_cpu_instruction_set_can_be_chosen_by_environment(monkeypatch):
    from pyengine.backends.cpu import CpuBackend
    if CpuBackend("").unavailable_reason() is not None:
        pytest.skip("no cpu backend in this build")
    usable = pyengine.build_info()["cpu_isas_usable"]
    monkeypatch.setenv("PYENGINE_CPU_ISA", usable[-1])
    assert CpuBackend().isa == usable[-1] and CpuBackend().unavailable_reason() is None
    monkeypatch.setenv("PYENGINE_CPU_ISA", "avx9")
    with pytest.warns(UserWarning, match="PYENGINE_CPU_ISA=avx9"):
        assert "avx9" in CpuBackend().unavailable_reason()
    monkeypatch.delenv("PYENGINE_CPU_ISA")
    assert CpuBackend().isa == ""
