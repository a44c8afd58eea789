"""pytest-benchmark suite of pyengine's ops on real layer shapes, per backend.

Times ``dequant_matmul``, ``sliced_matmul`` (75% of each dimension of the weight) and
``shortcut_matmul`` (plus the projection of a residual stream as wide as the output) on every
backend that serves the device, at 2, 3, 4 and 8 bits with group size 128, and the dense
``F.linear`` reference of the same call (fp32 on a CPU, fp16 on a GPU) as rows of backend
``dense``, so that speedups come from one run. Before it is timed, every call's output is checked
once against fp64 math on the (dequantized) weight; an error above the tolerance (relative
Frobenius error 1e-4 for fp32 activations, 1e-2 for fp16, as in tests/helpers.py) fails the test
and no timing row is written.

Profiles (benchmarks/conftest.py): ``small`` = SmolLM2-135M shapes 576x576, 1536x576, 576x1536
(N x K) at M 1, 16, 128 (default on a CPU, a few minutes on 2 cores); ``full`` = Llama-3-8B shapes
4096x4096, 14336x4096, 4096x14336, 1024x4096 and 28672x8192 at M 1, 16, 256, 1024 (default on a
GPU). shortcut_matmul runs on the shapes that write the residual stream (N = hidden size).

CPU (the small profile; JSON and markdown kept under benchmarks/results/):

    OMP_NUM_THREADS=2 python -m pytest benchmarks/test_bench_ops.py \\
        --benchmark-json benchmarks/results/ops_bench_cpu.json --benchmark-columns median,iqr,rounds
    python benchmarks/summarize_ops_bench.py benchmarks/results/ops_bench_cpu.json \\
        --markdown benchmarks/results/ops_bench_cpu.md

GPU (the full profile; or ``OUT=DIR bash benchmarks/gpu_check.sh opsbench``):

    python -m pytest benchmarks/test_bench_ops.py --ops-device cuda \\
        --benchmark-json benchmarks/results/ops_bench_<gpu>.json \\
        --benchmark-columns median,iqr,rounds
    python benchmarks/summarize_ops_bench.py benchmarks/results/ops_bench_<gpu>.json \\
        --markdown benchmarks/results/ops_bench_<gpu>.md

Options: ``--ops-device cpu|cuda``, ``--ops-profile small|full``, ``--ops-time SECONDS`` (timed
seconds per benchmark), ``--ops-rotate-mib MIB``, ``--ops-deadline SECONDS``, ``--ops-note TEXT``;
``-k`` selects cases (test ids read ``test_<op>[<backend>-int<bits>-M<m>-<N>x<K>]``, the dense
rows ``test_<op>[dense-ref-M<m>-<N>x<K>]``, so ``-k "cpu-int4 and M1-"`` picks M = 1);
``--benchmark-disable`` runs each case once: the correctness checks without timing.

Timing: pytest-benchmark's pedantic mode with rounds and iterations chosen per case from a short
probe: rounds of about 0.5 ms (CPU) or 1 ms (GPU), as many as fit in --ops-time seconds (5 to 200);
the median of the rounds is the figure to read. On CUDA the timer synchronises the device
(conftest.py), so a round's time covers the kernels it launched. Calls cycle through copies of
their operands totalling at least --ops-rotate-mib: by default twice the GPU's L2 cache, so GPU
timings read the weights from memory as a decoding model does, and 64 MiB on a CPU, past its
per-core L2 caches (a CPU's shared L3 may still hold them: compare GB/s with the copy bandwidth in
the JSON's machine_info). Each row's extra_info holds op, backend, bits, group_size, M, N, K (of
the block computed), R (residual width), the bytes moved (weights + activations + output) and the
device name; the JSON's machine_info adds pyengine's metadata (versions, commit, date), the
settings, the copy bandwidth and the load average before and after the run. CPU timings need a
quiet machine: with as many OpenMP threads as cores, one other busy process makes every
multi-threaded call wait for a time slice (milliseconds); each row's other_load_cores says how many
cores other processes kept busy while it was timed.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

import pyengine
from pyengine.backends import LinearCase, get_backend
from pyengine.benchmarking import device_name

# Relative Frobenius error allowed against the reference (docs/DESIGN.md, tests/helpers.py).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
MAX_ROUNDS = 200       # rounds per benchmark when the calls are short enough
MIN_ROUNDS = 5         # rounds per benchmark however slow the call
# A round runs calls for about this long: short rounds keep a CPU's median clear of the
# time slices lost to other processes; on a GPU a round amortises the synchronisation.
ROUND_SECONDS = {"cpu": 0.5e-3, "cuda": 1e-3}
MAX_OPERAND_SETS = 256  # copies cycled through for --ops-rotate-mib

Tensor = torch.Tensor


# ---- weights of one layer shape ------------------------------------------------------------------


class LayerWeights:
    """A random dense weight of one layer shape in the activation dtype and its RTN quantization
    at each bit width, made on first use. Only the shape in use is kept (cases run shape by
    shape), so the full profile's largest weights are not all held at once."""

    _current: Optional["LayerWeights"] = None

    def __init__(self, n: int, k: int, device: str, dtype: torch.dtype) -> None:
        self.key = (n, k, device, dtype)
        self.dense = (torch.randn(n, k, device=device) * 0.02).to(dtype)
        self._quantized: Dict[Tuple[int, int], pyengine.QuantizedWeight] = {}

    def quantized(self, bits: int, group_size: int) -> pyengine.QuantizedWeight:
        if (bits, group_size) not in self._quantized:
            self._quantized[bits, group_size] = pyengine.quantize(self.dense, bits, group_size,
                                                                  clip_search=False)
        return self._quantized[bits, group_size]

    @classmethod
    def get(cls, n: int, k: int, device: str, dtype: torch.dtype) -> "LayerWeights":
        if cls._current is None or cls._current.key != (n, k, device, dtype):
            cls._current = None
            if device == "cuda":
                torch.cuda.empty_cache()
            cls._current = cls(n, k, device, dtype)
        return cls._current


