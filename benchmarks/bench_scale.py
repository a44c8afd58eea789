"""Models people run: compression and loading at real sizes, in bounded memory.

For each shape (random weights of a real model's shapes, written as sharded bf16 safetensors
without holding the model in memory: pyengine.model.random.save_random_checkpoint), each in its
own fresh process so that peak memory is the step's own:

* ``sequential``: `pyengine.pipeline.streaming.compress_checkpoint` (one decoder layer at a time)
  with RTN int4 g128 (embeddings and head int8): seconds, seconds per billion parameters, peak
  memory;
* ``in_memory``: the whole model loaded (from_pretrained), pyengine.compress, pyengine.save:
  the same figures (skipped where the model would not fit in this machine's memory);
* ``load``: pyengine.load of the written checkpoint: seconds of a first load (imports included)
  and of a second one in the same process, peak memory, against the seconds to read its files;
* ``decode``: greedy decode tokens/s at batch 1 of the int4 checkpoint and of the dense model
  (float32 activations; dense skipped where float32 weights would not fit).

Memory is reported two ways: ``peak_rss_mib`` (VmHWM: everything resident, memory-mapped file
pages included, which the kernel can drop and re-read) and ``peak_anon_mib`` (anonymous memory,
sampled every 5 ms: what the process itself allocates). ``base_*`` are the same figures after
the imports (torch, transformers, pyengine and the model family's code), before the step; the
step's own memory is peak - base. ``bound_mib`` is what the
sequential pipeline must hold at least: the largest decoder layer in its source dtype plus the
embedding table and head.

    python benchmarks/bench_scale.py                      # tinyllama-1.1b
    python benchmarks/bench_scale.py --shapes tinyllama-1.1b,llama-3-8b
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import common  # noqa: E402  (benchmarks/ is the script's directory)

RAM_FRACTION = 0.8  # an in-memory step runs only if its expected peak fits in this share


# ---- child side: one step in a fresh process ----------------------------------------------------

class MemoryWatch:
    """Samples the process's anonymous memory every 5 ms; VmHWM gives the resident peak."""

    def __init__(self) -> None:
        self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def status() -> Dict[str, int]:
        values = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    values[key] = int(rest.split()[0]) * 1024
        return values

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, self.status().get("RssAnon", 0))
            time.sleep(0.005)

    def __enter__(self) -> "MemoryWatch":
        start = self.status()
        self.base_rss, self.base_anon = start["VmHWM"], start["RssAnon"]
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        end = self.status()
        self.peak_anon = max(self.peak_anon, end["RssAnon"])
        self.peak_rss = end["VmHWM"]

    def figures(self) -> Dict[str, float]:
        mib = 1 << 20
        return dict(peak_rss_mib=round(self.peak_rss / mib),
                    peak_anon_mib=round(self.peak_anon / mib),
                    base_rss_mib=round(self.base_rss / mib),
                    base_anon_mib=round(self.base_anon / mib))


def _recipe():
    from pyengine.quant.recipe import QuantConfig, Recipe
    return Recipe(quant={"_default": QuantConfig(4, 128)})


