"""Timing helpers and measurements shared by the ``pyengine bench`` and ``pyengine demo``
commands: kernel rows (quantized matmul against a dense fp16 ``F.linear`` measured in the same
run) and end-to-end rows (prefill and decode tokens/s, peak memory) of a whole model.

Kernel rows carry ``op, backend, bits, group_size, M, N, K, ms, gbps, pct_copy_bw,
speedup_vs_fp16`` (plus ``dtype`` and ``rel_err``); results are written as JSON
``{"meta": {...}, "rows": [...], "end_to_end": [...]}``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import random
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .format.qweight import QuantizedWeight
from .utils import progress

FP16 = torch.float16

# Layer shapes (N x K) timed when no model is given: SmolLM2-135M on a CPU (small, quick),
# Llama-3-8B on a GPU.
DEFAULT_SHAPES: Dict[str, List[Tuple[int, int]]] = {
    "cpu": [(1536, 576), (576, 1536), (576, 576), (192, 576)],
    "cuda": [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096)],
}
DEFAULT_BITS: Dict[str, List[int]] = {"cpu": [8, 4], "cuda": [8, 4, 3, 2]}
DEFAULT_M: Dict[str, List[int]] = {"cpu": [1, 16], "cuda": [1, 16, 256]}


# ---- timing ----------------------------------------------------------------------------------

def synchronize(device: str) -> None:
    """Waits for the device's queued work (a no-op on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_cpu(fn: Callable[[], object], warmup: int = 3, reps: int = 25) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def time_cuda(fn: Callable[[], object], warmup: int = 10, reps: int = 100) -> float:
    """Median time of ``fn()`` in milliseconds, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(reps)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairs)


def time_interleaved(fns: Dict[str, Callable[[], object]], device: str = "cpu", warmup: int = 3,
                     rounds: int = 25, min_seconds: float = 0.0) -> Dict[str, float]:
    """Median time (ms) of each function, measured round-robin so that slow drifts of a shared
    machine hit all of them alike and the ratios between them stay meaningful. Each round takes
    the functions in a fresh order (seeded, so runs repeat): in a fixed order one function
    always follows the same other one and pays for what it leaves behind (on an Intel Xeon a
    decode kernel ran 3-5% slower right after a copy past the last-level cache than after
    another kernel). Rounds go on past ``rounds`` until ``min_seconds`` have passed since the
    first (CPU). On CUDA each function is timed with events (:func:`time_cuda`) instead."""
    if device == "cuda":
        return {name: time_cuda(fn, warmup=warmup, reps=rounds) for name, fn in fns.items()}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    order, shuffle = list(fns), random.Random(0).shuffle
    start, done = time.perf_counter(), 0
    while done < rounds or time.perf_counter() - start < min_seconds:
        done += 1
        shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) * 1e3 for name, v in samples.items()}


CPU0_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")
_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}  # of sysfs cache sizes ("266240K")


def last_level_cache_bytes(caches: Path = CPU0_CACHES) -> Optional[int]:
    """The size of the CPU's last-level cache: the highest level listed under ``caches`` (Linux's
    cache directories of CPU 0; e.g. 260 MiB of L3 on an Intel Xeon server VM), or None where
    none can be read."""
    level, size = 0, None
    for index in caches.glob("index*"):
        try:
            this_level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        try:
            this_size = (int(text[:-1]) * _SIZE_UNITS[text[-1]] if text[-1] in _SIZE_UNITS
                         else int(text))
        except ValueError:
            continue
        if this_level > level:
            level, size = this_level, this_size
    return size


def cpu_streaming_bytes(minimum: int) -> int:
    """Bytes of a CPU buffer that a timed pass streams from memory, not from the caches: at
    least ``minimum``, and at least twice the last-level cache (a 64 MiB copy fits in the
    260 MiB L3 of some server CPUs, and would time the cache instead)."""
    return max(minimum, 2 * (last_level_cache_bytes() or 0))


def copy_bandwidth_gbps(device: str, nbytes: Optional[int] = None,
                        huge_pages: bool = False) -> float:
    """Measured copy bandwidth of ``device``: (bytes read + bytes written) / time of a large
    copy (256 MiB, on a CPU at least twice its last-level cache; unless ``nbytes`` is given).
    ``huge_pages`` (CPU): both buffers in the huge-page memory of the prepared weight copies
    (pyengine.backends.huge_pages; ordinary memory where the OS has none)."""
    nbytes = nbytes or ((256 << 20) if device == "cuda" else cpu_streaming_bytes(256 << 20))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    if huge_pages and device == "cpu":
        from .backends.huge_pages import huge_page_copy
        src, dst = huge_page_copy(src), huge_page_copy(dst)
    if device == "cuda":
        ms = time_cuda(lambda: dst.copy_(src), warmup=3, reps=20)
    else:
        ms = time_cpu(lambda: dst.copy_(src), warmup=2, reps=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ---- metadata ---------------------------------------------------------------------------------

def device_name(device: str) -> str:
    """A readable name of the device: the GPU's name, or the CPU model with its thread count."""
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


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, check=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def metadata(device: str) -> Dict[str, object]:
    """Device, versions, commit and date of a benchmark run."""
    from . import __version__, build_info
    info = build_info()
    meta: Dict[str, object] = {
        "device": device_name(device),
        "device_type": device,
        "torch": torch.__version__,
        "triton": info.get("triton_version"),
        "pyengine": __version__,
        "cpu_isa": info.get("cpu_isa_selected"),
        "commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device == "cuda":
        meta["cuda"] = torch.version.cuda
        meta["driver"] = _nvidia_driver()
    else:
        llc = last_level_cache_bytes()
        meta["last_level_cache_mib"] = None if llc is None else llc >> 20
        meta["cpu_family_model"] = _cpu_family_model()
        # the cpu backend's run-time switches as the run started (PYENGINE_CPU_ZMM, _VNNI,
        # _VECTOR_PAIRS, _PREFETCH): which path the interleaved decode kernel took
        from .backends.cpu import SWITCH_VARIABLES
        meta["cpu_switches"] = {key: info.get(key) for key in SWITCH_VARIABLES.values()}
    return meta


def _cpu_family_model() -> Optional[str]:
    """"family/model" of /proc/cpuinfo (e.g. 6/207: Intel Emerald Rapids; 25/17: AMD Zen 4),
    which tells CPUs apart where the model name does not ("Intel(R) Xeon(R) Processor")."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("cpu family", "model") and key.strip() not in fields:
                fields[key.strip()] = value.strip()
            if not line.strip() and fields:
                break
    except OSError:
        return None
    if len(fields) < 2:
        return None
    return f"{fields['cpu family']}/{fields['model']}"


def _nvidia_driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_json(path: "str | os.PathLike", meta: Dict[str, object], rows: List[Dict[str, object]],
               **sections: List[Dict[str, object]]) -> Path:
    """Writes ``{"meta": meta, "rows": rows, **sections}`` as indented JSON; returns the path."""
    out = Path(path)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, **sections}, indent=1) + "\n")
    return out


# ---- kernel rows ------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelCase:
    """One quantized layer shape: out_features N, in_features K, bits and group size."""

    n: int
    k: int
    bits: int
    group_size: int

    def describe(self) -> str:
        return f"{self.n}x{self.k} int{self.bits} g{self.group_size}"


def model_kernel_cases(model: nn.Module) -> List[Tuple[KernelCase, QuantizedWeight]]:
    """The distinct quantized layer shapes of ``model`` (one of its own weights for each)."""
    from .nn.quant_linear import QuantLinear
    found: Dict[KernelCase, QuantizedWeight] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            case = KernelCase(module.out_features, module.in_features, module.bits,
                              module.group_size)
            found.setdefault(case, module.quantized_weight)
    return sorted(found.items(), key=lambda item: (-item[0].n * item[0].k, -item[0].bits))


def random_kernel_cases(shapes: Sequence[Tuple[int, int]], bits: Sequence[int], group_size: int,
                        seed: int = 0) -> List[Tuple[KernelCase, QuantizedWeight]]:
    """Random weights of ``shapes`` (N, K) quantized (RTN) at each of ``bits``."""
    from .quant.rtn import quantize
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for n, k in shapes:
        w = torch.randn(n, k, generator=gen) * 0.02
        for b in bits:
            cases.append((KernelCase(n, k, b, group_size),
                          quantize(w, b, group_size, clip_search=False)))
    return cases


def kernel_backends(device: str, dtype: torch.dtype, include_reference: bool = False) -> List[str]:
    """Backends available here that serve a quantized matmul on ``device`` with ``dtype``
    activations; the ``torch`` reference only when asked or when nothing else serves it."""
    from .backends import LinearCase, available_backends, get_backend
    probe = LinearCase(device_type=device, dtype=dtype, kind="packed", bits=4)
    names = [b for b in available_backends() if get_backend(b).unsupported_reason(probe) is None]
    native = [b for b in names if b != "torch"]
    if include_reference or not native:
        return names
    return native


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y64, r64 = y.double(), ref.double()
    if not bool(torch.isfinite(y64).all()):
        return float("inf")
    return float((y64 - r64).norm() / r64.norm().clamp_min(1e-30))


def kernel_rows(cases: Sequence[Tuple[KernelCase, QuantizedWeight]], ms: Sequence[int],
                device: str, dtype: torch.dtype, backends: Sequence[str], copy_bw: float,
                reps: int = 25, show_progress: bool = True) -> List[Dict[str, object]]:
    """Times ``dequant_matmul`` of every case, M and backend against ``F.linear`` with the
    dense fp16 weight (and, for other activation dtypes, the dense weight in that dtype).

    Returns rows with op, backend, bits, group_size, M, N, K, ms, gbps (weight + activation
    bytes per second), pct_copy_bw, speedup_vs_fp16, dtype and rel_err (against fp64 math on
    the dequantized weight); the dense baselines are rows of op ``linear``.
    """
    from . import ops
    rows: List[Dict[str, object]] = []
    dense_backend = "cublas" if device == "cuda" else "torch"
    act_size = torch.empty((), dtype=dtype).element_size()
    for case, qw in progress(cases, desc="kernels", enabled=show_progress, unit="shape"):
        qw = qw.to(device=device, dtype=dtype)  # scales in the activation dtype
        dense16 = qw.dequantize(FP16).to(device)
        dense_act = dense16 if dtype == FP16 else qw.dequantize(dtype).to(device)
        n, k = case.n, case.k
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=dtype)
            x16 = x.to(FP16)
            ref = F.linear(x.double(), qw.dequantize(torch.float32).to(device).double())
            fns: Dict[str, Callable[[], object]] = {"fp16": lambda: F.linear(x16, dense16)}
            if dtype != FP16:
                fns["dense"] = lambda: F.linear(x, dense_act)
            errs: Dict[str, float] = {}
            for b in backends:
                fn = (lambda b=b: ops.dequant_matmul(x, qw, backend=b))
                errs[b] = _rel_err(fn(), ref)
                fns[b] = fn
            times = time_interleaved(fns, device=device, rounds=reps)
            fp16_ms = times["fp16"]

            def row(op: str, backend: str, bits: int, group_size: int, ms_: float, nbytes: int,
                    row_dtype: torch.dtype, **extra: object) -> None:
                gbps = nbytes / (ms_ * 1e-3) / 1e9
                rows.append(dict(op=op, backend=backend, bits=bits, group_size=group_size, M=m,
                                 N=n, K=k, ms=round(ms_, 5), gbps=round(gbps, 3),
                                 pct_copy_bw=round(100 * gbps / copy_bw, 2),
                                 speedup_vs_fp16=round(fp16_ms / ms_, 3),
                                 dtype=str(row_dtype).replace("torch.", ""), **extra))

            row("linear", dense_backend, 16, 0, fp16_ms, n * k * 2 + (m * k + m * n) * 2, FP16)
            if "dense" in times:
                row("linear", dense_backend, 8 * act_size, 0, times["dense"],
                    (n * k + m * k + m * n) * act_size, dtype)
            for b in backends:
                extra = {"rel_err": round(errs[b], 7)}
                if "dense" in times:
                    extra["speedup_vs_dense"] = round(times["dense"] / times[b], 3)
                row("dequant_matmul", b, case.bits, case.group_size, times[b],
                    qw.nbytes + (m * k + m * n) * act_size, dtype, **extra)
    return rows


# ---- end to end -------------------------------------------------------------------------------

def peak_memory_mib(device: str) -> Tuple[float, str]:
    """(peak memory in MiB, what it measures): the CUDA caching allocator's peak since the last
    reset on a GPU; the process' peak resident set size on a CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


@torch.inference_mode()
def prefill_tokens_per_s(model: nn.Module, prompt_len: int = 128, batch: int = 1,
                         reps: int = 3, seed: int = 0) -> float:
    """Tokens per second of one forward pass over ``batch`` random prompts of ``prompt_len``
    tokens (no cache), the median of ``reps`` runs after a warm-up."""
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") \
        else model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=gen).to(device)
    run = lambda: model(input_ids=ids, use_cache=False)  # noqa: E731
    timer = time_cuda if device.type == "cuda" else time_cpu
    ms = timer(run, warmup=1, reps=reps)
    return batch * prompt_len / (ms * 1e-3)


RUNNERS = ("auto", "decoder", "transformers")


def pick_runner(model: nn.Module, max_len: int, runner: str = "auto") -> str:
    """The decode loop a measurement uses: "decoder" (pyengine.Decoder, the lean loop) or
    "transformers" (``model.generate``). "auto" takes the decoder where it runs the model."""
    from .decoder import decoder_blocker
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    if runner == "auto":
        return "transformers" if decoder_blocker(model, max_len) else "decoder"
    if runner == "decoder":
        why = decoder_blocker(model, max_len)
        if why:
            raise ValueError(f"runner 'decoder' cannot run this model: {why}")
    return runner


@torch.inference_mode()
def decode_tokens_per_s(model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 32,
                        warmup_tokens: int = 4, runner: str = "auto") -> Tuple[float, torch.Tensor]:
    """Greedy generation speed: ``new_tokens`` / wall time of a generation (a short prompt's
    prefill included), timed after a warm-up generation, through :func:`pick_runner`'s loop.
    Returns (tokens/s, output ids [batch, T + new_tokens])."""
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    runner = pick_runner(model, ids.shape[1] + new_tokens, runner)
    if runner == "decoder":
        from .decoder import Decoder
        decoder = Decoder(model, max_len=ids.shape[1] + max(new_tokens, warmup_tokens),
                          batch=ids.shape[0])
        generate = lambda n: decoder.generate(ids, n)  # noqa: E731
    else:
        mask = torch.ones_like(ids)
        kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=_pad_id(model))
        generate = lambda n: model.generate(ids, max_new_tokens=n, min_new_tokens=n,  # noqa: E731
                                            **kwargs)
    generate(warmup_tokens)
    synchronize(device.type)
    t0 = time.perf_counter()
    out = generate(new_tokens)
    synchronize(device.type)
    seconds = time.perf_counter() - t0
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / seconds, out


