"""Build of pyengine: setuptools drives CMake, which builds the pybind11 module pyengine._C.

Environment:
  PYENGINE_CUDA_ARCHS   CUDA archs for -gencode, e.g. "90a" or "80;86;89;90a" ("all": that list,
                        for wheels). Unset: the archs of the GPUs nvidia-smi lists (compute
                        capability 9.0 -> 90a), and no CUDA kernels when it lists none
  PYENGINE_NO_CUDA=1    never build the CUDA kernels, even when nvcc is found
  PYENGINE_SKIP_EXT=1   build no extension at all (pure-Python install on the torch backend)
  PYENGINE_BUILD_JOBS   parallel build jobs (default: the number of CPUs)
  CMAKE_ARGS            extra arguments for the CMake configure step
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _find_cxx_compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


# What PYENGINE_CUDA_ARCHS=all builds: the GPUs a wheel is meant for.
ALL_CUDA_ARCHS = "80;86;89;90a"


def gpu_cuda_archs():
    """The CUDA archs of the GPUs on this machine ("90a" for compute capability 9.0: its
    tensor-core instructions need the arch-specific target; "86" for 8.6, ...), in the order
    nvidia-smi lists them, without repeats; [] when nvidia-smi is missing, fails or lists none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        proc = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    if proc.returncode != 0:
        return []
    archs = []
    for field in proc.stdout.split():
        m = re.fullmatch(r"(\d+)\.(\d+)", field.strip())
        if m:
            arch = m.group(1) + m.group(2)
            arch = "90a" if arch == "90" else arch
            if arch not in archs:
                archs.append(arch)
    return archs


def cuda_arch_choice(environ):
    """(archs for CMake or None to build no CUDA kernels, a line saying why) from the
    environment (PYENGINE_NO_CUDA, PYENGINE_CUDA_ARCHS) and the GPUs present."""
    if environ.get("PYENGINE_NO_CUDA", "") not in ("", "0"):
        return None, "pyengine: PYENGINE_NO_CUDA set, building the CPU kernels only"
    given = environ.get("PYENGINE_CUDA_ARCHS", "").strip()
    if given:
        archs = ALL_CUDA_ARCHS if given == "all" else given.replace(",", ";")
        return archs, f"pyengine: CUDA kernels for PYENGINE_CUDA_ARCHS={archs}"
    found = gpu_cuda_archs()
    if not found:
        return None, ("pyengine: no GPU found and PYENGINE_CUDA_ARCHS unset, building the CPU "
                      "kernels only (PYENGINE_CUDA_ARCHS=all builds CUDA kernels for "
                      f"{ALL_CUDA_ARCHS})")
    archs = ";".join(found)
    return archs, f"pyengine: CUDA kernels for the GPUs found ({archs})"


class CMakeBuild(build_ext):
    def run(self):
        if os.environ.get("PYENGINE_SKIP_EXT", "") not in ("", "0"):
            print("pyengine: PYENGINE_SKIP_EXT set, installing without compiled kernels")
            self.extensions = []
            return
        if _find_cxx_compiler() is None:
            print("pyengine: no C++ compiler found, installing without compiled kernels "
                  "(the torch backend still works)")
            self.extensions = []
            return
        super().run()

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)

        cfg = "Debug" if self.debug else "Release"
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPYENGINE_OUTPUT_DIR={out_dir}",
        ]
        archs, why = cuda_arch_choice(os.environ)
        print(why)
        if archs:
            args.append(f"-DPYENGINE_CUDA_ARCHS={archs}")
        else:
            args.append("-DPYENGINE_NO_CUDA=ON")
        if shutil.which("ninja"):
            args.append("-GNinja")
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))

        jobs = os.environ.get("PYENGINE_BUILD_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "--parallel", jobs],
                       cwd=build_temp, check=True)


if __name__ == "__main__":   # pip runs this file as __main__; tests import its functions
    setup(
        packages=find_packages(include=["pyengine", "pyengine.*"]),
        ext_modules=[CMakeExtension("pyengine._C")],
        cmdclass={"build_ext": CMakeBuild},
        zip_safe=False,
    )
