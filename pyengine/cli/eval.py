"""``pyengine eval DIR``."""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, Optional

from torch import nn

from .checks import check_output_file, write_text
from .common import (check_device, dtype_of, load_model, mib, perplexity_of, require_tokenizer,
                     text_source)


def cmd_eval(args: argparse.Namespace) -> int:
    """``pyengine eval DIR``: perplexity and weight bytes."""
    from ..pipeline.compress import predicted_bytes, storage_bytes
    check_device(args.device)
    args.json = check_output_file(args.json, "--json")
    source = None if args.no_ppl else text_source(args.ppl)
    loaded = load_model(args.model, args.device, dtype_of(args.dtype))
    result: Dict[str, Any] = {"model": str(args.model), "compressed": loaded.compressed,
                              "weight_bytes": storage_bytes(loaded.model),
                              "predicted_bytes": predicted_bytes(loaded.model),
                              "bits_per_weight": bits_per_weight_or_none(loaded.model)}
    if source is not None:
        tokenizer = require_tokenizer(loaded, "perplexity")
        result.update(dataset=args.ppl, seqlen=args.seqlen, max_windows=args.max_windows,
                      perplexity=perplexity_of(loaded.model, tokenizer, args.ppl, args.seqlen,
                                               args.max_windows))
        print(f"perplexity: {result['perplexity']:.4f} ({args.ppl}, seqlen {args.seqlen}, "
              f"at most {args.max_windows} windows)")
    print(f"weight bytes: {result['weight_bytes']} ({mib(result['weight_bytes'])} held, "
          f"{mib(result['predicted_bytes'])} predicted by the format)")
    if result["bits_per_weight"] is not None:
        print(describe_bits(result["bits_per_weight"]))
    if args.json:
        write_text(args.json, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def bits_per_weight_or_none(model: nn.Module) -> Optional[Dict[str, float]]:
    """pyengine.bits_per_weight, or None for a model of a family pyengine does not support."""
    from ..pipeline.compress import bits_per_weight
    from ..model.adapters import UnsupportedModelError
    try:
        return {k: round(v, 4) for k, v in bits_per_weight(model).items()}
    except UnsupportedModelError:
        return None


def describe_bits(bits: Dict[str, float]) -> str:
    return (f"bits per weight: {bits['model']:.2f} over the whole model, {bits['linears']:.2f} "
            f"over the decoder's linear layers (scales and zeros included)")

