"""`pip wheel .` builds a wheel that installs into a fresh virtual environment and works there;
without a C++ compiler the build still produces a working (torch-backend) package.

These tests build with pip's build isolation, so the build requirements of pyproject.toml are
what is proven (no torch at build time). They need PyPI (or a mirror) for those requirements.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

CHECK = textwrap.dedent("""
    import sys, torch, pyengine
    assert sys.prefix in pyengine.__file__, ("imported from outside the venv", pyengine.__file__)
    info = pyengine.build_info()
    print("cpu_kernels", info["cpu_kernels"])
    qw = pyengine.quantize(torch.randn(40, 96), 3, 32)
    x = torch.randn(5, 96)
    ref = x @ qw.dequantize().T
    for backend in pyengine.available_backends():
        y = pyengine.ops.dequant_matmul(x, qw, backend=backend)
        err = ((y - ref).norm() / ref.norm()).item()
        assert err < 1e-4, (backend, err)
    print("backends", ",".join(pyengine.available_backends()))
""")


def _clean_copy(dest: Path) -> Path:
    """The sources without build products (an in-tree build/ or a compiled _C from an editable
    install would otherwise leak into the wheel)."""
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".pytest_cache",
        ".benchmarks", ".venv*", ".whl"))
    return dest


def _build_wheel(out_dir: Path, env: dict) -> Path:
    src = _clean_copy(out_dir.parent / "src")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w",
                           str(out_dir)], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    wheels = list(out_dir.glob("pyengine-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _install_and_check(wheel: Path, venv_dir: Path, work_dir: Path) -> str:
    # A fresh venv (no system site-packages, so no editable install of the checkout can leak
    # in) that borrows only the runtime dependencies: a .pth file appends the directory that
    # holds torch to its path. pyengine itself must come from the wheel.
    venv.EnvBuilder(with_pip=True).create(venv_dir)
    python = venv_dir / "bin" / "python"
    site_dir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
    torch_parent = Path(torch.__file__).resolve().parents[1]
    Path(site_dir, "borrowed_dependencies.pth").write_text(f"{torch_parent}\n")
    # from work_dir: pip counts what the current directory holds as installed (a checkout's
    # pyengine.egg-info would make it skip the wheel)
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", str(wheel)], check=True,
                   capture_output=True, timeout=600, cwd=work_dir)
    proc = subprocess.run([str(python), "-I", "-c", CHECK], cwd=work_dir, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_wheel_installs_into_a_fresh_venv(tmp_path):
    env = dict(os.environ, PYENGINE_CUDA_ARCHS="80")  # one arch keeps the build short
    wheel = _build_wheel(tmp_path / "dist", env)
    out = _install_and_check(wheel, tmp_path / "venv", tmp_path)
    assert "cpu_kernels True" in out
    assert "cpu" in out.split("backends ")[1]


def test_build_without_a_compiler_still_installs(tmp_path):
    # A PATH with the interpreter but no c++/g++/clang++ and no CXX: the build must say so and
    # produce a package that runs on the torch backend.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC")}
    env["PATH"] = str(bin_dir)
    wheel = _build_wheel(tmp_path / "dist", env)
    out = _install_and_check(wheel, tmp_path / "venv", tmp_path)
    assert "cpu_kernels False" in out
    assert out.strip().endswith("backends torch")