def _pad_id(model: nn.Module) -> Optional[int]:
    gen_cfg = getattr(model, "generation_config", None)
    for cfg in (gen_cfg, model.config):
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0


def end_to_end_row(model: nn.Module, label: str, prompt_len: int = 64, new_tokens: int = 16,
                   batch: int = 1, seed: int = 0, runner: str = "auto") -> Dict[str, object]:
    """Prefill tokens/s, decode tokens/s (batch ``batch``, greedy, through ``runner``: see
    :func:`pick_runner`) and peak memory of ``model``."""
    from .pipeline.compress import storage_bytes
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prefill = prefill_tokens_per_s(model, prompt_len, batch, seed=seed)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(3, vocab, (batch, 8), generator=gen)
    runner = pick_runner(model, prompt.shape[1] + new_tokens, runner)
    decode, _ = decode_tokens_per_s(model, prompt, new_tokens, runner=runner)
    peak, peak_kind = peak_memory_mib(device.type)
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), None)
    return dict(op="end_to_end", model=label, device=device.type,
                dtype=str(dtype).replace("torch.", ""), batch=batch, prompt_tokens=prompt_len,
                new_tokens=new_tokens, prefill_tokens_per_s=round(prefill, 2),
                decode_tokens_per_s=round(decode, 2), decode_runner=runner, peak_memory_mib=round(peak, 1),
                peak_memory_kind=peak_kind, weight_bytes=storage_bytes(model))
