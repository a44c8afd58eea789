"""``pyengine compress MODEL --out DIR``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..model.sources import LoadedModel, is_checkpoint, tokenizer_or_none
from .checks import UsageError, check_output_dir
from .common import (calibration, check_device, compress_model, describe_recipe, load_model,
                     method_options, mib, plan_recipe, require_supported, require_tokenizer,
                     status)


def cmd_compress(args: argparse.Namespace) -> int:
    """``pyengine compress MODEL --out DIR``: plan, compress and save (with the tokenizer)."""
    from ..io.checkpoint import save
    from ..pipeline.compress import storage_bytes
    out = check_output_dir(args.out, "--out")
    source = Path(args.model).expanduser()
    if source.exists() and out.exists() and out.resolve() == (source if source.is_dir()
                                                                 else source.parent).resolve():
        raise UsageError(f"--out {out}: that is where the original model is; choose another "
                         f"directory")
    if (out / "config.json").exists() and not is_checkpoint(out):
        raise UsageError(f"--out {out}: holds another model (config.json); choose an empty "
                         f"directory")
    if source.is_dir() and is_checkpoint(source):
        raise UsageError(f"{args.model} is already compressed by pyengine; compress the "
                         f"original model")
    check_device(args.device)
    gguf = source.is_file() and source.suffix.lower() == ".gguf"
    readable = gguf or (source.is_dir() and any(source.glob("*.safetensors")))
    sequential = args.sequential
    if sequential is None:
        sequential = readable and not args.rotate and not args.slice
    if sequential:
        if not readable:
            raise UsageError(f"--sequential reads a local Hugging Face directory of "
                             f"safetensors files or a .gguf file; {args.model} is neither")
        if args.rotate or args.slice:
            raise UsageError("--sequential: slicing and rotation transform the whole model "
                             "and run in memory; drop --sequential")
        return _compress_sequential(args, source, out)
    status(f"loading {args.model}")
    loaded = load_model(args.model, device=args.device)
    if loaded.compressed:
        raise UsageError(f"{args.model} is already compressed by pyengine; compress the "
                         f"original model")
    require_supported(loaded.model)
    tokenizer = require_tokenizer(loaded, "calibration")
    model = loaded.model
    calib = calibration(tokenizer, args.calib, args.n_samples, args.seqlen)
    dense_bytes = storage_bytes(model)
    t0 = time.perf_counter()
    recipe = plan_recipe(model, calib, args)
    status(f"recipe: {describe_recipe(recipe)}")
    compress_model(model, recipe, calib, method_options(args))
    seconds = time.perf_counter() - t0
    save(model, out)
    tokenizer.save_pretrained(str(out))
    after = storage_bytes(model)
    print(f"compressed {loaded.name} in {seconds:.0f} s: {describe_recipe(recipe)}")
    print(f"weights: {mib(dense_bytes)} -> {mib(after)} ({dense_bytes / after:.2f}x smaller)")
    print(f"saved to {out}")
    return 0


def _compress_sequential(args: argparse.Namespace, source: Path, out: Path) -> int:
    """cmd_compress, one decoder layer at a time (pyengine.pipeline.streaming)."""
    from ..pipeline.streaming import (GGUFSource, SourceCheckpoint, StreamingError,
                                      compress_checkpoint, open_source, stream_scores)
    try:
        src = open_source(source)
        skeleton = src.skeleton()
    except StreamingError as exc:
        raise UsageError(str(exc)) from None
    require_supported(skeleton)
    found = (tokenizer_or_none(str(source.parent), gguf_file=source.name)
             if isinstance(src, GGUFSource) else tokenizer_or_none(str(source)))
    tokenizer = require_tokenizer(LoadedModel(skeleton, found, source.name, False),
                                  "calibration")
    calib = calibration(tokenizer, args.calib, args.n_samples, args.seqlen)
    status(f"compressing {source.name} layer by layer ({len(src.stored)} tensors in "
           f"{src.dtype}, {mib(src.nbytes)})")
    t0 = time.perf_counter()
    layer_scores = None
    if args.avg_bits is not None and args.importance in ("lim", "zd"):
        layer_scores = stream_scores(source, calib, device=args.device)
    recipe = plan_recipe(skeleton, calib, args, layer_scores=layer_scores)
    status(f"recipe: {describe_recipe(recipe)}")
    try:
        compress_checkpoint(source, out, recipe, calib, device=args.device,
                            options=method_options(args))
    except ValueError as exc:  # StreamingError included
        raise UsageError(f"cannot compress with this recipe: {exc}") from None
    seconds = time.perf_counter() - t0
    tokenizer.save_pretrained(str(out))
    after = SourceCheckpoint.tensor_bytes(out)
    print(f"compressed {source.name} in {seconds:.0f} s: {describe_recipe(recipe)}")
    print(f"weights: {mib(src.nbytes)} -> {mib(after)} ({src.nbytes / after:.2f}x smaller)")
    print(f"saved to {out}")
    return 0