def copy_weight(w: "Tensor | pyengine.QuantizedWeight") -> "Tensor | pyengine.QuantizedWeight":
    """A copy in new memory (a rotation set's own weight)."""
    if isinstance(w, Tensor):
        return w.clone()
    return pyengine.QuantizedWeight(
        w.qweight.clone(), w.scales.clone(), None if w.zeros is None else w.zeros.clone(),
        bits=w.bits, group_size=w.group_size, shape=tuple(w.shape), method=w.method)


def weight_block_bytes(w: "Tensor | pyengine.QuantizedWeight", n: int, k: int) -> int:
    """Bytes of W[:n, :k] a kernel reads: the dense block, or the packed codes of the block's
    rows (32 codes take ``bits`` 32-bit words) with their scales and zeros."""
    if isinstance(w, Tensor):
        return n * k * w.element_size()
    if k == w.shape[1]:
        words, groups = w.qweight.shape[1], w.scales.shape[1]
    else:
        words, groups = math.ceil(k / 32) * w.bits, math.ceil(k / w.effective_group_size)
    per_group = w.scales.element_size() + (0 if w.zeros is None else w.zeros.element_size())
    return n * (4 * words + groups * per_group)


# ---- one benchmark case --------------------------------------------------------------------------


@dataclass
class Operands:
    x: Tensor
    weight: "Tensor | pyengine.QuantizedWeight"
    residual: Optional[Tensor]
    shortcut: Optional[Tensor]


@dataclass
class OpCall:
    """An op (or its dense reference) on one shape: the block computed is [M, K] x [N, K]^T,
    plus residual [M, R] @ shortcut [R, N] for shortcut_matmul."""

    run: Callable[[Operands], Tensor]
    weight: "Tensor | pyengine.QuantizedWeight"
    m: int
    n: int
    k: int
    r: int
    device: str
    dtype: torch.dtype

    def operands(self, fresh_weight: bool) -> Operands:
        """Fresh random activations (and shortcut), with the shared weight or a copy of it."""
        kw = dict(device=self.device, dtype=self.dtype)
        x = torch.randn(self.m, self.k, **kw)
        residual = shortcut = None
        if self.r:
            residual = torch.randn(self.m, self.r, **kw)
            shortcut = torch.randn(self.r, self.n, **kw) / math.sqrt(self.r)
        return Operands(x, copy_weight(self.weight) if fresh_weight else self.weight, residual,
                        shortcut)

    def reference(self, o: Operands) -> Tensor:
        """fp64 math on the (dequantized) weight's block."""
        w = o.weight if isinstance(o.weight, Tensor) else o.weight.dequantize(torch.float32)
        y = o.x.double() @ w[:self.n, :self.k].double().T
        if self.r:
            y += o.residual.double() @ o.shortcut.double()
        return y

    @property
    def weight_bytes(self) -> int:
        return weight_block_bytes(self.weight, self.n, self.k)

    @property
    def bytes_moved(self) -> int:
        """Weight block + shortcut matrix + activations, residual and output."""
        act = torch.empty((), dtype=self.dtype).element_size()
        return (self.weight_bytes
                + act * (self.r * self.n + self.m * self.k + self.m * self.r + self.m * self.n))


