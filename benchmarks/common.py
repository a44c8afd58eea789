"""Shared pieces of pyengine's benchmark scripts: timing, bandwidth, metadata, JSON rows.

Every result file is JSON: {"meta": {...device, versions, commit, date...}, "rows": [...]}.
Rows carry at least: op, backend, bits, group_size, M, N, K, ms, gbps, pct_copy_bw and a
speedup against the dense baseline measured in the same run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

import pyengine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def time_cpu(fn: Callable[[], object], warmup: int = 3, reps: int = 25) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def time_interleaved(fns: Dict[str, Callable[[], object]], warmup: int = 3,
                     rounds: int = 25) -> Dict[str, float]:
    """Median wall time (ms) of each function, measured round-robin: every round times each
    function once, so slow drifts of a shared machine hit all of them alike and the ratios
    between them stay meaningful."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) * 1e3 for name, v in samples.items()}


def time_cuda(fn: Callable[[], object], warmup: int = 10, reps: int = 100) -> float:
    """Median time of fn() in milliseconds with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def copy_bandwidth_gbps(device: str, nbytes: int = 1 << 28) -> float:
    """Measured device copy bandwidth: (bytes read + bytes written) / time of a large copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timer = time_cuda if device == "cuda" else time_cpu
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} CPUs, {torch.get_num_threads()} threads)"


def metadata(device: str) -> Dict[str, object]:
    info = pyengine.build_info()
    meta = {
        "device": device_name(device),
        "device_type": device,
        "torch": torch.__version__,
        "triton": info.get("triton_version"),
        "pyengine": pyengine.__version__,
        "cpu_isa": info.get("cpu_isa_selected"),
        "commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device == "cuda":
        meta["driver"] = _nvidia_driver()
        meta["cuda"] = torch.version.cuda
    return meta


def _nvidia_driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(path: Path, meta: Dict[str, object], rows: List[Dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
