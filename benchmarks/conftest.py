"""Configuration of the pytest-benchmark suite of pyengine's ops (benchmarks/test_bench_ops.py).

This file decides *what* is measured: the command-line options, the two size profiles, the
backends timed on the device, the parametrisation of the three op benchmarks, the timer and what
goes into the JSON's ``machine_info``. How one case is built, checked and timed is in
test_bench_ops.py, whose docstring has the command lines.

It is loaded only when benchmarks/ is on pytest's command line; ``python -m pytest tests`` never
sees it (pyproject.toml's testpaths is tests/).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import pytest
import torch

# ---- profiles -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerShape:
    """One linear layer of a real model: N (out_features) x K (in_features). ``hidden`` is the
    model's residual width: a layer with N == hidden writes into the residual stream, and only
    those get the shortcut_matmul benchmark (a sliced model's output projection adds the
    projected residual stream)."""

    layer: str
    n: int
    k: int
    hidden: int

    @property
    def label(self) -> str:
        return f"{self.n}x{self.k}"

    @property
    def writes_residual(self) -> bool:
        return self.n == self.hidden


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    shapes: Tuple[LayerShape, ...]
    batch_sizes: Tuple[int, ...]


PROFILES: Dict[str, Profile] = {
    "small": Profile(
        "small", "SmolLM2-135M layer shapes",
        (LayerShape("attn q/o_proj", 576, 576, 576),
         LayerShape("mlp gate/up_proj", 1536, 576, 576),
         LayerShape("mlp down_proj", 576, 1536, 576)),
        (1, 16, 128)),
    "full": Profile(
        "full", "Llama-3-8B layer shapes and Llama-3-70B's MLP input",
        (LayerShape("attn q/o_proj", 4096, 4096, 4096),
         LayerShape("mlp gate/up_proj", 14336, 4096, 4096),
         LayerShape("mlp down_proj", 4096, 14336, 4096),
         LayerShape("attn k/v_proj", 1024, 4096, 4096),
         LayerShape("70B mlp gate/up_proj", 28672, 8192, 8192)),
        (1, 16, 256, 1024)),
}

BITS = (2, 3, 4, 8)
GROUP_SIZE = 128
SLICE_FRACTION = 0.75          # sliced_matmul keeps this share of each dimension
DENSE = "dense"                # the backend label of the dense F.linear reference rows
ACTIVATION_DTYPE = {"cpu": torch.float32, "cuda": torch.float16}
DEFAULT_SECONDS = {"cpu": 0.1, "cuda": 0.05}   # timed seconds per benchmark (--ops-time)
# Default operand rotation on a CPU: past the per-core L2 caches, as a decoding model's other
# layers push a layer's weights out of them, while a large shared L3 may still hold them.
CPU_ROTATE_BYTES = 64 << 20

# The op each benchmark function measures (its name without the "test_" prefix).
OPS = ("dequant_matmul", "sliced_matmul", "shortcut_matmul")


# ---- the run's settings --------------------------------------------------------------------------


@dataclass
class OpsBenchRun:
    """Resolved settings of one run of the suite and what it learns on the way (kept in the
    config's stash, reported in the header and in the JSON's machine_info)."""

    device: str
    profile: Profile
    dtype: torch.dtype
    seconds: float                    # timed seconds per benchmark
    rotate_bytes: int                 # bytes of operand copies cycled through (0: one set)
    deadline_s: Optional[float]       # later benchmarks are skipped, so the JSON is still written
    note: str
    backends: List[str] = field(default_factory=list)
    excluded: Dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    loadavg_start: Optional[Tuple[float, float, float]] = None
    copy_bandwidth_gbps: Optional[float] = None

    def seconds_left(self) -> Optional[float]:
        if self.deadline_s is None:
            return None
        return self.deadline_s - (time.monotonic() - self.started)


RUN_KEY = pytest.StashKey[OpsBenchRun]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pyengine-ops", "pyengine ops benchmark (benchmarks/test_bench_ops.py)")
    group.addoption("--ops-device", choices=("cpu", "cuda"), default=None,
                    help="device to benchmark on (default: cuda when torch sees one, else cpu)")
    group.addoption("--ops-profile", choices=tuple(PROFILES), default=None,
                    help="small: SmolLM2-135M shapes, M 1/16/128; full: Llama-3-8B shapes and "
                         "28672x8192, M 1/16/256/1024 (default: small on cpu, full on cuda)")
    group.addoption("--ops-time", type=float, default=None, metavar="SECONDS",
                    help="timed seconds per benchmark, in rounds of about 0.5 ms (cpu) or 1 ms "
                         "(cuda), 5 to 200 of them "
                         f"(default: {DEFAULT_SECONDS['cpu']} on cpu, {DEFAULT_SECONDS['cuda']} "
                         "on cuda)")
    group.addoption("--ops-rotate-mib", type=float, default=None, metavar="MIB",
                    help="cycle through copies of the operands totalling at least this many MiB, "
                         "so that timed calls read weights from memory, not from a warm cache "
                         "(default: twice the L2 size on cuda, 64 on cpu; 0: one set)")
    group.addoption("--ops-deadline", type=float, default=None, metavar="SECONDS",
                    help="skip the benchmarks that would start after this many seconds, so that "
                         "a run under an outer time limit still writes its JSON")
    group.addoption("--ops-keep-data", action="store_true",
                    help="keep every round's time in the JSON (stats.data); by default only the "
                         "statistics are kept, so result files stay small")
    group.addoption("--ops-note", default="",
                    help="free text stored in the JSON's machine_info (e.g. other load on the "
                         "machine)")


def _resolve(config: pytest.Config) -> OpsBenchRun:
    device = config.getoption("ops_device", None)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--ops-device cuda: torch sees no CUDA device")
    profile_name = config.getoption("ops_profile", None)
    profile = PROFILES[profile_name or ("full" if device == "cuda" else "small")]
    seconds = config.getoption("ops_time", None)
    seconds = DEFAULT_SECONDS[device] if seconds is None else seconds
    if seconds <= 0:
        raise pytest.UsageError(f"--ops-time must be positive, got {seconds}")
    rotate_mib = config.getoption("ops_rotate_mib", None)
    if rotate_mib is None:
        rotate_bytes = 2 * _l2_bytes() if device == "cuda" else CPU_ROTATE_BYTES
    else:
        rotate_bytes = int(rotate_mib * 2**20)
    run = OpsBenchRun(device=device, profile=profile, dtype=ACTIVATION_DTYPE[device],
                      seconds=seconds, rotate_bytes=max(0, rotate_bytes),
                      deadline_s=config.getoption("ops_deadline", None),
                      note=config.getoption("ops_note", ""), loadavg_start=_loadavg())
    run.backends, run.excluded = discover_backends(device, run.dtype)
    return run


def _l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or (50 << 20))


def _loadavg() -> Optional[Tuple[float, float, float]]:
    try:
        return tuple(round(v, 2) for v in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return None


def discover_backends(device: str, dtype: torch.dtype) -> Tuple[List[str], Dict[str, str]]:
    """(backends timed on ``device``, {backend: why it is not timed}). A backend is timed when
    it is available in this process and serves a 4-bit ``dequant_matmul`` on the device; cases
    it cannot serve (other bits, shapes, ops) are skipped one by one with its own reason."""
    import pyengine
    from pyengine.backends import LinearCase, get_backend

    available = pyengine.available_backends()
    probe = LinearCase(device_type=device, dtype=dtype, kind="packed", bits=4)
    timed: List[str] = []
    excluded: Dict[str, str] = {}
    for name in pyengine.known_backends():
        backend = get_backend(name)
        if name not in available:
            excluded[name] = f"unavailable: {backend.unavailable_reason()}"
            continue
        why = backend.unsupported_reason(probe)
        if why is None and name == "triton" and device == "cpu":
            why = ("on CPU tensors it runs only under the Triton interpreter, which is for "
                   "testing, not timing")
        if why is None:
            timed.append(name)
        else:
            excluded[name] = f"does not serve {device}: {why}"
    return timed, excluded


# ---- timer ---------------------------------------------------------------------------------------


def cuda_synchronized_timer() -> float:
    """time.perf_counter() after waiting for the GPU's queued work. pytest-benchmark reads its
    timer before and after each round of ``iterations`` calls, so a round's time covers the
    kernels it launched, while the launches inside the round still overlap the GPU's work."""
    torch.cuda.synchronize()
    return time.perf_counter()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Resolves the settings; on CUDA makes pytest-benchmark time with
    :func:`cuda_synchronized_timer` unless --benchmark-timer was given."""
    run = _resolve(config)
    config.stash[RUN_KEY] = run
    if run.device == "cuda" and config.getoption("benchmark_timer", None) == "time.perf_counter":
        # pytest-benchmark imports the timer by its dotted name when its session starts.
        config.option.benchmark_timer = f"{__name__}.{cuda_synchronized_timer.__name__}"


def pytest_report_header(config: pytest.Config) -> List[str]:
    run = config.stash[RUN_KEY]
    shapes = ", ".join(s.label for s in run.profile.shapes)
    lines = [
        f"ops bench: device {run.device} ({str(run.dtype).replace('torch.', '')} activations), "
        f"profile {run.profile.name} ({run.profile.description}: {shapes}; "
        f"M {', '.join(map(str, run.profile.batch_sizes))})",
        f"ops bench: backends timed {run.backends} + {DENSE!r} (F.linear); "
        f"{run.seconds} s per benchmark; operand rotation {run.rotate_bytes / 2**20:.0f} MiB",
    ]
    lines += [f"ops bench: not timed: {name}: {why}" for name, why in run.excluded.items()]
    return lines


# ---- parametrisation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OpsCase:
    """One benchmark: an op on one layer shape at one batch size M, run by ``backend`` at
    ``bits`` with ``group_size`` (or by the dense F.linear reference: backend ``dense``, bits
    None, group_size 0)."""

    op: str
    backend: str
    bits: Optional[int]
    group_size: int
    shape: LayerShape
    m: int

    @property
    def dense(self) -> bool:
        return self.backend == DENSE

    @property
    def id(self) -> str:
        bits = f"int{self.bits}" if self.bits else "ref"
        return f"{self.backend}-{bits}-M{self.m}-{self.shape.label}"

    def block(self) -> Tuple[int, int, int]:
        """(N, K, R) of the call: the block of the weight it computes, and the residual width
        (0 but for shortcut_matmul, whose residual stream is as wide as its output). The sliced
        block keeps SLICE_FRACTION of each dimension, K rounded down to a multiple of the group
        size (which sliced_matmul requires)."""
        n, k = self.shape.n, self.shape.k
        if self.op == "sliced_matmul":
            n = max(1, int(SLICE_FRACTION * n))
            k = max(GROUP_SIZE, int(SLICE_FRACTION * k) // GROUP_SIZE * GROUP_SIZE)
        return n, k, (n if self.op == "shortcut_matmul" else 0)


def ops_cases(op: str, run: OpsBenchRun) -> List[OpsCase]:
    """The cases of ``op`` in run order: shape by shape (so one shape's weights are prepared
    once), then M, the dense row first and then each bit width on each backend."""
    cases: List[OpsCase] = []
    for shape in run.profile.shapes:
        if op == "shortcut_matmul" and not shape.writes_residual:
            continue
        for m in run.profile.batch_sizes:
            cases.append(OpsCase(op, DENSE, None, 0, shape, m))
            for bits in BITS:
                cases.extend(OpsCase(op, backend, bits, GROUP_SIZE, shape, m)
                              for backend in run.backends)
    return cases


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "ops_case" not in metafunc.fixturenames:
        return
    op = metafunc.function.__name__.removeprefix("test_")
    if op not in OPS:
        raise pytest.UsageError(f"{metafunc.function.__name__}: no op named {op!r} ({OPS})")
    cases = ops_cases(op, metafunc.config.stash[RUN_KEY])
    metafunc.parametrize("ops_case", cases, ids=[c.id for c in cases])


@pytest.fixture(scope="session")
def ops_run(request: pytest.FixtureRequest) -> OpsBenchRun:
    """The run's settings; measures the device's copy bandwidth once, for the JSON."""
    run = request.config.stash[RUN_KEY]
    if run.copy_bandwidth_gbps is None:
        from pyengine.benchmarking import copy_bandwidth_gbps
        run.copy_bandwidth_gbps = round(copy_bandwidth_gbps(run.device, 256 << 20), 2)
    return run


# ---- JSON ----------------------------------------------------------------------------------------


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Adds the run's settings, pyengine's metadata (device name, versions, commit, date) and
    the machine's load before and after the run to the JSON's machine_info."""
    run = config.stash.get(RUN_KEY, None)
    if run is None:
        return
    from pyengine.benchmarking import metadata
    machine_info["pyengine"] = metadata(run.device)
    machine_info["ops_bench"] = {
        "device": run.device,
        "profile": run.profile.name,
        "activation_dtype": str(run.dtype).replace("torch.", ""),
        "backends": run.backends,
        "not_timed": run.excluded,
        "seconds_per_benchmark": run.seconds,
        "rotate_bytes": run.rotate_bytes,
        "deadline_s": run.deadline_s,
        "copy_bandwidth_gbps": run.copy_bandwidth_gbps,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_start": run.loadavg_start,
        "loadavg_end": _loadavg(),
        "wall_s": round(time.monotonic() - run.started, 1),
        "note": run.note,
    }


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    """Names each benchmark's case by its id in ``params`` (its extra_info has the fields) and
    drops the per-round times (stats.data) unless --ops-keep-data."""
    keep_data = config.getoption("ops_keep_data", False)
    for bench in output_json.get("benchmarks", []):
        if "ops_case" in (bench.get("params") or {}):
            bench["params"] = {"ops_case": bench.get("param")}
        if not keep_data:
            bench.get("stats", {}).pop("data", None)
