"""CPU kernel benchmark: the ``cpu`` backend's quantized matmul against fp32 F.linear and
against PyTorch's own weight-only CPU kernels.

Measures, in one run, the machine's copy bandwidth, the fp32 dense baseline and the quantized
kernels at each bit width (all of them in the same interleaved rounds, per shape and M), and
prints the ratios (the issue's floors at M = 1, 14336 x 4096, group 128: int8 >= 2x, int4 >= 3x,
int2 >= 4x faster than fp32) with the achieved fraction of the copy bandwidth.

Peers (--peers, on by default): PyTorch's weight-only CPU kernels, the ones torchao's CPU
layouts call, on the same codes as the cpu backend and with bf16 activations (their fast path;
their fp32 paths are many times slower): ``aten._weight_int4pack_mm_for_cpu`` (int4, asymmetric,
the --group-size) against the cpu backend's int4 at that group size, and
``aten._weight_int8pack_mm`` (int8, symmetric per-channel) against the cpu backend's symmetric
per-channel int8. Each is checked against the dequantized weight before it is timed.

The cpu backend also runs with int8 activations (``act_bits=8``, rows with activations
"int8": the integer dot-product path for 2-, 3-, 4- and 8-bit weights at decode sizes), on the
weight's canonical rows (what ``ops.qlinear`` runs) and on the copy in the row-interleaved
layout that ``pyengine.Decoder`` prepares by default (backend "cpu rows8",
``CpuBackend.bind(..., layout_copy=True)``; the bytes streamed are the copy's). Every
weight is held in enough copies that one pass over all of them exceeds ``--rotate-mb`` (default
256 MB or three times the last-level cache, whichever is larger), and consecutive calls take the next copy, so that the rows
measure streaming from memory, as decoding a model does. ``--isa`` runs the cpu backend's build
for one instruction set (e.g. avx2 on an AVX-512 machine).

Before the timed rounds, the same interleaved rounds run for ``--settle-s`` seconds (default
10) as a first pass, whose medians the rows keep as ``ms_first_pass`` (and the run prints the
kernels that were 1.15x slower or more in it): on an Intel Xeon VM (6/207) the decode kernels
on freshly written copies ran 1.4-1.5x slower in about half the processes for their first
seconds and then, each kernel at its own moment, at their steady speed for good (the same
kernels timed alone, 50 calls each, later in those processes read within 1.12x of their
fastest rounds), which made single runs bimodal. A
decoder reads its weights for as long as it runs: the timed rounds measure that steady state.

Writes JSON rows to benchmarks/results/ (--json to choose the file); rows carry
``activations`` (float32, bfloat16 or int8).

    python benchmarks/bench_cpu_kernels.py [--shapes 14336x4096,4096x4096] [--m 1,8,123]
    python benchmarks/bench_cpu_kernels.py --isa avx2 --json benchmarks/results/cpu_kernels_avx2.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import pyengine  # noqa: E402
from pyengine.backends import huge_pages  # noqa: E402
from pyengine.ops.act_quant import quantize_activations  # noqa: E402

FLOORS_M1 = {8: 2.0, 4: 3.0, 2: 4.0}  # speedup over fp32 F.linear at M = 1, 14336 x 4096, g128
# a kernel whose first-pass median is this much slower than its timed one is named in the output
SLOW_FIRST_PASS = 1.15


class Kernel(NamedTuple):
    """One timed kernel: its result row's labels, the bytes its weight occupies, and a call."""
    op: str
    backend: str
    bits: int
    group_size: int
    activations: str
    nbytes: int
    call: Callable[[], torch.Tensor]
    huge_pages: bool = False  # the weight in huge-page memory (pyengine.backends.huge_pages)


# the copy timed with the kernels (as pyengine.benchmarking's: past the last-level cache)
COPY_BYTES = common.cpu_streaming_bytes(64 << 20)


