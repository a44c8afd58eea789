"""Build of pyengine: setuptools drives CMake, which builds the pybind11 module pyengine._C.

Environment:
  PYENGINE_CUDA_ARCHS   CUDA archs for -gencode (default "80;86;89;90a")
  PYENGINE_NO_CUDA=1    never build the CUDA kernels, even when nvcc is found
  PYENGINE_SKIP_EXT=1   build no extension at all (pure-Python install on the torch backend)
  PYENGINE_BUILD_JOBS   parallel build jobs (default: the number of CPUs)
  CMAKE_ARGS            extra arguments for the CMake configure step
"""

import os
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
        archs = os.environ.get("PYENGINE_CUDA_ARCHS")
        if archs:
            args.append(f"-DPYENGINE_CUDA_ARCHS={archs.replace(',', ';')}")
        if os.environ.get("PYENGINE_NO_CUDA", "") not in ("", "0"):
            args.append("-DPYENGINE_NO_CUDA=ON")
        if shutil.which("ninja"):
            args.append("-GNinja")
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))

        jobs = os.environ.get("PYENGINE_BUILD_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "--parallel", jobs],
                       cwd=build_temp, check=True)


setup(
    packages=find_packages(include=["pyengine", "pyengine.*"]),
    ext_modules=[CMakeExtension("pyengine._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
