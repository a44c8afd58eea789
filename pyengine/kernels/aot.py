"""Ahead-of-time compilation of the Triton kernels for GPU targets, without a GPU.

    python -m pyengine.kernels.aot [--arch 80 --arch 90] [--jobs N] [--ledger FILE]
                                   [--update-ledger] [--verify-sample N] [--json FILE]

The Triton interpreter runs the kernels' arithmetic on CPU tensors but never compiles them, so
an error that only the compiler sees (a constexpr reassigned in a loop, a layout the backend
cannot lower, a dtype ``tl.dot`` rejects) passes every interpreter test and raises on a GPU's
first call. This module compiles what a GPU would compile, for ``GPUTarget("cuda", arch, 32)``.

**What is compiled**: the launches the dispatch plans, not a list kept beside it. Each case is a
call of the public entry points' planning step (``matmul.plan_launches`` on a
``quant_problem`` / ``dense_problem``, ``matryoshka.plane_launches``) with the GPU config
tables (``interpreted=False``) on meta tensors (no memory), so path, config, split-K and
constexprs come from ``select_config`` / ``select_plane_config`` and the launchers. The cases
(:func:`dispatch_cases`) span

    weight kind: packed bits (matmul.SUPPORTED_BITS), dense, Matryoshka precision
                 (matryoshka.weight.PRECISIONS)
    x group size as stored (qweight.SUPPORTED_GROUP_SIZES; per channel included)
    x activation dtype (matmul.ACTIVATION_DTYPES; scales, bias, residual in that dtype)
    x M: the largest M of every bucket of matmul.m_bucket (DECODE_MAX_M, the prefill bounds;
         OPEN_BUCKET_M for the open one), which picks the path and config
    x layer shape: real Llama-3-8B shapes; two for the decode buckets (DECODE_SHAPES) so that
         both a single K slice and several (with the split-K reduce kernel) are planned on
         every target (checked, :func:`check_coverage`)

and the online Walsh-Hadamard transform (``kind="hadamard"``, pyengine/kernels/hadamard.py) for
every block a rotated model's MLP can use (rotation.MLP_HADAMARD_MIN_BLOCK to
MLP_HADAMARD_MAX_BLOCK) in every activation dtype;

with the epilogue flags (symmetric weights, bias, shortcut) rotated so that every combination
occurs for every (kind, dtype), and for packed and plane weights for every (dtype, M bucket,
shape) too (each such cell holds 16 or 20 (width, group) cases); and an odd-shape sweep (the
smallest M of each bucket, dimensions and strides that are not multiples of 16, which the JIT
specializes differently) with one bits / group per cell.

**How**: each planned launch goes through the JIT's own argument binding and specialization
(``JITFunction.warmup``) under a stand-in driver that names the target GPU, so dtypes, 16-byte
divisibility, ints equal to 1 and options are exactly what the JIT computes on that GPU for
these arguments; then ``triton.compile`` runs to a cubin. A compile error is a failure, and so
is a decode kernel (DECODE_KERNELS) whose SASS holds local-memory instructions (LDL / STL:
register spills), found with pyengine/kernels/sass.py.

**Ledger**: compiling everything for two targets takes over an hour of one CPU core per Triton
version, so a committed ledger (tests/data/triton_aot_ledger.json) records, per Triton build
and target, the Triton cache hashes of the specializations that compiled (decode kernels
without local memory). A hash is Triton's own cache key: the kernel's source and every JIT
function it calls, the constexprs, signature and specialization, the options, the target,
ptxas' version and a digest of the Triton build itself; so an unchanged hash is an unchanged
compilation. Specializations whose hash is not in the ledger are compiled (all of them after a
kernel edit), and ``--verify-sample N`` compiles N ledger entries again to check the ledger's
word. ``--update-ledger`` rewrites the entries of the Triton build and targets it ran, after a
run in which nothing failed.

``--cases-json FILE`` compiles given cases instead (e.g. a benchmark's calls, from
benchmarks/bench_gpu_kernels.py --plan-aot); with TRITON_CACHE_DIR set the compiled kernels
stay there for a later run of the same calls to find (benchmarks/gpu_check.sh prepare, budget).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..format.qweight import DTYPE_NAMES

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LEDGER = ROOT / "tests" / "data" / "triton_aot_ledger.json"

# Targets: compute capability -> streaming multiprocessors of the GPU the split-K heuristic is
# planned for (A100: 108; H100 SXM and H200: 132). The split decision depends on it.
SM_COUNTS = {80: 108, 90: 132}
DEFAULT_ARCHS = (80, 90)

# Layer shapes (N, K) of Llama-3-8B: down_proj (narrow N: several K slices in every decode
# form) and the fused gate + up projection (wide N: one slice).
DECODE_SHAPES = ((4096, 14336), (28672, 4096))
PREFILL_SHAPE = (14336, 4096)
SHORTCUT_WIDTH = 3072            # residual width R of a sliced layer's shortcut
# Odd sweep: N odd; K = 4040 pads to 4064 codes, so packed row strides (4064 * bits / 32
# words), x's row stride and the scale rows are not all multiples of 16.
ODD_SHAPE = (4099, 4040)
ODD_SHORTCUT_WIDTH = 3001
OPEN_BUCKET_M = 1024             # the M that stands for the open (largest) bucket
LEDGER_HASH_CHARS = 24           # hex digits of a cache hash kept in the ledger
# Decode kernels must not touch local memory (register spills or stack arrays): streaming the
# weight is their whole job, and a spill in the loop costs issue slots and latency per step.
DECODE_KERNELS = ("_decode_kernel", "split_k_reduce_kernel", "_plane_decode_kernel")

# (symmetric, bias, shortcut): rotated over the cells of a kind so each occurs everywhere
FLAG_COMBOS = tuple(itertools.product((False, True), repeat=3))


@dataclasses.dataclass(frozen=True)
class Case:
    """One call the dispatch can receive.

    kind: "packed", "dense", "planes" or "hadamard" (group_size: the transform's block; M rows
    of N = K features). bits: packed 2/3/4/8, planes the precision r,
    dense 0. group_size: as stored (32/64/128, -1 per channel; dense 0). dtype: the activation
    dtype's name. M, N, K: the call's rows, output and input features. symmetric: no zero
    points. bias, shortcut: the fused epilogue terms present. sweep: "dispatch", "odd" or
    "given" (--cases-json). N_stored, K_stored: the stored weight's rows and input features
    when the call reads its top-left [N, K] block (0: N, K). R: the shortcut's width (0:
    SHORTCUT_WIDTH, ODD_SHORTCUT_WIDTH in the odd sweep).
    """

    kind: str
    bits: int
    group_size: int
    dtype: str
    M: int
    N: int
    K: int
    symmetric: bool = False
    bias: bool = False
    shortcut: bool = False
    sweep: str = "dispatch"
    N_stored: int = 0
    K_stored: int = 0
    R: int = 0

    @property
    def label(self) -> str:
        if self.kind == "hadamard":
            return f"hadamard b={self.group_size} {self.dtype} M={self.M} n={self.N}"
        what = {"packed": f"int{self.bits}", "dense": "dense",
                "planes": f"planes-r{self.bits}"}[self.kind]
        group = "" if self.kind == "dense" else (
            " g=ch" if self.group_size == -1 else f" g={self.group_size}")
        flags = "".join(f" {name}" for name, on in (("sym", self.symmetric), ("bias", self.bias),
                                                   ("shortcut", self.shortcut)) if on)
        block = (f" of {self.N_stored or self.N}x{self.K_stored or self.K}"
                 if (self.N_stored, self.K_stored) != (0, 0) else "")
        return (f"{what}{group} {self.dtype} M={self.M} {self.N}x{self.K}{block}{flags}"
                f"{' (odd)' if self.sweep == 'odd' else ''}")


# ---- what the dispatch can select ---------------------------------------------------------------

def m_bucket_ranges(limit: int = OPEN_BUCKET_M) -> List[Tuple[int, int]]:
    """(smallest M, largest M) of every bucket of matmul.m_bucket, in order, for M in
    1..limit (the open bucket ends at limit)."""
    from .matmul import m_bucket
    ranges: Dict[int, List[int]] = {}
    for m in range(1, limit + 1):
        ranges.setdefault(m_bucket(m), [m, m])[1] = m
    return [tuple(r) for r in ranges.values()]


def _kinds():
    """(kind, bit widths or precisions, group sizes) of the weights the dispatch serves."""
    from ..matryoshka.weight import PRECISIONS
    from ..format.qweight import SUPPORTED_GROUP_SIZES
    from .matmul import SUPPORTED_BITS
    return (("packed", SUPPORTED_BITS, SUPPORTED_GROUP_SIZES), ("dense", (0,), (0,)),
            ("planes", PRECISIONS, SUPPORTED_GROUP_SIZES))


def dispatch_cases(archs: Sequence[int] = DEFAULT_ARCHS) -> List[Case]:
    """Every case described in the module docstring (the same list for every target)."""
    from .matmul import ACTIVATION_DTYPES, DECODE_MAX_M
    cases: List[Case] = []
    buckets = m_bucket_ranges()
    for kind, widths, groups in _kinds():
        cell = 0
        for dtype in ACTIVATION_DTYPES:
            for lo_m, hi_m in buckets:
                shapes = DECODE_SHAPES if hi_m <= DECODE_MAX_M else (PREFILL_SHAPE,)
                for n, k in shapes:
                    cell += 1
                    if kind == "dense":   # one case per cell, (bias, shortcut) rotated
                        _, bias, shortcut = FLAG_COMBOS[cell % 4]      # symmetric False
                        cases.append(Case(kind, 0, 0, DTYPE_NAMES[dtype], hi_m, n, k, False,
                                          bias, shortcut))
                        continue
                    for i, (bits, group) in enumerate(itertools.product(widths, groups)):
                        sym, bias, shortcut = FLAG_COMBOS[(i + cell) % len(FLAG_COMBOS)]
                        cases.append(Case(kind, bits, group, DTYPE_NAMES[dtype], hi_m, n, k,
                                          sym, bias, shortcut))
        # odd sweep: the smallest M of each bucket on ODD_SHAPE, one width / group per cell
        for d, dtype in enumerate(ACTIVATION_DTYPES):
            for b, (lo_m, _) in enumerate(buckets):
                i = d * len(buckets) + b
                bits = widths[i % len(widths)]
                group = groups[(i // len(widths) + i) % len(groups)]
                sym, bias, shortcut = FLAG_COMBOS[i % len(FLAG_COMBOS)]
                cases.append(Case(kind, bits, group, DTYPE_NAMES[dtype], lo_m, *ODD_SHAPE,
                                  sym and kind != "dense", bias, shortcut, sweep="odd"))
    cases.extend(hadamard_cases())
    return cases


def hadamard_cases() -> List[Case]:
    """The online Walsh-Hadamard transform at every block rotate_mlp_inner can choose, in every
    activation dtype (rows of three blocks, like SmolLM2's 1536 = 3 x 512)."""
    from ..quant.rotation import MLP_HADAMARD_MAX_BLOCK, MLP_HADAMARD_MIN_BLOCK
    from .matmul import ACTIVATION_DTYPES
    cases = []
    block = MLP_HADAMARD_MIN_BLOCK
    while block <= MLP_HADAMARD_MAX_BLOCK:
        for dtype in ACTIVATION_DTYPES:
            cases.append(Case("hadamard", 0, block, DTYPE_NAMES[dtype], 1, 3 * block, 3 * block))
        block *= 2
    return cases


def case_launches(case: Case, arch: int) -> list:
    """The KernelLaunch list the dispatch plans for ``case`` on a GPU of compute capability
    ``arch`` (SM_COUNTS[arch] multiprocessors), with meta tensors (no memory) of the case's
    shapes; nothing is launched."""
    from ..format.qweight import padded_in_features
    from . import matmul, matryoshka

    dtype = getattr(torch, case.dtype)
    meta = dict(device="meta")
    M, N, K = case.M, case.N, case.K
    NS, KS = case.N_stored or N, case.K_stored or K     # the stored weight
    x = torch.empty((M, K), dtype=dtype, **meta)
    out = torch.empty((M, N), dtype=dtype, **meta)
    bias = torch.empty((NS,), dtype=dtype, **meta) if case.bias else None
    width = case.R or (ODD_SHORTCUT_WIDTH if case.sweep == "odd" else SHORTCUT_WIDTH)
    residual = torch.empty((M, width), dtype=dtype, **meta) if case.shortcut else None
    shortcut = torch.empty((width, N), dtype=dtype, **meta) if case.shortcut else None
    target_programs = 4 * SM_COUNTS[arch]     # matmul.target_programs on that GPU

    if case.kind == "hadamard":
        from .hadamard import hadamard_launches
        return hadamard_launches(x, torch.empty((M, K), dtype=dtype, **meta), case.group_size)
    if case.kind == "dense":
        weight = torch.empty((NS, KS), dtype=dtype, **meta)
        p = matmul.dense_problem(x, weight, N, K, bias, residual, shortcut, out,
                                 interpreted=False)
        return matmul.plan_launches(p, None, target_programs, interpreted=False)

    kp = padded_in_features(KS, case.group_size)
    effective_group = kp if case.group_size == -1 else case.group_size
    groups = -(-kp // effective_group)
    scales = torch.empty((NS, groups), dtype=dtype, **meta)
    zeros = None if case.symmetric else torch.empty((NS, groups), dtype=dtype, **meta)
    if case.kind == "packed":
        qweight = torch.empty((NS, kp * case.bits // 32), dtype=torch.int32, **meta)
        p = matmul.quant_problem(x, qweight, scales, zeros, case.bits, effective_group, N, K,
                                 bias, residual, shortcut, out, interpreted=False)
        return matmul.plan_launches(p, None, target_programs, interpreted=False)
    hi = torch.empty((NS, kp * 3 // 32), dtype=torch.int32, **meta)
    mid = torch.empty((NS, kp * 2 // 32), dtype=torch.int32, **meta)
    lo = torch.empty((NS, kp * 3 // 32), dtype=torch.int32, **meta)
    return matryoshka.plane_launches(x, hi, mid, lo, scales, zeros, bias, case.bits,
                                     case.group_size, N, K, out, None, residual, shortcut,
                                     target_programs, interpreted=False)


def check_coverage(cases: Sequence[Case], arch: int) -> List[str]:
    """What the case list fails to reach on ``arch`` (empty when complete): every decode
    config of every kind must be planned both with one K slice and with several."""
    seen: Dict[Tuple[str, int], set] = {}
    for case in cases:
        for launch in case_launches(case, arch):
            if "WRITE_PARTIAL" in launch.kwargs:
                key = (f"{case.kind} {launch.name}", launch.kwargs["BLOCK_M"])
                seen.setdefault(key, set()).add(launch.kwargs["WRITE_PARTIAL"])
    return [f"sm_{arch}: {name} BLOCK_M={bm} planned only with WRITE_PARTIAL={sorted(v)}"
            for (name, bm), v in sorted(seen.items()) if len(v) < 2]


# ---- compiling for a target without its GPU ----------------------------------------------------

class _TargetDriver:
    """The few questions ``JITFunction.run`` asks the active driver while it binds arguments,
    answered for a GPU that is not there: device id = the compute capability, so each target
    gets its own binder and in-memory kernel cache."""

    def __init__(self) -> None:
        self.arch = DEFAULT_ARCHS[-1]

    def get_current_device(self) -> int:
        return self.arch

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", self.arch, 32)


_DRIVER: Optional[_TargetDriver] = None
_PREPARED: set = set()


def _install_driver() -> _TargetDriver:
    global _DRIVER
    if _DRIVER is None:
        from triton.runtime.driver import driver
        _DRIVER = _TargetDriver()
        driver.set_active(_DRIVER)
    return _DRIVER


def cache_hash(src, target, options: dict) -> str:
    """Triton's cache hash of compiling ``src`` for ``target`` with ``options``: the same
    steps as ``triton.compile`` takes before it looks in its cache."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import get_cache_key
    backend = make_backend(target)
    parsed = backend.parse_options(dict(options or {}, **src.parse_options()))
    key = get_cache_key(src, backend, parsed, env_vars=get_cache_invalidating_env_vars())
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclasses.dataclass
class _Hashed:
    """What the hashing pass puts where a compiled kernel would go."""

    hash: str


class _Compiler:
    """``JITFunction.compile`` replacement: hashes, and compiles unless told not to (noting
    whether Triton's cache already held the kernel, so that triton.compile only read it)."""

    def __init__(self) -> None:
        self.compile_now = False
        self.last_hash: Optional[str] = None
        self.last_was_cached = False

    def __call__(self, src, target=None, options=None, _env_vars=None):
        import triton
        from triton.runtime.cache import get_cache_manager
        self.last_hash = cache_hash(src, target, options)
        if not self.compile_now:
            return _Hashed(self.last_hash)
        # triton.compile looks for "<name>.json" in the hash's cache group the same way
        group = get_cache_manager(self.last_hash).get_group(f"{src.name[:150]}.json")
        self.last_was_cached = bool(group)
        return triton.compile(src, target=target, options=options)


_COMPILER = _Compiler()


def _prepare(kernel, archs: Iterable[int]) -> None:
    """Creates the kernel's binder for every target (the JIT does that on first use and then
    resets ``kernel.compile``), then routes its compiles through _COMPILER."""
    if kernel in _PREPARED:
        return
    drv = _install_driver()
    saved = drv.arch
    for arch in archs:
        drv.arch = arch
        kernel.device_caches[arch]        # creates the binder for this target
    drv.arch = saved
    kernel.compile = _COMPILER
    _PREPARED.add(kernel)


def _bind(launch, arch: int, compile_now: bool):
    """Runs the launch's argument binding for ``arch`` (JITFunction.warmup); returns
    (cache hash, compiled kernel or None)."""
    drv = _install_driver()
    _prepare(launch.kernel, SM_COUNTS)
    drv.arch = arch
    # the in-memory cache would answer a second request for the same specialization
    for caches in launch.kernel.device_caches.values():
        caches[0].clear()
    _COMPILER.compile_now = compile_now
    _COMPILER.last_hash = None
    result = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
    compiled = None if isinstance(result, _Hashed) else result
    return _COMPILER.last_hash, compiled


def _compile_task(task: Tuple[Case, int, int]) -> dict:
    """Worker: compiles launch ``index`` of ``case`` for ``arch``; returns its record."""
    case, arch, index = task
    t0 = time.perf_counter()
    try:
        launch = case_launches(case, arch)[index]
        digest, compiled = _bind(launch, arch, compile_now=True)
        from . import sass
        funcs = sass.parse(sass.disassemble(compiled.asm["cubin"]))
        local = sum(sass.local_memory_instructions(f) for f in funcs.values())
        return dict(hash=digest, ok=True, seconds=time.perf_counter() - t0,
                    local_memory_instructions=local, cached=_COMPILER.last_was_cached)
    except Exception as exc:  # noqa: BLE001 - every compile error is reported, none raised
        return dict(hash=None, ok=False, seconds=time.perf_counter() - t0,
                    error=f"{type(exc).__name__}: {exc}"[:4000],
                    traceback=traceback.format_exc()[-4000:])


def _quiet_triton_warnings() -> None:
    """triton 3.9 warns once per process that TRITON_DEFAULT_FP_FUSION is unset; it stays unset
    (it is part of the cache key, and a GPU run does not set it)."""
    import warnings
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def use_triton_key(path: Optional[str]) -> None:
    """Files this process's compiles under another Triton build's key: the text of
    ``triton.runtime.cache.triton_key()`` as that build computes it (saved in ``path``).

    A Triton cache key includes a digest of the Triton build, its compiled libtriton
    included, which differs between the wheels of one Triton release for different Pythons
    while the compiler they run is the same source. So a cache built here for a GPU machine
    whose Python differs is filed under that machine's key (benchmarks/gpu_check.sh prepare);
    the GPU machine's run reports whether it was used (cache hits, benchmarks/gpu_check.sh
    budget)."""
    if not path:
        return
    import triton.runtime.cache as cache
    key = Path(path).read_text().strip()
    if not key.startswith(_triton_version()):       # triton_key() = version + digests
        raise ValueError(f"{path} holds the key of another Triton version than "
                         f"{_triton_version()} ({key[:40]}...)")
    cache.triton_key = lambda: key


def _triton_version() -> str:
    import triton
    return triton.__version__


def _worker_init(env: Dict[str, str], triton_key_file: Optional[str]) -> None:
    os.environ.update(env)
    _quiet_triton_warnings()
    use_triton_key(triton_key_file)
    _install_driver()


# ---- ledger -------------------------------------------------------------------------------------

def triton_build() -> str:
    """'<version> <digest>': Triton's version and a digest of its build (triton_key: its
    compiler sources and libtriton), the part of every cache key that is not the kernel's."""
    import triton
    from triton.runtime.cache import triton_key
    return f"{triton.__version__} {hashlib.sha256(triton_key().encode()).hexdigest()[:16]}"


def load_ledger(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"about": "Triton cache hashes of the kernel specializations that compiled, per "
                     "Triton build and target; written by python -m pyengine.kernels.aot "
                     "--update-ledger, read by tests/kernels/test_triton_aot.py", "entries": {}}


def _ledger_key(arch: int) -> str:
    return f"{triton_build()} sm_{arch}"


# ---- driver -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Spec:
    """One distinct specialization of one target (several cases can plan the same)."""

    arch: int
    hash: str
    kernel: str
    case: Case
    index: int            # position of the launch in case_launches(case, arch)
    status: str = "pending"   # compiled | ledger | verified | failed | spills
    seconds: float = 0.0
    error: str = ""
    local_memory_instructions: Optional[int] = None
    cached: bool = False      # compiled now, but Triton's cache held it already


def plan_specs(cases: Sequence[Case], archs: Sequence[int]) -> Dict[int, Dict[str, Spec]]:
    """arch -> {cache hash: Spec}: every distinct specialization the cases plan, hashed
    without compiling."""
    specs: Dict[int, Dict[str, Spec]] = {}
    for arch in archs:
        table = specs.setdefault(arch, {})
        for case in cases:
            for index, launch in enumerate(case_launches(case, arch)):
                digest, _ = _bind(launch, arch, compile_now=False)
                if digest not in table:
                    table[digest] = Spec(arch, digest, launch.name, case, index)
    return specs


def run(archs: Sequence[int], jobs: int, ledger_path: Optional[Path],
        ledger_out: Optional[Path],
        verify_sample: int, seed: int, case_filter: Optional[str] = None,
        plan_only: bool = False, log=print, cases: Optional[List[Case]] = None,
        triton_key_file: Optional[str] = None) -> dict:
    """Plans, hashes and compiles (see the module docstring); returns the report."""
    import re

    import triton

    import pyengine
    t_start = time.perf_counter()
    given = cases is not None
    cases = list(cases) if given else dispatch_cases(archs)
    if case_filter:
        cases = [c for c in cases if re.search(case_filter, c.label)]
    coverage = ([] if case_filter or given
                else [m for a in archs for m in check_coverage(cases, a)])
    specs = plan_specs(cases, archs)
    ledger = load_ledger(ledger_path) if ledger_path else {"entries": {}}
    rng = random.Random(seed)
    tasks: List[Spec] = []
    for arch, table in specs.items():
        known = set(ledger["entries"].get(_ledger_key(arch), {}).get("compiled", []))
        hits = [s for s in table.values() if s.hash[:LEDGER_HASH_CHARS] in known]
        for spec in hits:
            spec.status = "ledger"
        for spec in rng.sample(hits, min(verify_sample, len(hits))):
            spec.status = "verify"
        tasks += [s for s in table.values() if s.status in ("pending", "verify")]
    t_plan = time.perf_counter() - t_start
    log(f"triton {triton.__version__} ({Path(triton.__file__).parent}), pyengine from "
        f"{Path(pyengine.__file__).parent}: {len(cases)} cases, "
        + ", ".join(f"sm_{a}: {len(t)} specializations" for a, t in specs.items())
        + f"; {len(tasks)} to compile ({sum(s.status == 'verify' for s in tasks)} ledger "
          f"entries re-checked), planned and hashed in {t_plan:.1f} s")

    if plan_only:
        tasks = []
    env = {k: v for k, v in os.environ.items() if k.startswith("TRITON_")}
    t_compile = time.perf_counter()
    if tasks:
        ctx = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx,
                                         initializer=_worker_init,
                                         initargs=(env, triton_key_file)) as pool:
            jobs_ = {pool.submit(_compile_task, (s.case, s.arch, s.index)): s for s in tasks}
            for done, fut in enumerate(futures.as_completed(jobs_), 1):
                spec, rec = jobs_[fut], fut.result()
                spec.seconds = rec["seconds"]
                if not rec["ok"]:
                    spec.status, spec.error = "failed", rec["error"]
                    log(f"FAILED sm_{spec.arch} {spec.kernel} [{spec.case.label}]: "
                        f"{rec['error'][:600]}")
                elif rec["hash"] != spec.hash:
                    spec.status = "failed"
                    spec.error = (f"compiled under hash {rec['hash']}, planned as {spec.hash}: "
                                  f"the hashing pass and the compile disagree")
                    log(f"FAILED sm_{spec.arch} {spec.kernel}: {spec.error}")
                elif spec.kernel in DECODE_KERNELS and rec["local_memory_instructions"]:
                    spec.local_memory_instructions = rec["local_memory_instructions"]
                    spec.status = "spills"
                    spec.error = (f"{rec['local_memory_instructions']} local-memory instructions "
                                  f"(LDL/STL) in a decode kernel")
                    log(f"SPILLS sm_{spec.arch} {spec.kernel} [{spec.case.label}]: {spec.error}")
                else:
                    spec.local_memory_instructions = rec["local_memory_instructions"]
                    spec.cached = rec["cached"]
                    spec.status = "verified" if spec.status == "verify" else "compiled"
                if done % 50 == 0 or done == len(tasks):
                    log(f"  {done}/{len(tasks)} compiled ({time.perf_counter() - t_compile:.0f} s)")
    t_compile = time.perf_counter() - t_compile

    report = {"triton": triton.__version__, "triton_build": triton_build(),
              "python": sys.version.split()[0], "cases": len(cases), "coverage_gaps": coverage,
              "seconds": {"plan_and_hash": round(t_plan, 1), "compile": round(t_compile, 1)},
              "targets": {}, "failures": []}
    for arch, table in specs.items():
        counts: Dict[str, int] = {}
        kernels: Dict[str, int] = {}
        local: Dict[str, int] = {}    # compiled now, with LDL/STL (prefill kernels may)
        for spec in table.values():
            counts[spec.status] = counts.get(spec.status, 0) + 1
            kernels[spec.kernel] = kernels.get(spec.kernel, 0) + 1
            if spec.local_memory_instructions:
                local[spec.kernel] = local.get(spec.kernel, 0) + 1
            if spec.status in ("failed", "spills"):
                report["failures"].append(dict(arch=arch, kernel=spec.kernel, status=spec.status,
                                               case=spec.case.label, error=spec.error))
        report["targets"][f"sm_{arch}"] = dict(specializations=len(table), status=counts,
                                               kernels=kernels, with_local_memory=local,
                                               found_in_triton_cache=sum(
                                                   s.cached for s in table.values()),
                                               compile_seconds=round(sum(
                                                   s.seconds for s in table.values()), 1))
    if ledger_out and not report["failures"] and not coverage and not plan_only:
        ledger = load_ledger(ledger_out)     # the other versions' and targets' entries stay
        for arch, table in specs.items():
            ledger["entries"][_ledger_key(arch)] = {
                "date": time.strftime("%Y-%m-%d"),
                "compiled": sorted(h[:LEDGER_HASH_CHARS] for h in table)}
        ledger["entries"] = dict(sorted(ledger["entries"].items()))
        ledger_out.parent.mkdir(parents=True, exist_ok=True)
        ledger_out.write_text(json.dumps(ledger, indent=0) + "\n")
        log(f"ledger {ledger_out} updated for " + ", ".join(f"sm_{a}" for a in specs))
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyengine.kernels.aot",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SM_COUNTS),
                        help="compute capability to compile for (repeatable; default 80 and 90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiler processes (default: the CPU count)")
    parser.add_argument("--ledger", type=Path, default=DEFAULT_LEDGER,
                        help=f"ledger file (default {DEFAULT_LEDGER.relative_to(ROOT)})")
    parser.add_argument("--no-ledger", action="store_true",
                        help="compile everything (the ledger is not read)")
    parser.add_argument("--update-ledger", action="store_true",
                        help="write this run's specializations to the ledger, replacing the "
                             "entries of this Triton build's targets, when none failed")
    parser.add_argument("--verify-sample", type=int, default=0,
                        help="ledger entries per target to compile again (default 0)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sample")
    parser.add_argument("--cases", default=None, help="only cases whose label matches this regex")
    parser.add_argument("--cases-json", type=Path, default=None,
                        help="compile these cases (a JSON list of Case fields, e.g. from "
                             "benchmarks/bench_gpu_kernels.py --plan-aot) instead of the "
                             "dispatch's")
    parser.add_argument("--triton-key-file", default=None,
                        help="file compiles under the Triton build key saved in this file "
                             "(see use_triton_key)")
    parser.add_argument("--plan-only", action="store_true",
                        help="plan and hash, compile nothing (counts, coverage)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y"):
        parser.error("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled")
    _quiet_triton_warnings()
    use_triton_key(args.triton_key_file)
    cases = None
    if args.cases_json:
        cases = [Case(**dict(c, sweep="given")) for c in json.loads(args.cases_json.read_text())]
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    print(f"verify-sample seed: {seed}")
    report = run(args.arch or DEFAULT_ARCHS, args.jobs,
                 None if args.no_ledger else args.ledger,
                 args.ledger if args.update_ledger else None,
                 args.verify_sample, seed, args.cases, args.plan_only, cases=cases,
                 triton_key_file=args.triton_key_file)
    report["seed"] = seed
    for name, target in report["targets"].items():
        print(f"{name}: {target['specializations']} specializations {target['status']}")
    for gap in report["coverage_gaps"]:
        print(f"COVERAGE GAP {gap}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    failed = len(report["failures"]) + len(report["coverage_gaps"])
    print(f"{'FAILED: ' + str(failed) if failed else 'ok'} "
          f"({report['seconds']['plan_and_hash']} s planning, {report['seconds']['compile']} s "
          f"compiling)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
