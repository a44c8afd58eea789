"""Size and quality of SmolLM2-135M: pyengine's checkpoints next to llama.cpp's quantized files of
the same GGUF, each with its bytes on disk, bits per weight over the whole model and held-out
perplexity.

Every perplexity is measured by the same code on the same text (``pyengine.perplexity``, the
held-out split of the offline corpus, ``--max-windows`` windows of ``--seqlen`` tokens): for
llama.cpp's files on their weights as transformers' GGUF reader dequantizes them (llama.cpp's own
runtime additionally rounds activations to 8 bits in its dot products, which this does not
model). Bits per weight = 8 x file bytes / the parameters of the original model (its tied
table counted once), for both engines; pyengine's rows also give the bits of the decoder's linear
layers and check ``pyengine.storage_bytes`` against the file.

llama.cpp's ``llama-quantize`` comes from benchmarks/bench_vs_llamacpp.py (built once, about 10
minutes on 2 cores); ``--no-llama`` runs the pyengine side alone.

    python benchmarks/size_vs_llamacpp.py --no-llama
    python benchmarks/size_vs_llamacpp.py --configs int8,int4,int4_g64_gptq --llama-types Q8_0,Q4_0,Q2_K

Calibrated RTN, GPTQ with and without ``Recipe.rotate``, and rotated without the online
Walsh-Hadamard transform of the MLPs (``_rot_merged``) (``rotation_smollm2.json``, a README
table):

    python benchmarks/size_vs_llamacpp.py --configs int4_g64,int3_g64,int2_g64,\
        int4_g64_rot,int3_g64_rot,int2_g64_rot,\
        int4_g64_gptq,int4_g64_gptq_rot,\
        int4_g64_gptq_rot_merged,int3_g64_gptq,int3_g64_gptq_rot,int3_g64_gptq_rot_merged,\
        int2_g64_gptq,int2_g64_gptq_rot,int2_g64_gptq_rot_merged \
        --llama-types Q4_0,Q3_K_M,Q2_K --json benchmarks/results/rotation_smollm2.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import pyengine  # noqa: E402
from pyengine import QuantConfig, Recipe  # noqa: E402

CONFIGS: Dict[str, Dict] = {
    # name: recipe quant, method needs calibration, compress dtype
    "dense_fp16": dict(quant=None),
    "int8": dict(quant={"_default": QuantConfig(8, 128)}),
    "int4": dict(quant={"_default": QuantConfig(4, 128)}),
    # int8 activations on every linear and the head (bench_vs_llamacpp's *_a8 configs): the
    # quality side of the integer kernels
    "int8_a8": dict(quant={"lm_head": QuantConfig(8, 128, act_bits=8),
                           "_default": QuantConfig(8, 128, act_bits=8)}),
    "int4_a8": dict(quant={"lm_head": QuantConfig(8, 128, act_bits=8),
                           "_default": QuantConfig(4, 128, act_bits=8)}),
    "int4_fp32_scales_dense_table": dict(quant={"_default": QuantConfig(4, 128)},
                                        dtype=torch.float32, embeddings=None),
    # RTN at group 64 (calibrated: each input's errors weighed by its mean square on the
    # calibration text)
    **{f"int{bits}_g64{suffix}": dict(quant={"_default": QuantConfig(bits, 64)}, rotate=rotate,
                                      online_hadamard=rotate)
       for bits in (4, 3, 2) for suffix, rotate in (("", False), ("_rot", True))},
    "int4_g64_gptq": dict(quant={"_default": QuantConfig(4, 64, method="gptq")}),
    "int4_g128_gptq": dict(quant={"_default": QuantConfig(4, 128, method="gptq")}),
    # the table (and tied head) with one scale per row: 576 is not a multiple of 128, so group
    # 128 pads every row to 640 codes
    "int4_g64_gptq_row_table": dict(quant={"_default": QuantConfig(4, 64, method="gptq")},
                                    embeddings=QuantConfig(8, -1)),
    # GPTQ at 4/3/2 bits with and without the random rotations of Recipe.rotate (``_rot``: with
    # the MLPs' online Walsh-Hadamard transform, ``_rot_merged``: the merged rotations alone)
    **{f"int{bits}_g64_gptq{suffix}":
       dict(quant={"_default": QuantConfig(bits, 64, method="gptq")}, rotate=rotate,
            online_hadamard=online)
       for bits in (4, 3, 2)
       for suffix, rotate, online in (("", False, False), ("_rot", True, True),
                                      ("_rot_merged", True, False))
       if (bits, rotate) != (4, False)},
}
LLAMA_TYPES = ("Q8_0", "Q4_0", "Q2_K")


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _file_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def pyengine_row(config: str, tokenizer, calib, eval_kwargs, workdir: Path) -> Dict:
    from pyengine.model.smollm2 import load_smollm2
    spec = CONFIGS[config]
    model, _ = load_smollm2()
    t0 = time.perf_counter()
    if spec["quant"] is None:
        pyengine.compress(model, Recipe({}, embeddings=None), show_progress=False,
                          dtype=torch.float16)
    else:
        kwargs = {} if "embeddings" not in spec else {"embeddings": spec["embeddings"]}
        kwargs["rotate"] = spec.get("rotate", False)
        kwargs["online_hadamard"] = spec.get("online_hadamard", True)
        pyengine.compress(model, Recipe(spec["quant"], **kwargs), calib, show_progress=False,
                          dtype=spec.get("dtype"))
    seconds = time.perf_counter() - t0
    out = workdir / config
    pyengine.save(model, out)
    loaded = pyengine.load(out)
    on_disk = _file_bytes(out)
    bits = pyengine.bits_per_weight(loaded)
    ppl = pyengine.perplexity(loaded, tokenizer, show_progress=False, **eval_kwargs)
    return dict(engine="pyengine", config=config, file_bytes=on_disk,
                storage_bytes=pyengine.storage_bytes(loaded), linears_bits=round(bits["linears"], 3),
                run_dtype=str(next(loaded.parameters()).dtype).replace("torch.", ""),
                perplexity=round(ppl, 4), compress_s=round(seconds, 1))


def gguf_row(path: Path, label: str, tokenizer, eval_kwargs) -> Dict:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    ppl = pyengine.perplexity(model, tokenizer, show_progress=False, **eval_kwargs)
    return dict(engine="llama.cpp", config=label, file_bytes=path.stat().st_size,
                perplexity=round(ppl, 4))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="dense_fp16,int8,int4,int4_g64_gptq")
    parser.add_argument("--llama-types", default=",".join(LLAMA_TYPES))
    parser.add_argument("--no-llama", action="store_true", help="the pyengine side only")
    parser.add_argument("--isa", default="native", help="llama.cpp build (bench_vs_llamacpp.py)")
    parser.add_argument("--jobs", type=int, default=2, help="llama.cpp build jobs")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=4)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--json", type=Path, default=common.RESULTS / "size_vs_llamacpp.json")
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")

    from pyengine.model.smollm2 import gguf_path, load_smollm2
    torch.manual_seed(0)
    reference, tokenizer = load_smollm2()
    params = _params(reference)
    del reference
    calib = pyengine.calibration_data(tokenizer, n_samples=args.calib_samples, seqlen=512)
    eval_kwargs = dict(seqlen=args.seqlen, max_windows=args.max_windows)
    rows = []
    source = gguf_path()
    rows.append(gguf_row(source, f"source {source.stem.split('.')[-1]}", tokenizer, eval_kwargs))
    llama_types = [] if args.no_llama else [t for t in args.llama_types.split(",") if t]
    if llama_types:
        from bench_vs_llamacpp import llama_model, llama_tools
        bin_dir = llama_tools(args.isa, args.jobs)
        for qtype in llama_types:
            rows.append(gguf_row(llama_model(bin_dir, source, qtype), qtype, tokenizer,
                                 eval_kwargs))
            print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory(prefix="pyengine-size-") as tmp:
        for config in configs:
            rows.append(pyengine_row(config, tokenizer, calib, eval_kwargs, Path(tmp)))
            print(rows[-1], flush=True)
    for row in rows:
        row.update(op="size_vs_llamacpp", params=params,
                   bits_per_weight=round(8 * row["file_bytes"] / params, 3))
    for row in rows:
        print(f"{row['engine']:>9} {row['config']:>30}: {row['file_bytes'] / 2**20:7.1f} MiB "
              f"{row['bits_per_weight']:6.2f} bits/weight  perplexity {row['perplexity']:.3f}")
    meta = common.metadata("cpu")
    meta.update(params=params, dataset="offline (held-out split)", seqlen=args.seqlen,
                max_windows=args.max_windows, calib_samples=args.calib_samples,
                llama_types=llama_types,
                not_run=[] if llama_types else ["llama.cpp files (--no-llama)"])
    common.write_results(args.json, meta, rows)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
