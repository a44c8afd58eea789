"""``pyengine demo``: SmolLM2-135M before and after compression."""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any, Dict

import torch
from torch import nn

from ..model.sources import SMOLLM2
from .checks import UsageError, check_output_dir
from .common import (calibration, check_device, compress_model, describe_recipe, dtype_of,
                     load_model, mib, perplexity_of, plan_recipe, status)

DEMO_PROMPT = "What is the capital of France?"


def sample_text(tokenizer: Any, model: nn.Module, ids: torch.Tensor) -> str:
    """The generated ``ids`` as text, up to the first end-of-sequence token."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    stops = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    tokens = ids.tolist()
    for i, token in enumerate(tokens):
        if token in stops:
            tokens = tokens[:i]
            break
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def prompt_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids [1, T] of ``text`` as a user turn of the tokenizer's chat template (plain text
    when it has none)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        return torch.as_tensor(ids).reshape(1, -1)
    return tokenizer(text, return_tensors="pt").input_ids


def cmd_demo(args: argparse.Namespace) -> int:
    """``pyengine demo``: SmolLM2-135M before and after compression, side by side."""
    from .. import benchmarking as bm
    from ..pipeline.compress import storage_bytes
    from ..utils import progress
    check_device(args.device)
    if args.act_bits is None:  # int8 activations where the kernels multiply them as integers
        args.act_bits = 8 if args.device == "cpu" else 0
    args.save = check_output_dir(args.save, "--save")
    t_start = time.perf_counter()
    status("loading SmolLM2-135M (the embedded default model)")
    loaded = load_model(SMOLLM2, args.device, dtype_of(args.dtype))
    model, tokenizer = loaded.model, loaded.tokenizer
    ppl_kwargs = dict(source="offline", seqlen=args.eval_seqlen, max_windows=args.max_windows)
    prompt = prompt_ids(tokenizer, args.prompt)

    status("measuring the original model")
    before: Dict[str, Any] = dict(ppl=perplexity_of(model, tokenizer, **ppl_kwargs),
                                  bytes=storage_bytes(model))
    original = copy.deepcopy(model)  # kept for the decode-speed comparison at the end
    status("planning the recipe")
    calib = calibration(tokenizer, args.calib, args.n_samples, args.seqlen)
    t0 = time.perf_counter()
    recipe = plan_recipe(model, calib, args)
    status(f"recipe: {describe_recipe(recipe)}")
    compress_model(model, recipe, calib)
    compress_s = time.perf_counter() - t0
    status("measuring the compressed model")
    after: Dict[str, Any] = dict(ppl=perplexity_of(model, tokenizer, **ppl_kwargs),
                                 bytes=storage_bytes(model))
    # decode speed: the two models alternate, so a load change on a shared machine hits both;
    # the best of the rounds is kept. Both run through the same decode loop.
    max_len = prompt.shape[1] + args.new_tokens
    try:
        runners = {bm.pick_runner(m, max_len, args.runner) for m in (original, model)}
    except ValueError as exc:  # --runner decoder on a model it does not run
        raise UsageError(f"--runner: {exc}") from None
    runner = runners.pop() if len(runners) == 1 else "transformers"
    for _ in progress(range(args.decode_rounds), desc="decode speed", unit="round"):
        for result, m in ((before, original), (after, model)):
            tps, out = bm.decode_tokens_per_s(m, prompt, args.new_tokens, runner=runner)
            result["tps"] = max(result.get("tps", 0.0), tps)
            result["text"] = sample_text(tokenizer, m, out[0, prompt.shape[1]:])
    del original
    if args.save:
        from ..io.checkpoint import save
        save(model, args.save)
        tokenizer.save_pretrained(str(args.save))

    threads = f", {torch.get_num_threads()} threads" if args.device == "cpu" else ""
    lines = [
        f"pyengine demo: {loaded.name} on {args.device}{threads}",
        f"recipe: {describe_recipe(recipe)} (planned and compressed in {compress_s:.0f} s)",
        "",
        f"{'':<18} {'original':>12} {'compressed':>12}  change",
        f"{'perplexity':<18} {before['ppl']:12.3f} {after['ppl']:12.3f}  "
        f"{100 * (after['ppl'] / before['ppl'] - 1):+.1f}%",
        f"{'weight size':<18} {mib(before['bytes']):>12} {mib(after['bytes']):>12}  "
        f"{before['bytes'] / after['bytes']:.2f}x smaller",
        f"{'decode tokens/s':<18} {before['tps']:12.1f} {after['tps']:12.1f}  "
        f"{after['tps'] / before['tps']:.2f}x",
        "",
        f"perplexity: offline corpus, held-out split, {args.max_windows} windows of "
        f"{args.eval_seqlen} tokens; "
        f"decode: batch 1, greedy, {args.new_tokens} tokens after a warm-up, both models "
        f"through {'pyengine.Decoder' if runner == 'decoder' else 'transformers generate'}, "
        f"best of "
        f"{args.decode_rounds} alternating rounds",
        f"sample (compressed): {args.prompt!r} -> {after['text']!r}",
        f"sample (original):   {args.prompt!r} -> {before['text']!r}",
    ]
    if args.save:
        lines.append(f"saved the compressed model to {args.save}")
    lines.append(f"total time {time.perf_counter() - t_start:.0f} s")
    print("\n".join(lines))
    return 0

