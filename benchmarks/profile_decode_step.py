"""Where a CPU decode step's time goes: the StepProgram's per-operation profile of pyengine's
SmolLM2 models (the configs of bench_vs_llamacpp.py), against the whole step.

For each config and thread count, a Decoder takes ``--steps`` greedy steps with profiling on
(``StepProgram.profiling``; with several threads the parallel schedule is forced, so that the
profile is of one schedule). Printed per step: the step's time; the program's (every layer,
the final norm and head where the head is a prepared call: ``Decoder.head_in_program``, and
the table lookup of a quantized embedding); the rest ("outside": the logits' copy, argmax and
the Python between them; the embedding row, final norm and head where they are not in the
program);
and the program's time by operation kind. The matmuls' time is split by weight shape with the
bandwidth of their weight bytes (the decoder's row-interleaved copies where it made them, else
the packed codes, scales and zeros), against a copy timed in the same run. With several
threads the profile has one time per barrier: a group of operations that shares one (a norm
and the q/k/v or gate/up matmuls that read it) is one row, named by its operations.

    python benchmarks/profile_decode_step.py [--configs int4_a8,int3_a8] [--threads 1,2]
    python benchmarks/profile_decode_step.py --isa avx2 --json benchmarks/results/profile_step_avx2.json
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import pyengine  # noqa: E402
from bench_decode import (greedy_steps, prefill_random_prompt,  # noqa: E402
                          weight_bytes_per_step)


def profile_config(model: torch.nn.Module, threads: int, steps: int,
                   prompt_len: int = 8) -> Dict[str, object]:
    """One decoder on ``model``: ``steps`` profiled steps on ``threads`` threads. Returns the
    step, program and outside times (ms per step) and the profile's rows (ms per step each)."""
    torch.set_num_threads(threads)
    decoder = pyengine.Decoder(model, max_len=prompt_len + steps + 8)
    program = decoder.program
    if program is None:
        raise RuntimeError("the decoder runs no StepProgram for this model (a layer without a "
                           "prepared native call)")
    decoder.adaptive_schedule = False  # one schedule: parallel with several threads
    ids = prefill_random_prompt(decoder, model.config.vocab_size, 1, prompt_len, seed=0)
    ids, _ = greedy_steps(decoder, ids, 4)  # warm-up
    program.profiling = True
    ids, seconds = greedy_steps(decoder, ids, steps)
    step_ms = seconds * 1e3 / steps
    prof = program.profile()
    program.profiling = False
    parallel = threads > 1
    key = "parallel_ms" if parallel else "serial_ms"
    runs = prof["parallel_runs" if parallel else "serial_runs"]
    if runs != steps:
        raise RuntimeError(f"{runs} profiled runs of the {'parallel' if parallel else 'one-thread'}"
                           f" schedule for {steps} steps")
    linears = [c for layer in decoder.layers for c in layer.linears()]
    kernels = iter(c.kernel for c in linears + ([decoder.head] if decoder.head_in_program
                                                  else []))
    rows: List[Dict[str, object]] = []
    group: List[str] = []
    group_bytes = 0
    for op in prof["ops"]:
        name = (f"qmatmul {op['n']}x{op['k']} int{op['bits']}" if op["op"] == "qmatmul"
                else op["op"])
        if op["op"] == "qmatmul":
            group_bytes += next(kernels).decode_weight_bytes
        group.append(name)
        if parallel and not op["barrier_after"]:  # its time is on the group's last operation
            continue
        rows.append(dict(ops=" + ".join(group), ms=op[key] / runs, weight_bytes=group_bytes))
        group, group_bytes = [], 0
    program_ms = sum(r["ms"] for r in rows)
    return dict(threads=threads, steps=steps, step_ms=step_ms, program_ms=program_ms,
                outside_ms=step_ms - program_ms, weight_bytes_per_step=weight_bytes_per_step(
                    model, 1), rows=rows)


def summarize(rows: List[Dict[str, object]]) -> Dict[str, Dict[str, float]]:
    """The rows merged by their operations' names: ms per step, weight bytes per step, calls."""
    out: Dict[str, Dict[str, float]] = defaultdict(lambda: dict(ms=0.0, weight_bytes=0, calls=0))
    for r in rows:
        s = out[r["ops"]]
        s["ms"] += r["ms"]
        s["weight_bytes"] += r["weight_bytes"]
        s["calls"] += 1
    return dict(out)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="int4_a8,int3_a8,int2_a8")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--isa", default="",
                        help="the cpu backend's instruction-set build (default: the best here)")
    parser.add_argument("--json", type=Path, default=common.RESULTS / "profile_decode_step.json")
    args = parser.parse_args(argv)
    why_not = common.use_cpu_isa(args.isa) if args.isa else None
    if why_not:
        print(why_not)
        return 1
    from bench_vs_llamacpp import pyengine_model
    meta = common.metadata("cpu")
    if args.isa:
        meta["cpu_isa"] = args.isa
    print(f"{meta['device']}, kernels: {meta['cpu_isa']}")
    results = []
    for config in args.configs.split(","):
        model = pyengine_model(config)
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            copy_gbps = common.copy_bandwidth_gbps("cpu")
            r = profile_config(model, threads, args.steps)
            r.update(config=config, copy_gbps=copy_gbps)
            results.append(r)
            roof_ms = r["weight_bytes_per_step"] / (copy_gbps * 1e9) * 1e3
            print(f"\n{config}, {threads} thread(s): step {r['step_ms']:.3f} ms "
                  f"({1e3 / r['step_ms']:.1f} tokens/s; the roofline of its "
                  f"{r['weight_bytes_per_step'] / 1e6:.1f} MB at a {copy_gbps:.1f} GB/s copy: "
                  f"{roof_ms:.3f} ms, {100 * roof_ms / r['step_ms']:.0f}%); program "
                  f"{r['program_ms']:.3f} ms, outside it {r['outside_ms']:.3f} ms")
            for name, s in sorted(summarize(r["rows"]).items(), key=lambda kv: -kv[1]["ms"]):
                gbps = s["weight_bytes"] / (s["ms"] * 1e-3) / 1e9 if s["weight_bytes"] else 0
                bw = (f"{gbps:6.1f} GB/s {100 * gbps / copy_gbps:4.0f}% of copy"
                      if s["weight_bytes"] else "")
                print(f"  {s['ms']:8.3f} ms {100 * s['ms'] / r['step_ms']:5.1f}%  "
                      f"{s['calls']:4d}x  {name:<60} {bw}")
        del model
    common.write_results(args.json, meta, results)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
