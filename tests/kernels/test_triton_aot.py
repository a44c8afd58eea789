"""Every Triton kernel specialization the dispatch can select compiles for sm_80 and sm_90,
on the installed triton and on triton 3.6.0 (the version on the lent GPU machines), without a
GPU (pyengine/kernels/aot.py).

The compiles run in subprocesses (this process has the kernels loaded for the interpreter).
Specializations recorded in the committed ledger (tests/data/triton_aot_ledger.json) under the
same Triton cache hash are not compiled again, except a random sample per target; everything
else is compiled, so an edited kernel is compiled in full until the ledger is refreshed with
``python -m pyengine.kernels.aot --update-ledger`` (and the same under triton 3.6.0, see
README).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from pyengine.kernels import aot  # noqa: E402  (needs triton)
from pyengine.kernels import matmul  # noqa: E402
from pyengine.kernels.matryoshka import select_plane_config  # noqa: E402
from pyengine.matryoshka.weight import PRECISIONS  # noqa: E402
from pyengine.format.qweight import SUPPORTED_GROUP_SIZES  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEVICE_TRITON = "3.6.0"      # benchmarks/gpu_check.sh's machines run this version
VERIFY_SAMPLE = 2            # ledger entries compiled again per target and version
AOT_TIMEOUT_S = 75 * 60      # a run with an empty ledger compiles ~2000 specializations


def _cache_root() -> Path:
    return Path(os.environ.get("PYENGINE_CACHE", Path.home() / ".cache" / "pyengine"))


@pytest.fixture(scope="session")
def device_triton_path() -> Path:
    """triton==3.6.0 installed into its own folder (once per machine and Python), never into
    the environment: the subprocess puts the folder first on sys.path."""
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    target = _cache_root() / f"triton-{DEVICE_TRITON}-{tag}"
    if (target / "triton" / "__init__.py").exists():
        return target
    staging = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
                           "--target", str(staging), f"triton=={DEVICE_TRITON}"],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        text = proc.stdout + proc.stderr
        if "No matching distribution" in text or "Could not find a version" in text:
            pytest.skip(f"the package index has no triton=={DEVICE_TRITON} wheel for this "
                        f"Python ({tag}): {text.strip().splitlines()[-1]}")
        pytest.fail(f"pip install triton=={DEVICE_TRITON} failed:\n{text[-3000:]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def _aot_env(tmp_path: Path, first_on_path=()) -> dict:
    """A plain environment: no TRITON_* setting of the caller (the interpreter switch or
    cache-key settings), a fresh Triton cache, this checkout (and first_on_path) on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = os.pathsep.join([*map(str, first_on_path), str(ROOT)]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _run_aot(env: dict, cwd: Path, *args: str, timeout: float = AOT_TIMEOUT_S):
    """python -m pyengine.kernels.aot ARGS in cwd (not the checkout: ``-m`` puts the working
    directory first on sys.path)."""
    proc = subprocess.run([sys.executable, "-m", "pyengine.kernels.aot", *args], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)
    print(proc.stdout[-6000:])
    return proc


# ---- the case list follows the dispatch -----------------------------------------------------

def test_cases_span_every_dispatch_dimension():
    """Every (kind, width, group, dtype, M bucket) is a case, on real layer shapes."""
    cases = aot.dispatch_cases()
    got = {(c.kind, c.bits, c.group_size, c.dtype, matmul.m_bucket(c.M))
           for c in cases if c.sweep == "dispatch"}
    buckets = {matmul.m_bucket(m) for m in range(1, 4097)}
    dtypes = [aot.DTYPE_NAMES[d] for d in matmul.ACTIVATION_DTYPES]
    want = set(itertools.product(["packed"], matmul.SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, dtypes,
                                 buckets))
    want |= set(itertools.product(["planes"], PRECISIONS, SUPPORTED_GROUP_SIZES, dtypes, buckets))
    want |= set(itertools.product(["dense"], [0], [0], dtypes, buckets))
    assert want - got == set(), sorted(want - got)[:10]
    assert {c.sweep for c in cases} == {"dispatch", "odd"}
    # the online Walsh-Hadamard transform: every block a rotated MLP can use, every dtype
    from pyengine.quant.rotation import MLP_HADAMARD_MAX_BLOCK, MLP_HADAMARD_MIN_BLOCK
    blocks = [1 << e for e in range(MLP_HADAMARD_MIN_BLOCK.bit_length() - 1,
                                    MLP_HADAMARD_MAX_BLOCK.bit_length())]
    assert {(c.group_size, c.dtype) for c in cases if c.kind == "hadamard"} == \
        set(itertools.product(blocks, dtypes))


@pytest.mark.parametrize("arch", sorted(aot.SM_COUNTS))
def test_planned_configs_are_every_config_the_gpu_tables_give(arch):
    """The launch configs the cases plan are all the configs select_config /
    select_plane_config return on a GPU for any M up to 4096; and both a single K slice and
    several are planned for every decode kernel."""
    main_kernels = ("_decode_kernel", "_prefill_kernel", "_plane_decode_kernel",
                    "_plane_prefill_kernel")
    planned = set()
    for case in aot.dispatch_cases():
        for launch in aot.case_launches(case, arch):
            if launch.name in main_kernels:
                kw = launch.kwargs
                planned.add((case.kind, case.bits, case.dtype, kw["BLOCK_M"], kw["BLOCK_N"],
                             kw["BLOCK_K"], kw["num_warps"], kw["num_stages"]))
    wanted = set()
    for m in range(1, 4097):
        for dtype in matmul.ACTIVATION_DTYPES:
            name = aot.DTYPE_NAMES[dtype]
            for bits in (*matmul.SUPPORTED_BITS, 0):
                _, cfg = matmul.select_config(m, bits, dtype, interpreted=False)
                wanted.add(("packed" if bits else "dense", bits, name, cfg.block_m,
                            cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages))
            for r in PRECISIONS:
                _, cfg = select_plane_config(m, r, dtype, interpreted=False)
                wanted.add(("planes", r, name, cfg.block_m, cfg.block_n, cfg.block_k,
                            cfg.num_warps, cfg.num_stages))
    assert wanted - planned == set(), sorted(wanted - planned)[:10]
    assert aot.check_coverage(aot.dispatch_cases(), arch) == []


# ---- compiling --------------------------------------------------------------------------------

def _check_report(report: dict, version: str) -> None:
    assert report["triton"] == version
    assert report["failures"] == [], json.dumps(report["failures"][:5], indent=1)
    assert report["coverage_gaps"] == []
    assert set(report["targets"]) == {"sm_80", "sm_90"}
    for name, target in report["targets"].items():
        status = target["status"]
        # every specialization was compiled now or is in the ledger under its current hash
        assert set(status) <= {"compiled", "ledger", "verified"}, (name, status)
        assert sum(status.values()) == target["specializations"] > 500, (name, status)
        assert set(target["kernels"]) == {"_decode_kernel", "split_k_reduce_kernel",
                                          "_prefill_kernel", "_plane_decode_kernel",
                                          "_plane_prefill_kernel", "_hadamard_kernel"}
        # the sample re-compiled from the ledger's entries
        in_ledger = status.get("ledger", 0) + status.get("verified", 0)
        assert status.get("verified", 0) == min(VERIFY_SAMPLE, in_ledger), (name, status)


@pytest.mark.slow
def test_every_specialization_compiles_on_the_installed_triton(tmp_path):
    import triton
    report_path = tmp_path / "aot.json"
    proc = _run_aot(_aot_env(tmp_path), tmp_path, "--verify-sample", str(VERIFY_SAMPLE),
                    "--json", str(report_path))
    assert report_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_report(json.loads(report_path.read_text()), triton.__version__)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_every_specialization_compiles_on_the_device_triton(tmp_path, device_triton_path):
    report_path = tmp_path / "aot.json"
    proc = _run_aot(_aot_env(tmp_path, [device_triton_path]), tmp_path, "--verify-sample",
                    str(VERIFY_SAMPLE), "--json", str(report_path))
    assert report_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_report(json.loads(report_path.read_text()), DEVICE_TRITON)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


_BROKEN_3BIT = '''\
                SHIFT: tl.constexpr = (3 * j) % 32
                if (3 * j) // 32 == 0:
                    low, high = w0, w1
                elif (3 * j) // 32 == 1:
                    low, high = w1, w2
                else:
                    low, high = w2, w2
                code = low >> SHIFT
                if SHIFT > 29:
                    code = code | (high << (32 - SHIFT))
                code = code & 7
'''


@pytest.mark.slow
def test_a_kernel_that_does_not_compile_fails_the_check(tmp_path):
    """The check can fail: a copy of the package with the former 3-bit GEMV code (a constexpr
    reassigned inside tl.static_range, which the interpreter runs fine) is reported, by case,
    with the compiler's error, and the exit status is 1."""
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "pyengine", copy / "pyengine",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    decode = copy / "pyengine" / "kernels" / "matmul_decode.py"
    text = decode.read_text()
    fixed = "                code = block_code(w0, w1, w2, j, 3)\n"
    assert text.count(fixed) == 1
    decode.write_text(text.replace(fixed, _BROKEN_3BIT))
    env = _aot_env(tmp_path, [copy])
    proc = _run_aot(env, tmp_path, "--no-ledger", "--arch", "90", "--cases",
                    r"^int3 g=128 float16 M=1 4096x", timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILED sm_90 _decode_kernel [int3 g=128 float16 M=1 4096x14336" in proc.stdout
    assert "CompilationError" in proc.stdout


def test_benchmark_calls_plan_as_cases():
    """bench_gpu_kernels.py --plan-aot's cases (what gpu_check.sh prepare / budget compile)
    plan the calls the benchmark makes: the sliced rows read the top-left block of the stored
    weight, the shortcut rows carry a residual as wide as N."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_gpu_kernels

    fields = bench_gpu_kernels.aot_cases([(14336, 4096), (4096, 14336)], [1, 16], [4, 3], 128)
    cases = [aot.Case(**dict(f, sweep="given")) for f in fields]
    assert len(cases) == 2 * 2 * (2 + 1) + 2 * 2 * 2       # shortcut rows where N <= K
    for case in cases:
        launches = aot.case_launches(case, 90)
        main = launches[0]
        qweight = main.args[2]
        assert main.name == "_decode_kernel" and qweight.dtype == torch.int32
        assert qweight.shape[0] == (case.N_stored or case.N)
        assert qweight.shape[1] * 32 // case.bits == (case.K_stored or case.K)
        assert main.kwargs["HAS_SHORTCUT"] == case.shortcut
        # (x, stride, w, stride, s, stride, z, stride, bias, stride, residual, 2 strides,
        #  shortcut, 2 strides, R, ...): R is the residual's width
        assert main.args[16] == (case.N if case.shortcut else 0)