def make_call(case, device: str, dtype: torch.dtype) -> OpCall:
    """The OpCall of a case (conftest.OpsCase): dense rows run F.linear on the dense weight,
    the others the op with ``backend=case.backend`` on the quantized weight."""
    op = case.op
    layer = LayerWeights.get(case.shape.n, case.shape.k, device, dtype)
    n, k, r = case.block()
    ops, backend = pyengine.ops, case.backend
    if case.dense:
        weight = layer.dense
        run = {
            "dequant_matmul": lambda o: F.linear(o.x, o.weight),
            "sliced_matmul": lambda o: F.linear(o.x, o.weight[:n, :k]),
            "shortcut_matmul": lambda o: F.linear(o.x, o.weight).addmm_(o.residual, o.shortcut),
        }[op]
    else:
        weight = layer.quantized(case.bits, case.group_size)
        run = {
            "dequant_matmul": lambda o: ops.dequant_matmul(o.x, o.weight, backend=backend),
            "sliced_matmul": lambda o: ops.sliced_matmul(o.x, o.weight, k, n, backend=backend),
            "shortcut_matmul": lambda o: ops.shortcut_matmul(o.x, o.weight, o.residual,
                                                             o.shortcut, backend=backend),
        }[op]
    return OpCall(run, weight, case.m, n, k, r, device, dtype)


def rel_err(out: Tensor, ref: Tensor) -> float:
    """||out - ref||_F / ||ref||_F in fp64; inf when out has a NaN or Inf."""
    out64, ref64 = out.double(), ref.double()
    if not bool(torch.isfinite(out64).all()):
        return math.inf
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


# ---- timing --------------------------------------------------------------------------------------


