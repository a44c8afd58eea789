"""Shared fixtures and helpers of pyengine's tests."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors under the Triton interpreter. triton reads
# TRITON_INTERPRET when it decorates a function, its own standard library included (at `import
# triton`), so the switch is thrown here, before anything imports triton. It is then kept in
# triton's knob and taken out of the environment again: subprocesses started by tests
# (tests/test_build.py) must still see a plain environment.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton

        triton.knobs.runtime.interpret = True
    except Exception:  # noqa: BLE001 - no (working) triton: its tests skip themselves
        pass
    finally:
        os.environ.pop("TRITON_INTERPRET", None)


def pytest_addoption(parser):
    parser.addoption("--seed", default=None, metavar="N|random",
                     help="seed of every test's rng fixture: N for that seed; 'random' for a "
                          "fresh seed per test (printed with the test's output); default: a "
                          "fixed seed per test, derived from its name")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped (and say so) where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests choose backends explicitly; a PYENGINE_BACKEND in the caller's environment must not
    change what they check."""
    monkeypatch.delenv("PYENGINE_BACKEND", raising=False)


def rng_seed(option: "str | None", node_id: str) -> int:
    """The rng fixture's seed: the ``--seed`` option's value when it is a number, a fresh one
    for ``random``, else a fixed one per test (a CRC of the test's node id), so that a plain
    run is reproducible and tests draw different data."""
    if option is None:
        return zlib.crc32(node_id.encode())
    if option == "random":
        return int.from_bytes(os.urandom(4), "little")
    try:
        return int(option)
    except ValueError:
        raise pytest.UsageError(f"--seed takes an integer or 'random', got {option!r}") from None


@pytest.fixture
def rng(request):
    """A CPU generator seeded by :func:`rng_seed`; the seed is printed, so a failing test's
    captured output says how to reproduce it."""
    seed = rng_seed(request.config.getoption("--seed"), request.node.nodeid)
    print(f"rng seed: {seed} (rerun with --seed {seed})")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The Python of vLLM's CPU build in its own environment (pyengine.vllm.env, made once per
    machine); the test skips, saying why, where the package index cannot provide it."""
    from pyengine.vllm.env import VllmUnavailable, vllm_python as make
    try:
        return make()
    except VllmUnavailable as exc:
        if exc.offline:
            pytest.skip(f"vLLM's CPU build (and the compressed-tensors library it brings) "
                        f"cannot be installed here: {exc}")
        raise