def child(step: str, source: str, out: str) -> Dict[str, Any]:
    import torch
    import transformers  # noqa: F401

    import pyengine
    from pyengine.pipeline.streaming import compress_checkpoint
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(source))]  # imports its code
    result: Dict[str, Any] = {}
    if step == "sequential":
        with MemoryWatch() as watch:
            t0 = time.perf_counter()
            compress_checkpoint(source, out, _recipe(), show_progress=False, resume=False)
            result["seconds"] = time.perf_counter() - t0
    elif step == "in_memory":
        from transformers import AutoModelForCausalLM
        with MemoryWatch() as watch:
            t0 = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
            pyengine.compress(model, _recipe(), show_progress=False)
            pyengine.save(model, out)
            result["seconds"] = time.perf_counter() - t0
    elif step == "load":
        with MemoryWatch() as watch:
            t0 = time.perf_counter()
            model = pyengine.load(out)
            result["first_seconds"] = time.perf_counter() - t0
            del model
            t0 = time.perf_counter()
            model = pyengine.load(out)
            result["second_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for file in sorted(Path(out).glob("*.safetensors")):
            with open(file, "rb") as f:
                while f.read(16 << 20):
                    pass
        result["read_files_seconds"] = time.perf_counter() - t0
    elif step in ("decode_int4", "decode_dense"):
        from bench_decode import measure_decode
        if step == "decode_int4":
            model = pyengine.load(out, dtype=torch.float32)
        else:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        with MemoryWatch() as watch:
            row = measure_decode(model, 1, 16, 16, "none", "cpu", runner="decoder")
        result.update(tokens_per_s=1e3 / row["ms_per_step"], runner=row["runner"],
                      threads=torch.get_num_threads())
    else:
        raise SystemExit(f"unknown step {step}")
    result.update(watch.figures())
    return result


# ---- parent side ---------------------------------------------------------------------------------

def run_step(step: str, source: Path, out: Path, timeout: float) -> Dict[str, Any]:
    """Runs ``step`` in a fresh Python process; its JSON result (or the error it ended with)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", step, str(source), str(out)]
    env = dict(os.environ, PYENGINE_NO_PROGRESS="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:300]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def shape_facts(source: Path) -> Dict[str, Any]:
    """Parameters, bytes, and the sequential pipeline's least memory (largest layer in its
    source dtype + the tensors outside the layers) of the checkpoint in ``source``."""
    from pyengine.io.checks import checkpoint_files, stored_tensors
    stored = stored_tensors(checkpoint_files(source)[0])
    per_layer: Dict[str, int] = {}
    outside, params = 0, 0
    for key, info in stored.items():
        n = 1
        for d in info.shape:
            n *= d
        params += n
        if key.startswith("model.layers."):
            layer = key.split(".")[2]
            per_layer[layer] = per_layer.get(layer, 0) + info.nbytes
        else:
            outside += info.nbytes
    total = sum(info.nbytes for info in stored.values())
    return dict(params=params, checkpoint_mib=round(total / 2**20),
                bound_mib=round((max(per_layer.values()) + outside) / 2**20))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tinyllama-1.1b",
                        help="comma-separated keys of pyengine.model.random.SHAPES")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pyengine-scale"),
                        help="where the random checkpoints and outputs are written (kept for "
                             "re-runs: a source already there is reused)")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "scale_cpu.json")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per step")
    parser.add_argument("--shared-machine", default="",
                        help="a note for the table when other jobs ran alongside (the seconds "
                             "and tokens/s are then indicative only; memory is not affected)")
    parser.add_argument("--child", nargs=3, metavar=("STEP", "SOURCE", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0

    from pyengine.model.random import save_random_checkpoint
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = []
    for shape in args.shapes.split(","):
        source = args.work / f"{shape}-bf16"
        if not (source / "model.safetensors.index.json").exists():
            t0 = time.perf_counter()
            save_random_checkpoint(source, "llama", shape, max_shard_bytes=2 << 30)
            print(f"{shape}: wrote the random source in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        facts = shape_facts(source)
        billions = facts["params"] / 1e9
        row: Dict[str, Any] = dict(shape=shape, source_dtype="bfloat16", **facts,
                                   recipe="rtn int4 g128, embeddings and head int8")
        seq_out, mem_out = args.work / f"{shape}-int4-seq", args.work / f"{shape}-int4-mem"
        row["sequential"] = run_step("sequential", source, seq_out, args.timeout)
        # in memory: the bf16 model plus its float32 upcasts of one matrix and the output
        if facts["checkpoint_mib"] * 2**20 * 1.6 < RAM_FRACTION * ram:
            row["in_memory"] = run_step("in_memory", source, mem_out, args.timeout)
        else:
            row["in_memory"] = {"skipped": f"a {facts['checkpoint_mib']} MiB model does not "
                                           f"fit in memory whole on this machine "
                                           f"({ram / 2**30:.0f} GiB)"}
        for key in ("sequential", "in_memory"):
            if "seconds" in row[key]:
                row[key]["seconds_per_billion"] = row[key]["seconds"] / billions
                step_mib = row[key]["peak_rss_mib"] - row[key]["base_rss_mib"]
                row[key]["step_rss_over_bound"] = round(step_mib / facts["bound_mib"], 2)
                row[key]["peak_rss_over_checkpoint"] = round(
                    row[key]["peak_rss_mib"] / facts["checkpoint_mib"], 2)
        row["output_mib"] = round(sum(f.stat().st_size for f in seq_out.glob("*.safetensors"))
                                  / 2**20) if seq_out.exists() else None
        row["load"] = run_step("load", source, seq_out, args.timeout)
        row["decode_int4"] = run_step("decode_int4", source, seq_out, args.timeout)
        if facts["params"] * 4 < RAM_FRACTION * ram:
            row["decode_dense"] = run_step("decode_dense", source, seq_out, args.timeout)
        else:
            row["decode_dense"] = {"skipped": "float32 weights do not fit in memory"}
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    meta = common.metadata("cpu")
    if args.shared_machine:
        meta["shared_machine"] = args.shared_machine
    common.write_results(args.out, meta, rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