def copy_call(in_huge_pages: bool) -> Callable[[], torch.Tensor]:
    """A copy of COPY_BYTES between two buffers, in ordinary memory or in the huge-page memory
    of the decoder's weight copies: timed among the kernels, so that each row's fraction of the
    copy bandwidth is a ratio within the same rounds (the machine's bandwidth drifts)."""
    src = torch.empty(COPY_BYTES // 4).uniform_()
    dst = torch.empty_like(src)
    if in_huge_pages:
        src, dst = huge_pages.huge_page_copy(src), huge_pages.huge_page_copy(dst)
    return lambda: dst.copy_(src)


def _check(name: str, got: torch.Tensor, x: torch.Tensor, dense: torch.Tensor) -> None:
    """Relative error of a bf16-activation kernel against x @ dense^T in fp32."""
    ref = x.float() @ dense.T
    err = ((got.float() - ref).norm() / ref.norm()).item()
    if not err <= 2e-2:
        raise SystemExit(f"bench_cpu_kernels: {name} is wrong ({err:.2e} relative error)")


class PeerWeights(NamedTuple):
    """One weight prepared once for the peer comparison (all M of a shape)."""
    group_size: int
    q4: pyengine.QuantizedWeight     # int4, asymmetric, group_size, bf16 scales
    packed4: torch.Tensor             # q4's codes in aten's int4 CPU packing
    scale_and_zero: torch.Tensor      # bf16 [G, N, 2]: aten's (scale, zero) per group
    q8: pyengine.QuantizedWeight     # int8, symmetric, per channel, bf16 scales
    w8: torch.Tensor                  # int8 [N, K]: q8's codes - 128
    s8: torch.Tensor                  # bf16 [N]: q8's scales

    @property
    def nbytes(self) -> int:
        """Bytes held by all of its tensors (a copy's share of the rotation): about 3 N K, of
        which each peer kernel reads N K / 2 or N K."""
        tensors = (self.packed4, self.scale_and_zero, self.w8, self.s8)
        return self.q4.nbytes + self.q8.nbytes + sum(t.numel() * t.element_size() for t in tensors)


def peer_weights(w: torch.Tensor, group_size: int) -> PeerWeights:
    """w ([N, K] fp32) quantized once for the cpu backend and packed for PyTorch's kernels on
    the same codes. int4: aten's tinygemm form is w = (q - 8) * scale + zero, so ours,
    w = (q - z) * s, is scale = s and zero = (8 - z) * s. int8: w = (q - 128) * s."""
    q4 = pyengine.quantize(w, 4, group_size, clip_search=False, scale_dtype=torch.bfloat16)
    s4, z4 = q4.scales.float(), q4.zeros.float()
    scale_and_zero = torch.stack([s4, (8 - z4) * s4], -1).transpose(0, 1).contiguous()
    packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4.codes().to(torch.int32), 1)
    q8 = pyengine.quantize(w, 8, -1, symmetric=True, clip_search=False,
                           scale_dtype=torch.bfloat16)
    return PeerWeights(group_size, q4, packed4, scale_and_zero.to(torch.bfloat16), q8,
                       (q8.codes() - 128).to(torch.int8), q8.scales[:, 0].contiguous())


