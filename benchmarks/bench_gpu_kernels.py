"""GPU kernel benchmark: every CUDA-capable backend's quantized matmul against cuBLAS fp16.

In one run: the device's copy bandwidth, cuBLAS fp16 ``F.linear`` and each available backend's
``dequant_matmul`` on real layer shapes at several M and bit widths; ``sliced_matmul`` at 75% of
each dimension against the full call; ``shortcut_matmul`` against the unfused pair (the
quantized matmul, then ``addmm`` of residual @ shortcut). Each kernel's result is checked once
against the dequantized weight (rel_err in the row). The cuda backend runs its default route
(backend "cuda") and, at M <= 16, each kernel of --cuda-kernels forced by name (backends
"cuda:decode", the decode GEMV, and "cuda:mma", the tensor-core decode kernel). Timings are medians
over CUDA events with the L2 cache flushed before every repetition (--warm-l2: no flush,
common.time_cuda), so weights that fit in L2 are not read from cache.

Writes JSON rows (op, backend, bits, group_size, M, N, K, ms, gbps, pct_copy_bw,
speedup_vs_fp16, ...) to benchmarks/results/gpu_kernels_<device>.json (with --incremental
after every row, "complete": false until the end, so that a run cut short keeps its rows).

    python benchmarks/bench_gpu_kernels.py [--shapes 4096x4096] [--m 1,16] [--bits 4] [--quick]

``--plan-aot FILE`` (no GPU needed) writes the Triton calls such a run makes as a case list
for ``python -m pyengine.kernels.aot --cases-json FILE``, which compiles them ahead of time
(benchmarks/gpu_check.sh prepare / budget).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import pyengine  # noqa: E402
from pyengine.backends import LinearCase, get_backend  # noqa: E402
from pyengine.backends.cuda import ENV_KERNEL  # noqa: E402

DEFAULT_SHAPES = "14336x4096,4096x4096,1024x4096,4096x14336,28672x8192"  # N x K
FP16 = torch.float16
DEVICE = "cuda"  # a module constant so that the logic can be smoke-tested on the CPU
_L2_FLUSH_BYTES = 256 << 20


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


class Timer:
    """Median milliseconds of fn(), with (default) or without an L2 flush before each rep."""

    def __init__(self, reps: int, warmup: int, warm_l2: bool) -> None:
        self.reps, self.warmup, self.warm_l2 = reps, warmup, warm_l2
        self.flush_buffer = None if warm_l2 else torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8,
                                                             device=DEVICE)

    def __call__(self, fn: Callable[[], object]) -> float:
        if DEVICE != "cuda":
            return common.time_cpu(fn, warmup=1, reps=self.reps)
        if self.warm_l2:
            return common.time_cuda(fn, warmup=self.warmup, reps=self.reps)
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.reps)]
        for start, end in events:
            self.flush_buffer.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y64, r64 = y.double(), ref.double()
    if not bool(torch.isfinite(y64).all()):
        return float("inf")
    return ((y64 - r64).norm() / r64.norm().clamp_min(1e-30)).item()


def sliced_dims(n: int, k: int, group_size: int):
    """(in_dims, out_dims) of the sliced_matmul rows: 75% of K rounded down to a multiple of
    the group size (at least one group), 75% of N."""
    return max(group_size, (int(0.75 * k) // group_size) * group_size), max(1, int(0.75 * n))


def aot_cases(shapes: List[tuple], ms: List[int], bits_list: List[int],
              group_size: int) -> List[Dict[str, object]]:
    """The Triton calls a run makes (Case fields of pyengine.kernels.aot): per shape, M and
    bits, dequant_matmul, sliced_matmul (the top-left block of the stored weight) and, for
    output projections (N <= K), shortcut_matmul with a residual as wide as N."""
    cases = []
    for n, k in shapes:
        in_dims, out_dims = sliced_dims(n, k, group_size)
        for m in ms:
            for bits in bits_list:
                base = dict(kind="packed", bits=bits, group_size=group_size,
                            dtype="float16", M=m)
                cases.append(dict(base, N=n, K=k))
                cases.append(dict(base, N=out_dims, K=in_dims, N_stored=n, K_stored=k))
                if n <= k:
                    cases.append(dict(base, N=n, K=k, shortcut=True, R=n))
    return cases


def quant_bytes(qw: pyengine.QuantizedWeight, n: int, k: int) -> int:
    """Bytes of the packed codes, scales and zeros of the block W[:n, :k]."""
    n_full, k_full = qw.shape
    return int(qw.nbytes * (n / n_full) * (k / k_full))


def cuda_backends(include_torch: bool) -> List[str]:
    """Registered backends that are available and serve a CUDA fp16 quantized matmul."""
    names = []
    for name in pyengine.available_backends():
        if name == "torch" and not include_torch:
            continue
        case = LinearCase(device_type="cuda", dtype=FP16, kind="packed", bits=4)
        if get_backend(name).unsupported_reason(case) is None:
            names.append(name)
    return names


class Bench:
    def __init__(self, args: argparse.Namespace, copy_bw: float, meta: dict,
                 path: Path) -> None:
        self.args, self.copy_bw, self.meta, self.path = args, copy_bw, meta, path
        self.time = Timer(args.reps, args.warmup, args.warm_l2)
        self.rows: List[Dict[str, object]] = []
        self.failures: List[str] = []

    def row(self, op: str, backend: str, bits: int, group_size: int, M: int, N: int, K: int,
            ms: float, nbytes: int, fp16_ms: float, **extra) -> None:
        gbps = nbytes / (ms * 1e-3) / 1e9
        r = dict(op=op, backend=backend, bits=bits, group_size=group_size, M=M, N=N, K=K,
                 ms=round(ms, 5), gbps=round(gbps, 2),
                 pct_copy_bw=round(100 * gbps / self.copy_bw, 2),
                 speedup_vs_fp16=round(fp16_ms / ms, 3),
                 tflops=round(2 * M * N * K / (ms * 1e-3) / 1e12, 3))
        r.update(extra)
        self.rows.append(r)
        if self.args.incremental:
            self.write(complete=False)
        note = " ".join(f"{k}={v}" for k, v in extra.items())
        print(f"{op:>15} {backend:>7} {bits:>2}b {N:>6}x{K:<6} M={M:<5} {ms:9.4f} ms "
              f"{gbps:8.1f} GB/s {r['pct_copy_bw']:6.1f}% {r['speedup_vs_fp16']:6.2f}x  {note}",
              flush=True)

    def write(self, complete: bool) -> None:
        """The rows so far, with the run's metadata, to the JSON file."""
        meta = dict(self.meta, failures=self.failures, complete=complete)
        common.write_results(self.path, meta, self.rows)

    def check(self, what: str, y: torch.Tensor, ref: torch.Tensor) -> float:
        err = rel_err(y, ref)
        if not err <= 1e-2:
            self.failures.append(f"{what}: relative error {err:.3e}")
            print(f"WRONG RESULT {what}: relative error {err:.3e}", flush=True)
        return round(err, 6)

    def attempt(self, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - record and go on with the other kernels
            self.failures.append(f"{what}: {type(exc).__name__}: {exc}")
            print(f"FAILED {what}:\n{traceback.format_exc()}", flush=True)

    # ---- one layer shape --------------------------------------------------------------------
    def shape(self, n: int, k: int, backends: List[str]) -> None:
        args, gs = self.args, self.args.group_size
        torch.manual_seed(0)
        w = (torch.randn(n, k, device=DEVICE) * 0.02).to(FP16)
        qws = {bits: pyengine.quantize(w, bits, gs, clip_search=False) for bits in args.bits}
        in_dims, out_dims = sliced_dims(n, k, gs)
        for m in args.m:
            x = torch.randn(m, k, device=DEVICE, dtype=FP16)
            act = (m * k + m * n) * 2
            fp16_ms = self.time(lambda: F.linear(x, w))
            self.row("linear", "cublas", 16, 0, m, n, k, fp16_ms, n * k * 2 + act, fp16_ms)
            xs = x[:, :in_dims].contiguous()
            w_block = w[:out_dims, :in_dims]
            fp16_sliced_ms = self.time(lambda: F.linear(xs, w_block))
            residual = shortcut = None
            if n <= k:  # an output projection: its residual stream has about N features
                residual = torch.randn(m, n, device=DEVICE, dtype=FP16)
                shortcut = torch.randn(n, n, device=DEVICE, dtype=FP16) * 0.02
            for bits, qw in qws.items():
                dense = qw.dequantize(FP16)
                ref = F.linear(x, dense)
                for b in backends:
                    for label, kernel in self.variants(b, m):
                        what = f"{label} {bits}-bit {n}x{k} M={m}"
                        self.attempt(what, lambda: self._forced(
                            kernel, lambda: self._one(b, bits, qw, dense, ref, x, xs, m, n, k,
                                                      in_dims, out_dims, residual, shortcut,
                                                      fp16_ms, fp16_sliced_ms, act, label)))

    def variants(self, backend: str, m: int) -> List[tuple]:
        """(row label, PYENGINE_CUDA_KERNEL value or None) for one backend at M: the cuda
        backend's default route, and each kernel of --cuda-kernels that serves M (the decode
        kernels only M <= 16)."""
        out = [(backend, None)]
        if backend == "cuda":
            for kernel in self.args.cuda_kernels:
                if kernel in ("decode", "mma") and m > 16:
                    continue
                out.append((f"cuda:{kernel}", kernel))
        return out

    @staticmethod
    def _forced(kernel: Optional[str], fn: Callable[[], None]) -> None:
        """fn() with PYENGINE_CUDA_KERNEL=kernel (unchanged when None), restored after."""
        if kernel is None:
            return fn()
        old = os.environ.get(ENV_KERNEL)
        os.environ[ENV_KERNEL] = kernel
        try:
            fn()
        finally:
            if old is None:
                del os.environ[ENV_KERNEL]
            else:
                os.environ[ENV_KERNEL] = old

    def _one(self, b, bits, qw, dense, ref, x, xs, m, n, k, in_dims, out_dims, residual,
             shortcut, fp16_ms, fp16_sliced_ms, act, label=None) -> None:
        label = label or b
        gs, ops = self.args.group_size, pyengine.ops
        full = lambda: ops.dequant_matmul(x, qw, backend=b)  # noqa: E731
        err = self.check(f"dequant_matmul {label} {bits}b {n}x{k} M={m}", full(), ref)
        ms = self.time(full)
        self.row("dequant_matmul", label, bits, gs, m, n, k, ms, quant_bytes(qw, n, k) + act,
                 fp16_ms, rel_err=err)

        sliced = lambda: ops.sliced_matmul(xs, qw, in_dims, out_dims, backend=b)  # noqa: E731
        err = self.check(f"sliced_matmul {label} {bits}b {n}x{k} M={m}", sliced(),
                         F.linear(xs, dense[:out_dims, :in_dims]))
        ms_sliced = self.time(sliced)
        self.row("sliced_matmul", label, bits, gs, m, out_dims, in_dims, ms_sliced,
                 quant_bytes(qw, out_dims, in_dims) + (m * in_dims + m * out_dims) * 2,
                 fp16_sliced_ms, rel_err=err, ms_full=round(ms, 5),
                 time_vs_full=round(ms_sliced / ms, 3))

        if residual is None:
            return
        r = residual.shape[1]
        fused = lambda: ops.shortcut_matmul(x, qw, residual, shortcut, backend=b)  # noqa: E731
        unfused = lambda: (ops.dequant_matmul(x, qw, backend=b)  # noqa: E731
                           .addmm_(residual, shortcut))
        err = self.check(f"shortcut_matmul {label} {bits}b {n}x{k} M={m}", fused(),
                         torch.addmm(ref, residual, shortcut))
        ms_fused, ms_unfused = self.time(fused), self.time(unfused)
        fp16_pair_ms = self.time(lambda: F.linear(x, dense).addmm_(residual, shortcut))
        self.row("shortcut_matmul", label, bits, gs, m, n, k, ms_fused,
                 quant_bytes(qw, n, k) + act + (m * r + r * n) * 2, fp16_pair_ms, R=r,
                 rel_err=err, ms_unfused=round(ms_unfused, 5),
                 speedup_vs_unfused=round(ms_unfused / ms_fused, 3))


def _int_list(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="N x K list, comma separated")
    parser.add_argument("--m", type=_int_list, default=[1, 16, 256, 1024], help="batch sizes M")
    parser.add_argument("--bits", type=_int_list, default=[8, 4, 3, 2])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--backends", default="",
                        help="comma separated (default: every available CUDA backend but torch)")
    parser.add_argument("--cuda-kernels", type=lambda t: [v for v in t.split(",") if v],
                        default=["decode", "mma"],
                        help="cuda kernels also timed by name (PYENGINE_CUDA_KERNEL) beside the "
                             "default route, comma separated; decode and mma at M <= 16 only "
                             "(default: decode,mma; '' for none)")
    parser.add_argument("--with-torch", action="store_true",
                        help="also time the torch reference backend (dequantizes every call)")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--warm-l2", action="store_true", help="do not flush L2 between reps")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4096x4096 and 1024x4096, M 1 and 256, bits 4 and 3")
    parser.add_argument("--json", type=Path, default=None,
                        help="output file (default benchmarks/results/gpu_kernels_<device>.json)")
    parser.add_argument("--incremental", action="store_true",
                        help="rewrite the JSON after every row")
    parser.add_argument("--plan-aot", type=Path, default=None,
                        help="write the Triton calls of this run as a pyengine.kernels.aot case "
                             "list to this file and exit (no GPU needed)")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.m, args.bits = "4096x4096,1024x4096", [1, 256], [4, 3]
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    if args.plan_aot:
        cases = aot_cases(shapes, args.m, args.bits, args.group_size)
        args.plan_aot.write_text(json.dumps(cases, indent=0) + "\n")
        print(f"{len(cases)} Triton calls written to {args.plan_aot}")
        return 0

    if not torch.cuda.is_available():
        print("bench_gpu_kernels: torch sees no CUDA device; this benchmark needs a GPU "
              "(nothing measured, nothing written)", file=sys.stderr)
        return 2
    backends = ([b for b in args.backends.split(",") if b] if args.backends
                else cuda_backends(args.with_torch))
    if not backends:
        print("bench_gpu_kernels: no backend serves CUDA tensors here "
              f"(available: {pyengine.available_backends()})", file=sys.stderr)
        return 2

    copy_bw = common.copy_bandwidth_gbps("cuda")
    meta = common.metadata("cuda")
    meta.update(copy_bandwidth_gbps=round(copy_bw, 1), backends=backends,
                group_size=args.group_size, l2_flushed=not args.warm_l2, reps=args.reps,
                build_info=pyengine.build_info())
    print(f"{meta['device']} (driver {meta.get('driver')}, CUDA {meta.get('cuda')}, torch "
          f"{meta['torch']}, triton {meta['triton']}); copy bandwidth {copy_bw:.0f} GB/s; "
          f"backends {backends}", flush=True)

    path = args.json or common.RESULTS / f"gpu_kernels_{device_slug(meta['device'])}.json"
    bench = Bench(args, copy_bw, meta, path)
    for n, k in shapes:
        bench.attempt(f"shape {n}x{k}", lambda: bench.shape(n, k, backends))
        torch.cuda.empty_cache()

    bench.write(complete=True)
    print(f"wrote {len(bench.rows)} rows to {path}")
    if bench.failures:
        print(f"{len(bench.failures)} failures:\n  " + "\n  ".join(bench.failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
