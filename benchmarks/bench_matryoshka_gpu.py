"""GPU timing of the Matryoshka plane-layout kernels against the canonical r-bit kernels.

For each backend (triton, cuda: those that run here), layer shape N x K, M and r in (8, 4, 2),
fp16 activations, group size 128:

* plane layout on an int8 parent (``pyengine.quantize(w, bits=8)`` split into bit planes), given
  only the planes of PLANES_READ[r] (int2 reads 3/8 of the parent's code bytes, int4 5/8, int8
  all): ``pyengine.kernels.matryoshka.matryoshka_matmul_triton`` (triton) or
  ``pyengine.backends._native.plane_matmul_cuda`` (cuda: the decode GEMV for M <= 16);
* plain: the canonical r-bit kernel of the same backend on ``pyengine.quantize(w, bits=r)`` of
  the same w, the kernel ``pyengine.ops.dequant_matmul(..., backend=<backend>)`` runs.

``ms`` of both rows is the kernel launcher called directly into a preallocated output, so the
ratio compares the kernels alone; the plain row also has ``ms_op``, the same kernel timed
through ``pyengine.ops.dequant_matmul(x, qw, backend="triton")`` (custom op dispatch included).
Each kernel's result is checked once against its dequantized weight (``rel_err``). Medians of
CUDA-event timings (bench_gpu_kernels.Timer): the L2 cache is flushed before every repetition
unless --warm-l2 (then common.time_cuda), so weights that fit in L2 are not served from it.

Rows: {op: "matryoshka_matmul", backend, bits, group_size, M, N, K, ms, gbps,
pct_copy_bw, matryoshka: true, planes_read, time_vs_plain, speedup_vs_plain, rel_err} and
{op: "dequant_matmul", backend, ..., matryoshka: false, ms_op, rel_err}; gbps counts
the packed code bytes read, scales, zeros, x and the output.

    python benchmarks/bench_matryoshka_gpu.py [--shapes 14336x4096,4096x4096] [--m 1,16]
        [--bits 8,4,2] [--backends triton,cuda] [--json benchmarks/results/matryoshka_gpu.json]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_gpu_kernels import Timer  # noqa: E402  (CUDA events, optional L2 flush)

import pyengine  # noqa: E402
from pyengine import MatryoshkaWeight  # noqa: E402
from pyengine.matryoshka import PLANES_READ  # noqa: E402

DEFAULT_SHAPES = "14336x4096,4096x4096"   # N x K
DEFAULT_JSON = common.RESULTS / "matryoshka_gpu.json"
GROUP_SIZE = 128
FP16 = torch.float16


def _int_list(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v]


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y64, r64 = y.double(), ref.double()
    if not bool(torch.isfinite(y64).all()):
        return float("inf")
    return ((y64 - r64).norm() / r64.norm().clamp_min(1e-30)).item()


def _tensor_bytes(*tensors: Optional[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _kernel_calls(backend: str, x: torch.Tensor, out: torch.Tensor, parent: MatryoshkaWeight,
                  planes: list, plain, r: int, n: int, k: int):
    """(plane-layout call, plain kernel call, plain call through pyengine.ops) of ``backend``,
    each writing x @ W^T into ``out`` (the op allocates its own)."""
    if backend == "triton":
        from pyengine.kernels.matmul import quant_matmul
        from pyengine.kernels.matryoshka import matryoshka_matmul_triton

        def plane_call():
            return matryoshka_matmul_triton(x, *planes, parent.scales, parent.zeros, None, r,
                                            GROUP_SIZE, n, k, out=out)

        def plain_call():
            return quant_matmul(x, plain.qweight, plain.scales, plain.zeros, r,
                                plain.effective_group_size, n, k, out=out)
    else:
        from pyengine.backends import PackedOperand
        from pyengine.backends._native import plane_matmul_cuda
        from pyengine.backends.cuda import CudaBackend
        cuda_backend = CudaBackend(kernel="auto")
        qt = PackedOperand(plain.qweight, plain.scales, plain.zeros, r, plain.effective_group_size)

        def plane_call():
            return plane_matmul_cuda(x, *planes, parent.scales, parent.zeros, None, r,
                                     GROUP_SIZE, n, k, out=out)

        def plain_call():
            return cuda_backend.matmul(x, qt, n, k, None, None, None, out=out)

    def plain_op():
        return pyengine.ops.dequant_matmul(x, plain, backend=backend)

    return plane_call, plain_call, plain_op


def backend_status(requested: List[str]) -> Dict[str, Optional[str]]:
    """{backend: None when it runs here, else why not} for the requested backends."""
    from pyengine.backends import get_backend
    from pyengine.backends._native import cuda_plane_kernel_unavailable_reason
    status: Dict[str, Optional[str]] = {}
    for name in requested:
        why = get_backend(name).unavailable_reason()
        if why is None and name == "cuda":
            why = cuda_plane_kernel_unavailable_reason()
        status[name] = why
    return status


def bench_matryoshka_gpu(shapes: List[tuple], ms: List[int], bits: List[int], timer: Timer,
                         copy_bw: float, failures: List[str],
                         backends: List[str] = ("triton",)) -> List[Dict[str, object]]:
    """Times the plane-layout kernel and the canonical kernel of every backend for every shape,
    M and r; returns the rows (a plain row, then its plane-layout row). Wrong results and
    exceptions go to ``failures`` (the rows of that combination are then left out)."""
    rows: List[Dict[str, object]] = []
    for n, k in shapes:
        torch.manual_seed(0)
        w = (torch.randn(n, k, device="cuda") * 0.02).to(FP16)
        parent = MatryoshkaWeight.from_quantized(
            pyengine.quantize(w, 8, GROUP_SIZE, clip_search=False))
        scale_bytes = _tensor_bytes(parent.scales, parent.zeros)
        for r in bits:
            plain = pyengine.quantize(w, r, GROUP_SIZE, clip_search=False)
            plane_ref = parent.dequantize(r, torch.float32)
            plain_ref = plain.dequantize(torch.float32)
            planes = [getattr(parent, name) if name in PLANES_READ[r] else None
                      for name in ("plane_hi", "plane_mid", "plane_lo")]
            for backend, m in itertools.product(backends, ms):
                what = f"{backend} {n}x{k} M={m} r={r}"
                try:
                    x = torch.randn(m, k, device="cuda", dtype=FP16)
                    out = torch.empty(m, n, device="cuda", dtype=FP16)
                    act_bytes = (m * k + m * n) * 2
                    plane_call, plain_call, plain_op = _kernel_calls(
                        backend, x, out, parent, planes, plain, r, n, k)
                    err_plain = _rel_err(plain_call(), x.float() @ plain_ref.T)
                    err_op = _rel_err(plain_op(), x.float() @ plain_ref.T)
                    err_plane = _rel_err(plane_call(), x.float() @ plane_ref.T)
                    bad = [f"{name} rel_err {e:.3e}" for name, e in
                           (("plain", err_plain), ("plain op", err_op), ("plane", err_plane))
                           if not e <= 1e-2]
                    if bad:
                        raise RuntimeError("wrong result: " + ", ".join(bad))
                    ms_plain, ms_op = timer(plain_call), timer(plain_op)
                    ms_plane = timer(plane_call)
                except Exception as exc:  # noqa: BLE001 - record it, go on with the others
                    failures.append(f"{what}: {type(exc).__name__}: {exc}")
                    print(f"FAILED {what}:\n{traceback.format_exc()}", flush=True)
                    continue
                plain_bytes = plain.nbytes + act_bytes
                plane_bytes = parent.code_bytes_read(r) + scale_bytes + act_bytes
                common_fields = dict(backend=backend, bits=r, group_size=GROUP_SIZE, M=m, N=n,
                                     K=k)
                rows.append(dict(op="dequant_matmul", **common_fields, ms=round(ms_plain, 5),
                                 gbps=_gbps(plain_bytes, ms_plain),
                                 pct_copy_bw=_pct(plain_bytes, ms_plain, copy_bw),
                                 matryoshka=False, ms_op=round(ms_op, 5),
                                 bytes=plain_bytes, rel_err=round(err_plain, 6)))
                rows.append(dict(op="matryoshka_matmul", **common_fields, ms=round(ms_plane, 5),
                                 gbps=_gbps(plane_bytes, ms_plane),
                                 pct_copy_bw=_pct(plane_bytes, ms_plane, copy_bw),
                                 matryoshka=True, planes_read=list(PLANES_READ[r]),
                                 bytes=plane_bytes, time_vs_plain=round(ms_plane / ms_plain, 3),
                                 speedup_vs_plain=round(ms_plain / ms_plane, 3),
                                 rel_err=round(err_plane, 6)))
                print(f"{backend:<6} {n:>6}x{k:<6} M={m:<3} r={r}  plane {ms_plane:8.4f} ms "
                      f"{rows[-1]['gbps']:7.1f} GB/s | plain {ms_plain:8.4f} ms "
                      f"{rows[-2]['gbps']:7.1f} GB/s (op {ms_op:.4f} ms) | plane/plain "
                      f"{ms_plane / ms_plain:5.2f}", flush=True)
        torch.cuda.empty_cache()
    return rows


def _gbps(nbytes: int, ms: float) -> float:
    return round(nbytes / (ms * 1e-3) / 1e9, 2)


def _pct(nbytes: int, ms: float, copy_bw: float) -> float:
    return round(100 * nbytes / (ms * 1e-3) / 1e9 / copy_bw, 2)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="N x K list, comma separated")
    parser.add_argument("--m", type=_int_list, default=[1, 16], help="batch sizes M")
    parser.add_argument("--bits", type=_int_list, default=[8, 4, 2],
                        help="Matryoshka precisions r (and the plain kernels' bits)")
    parser.add_argument("--backends", default="triton,cuda",
                        help="backends whose plane and plain kernels are timed (those that do "
                             "not run here are recorded as skipped)")
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--warm-l2", action="store_true", help="do not flush L2 between reps")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help=f"output file (default {DEFAULT_JSON.relative_to(common.ROOT)})")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_matryoshka_gpu: torch sees no CUDA device; this benchmark needs a GPU "
              "(nothing measured, nothing written)", file=sys.stderr)
        return 2
    bad_bits = [b for b in args.bits if b not in (2, 3, 4, 8)]
    if bad_bits:
        parser.error(f"--bits: {bad_bits} have no canonical kernel to compare with (2, 3, 4, 8)")
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]

    status = backend_status([b for b in args.backends.split(",") if b])
    backends = [name for name, why in status.items() if why is None]
    if not backends:
        print(f"bench_matryoshka_gpu: no requested backend runs here: {status}", file=sys.stderr)
        return 2
    copy_bw = common.copy_bandwidth_gbps("cuda")
    meta = common.metadata("cuda")
    meta.update(copy_bandwidth_gbps=round(copy_bw, 1), group_size=GROUP_SIZE,
                activations="float16", l2_flushed=not args.warm_l2, reps=args.reps,
                timing="kernel launchers called directly into a preallocated output; ms_op: "
                       "the plain kernel through pyengine.ops.dequant_matmul",
                backends=backends,
                skipped_backends={name: why for name, why in status.items() if why})
    print(f"{meta['device']} (driver {meta.get('driver')}, torch {meta['torch']}, triton "
          f"{meta['triton']}); copy bandwidth {copy_bw:.0f} GB/s", flush=True)
    failures: List[str] = []
    rows = bench_matryoshka_gpu(shapes, args.m, args.bits,
                                Timer(args.reps, args.warmup, args.warm_l2), copy_bw, failures,
                                backends)
    meta["failures"] = failures
    common.write_results(args.json, meta, rows)
    print(f"wrote {len(rows)} rows to {args.json}")
    if failures:
        print(f"{len(failures)} failures:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
