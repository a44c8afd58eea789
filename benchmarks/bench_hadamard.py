"""What the online Walsh-Hadamard transform of a rotated MLP costs on the CPU.

Two measurements in one run, each interleaved (round-robin samples, medians):

1. **The op**: ``hadamard_cpu`` of every instruction-set build this CPU runs (``isa`` rows;
   the default picks the widest) and the public ``pyengine.ops.hadamard_transform`` (cpu and
   torch backends) at the MLP widths of SmolLM2 (1536, blocks of 512) and Llama-3-8B (14336,
   blocks of 2048), M = 1 and M = 64 rows, next to the int4 down projection that reads the
   transformed activation (a prepared kernel call, M = 1) for scale. Every call is checked
   against the float64 oracle first.
2. **Decoding**: a SmolLM2-135M-shaped model (random weights: speed only) rotated
   (Recipe.rotate) and quantized int4 g64 RTN, with and without the online transform
   (``online_hadamard``), through pyengine.Decoder at batch 1: tokens/s, alternating the two
   models over ``--rounds`` / 3 rounds (at least 3) of ``--tokens`` steps.

    python benchmarks/bench_hadamard.py [--threads 1,2] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import pyengine  # noqa: E402
from pyengine import QuantConfig, Recipe, ops  # noqa: E402
from pyengine._ext import DTYPE_CODES, extension  # noqa: E402
from pyengine.benchmarking import metadata, time_interleaved, write_json  # noqa: E402
from pyengine.model.random import random_model  # noqa: E402
from pyengine.ops.hadamard import reference_hadamard  # noqa: E402

# MLP width : block : hidden size (the down projection's outputs)
SHAPES = "1536:512:576,14336:2048:4096"


def _repeated(fn: Callable[[], object], inner: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(inner):
            fn()
    return run


def op_rows(shapes, threads: int, inner: int, rounds: int, gen: torch.Generator) -> List[Dict]:
    ext = extension()
    isas = pyengine.build_info().get("cpu_isas_usable", []) if ext is not None else []
    rows = []
    for n, block, hidden in shapes:
        for m in (1, 64):
            x = torch.randn(m, n, generator=gen)
            out = torch.empty_like(x)
            want = reference_hadamard(x, block)
            fns: Dict[str, Callable[[], object]] = {}
            for isa in isas:
                def native(isa=isa):
                    ext.hadamard_cpu(x.data_ptr(), n, out.data_ptr(), n, DTYPE_CODES[x.dtype],
                                     m, n, block, threads, isa)
                native()
                assert torch.allclose(out, want, atol=1e-4), isa
                fns[f"hadamard_cpu {isa}"] = native
            for backend in ("cpu", "torch") if ext is not None else ("torch",):
                got = ops.hadamard_transform(x, block, backend=backend)
                assert torch.allclose(got, want, atol=1e-4), backend
                fns[f"hadamard_transform {backend}"] = (
                    lambda backend=backend: ops.hadamard_transform(x, block, out=out,
                                                                   backend=backend))
            if m == 1:
                weight = torch.randn(hidden, n, generator=gen) * 0.02
                qw = pyengine.quantize(weight, 4, 64, clip_search=False)
                kernel = ops.bind_linear(qw)
                y = torch.empty(1, hidden)
                if kernel is not None:
                    fns["down_proj int4 g64 (prepared call)"] = lambda: kernel(x, y, False,
                                                                              threads)
            reps = max(1, inner * 1536 // (m * n))
            ms = time_interleaved({k: _repeated(f, reps) for k, f in fns.items()}, rounds=rounds)
            for name, value in ms.items():
                us = value * 1e3 / reps
                rows.append(dict(op="hadamard", call=name, n=n, block=block, M=m,
                                 threads=threads, us=round(us, 3)))
                print(f"{n:>6} b={block:<5} M={m:<3} threads={threads} {name:<38} "
                      f"{us:9.2f} us")
    return rows


def decode_rows(shape: str, threads: int, rounds: int, tokens: int) -> List[Dict]:
    gen = torch.Generator().manual_seed(0)
    base = random_model("llama", shape=shape)
    vocab = base.config.vocab_size
    calib = torch.randint(3, vocab, (2, 64), generator=gen)
    models = {}
    for online in (True, False):
        model = copy.deepcopy(base)
        recipe = Recipe(quant={"_default": QuantConfig(4, 64)}, rotate=True,
                        online_hadamard=online)
        pyengine.compress(model, recipe, calib, show_progress=False, dtype=torch.float32)
        models["rotated int4, online transform" if online else "rotated int4, merged only"] = \
            model
    del base
    decoders = {name: pyengine.Decoder(m, max_len=8 + tokens * (rounds + 1) + 4)
                for name, m in models.items()}
    prompt = torch.randint(3, vocab, (1, 8), generator=gen)
    state = {}
    for name, dec in decoders.items():
        state[name] = dec.prefill(prompt).argmax(dim=-1, keepdim=True)
        for _ in range(3):
            state[name] = dec.forward(state[name]).argmax(dim=-1, keepdim=True)
    samples: Dict[str, List[float]] = {name: [] for name in decoders}
    for _ in range(rounds):
        for name, dec in decoders.items():
            t0 = time.perf_counter()
            ids = state[name]
            for _ in range(tokens):
                ids = dec.forward(ids).argmax(dim=-1, keepdim=True)
            samples[name].append(tokens / (time.perf_counter() - t0))
            state[name] = ids
    rows = []
    for name, values in samples.items():
        rate = statistics.median(values)
        rows.append(dict(op="decode", model=f"{shape} shapes (random weights)", config=name,
                         threads=threads, tokens_per_s=round(rate, 1),
                         native_program=decoders[name].program is not None))
        print(f"decode threads={threads} {name:<34} {rate:7.1f} tokens/s")
    return rows


def main(argv: "List[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=SHAPES,
                        help="MLP width:block:hidden list, comma separated")
    parser.add_argument("--decode-shape", default="smollm2-135m",
                        help="pyengine.model.random shape of the decoded model")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--inner", type=int, default=200, help="calls per timed sample (M=1)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=32, help="decode steps per sample")
    parser.add_argument("--json", type=Path, default=common.RESULTS / "hadamard_cpu.json")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    shapes = [tuple(int(v) for v in shape.split(":")) for shape in args.shapes.split(",")]
    rows: List[Dict] = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        rows += op_rows(shapes, threads, args.inner, args.rounds, gen)
        rows += decode_rows(args.decode_shape, threads, max(3, args.rounds // 3), args.tokens)
    write_json(args.json, {**metadata("cpu"), "inner": args.inner, "rounds": args.rounds}, rows)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
