"""The installed build: what it reports, and that importing pyengine stays cheap and safe."""

import runpy
from pathlib import Path

import pytest

import pyengine

from helpers import run_python

ROOT = Path(__file__).resolve().parents[1]


def test_build_info_reports_the_build():
    info = pyengine.build_info()
    for key, kind in (("cpu_kernels", bool), ("cuda_kernels", bool), ("cuda_archs", list),
                      ("version", str), ("torch_version", str)):
        assert isinstance(info[key], kind), key
    assert info["version"] == pyengine.__version__
    assert info["cpu_kernels"], f"pyengine._C did not load: {info['extension_error']}"
    assert info["cpu_isa_selected"] in info["cpu_isas_usable"]
    assert "generic" in info["cpu_isas"]


def test_cuda_kernels_and_archs_agree():
    info = pyengine.build_info()
    assert info["cuda_kernels"] == bool(info["cuda_archs"]), info
    assert all(a.startswith("sm_") for a in info["cuda_archs"])


# ---- which CUDA archs a build compiles for (setup.py) -------------------------------------------

@pytest.fixture
def setup_py(monkeypatch, tmp_path):
    """setup.py's functions (its setup() call runs only as __main__), with a PATH whose
    nvidia-smi the test writes: fake_smi(stdout, rc) or none at all."""
    funcs = runpy.run_path(str(ROOT / "setup.py"), run_name="pyengine_setup")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))

    def fake_smi(stdout: str, rc: int = 0) -> None:
        script = bin_dir / "nvidia-smi"
        # printf and exit are shell builtins: the script needs nothing else on PATH
        script.write_text(f"#!/bin/sh\nprintf '%s\\n' '{stdout}'\nexit {rc}\n")
        script.chmod(0o755)

    funcs["fake_smi"] = fake_smi
    return funcs


def test_default_archs_are_the_gpus_present(setup_py):
    setup_py["fake_smi"]("9.0\n8.6\n9.0")
    assert setup_py["gpu_cuda_archs"]() == ["90a", "86"]
    archs, why = setup_py["cuda_arch_choice"]({})
    assert archs == "90a;86" and "GPUs found" in why


def test_no_gpu_builds_no_cuda_kernels_and_says_so_in_one_line(setup_py):
    assert setup_py["gpu_cuda_archs"]() == []             # no nvidia-smi on PATH
    archs, why = setup_py["cuda_arch_choice"]({})
    assert archs is None and "\n" not in why and "no GPU found" in why
    setup_py["fake_smi"]("NVIDIA-SMI has failed because it could not communicate with the "
                         "NVIDIA driver", rc=9)
    assert setup_py["gpu_cuda_archs"]() == []
    assert setup_py["cuda_arch_choice"]({})[0] is None


def test_explicit_arch_lists_win(setup_py):
    setup_py["fake_smi"]("8.0")
    choice = setup_py["cuda_arch_choice"]
    assert choice({"PYENGINE_CUDA_ARCHS": "80,90a"})[0] == "80;90a"
    assert choice({"PYENGINE_CUDA_ARCHS": "all"})[0] == "80;86;89;90a"
    assert choice({"PYENGINE_CUDA_ARCHS": "all", "PYENGINE_NO_CUDA": "1"})[0] is None


def test_import_does_not_initialise_cuda():
    out = run_python("""
        import torch
        import pyengine
        pyengine.quantize(torch.randn(4, 32), 4, 32)
        print(torch.cuda.is_initialized())
    """)
    assert out.strip() == "False"


def test_pyengine_works_without_the_extension():
    out = run_python("""
        import torch, pyengine
        info = pyengine.build_info()
        assert info["cpu_kernels"] is False and "blocked" in info["extension_error"]
        assert pyengine.available_backends() == ["torch"], pyengine.available_backends()
        qw = pyengine.quantize(torch.randn(8, 64), 4, 32)
        x = torch.randn(2, 64)
        y = pyengine.ops.dequant_matmul(x, qw)
        assert torch.allclose(y, x @ qw.dequantize().T, atol=1e-4)
        try:
            pyengine.ops.dequant_matmul(x, qw, backend="cpu")
        except pyengine.BackendError as e:
            assert "not available" in str(e)
        else:
            raise AssertionError("asking for the cpu backend without _C must fail")
        print("ok")
    """, without_extension=True)
    assert out.strip() == "ok"


def test_gpu_check_budget_tests_exist():
    """Every test the GPU check's budget mode runs (benchmarks/gpu_check.sh BUDGET_TESTS) exists,
    so a lent GPU's minutes are not lost to a renamed file or test."""
    import re
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    match = re.search(r"^BUDGET_TESTS=\(([^)]*)\)", script, re.M)
    assert match, "BUDGET_TESTS not found in gpu_check.sh"
    entries = match.group(1).split()
    assert entries
    for entry in entries:
        path, _, test = entry.partition("::")
        source = ROOT / path
        assert source.is_file(), entry
        if test:
            assert re.search(rf"^def {re.escape(test)}\(", source.read_text(), re.M), entry
