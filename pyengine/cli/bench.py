"""``pyengine bench [DIR]``."""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

from .checks import UsageError, check_output_file
from .common import check_device, dtype_of, load_model, mib, require_supported


def _shapes(text: str) -> List[tuple]:
    shapes = []
    for part in text.split(","):
        try:
            n, k = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise UsageError(f"--shapes: expected NxK[,NxK...], got {part!r}") from None
        if n < 1 or k < 1:
            raise UsageError(f"--shapes: sizes must be positive, got {part!r}")
        shapes.append((n, k))
    return shapes


def _dense_linear_cases(model: nn.Module, bits: Sequence[int], group_size: int):
    """Kernel cases from an uncompressed model's decoder linear shapes, quantized at ``bits``."""
    from ..benchmarking import KernelCase
    from ..pipeline.compress import quantizable_linears
    from ..model.adapters import get_adapter
    from ..quant.rtn import quantize
    prefix = get_adapter(model).layers + "."
    seen, cases = set(), []
    for name, linear, _, _ in quantizable_linears(model):
        if not name.startswith(prefix) or not hasattr(linear, "weight"):
            continue
        n, k = linear.weight.shape
        for b in bits:
            case = KernelCase(n, k, b, group_size)
            if case not in seen:
                seen.add(case)
                cases.append((case, quantize(linear.weight.detach().float().cpu(), b,
                                             group_size, clip_search=False)))
    return cases


def cmd_bench(args: argparse.Namespace) -> int:
    """``pyengine bench [DIR]``: kernel rows and, with a model, end-to-end rows."""
    from .. import benchmarking as bm
    from ..backends import BackendError, available_backends, known_backends
    from ..pipeline.compress import dequantize_model
    check_device(args.device)
    args.json = check_output_file(args.json, "--json")
    device = args.device
    dtype = dtype_of(args.dtype) or (torch.float16 if device == "cuda" else torch.float32)
    ms = args.m or bm.DEFAULT_M[device]
    bits = args.bits or bm.DEFAULT_BITS[device]
    reps = args.reps or (50 if device == "cuda" else 15)
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        if not backends:
            raise UsageError(f"--backends: expected backend names, got {args.backends!r}; "
                             f"available here: {available_backends()}")
        unknown = [b for b in backends if b not in known_backends()]
        missing = [b for b in backends if b in known_backends() and b not in available_backends()]
        if unknown or missing:
            raise UsageError(f"--backends: unknown {unknown}, unavailable {missing}; available "
                             f"here: {available_backends()}")
    else:
        backends = bm.kernel_backends(device, dtype)

    loaded = None
    if args.model:
        loaded = load_model(args.model, device, dtype)
        require_supported(loaded.model)
        cases = bm.model_kernel_cases(loaded.model)
        if not cases:
            cases = _dense_linear_cases(loaded.model, bits, args.group_size)
    else:
        shapes = _shapes(args.shapes) if args.shapes else bm.DEFAULT_SHAPES[device]
        cases = bm.random_kernel_cases(shapes, bits, args.group_size)
    if args.max_shapes:
        keep = sorted({(c.n, c.k) for c, _ in cases}, key=lambda s: -s[0] * s[1])[:args.max_shapes]
        cases = [(c, qw) for c, qw in cases if (c.n, c.k) in keep]

    copy_bw = bm.copy_bandwidth_gbps(device)
    meta = bm.metadata(device)
    meta.update(copy_bandwidth_gbps=round(copy_bw, 2), backends=backends,
                activation_dtype=str(dtype).replace("torch.", ""), model=args.model, reps=reps)
    print(f"{meta['device']}; copy bandwidth {copy_bw:.1f} GB/s; backends {', '.join(backends)}; "
          f"activations {meta['activation_dtype']}")
    try:
        rows = bm.kernel_rows(cases, ms, device, dtype, backends, copy_bw, reps=reps)
    except BackendError as exc:  # a requested backend that cannot serve a case
        raise UsageError(f"--backends: {exc}") from None
    print(f"{'op':>15} {'backend':>7} {'bits':>4} {'N x K':>12} {'M':>5} {'ms':>9} {'GB/s':>8} "
          f"{'%copy':>6} {'vs fp16':>8}")
    for r in rows:
        shape = f"{r['N']}x{r['K']}"
        print(f"{r['op']:>15} {r['backend']:>7} {r['bits']:>4} {shape:>12} "
              f"{r['M']:>5} {r['ms']:9.4f} {r['gbps']:8.2f} {r['pct_copy_bw']:6.1f} "
              f"{r['speedup_vs_fp16']:8.2f}")

    e2e: List[Dict[str, Any]] = []
    if loaded is not None and not args.no_end_to_end:
        prompt_len = args.prompt_len or (512 if device == "cuda" else 64)
        new_tokens = args.new_tokens or (64 if device == "cuda" else 16)
        variants = [("compressed" if loaded.compressed else "model", loaded.model)]
        if loaded.compressed and not args.no_dense:
            variants.append(("dequantized (dense)", None))
        from ..utils import progress
        for label, model in progress(variants, desc="end to end", unit="model"):
            model = model if model is not None else dequantize_model(loaded.model)
            try:
                row = bm.end_to_end_row(model, label, prompt_len, new_tokens,
                                        runner=args.runner)
            except ValueError as exc:  # --runner decoder on a model it does not run
                raise UsageError(f"--runner: {exc}") from None
            e2e.append(row)
        print(f"{'model':>20} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak MiB':>9} "
              f"{'weights':>10}  decode loop")
        for r in e2e:
            print(f"{r['model']:>20} {r['prefill_tokens_per_s']:14.1f} "
                  f"{r['decode_tokens_per_s']:13.2f} {r['peak_memory_mib']:9.1f} "
                  f"{mib(r['weight_bytes']):>10}  {r['decode_runner']}")
        print(f"(batch 1, prompt {prompt_len} tokens, {new_tokens} greedy tokens; peak memory: "
              f"{e2e[0]['peak_memory_kind']})")
    if args.json:
        bm.write_json(args.json, meta, rows, end_to_end=e2e)
        print(f"wrote {args.json}")
    return 0