def _copies(obj, nbytes: int, rotate_mb: int, copy: Callable) -> list:
    """obj and enough copies of it that all of them hold at least rotate_mb MB."""
    count = min(4096, max(1, -(-rotate_mb * 10**6 // max(1, nbytes))))
    return [obj] + [copy(obj) for _ in range(count - 1)]


def _copy_qweight(qw):
    return pyengine.QuantizedWeight(
        qw.qweight.clone(), qw.scales.clone(), None if qw.zeros is None else qw.zeros.clone(),
        bits=qw.bits, group_size=qw.group_size, shape=tuple(qw.shape), method=qw.method)


def _copy_peer(pw: PeerWeights) -> PeerWeights:
    return PeerWeights(pw.group_size, _copy_qweight(pw.q4), pw.packed4.clone(),
                       pw.scale_and_zero.clone(), _copy_qweight(pw.q8), pw.w8.clone(),
                       pw.s8.clone())


def rows8_kernel(copies: list, x: torch.Tensor, n: int, k: int) -> Optional[Kernel]:
    """The int8-activation decode on the row-interleaved copy the decoder prepares (one per
    weight copy, taken in turn), checked against the quantized activations times the
    dequantized weight; None where the cpu backend does not interleave this weight."""
    from pyengine.backends import get_backend
    from pyengine.backends.base import PackedOperand
    backend = get_backend("cpu")
    qw = copies[0]
    ops = [PackedOperand(q.qweight, q.scales, q.zeros, q.bits, q.effective_group_size)
           for q in copies]
    if not backend.interleaves(ops[0], n, 8):
        return None
    calls = [backend.bind(op, n, k, None, act_bits=8, dtype=torch.float32, layout_copy=True)
             for op in ops]
    out = torch.empty(x.shape[0], n)
    calls[0](x, out, False)
    _check(f"cpu rows8 int{qw.bits}", out, quantize_activations(x), qw.dequantize(torch.float32))
    words = calls[0].keep[2][0]  # the interleaved copy (CpuBackend.bind)
    return Kernel("dequant_matmul", "cpu rows8", qw.bits, qw.group_size, "int8",
                  calls[0].prepared_bytes,
                  common.rotating(calls, lambda call: call(x, out, False) or out),
                  huge_pages=bool(huge_pages.huge_pages_eligible(words)))


def peer_kernels(pws: List[PeerWeights], x: torch.Tensor) -> List[Kernel]:
    """PyTorch's int4 / int8 weight-only CPU kernels and the cpu backend on the same codes, all
    with bf16 activations x ([M, K]), each checked before it is timed; each call takes the next
    copy of pws (rotation, as for the other rows)."""
    xb = x.to(torch.bfloat16)
    aten = torch.ops.aten
    pw = pws[0]
    gs = pw.q4.effective_group_size
    nbytes4 = (pw.packed4.numel() * pw.packed4.element_size()
               + pw.scale_and_zero.numel() * pw.scale_and_zero.element_size())
    kernels = [
        (Kernel("dequant_matmul", "aten-int4pack", 4, pw.group_size, "bfloat16", nbytes4,
                common.rotating(pws, lambda p: aten._weight_int4pack_mm_for_cpu(
                    xb, p.packed4, gs, p.scale_and_zero))), pw.q4),
        (Kernel("dequant_matmul", "cpu", 4, pw.group_size, "bfloat16", pw.q4.nbytes,
                common.rotating(pws, lambda p: pyengine.ops.dequant_matmul(xb, p.q4,
                                                                           backend="cpu"))),
         pw.q4),
        (Kernel("dequant_matmul", "aten-int8pack", 8, -1, "bfloat16",
                pw.w8.numel() + pw.s8.numel() * pw.s8.element_size(),
                common.rotating(pws, lambda p: aten._weight_int8pack_mm(xb, p.w8, p.s8))), pw.q8),
        (Kernel("dequant_matmul", "cpu", 8, -1, "bfloat16", pw.q8.nbytes,
                common.rotating(pws, lambda p: pyengine.ops.dequant_matmul(xb, p.q8,
                                                                           backend="cpu"))),
         pw.q8),
    ]
    for kernel, qw in kernels:
        _check(f"{kernel.backend} int{kernel.bits}", kernel.call(), xb, qw.dequantize(torch.float32))
    return [kernel for kernel, _ in kernels]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="14336x4096", help="NxK list, comma separated")
    parser.add_argument("--m", default="1,8,123", help="batch sizes M, comma separated")
    parser.add_argument("--bits", default="8,4,3,2")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--settle-s", type=float, default=10.0,
                        help="seconds of interleaved rounds before the timed ones (their "
                             "medians kept as ms_first_pass; 0: none)")
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                        help="also time PyTorch's int4 / int8 weight-only CPU kernels")
    parser.add_argument("--act8", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the cpu backend with int8 activations (act_bits=8)")
    parser.add_argument("--rotate-mb", type=int, default=common.default_rotate_mb(),
                        help="hold each weight in enough copies to stream this many MB per pass")
    parser.add_argument("--isa", default="",
                        help="the cpu backend's instruction-set build (default: the best here)")
    parser.add_argument("--json", type=Path, default=common.RESULTS / "cpu_kernels.json")
    args = parser.parse_args(argv)

    if "cpu" not in pyengine.available_backends():
        print(f"the cpu backend is not available: {pyengine.build_info()['extension_error']}")
        return 1
    why_not = common.use_cpu_isa(args.isa) if args.isa else None
    if why_not:
        print(why_not)
        return 1
    torch.manual_seed(0)
    meta = common.metadata("cpu")
    # the copies timed with each shape and M's kernels: ordinary memory, and where the OS has
    # them the huge pages that hold the interleaved copies (the rows8 rows are measured against
    # that one, the others against the ordinary one)
    copies = {"copy": copy_call(False)}
    if huge_pages.unavailable_reason() is None:
        copies["copy in huge pages"] = copy_call(True)
    copy_gbps_runs = {name: [] for name in copies}
    if args.isa:
        meta["cpu_isa"] = args.isa
    meta["rotate_mb"] = args.rotate_mb
    print(f"{meta['device']}, kernels: {meta['cpu_isa']}")

    rows = []
    failures = []
    print(f"{'N x K':>12} {'M':>4} {'kernel':>26} {'ms':>8} {'GB/s':>7} {'%copy':>6} {'vs fp32':>8}")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        w = torch.randn(n, k) * 0.02
        bits_list = [int(b) for b in args.bits.split(",")]
        qweights = {bits: pyengine.quantize(w, bits, args.group_size, clip_search=False)
                    for bits in bits_list}
        # copies streamed in turn (rotation): [dense copies], {bits: [quantized copies]}
        dense_copies = _copies(w, w.numel() * 4, args.rotate_mb, lambda t: t.clone())
        q_copies = {bits: _copies(qw, qw.nbytes, args.rotate_mb, _copy_qweight)
                    for bits, qw in qweights.items()}
        peers_for_shape: Optional[List[PeerWeights]] = None
        if args.peers:
            try:
                first = peer_weights(w, args.group_size)
                peers_for_shape = _copies(first, first.nbytes, args.rotate_mb, _copy_peer)
            except RuntimeError as err:  # a shape or build PyTorch's kernels do not take
                print(f"{shape:>12} peers not run: {str(err).splitlines()[0]}")
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k)
            kernels = {"fp32": Kernel("linear", "torch", 32, 0, "float32", w.numel() * 4,
                                      common.rotating(dense_copies, lambda d: F.linear(x, d)))}
            for bits, qw in qweights.items():
                kernels[f"int{bits}"] = Kernel(
                    "dequant_matmul", "cpu", bits, args.group_size, "float32", qw.nbytes,
                    common.rotating(q_copies[bits],
                              lambda q: pyengine.ops.dequant_matmul(x, q, backend="cpu")))
                if args.act8:
                    _check(f"cpu int{bits} act8",
                           pyengine.ops.qlinear(x, qw, act_bits=8, backend="cpu"),
                           quantize_activations(x), qw.dequantize(torch.float32))
                    kernels[f"int{bits} a8"] = Kernel(
                        "dequant_matmul", "cpu", bits, args.group_size, "int8", qw.nbytes,
                        common.rotating(q_copies[bits], lambda q: pyengine.ops.qlinear(
                            x, q, act_bits=8, backend="cpu")))
                    rows8 = rows8_kernel(q_copies[bits], x, n, k)
                    if rows8 is not None:
                        kernels[f"int{bits} a8 rows8"] = rows8
            if peers_for_shape is not None:
                try:
                    peers = peer_kernels(peers_for_shape, x)
                except RuntimeError as err:
                    peers = []
                    print(f"{shape:>12} {m:>4} peers not run: {str(err).splitlines()[0]}")
                for kernel in peers:
                    kernels[f"{kernel.backend} int{kernel.bits} bf16"] = kernel
            fns = {**{name: kn.call for name, kn in kernels.items()}, **copies}
            first_pass = (common.time_interleaved(fns, rounds=1, min_seconds=args.settle_s)
                          if args.settle_s > 0 else {})
            times = common.time_interleaved(fns, warmup=0 if first_pass else 3,
                                            rounds=args.reps)
            copy_gbps = {name: 2 * COPY_BYTES / (times.pop(name) * 1e-3) / 1e9
                         for name in copies}
            for name, gbps in copy_gbps.items():
                copy_gbps_runs[name].append(gbps)
            print(f"{shape:>12} {m:>4} copy {copy_gbps['copy']:.1f} GB/s"
                  + (f", in huge pages {copy_gbps['copy in huge pages']:.1f} GB/s"
                     if "copy in huge pages" in copy_gbps else ""))
            base_ms = times["fp32"]
            for name, ms in times.items():
                kn = kernels[name]
                act_bytes = (m * k + m * n) * (2 if kn.activations == "bfloat16" else 4)
                gbps = (kn.nbytes + act_bytes) / (ms * 1e-3) / 1e9
                speedup = base_ms / ms
                reference_bw = (copy_gbps.get("copy in huge pages", copy_gbps["copy"])
                                if kn.huge_pages else copy_gbps["copy"])
                rows.append(dict(op=kn.op, backend=kn.backend, bits=kn.bits,
                                 group_size=kn.group_size, M=m, N=n, K=k,
                                 activations=kn.activations, ms=ms,
                                 gbps=gbps, pct_copy_bw=100 * gbps / reference_bw,
                                 copy_gbps=round(reference_bw, 2),
                                 huge_pages=kn.huge_pages, speedup_vs_fp32=speedup,
                                 ms_first_pass=first_pass.get(name)))
                print(f"{shape:>12} {m:>4} {name:>26} {ms:8.3f} {gbps:7.1f} "
                      f"{100 * gbps / reference_bw:6.1f} {speedup:8.2f}")
                if (m == 1 and (n, k) == (14336, 4096) and args.group_size == 128
                        and kn.backend in ("cpu", "cpu rows8")
                        and kn.activations in ("float32", "int8")):
                    floor = FLOORS_M1.get(kn.bits)
                    if floor and speedup < floor:
                        failures.append(f"{name}: {speedup:.2f}x < {floor}x")
            slow_first = [f"{name} {first_pass[name] / ms:.2f}x" for name, ms in times.items()
                          if first_pass.get(name, 0) >= SLOW_FIRST_PASS * ms]
            if slow_first:
                print(f"{shape:>12} {m:>4} slower in the first pass: " + ", ".join(slow_first))
    # medians of the copies of every shape and M (each row carries its own: copy_gbps)
    meta["copy_bandwidth_gbps"] = round(statistics.median(copy_gbps_runs["copy"]), 2)
    meta["copy_bandwidth_huge_pages_gbps"] = (
        round(statistics.median(copy_gbps_runs["copy in huge pages"]), 2)
        if "copy in huge pages" in copy_gbps_runs else None)
    meta["copy_measured"] = "with each shape and M's kernels, in the same rounds"
    common.write_results(args.json, meta, rows)
    print(f"wrote {args.json}")
    if failures:
        print("below the floors: " + "; ".join(failures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