def now(device: str) -> float:
    """perf_counter after the device's queued work (the probe's clock)."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def plan_rounds(call: Callable[[], object], device: str, seconds: float,
                warmup_calls: int) -> Tuple[int, int, float]:
    """(rounds, iterations per round, probed seconds per call): rounds of about
    ROUND_SECONDS[device] (at least one call), as many as fit in ``seconds`` but at least
    MIN_ROUNDS and at most MAX_ROUNDS; the probe runs after ``warmup_calls`` calls."""
    for _ in range(warmup_calls):
        call()
    calls, t0 = 0, now(device)
    while calls < 3 or (calls < 10_000 and now(device) - t0 < seconds / 10):
        call()
        calls += 1
    per_call = max((now(device) - t0) / calls, 1e-9)
    iterations = max(1, round(ROUND_SECONDS[device] / per_call))
    rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, int(seconds / (iterations * per_call))))
    return rounds, iterations, per_call


class OtherLoad:
    """CPU time other processes used while a block ran, in cores (Linux: /proc/stat minus this
    process' /proc/self/stat; None elsewhere). A value near 1 on a 2-core machine means the
    timings were taken beside a busy process. Resolution: one clock tick (10 ms) over the
    block's wall time."""

    def __enter__(self) -> "OtherLoad":
        self.cores: Optional[float] = None
        self._start = self._sample()
        return self

    def __exit__(self, *exc) -> None:
        end = self._sample()
        if self._start is None or end is None:
            return
        wall = end[0] - self._start[0]
        other_ticks = (end[1] - self._start[1]) - (end[2] - self._start[2])
        if wall > 0:
            self.cores = max(0.0, other_ticks / os.sysconf("SC_CLK_TCK") / wall)

    @staticmethod
    def _sample() -> Optional[Tuple[float, int, int]]:
        """(wall seconds, busy ticks of the machine, ticks of this process) or None."""
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                own = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
        busy = sum(fields[:8]) - fields[3] - fields[4]
        return time.perf_counter(), busy, int(own[11]) + int(own[12])  # utime + stime


@functools.lru_cache(maxsize=None)
def _device_name(device: str) -> str:
    return device_name(device)


def unsupported_reason(case, dtype: torch.dtype, device: str) -> Optional[str]:
    """Why case.backend cannot run this call (its own words), or None."""
    n, k, r = case.block()
    probe = LinearCase(device_type=device, dtype=dtype, kind="packed" if case.bits else "dense",
                       bits=case.bits)
    why = get_backend(case.backend).unsupported_reason(probe)
    return None if why is None else (f"{case.backend} cannot run {case.op}(M={case.m}, N={n}, "
                                     f"K={k}, R={r}): {why}")


def measure(benchmark, ops_run, ops_case) -> None:
    """Checks the case's output once against the reference, then times it."""
    left = ops_run.seconds_left()
    if left is not None and left <= 0:
        pytest.skip(f"--ops-deadline {ops_run.deadline_s} s has passed")
    device, dtype = ops_run.device, ops_run.dtype
    if not ops_case.dense:
        why = unsupported_reason(ops_case, dtype, device)
        if why is not None:
            pytest.skip(why)

    with torch.inference_mode():
        call = make_call(ops_case, device, dtype)
        first = call.operands(fresh_weight=False)
        err = rel_err(call.run(first), call.reference(first))
        tol = TOLERANCE[dtype]
        assert err <= tol, (f"{ops_case.op} {ops_case.id}: relative error {err:.3e} > {tol:.0e} "
                            "against the fp64 reference; a wrong result is not timed")

        n_sets = 1
        if ops_run.rotate_bytes > 0 and benchmark.enabled:
            n_sets = min(MAX_OPERAND_SETS, max(1, math.ceil(ops_run.rotate_bytes
                                                            / call.bytes_moved)))
        sets: List[Operands] = [first] + [call.operands(fresh_weight=True)
                                          for _ in range(n_sets - 1)]
        position = [0]

        def next_call() -> Tensor:
            o = sets[position[0]]
            position[0] = (position[0] + 1) % n_sets
            return call.run(o)

        rounds, iterations, probed = 1, 1, None
        if benchmark.enabled:
            rounds, iterations, probed = plan_rounds(next_call, device, ops_run.seconds,
                                                     warmup_calls=2)
        bits = ops_case.bits or 8 * torch.empty((), dtype=dtype).element_size()
        benchmark.group = f"{ops_case.op} {call.n}x{call.k} M={call.m}"
        benchmark.extra_info.update(
            op=ops_case.op, backend=ops_case.backend, bits=bits,
            group_size=ops_case.group_size,
            M=call.m, N=call.n, K=call.k, R=call.r, layer=ops_case.shape.layer,
            weight_N=ops_case.shape.n, weight_K=ops_case.shape.k,
            dtype=str(dtype).replace("torch.", ""), weight_bytes=call.weight_bytes,
            bytes_moved=call.bytes_moved, device=_device_name(device), device_type=device,
            profile=ops_run.profile.name, rel_err=err, tolerance=tol, operand_sets=n_sets,
            probe_us=None if probed is None else round(probed * 1e6, 3))
        with OtherLoad() as other:
            benchmark.pedantic(next_call, rounds=rounds, iterations=iterations, warmup_rounds=1)
        benchmark.extra_info["other_load_cores"] = (None if other.cores is None
                                                    else round(other.cores, 2))


# ---- the benchmarks (parametrised by conftest.pytest_generate_tests) -----------------------------


def test_dequant_matmul(benchmark, ops_run, ops_case):
    """y = x @ dequant(W)^T on the layer's full weight."""
    measure(benchmark, ops_run, ops_case)


def test_sliced_matmul(benchmark, ops_run, ops_case):
    """y = x @ W[:0.75 N, :0.75 K]^T, reading only that block of the stored weight."""
    measure(benchmark, ops_run, ops_case)


def test_shortcut_matmul(benchmark, ops_run, ops_case):
    """y = x @ dequant(W)^T + residual @ shortcut (residual width R = N), fused."""
    measure(benchmark, ops_run, ops_case)
