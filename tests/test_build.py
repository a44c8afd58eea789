"""The installed build: what it reports, and that importing pyengine stays cheap and safe."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import pyengine

DEFAULT_CUDA_ARCHS = {"sm_80", "sm_86", "sm_89", "sm_90a"}


def _run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_build_info_reports_the_build():
    info = pyengine.build_info()
    for key, kind in (("cpu_kernels", bool), ("cuda_kernels", bool), ("cuda_archs", list),
                      ("version", str), ("torch_version", str)):
        assert isinstance(info[key], kind), key
    assert info["version"] == pyengine.__version__
    assert info["cpu_kernels"], f"pyengine._C did not load: {info['extension_error']}"
    assert info["cpu_isa_selected"] in info["cpu_isas_usable"]
    assert "generic" in info["cpu_isas"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_kernels_are_built_when_nvcc_is_present():
    info = pyengine.build_info()
    assert info["cuda_kernels"], "nvcc is present but the extension has no CUDA kernels"
    if not os.environ.get("PYENGINE_CUDA_ARCHS"):
        assert DEFAULT_CUDA_ARCHS <= set(info["cuda_archs"])


def test_import_does_not_initialise_cuda():
    out = _run_python("""
        import torch
        import pyengine
        pyengine.quantize(torch.randn(4, 32), 4, 32)
        print(torch.cuda.is_initialized())
    """)
    assert out.strip() == "False"


def test_pyengine_works_without_the_extension():
    out = _run_python("""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "pyengine._C":
                    raise ImportError("pyengine._C blocked by the test")
                return None

        sys.meta_path.insert(0, Block())
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
    """)
    assert out.strip() == "ok"
