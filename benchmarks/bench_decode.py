"""End-to-end decode speed of random-weight models of real shapes: dense (fp16 on a GPU, fp32
on a CPU) against 4-bit, mixed 3-bit (half the layers at 4 bits, half at 2) and 25% dynamic slicing + mixed 3-bit, with peers
where they are installed, at batch 1 and 16, and the fraction of the memory roofline reached.

Decoding uses a static KV cache. On a GPU each decode step is compiled with
``torch.compile(mode="reduce-overhead")`` (CUDA graphs) so that launch overhead does not hide
the kernels; ``--graphs none`` measures eager steps. Random weights are fine for speed, never
for quality (no perplexity is reported here).

    python benchmarks/bench_decode.py --device cuda                       # Llama-3-8B shapes
    python benchmarks/bench_decode.py --device cpu --shape smollm2-135m --batches 1
    python benchmarks/bench_decode.py --device cpu --shape tiny --new-tokens 4   # smoke test

Roofline: a decode step must read every weight byte once (the embedding only for the batch's
rows; a tied head reads it whole) plus the KV cache written so far; the roofline time of a step
is those bytes over the copy bandwidth measured in the same run (read + write of a large copy,
the achievable streaming rate; for each row the mean of a copy timed right before and one right
after its decode, ``copy_gbps``). ``pct_roofline`` = roofline time / measured step time.

Writes JSON rows (``op: "decode"``) to --json (default benchmarks/results/decode_<device>.json).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import pyengine  # noqa: E402
from pyengine import QuantConfig, Recipe  # noqa: E402
from pyengine.model.random import SHAPES, random_model  # noqa: E402

CONFIGS = ("dense", "int4", "int4_a8", "mixed3", "sliced25_mixed3")
PEERS = ("torchao_int4", "gemlite_int4")
GROUP_SIZE = 128


# ---- the compressed variants ------------------------------------------------------------------

def mixed_recipe(n_layers: int, slicing: Optional[List[int]] = None) -> Recipe:
    """Even layers at 4 bits, odd layers at 2 bits (3 code bits on average), group 128."""
    even = "|".join(str(i) for i in range(0, n_layers, 2))
    return Recipe({rf"model\.layers\.({even})\..*": QuantConfig(4, GROUP_SIZE),
                   "_default": QuantConfig(2, GROUP_SIZE)}, slicing=slicing)


def random_slicing(model: torch.nn.Module, target: float = 0.25, seed: int = 0) -> List[int]:
    """Slices ``model`` to per-layer widths of the dynamic schedule (mean deletion ``target``)
    with random orthonormal bases. Speed depends on the widths only, not on the bases, so the
    PCA of calibration data (pyengine.plan) is not needed here."""
    from pyengine.pipeline.plan import kept_widths, slice_fractions
    from pyengine.slicing import structure
    n, d = model.config.num_hidden_layers, model.config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    redundancy = torch.rand(n, generator=gen).tolist()  # stands in for the LR scores
    widths = kept_widths(slice_fractions(redundancy, target, "dynamic"), d)
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype

    def basis(width: int) -> torch.Tensor:
        g = torch.randn(d, d, generator=gen, dtype=torch.float32).to(device)
        return torch.linalg.qr(g)[0][:, :width].to(dtype)

    with torch.no_grad():
        structure.apply_bases(model, [basis(w) for w in widths], [basis(w) for w in widths],
                              basis(widths[-1]))
    return widths


def build(config: str, shape: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight llama model of ``shape`` on ``device``, compressed as ``config`` says."""
    model = random_model("llama", shape, dtype=dtype, device=device)
    n = model.config.num_hidden_layers
    with torch.no_grad():
        if config in ("int4", "int4_a8"):  # int4_a8: int8 activations (QuantConfig.act_bits)
            act_bits = 8 if config == "int4_a8" else 0
            pyengine.compress(model, Recipe({"_default": QuantConfig(4, GROUP_SIZE,
                                                                     act_bits=act_bits)}),
                              show_progress=False)
        elif config == "mixed3":
            pyengine.compress(model, mixed_recipe(n), show_progress=False)
        elif config == "sliced25_mixed3":
            widths = random_slicing(model)
            pyengine.compress(model, mixed_recipe(n, widths), show_progress=False)
        elif config == "torchao_int4":
            _torchao_int4(model)
        elif config == "gemlite_int4":
            _gemlite_int4(model)
        elif config != "dense":
            raise ValueError(f"unknown config {config!r}")
    return model.eval()


def _torchao_int4(model: torch.nn.Module) -> None:
    from torchao.quantization import quantize_
    try:
        from torchao.quantization import Int4WeightOnlyConfig
        config = Int4WeightOnlyConfig(group_size=GROUP_SIZE)
    except ImportError:  # older torchao
        from torchao.quantization import int4_weight_only
        config = int4_weight_only(group_size=GROUP_SIZE)
    if model.lm_head.weight.dtype != torch.bfloat16:
        model.to(torch.bfloat16)  # torchao's int4 tinygemm layout wants bf16 activations
    quantize_(model.model.layers, config)


def _gemlite_int4(model: torch.nn.Module) -> None:
    from gemlite.helper import A16W4  # raises ImportError where the helper API differs
    layers = model.model.layers
    for name, module in list(layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            parent_name, _, attr = name.rpartition(".")
            parent = layers.get_submodule(parent_name) if parent_name else layers
            setattr(parent, attr, A16W4(device=module.weight.device).from_linear(module))


def peer_unavailable(peer: str, device: str) -> Optional[str]:
    """Why ``peer`` cannot run here (None when it can)."""
    if device != "cuda":
        return "GPU-only peer"
    module = {"torchao_int4": "torchao", "gemlite_int4": "gemlite"}[peer]
    try:
        __import__(module)
    except Exception as exc:  # not installed, or broken against this torch
        return f"{module} not importable: {type(exc).__name__}: {exc}".splitlines()[0][:200]
    return None


# ---- bytes a decode step must read ------------------------------------------------------------

def weight_bytes_per_step(model: torch.nn.Module, batch: int) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer (shared storages
    once) except the embedding table, of which only ``batch`` rows are read unless the head
    reads it too (tied embeddings)."""
    table = model.get_input_embeddings()
    head = model.get_output_embeddings()
    total = pyengine.storage_bytes(model)
    if isinstance(table, pyengine.QuantEmbedding):  # packed rows, scales and zeros
        tied = head is not None and getattr(head, "qweight", None) is table.qweight
        table_bytes, rows = table.nbytes, table.num_embeddings
    else:
        tied = head is not None and getattr(head, "weight", None) is table.weight
        table_bytes, rows = table.weight.numel() * table.weight.element_size(), \
            table.weight.shape[0]
    if not tied:
        total -= table_bytes - batch * table_bytes // rows
    return total


def kv_bytes_per_step(model: torch.nn.Module, batch: int, context: int, dtype: torch.dtype) -> int:
    """Bytes of K and V one decode step reads at ``context`` cached tokens."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim
    return batch * context * per_token * torch.finfo(dtype).bits // 8


# ---- the decode loop --------------------------------------------------------------------------

def make_step(model: torch.nn.Module, cache) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One greedy decode step: ids [B, 1], cache_position [1] -> next ids [B, 1]."""
    def step(ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids, past_key_values=cache, cache_position=position, use_cache=True)
        return out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
    return step


@torch.inference_mode()
def prefill_random_prompt(decoder: "pyengine.Decoder", vocab_size: int, batch: int,
                          prompt_len: int, seed: int) -> torch.Tensor:
    """Prefills ``decoder`` with a random prompt ([batch, prompt_len] token ids from a generator
    seeded with ``seed``); returns the greedy next ids, [batch, 1] int64."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab_size, (batch, prompt_len), generator=gen)
    return decoder.prefill(prompt).argmax(dim=-1, keepdim=True)


def greedy_steps(decoder: "pyengine.Decoder", ids: torch.Tensor,
                 count: int) -> Tuple[torch.Tensor, float]:
    """``count`` greedy decode steps from ``ids`` ([batch, 1] int64): the last step's ids and
    the seconds they took (the decoder's device synchronised at the end)."""
    t0 = time.perf_counter()
    for _ in range(count):
        ids = decoder.forward(ids).argmax(dim=-1, keepdim=True)
    common.synchronize(decoder.device.type)
    return ids, time.perf_counter() - t0


def measure_decoder(model: torch.nn.Module, batch: int, prompt_len: int,
                    new_tokens: int, layout_copy: bool = True) -> Dict[str, object]:
    """Like :func:`measure_decode`, through pyengine.Decoder (the lean loop; ``layout_copy``
    as the Decoder takes it)."""
    warmup = 3
    decoder = pyengine.Decoder(model, max_len=prompt_len + warmup + new_tokens + 1, batch=batch,
                               layout_copy=layout_copy)
    ids = prefill_random_prompt(decoder, model.config.vocab_size, batch, prompt_len, seed=batch)
    ids, warmup_s = greedy_steps(decoder, ids, warmup)
    ids, seconds = greedy_steps(decoder, ids, new_tokens)
    return dict(ms_per_step=seconds * 1e3 / new_tokens, graphs="none", runner="decoder",
                warmup_s=round(warmup_s, 2), context=decoder.position,
                dtype=str(decoder.dtype).replace("torch.", ""))


@torch.inference_mode()
def measure_decode(model: torch.nn.Module, batch: int, prompt_len: int, new_tokens: int,
                   graphs: str, device: str, runner: str = "transformers") -> Dict[str, object]:
    """Prefills a random prompt into a static cache, then times ``new_tokens`` greedy steps
    (after warm-up steps that compile/capture). Returns ms per step and what ran. ``runner``
    "decoder" runs pyengine.Decoder instead of the model's forward (:func:`measure_decoder`)."""
    if runner == "decoder":
        return measure_decoder(model, batch, prompt_len, new_tokens)
    from transformers import StaticCache
    cfg = model.config
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    warmup = 3
    max_len = prompt_len + warmup + new_tokens + 1
    cache = StaticCache(config=cfg, max_cache_len=max_len)
    gen = torch.Generator().manual_seed(batch)
    prompt = torch.randint(3, cfg.vocab_size, (batch, prompt_len), generator=gen).to(device)
    positions = torch.arange(max_len, device=device)
    out = model(input_ids=prompt, past_key_values=cache, cache_position=positions[:prompt_len],
                use_cache=True)
    ids = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
    step = make_step(model, cache)
    used = "none"
    if graphs == "compile":
        step = torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)
        used = "compile(reduce-overhead)"
    state = {"ids": ids, "pos": prompt_len}

    def run_steps(count: int) -> float:
        """Seconds taken by ``count`` greedy steps (device synchronised at the end)."""
        t0 = time.perf_counter()
        for _ in range(count):
            pos = state["pos"]
            state["ids"] = step(state["ids"], positions[pos:pos + 1]).clone()
            state["pos"] = pos + 1
        common.synchronize(device)
        return time.perf_counter() - t0

    warmup_s = run_steps(warmup)  # compiles / captures on the first calls
    seconds = run_steps(new_tokens)
    pos = state["pos"]
    return dict(ms_per_step=seconds * 1e3 / new_tokens, graphs=used, runner="transformers",
                warmup_s=round(warmup_s, 2), context=pos, dtype=str(dtype).replace("torch.", ""))


def roofline_bandwidth(device: str) -> Tuple[float, float, Optional[float]]:
    """(the roofline's bandwidth, a copy in ordinary memory, one in huge pages) in GB/s: on a CPU
    the decoder's weight copies live in huge pages where the OS has them, so the roofline takes
    the faster of a copy there and one in ordinary memory (None: no huge pages)."""
    ordinary = common.copy_bandwidth_gbps(device)
    huge = common.huge_page_copy_bandwidth_gbps(device)
    return max(ordinary, huge or 0), ordinary, huge


def with_roofline(row: Dict[str, object], bandwidth_gbps: float) -> Dict[str, object]:
    """row with ``copy_gbps`` (bandwidth_gbps to 0.01) and ``pct_roofline``: the time its bytes
    per step (weights and KV cache) take at that bandwidth against its measured step time, to 4
    significant digits (a tiny model's share is a few hundredths of a percent)."""
    copy_gbps = round(bandwidth_gbps, 2)
    roofline_s = (row["weight_bytes_read"] + row["kv_bytes_read"]) / (copy_gbps * 1e9)
    row.update(copy_gbps=copy_gbps,
               pct_roofline=float(f"{100 * roofline_s / (row['ms_per_step'] * 1e-3):.4g}"))
    return row


def decode_row(label: str, model: torch.nn.Module, batch: int, args,
               device: str) -> Dict[str, object]:
    """One decode row without its roofline (with_roofline adds it)."""
    graphs = args.graphs
    runner = args.runner
    if runner == "decoder" and pyengine.decoder_blocker(model, args.prompt + args.new_tokens + 4):
        runner = "transformers"  # e.g. a sliced model: the row says which loop ran
    try:
        m = measure_decode(model, batch, args.prompt, args.new_tokens, graphs, device, runner)
    except Exception as exc:  # a compile/capture failure must not cost the eager figure
        if graphs == "none":
            raise
        print(f"  [{label} b{batch}] {graphs} failed ({type(exc).__name__}: "
              f"{str(exc).splitlines()[0][:160]}); measuring eager steps", flush=True)
        torch._dynamo.reset()
        m = measure_decode(model, batch, args.prompt, args.new_tokens, "none", device, runner)
        m["graphs_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    act_dtype = getattr(torch, m["dtype"])
    wbytes = weight_bytes_per_step(model, batch)
    kv = kv_bytes_per_step(model, batch, int(m["context"]), act_dtype)
    step_s = m["ms_per_step"] * 1e-3
    return dict(op="decode", model=label, backend=os.environ.get("PYENGINE_BACKEND", "auto"),
                batch=batch, tokens_per_s=round(batch / step_s, 2),
                ms_per_step=round(m["ms_per_step"], 4), weight_bytes_read=wbytes, kv_bytes_read=kv,
                gbps=round((wbytes + kv) / step_s / 1e9, 2),
                weight_bytes=pyengine.storage_bytes(model), **{k: v for k, v in m.items()
                                                              if k != "ms_per_step"})


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="model shape (default: llama-3-8b on cuda, smollm2-135m on cpu)")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (default: the shape's; fewer for a quick run)")
    parser.add_argument("--configs", default=",".join(CONFIGS + PEERS),
                        help=f"comma-separated subset of {CONFIGS + PEERS}")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens prefilled")
    parser.add_argument("--new-tokens", type=int, default=64, help="timed decode steps")
    parser.add_argument("--graphs", choices=("compile", "none"), default=None,
                        help="compile decode steps with CUDA graphs (default on cuda) or not")
    parser.add_argument("--runner", choices=("decoder", "transformers"), default=None,
                        help="decode loop: pyengine.Decoder (default on cpu; models it does not "
                             "run fall back to transformers) or the model's forward (default "
                             "on cuda, with --graphs)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    args.shape = args.shape or ("llama-3-8b" if device == "cuda" else "smollm2-135m")
    args.graphs = args.graphs or ("compile" if device == "cuda" else "none")
    args.runner = args.runner or ("transformers" if device == "cuda" else "decoder")
    dtype = torch.float16 if device == "cuda" else torch.float32
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(CONFIGS + PEERS))
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {CONFIGS + PEERS}")
    batches = [int(b) for b in args.batches.split(",")]
    out = args.json or common.RESULTS / f"decode_{device}.json"
    if args.layers:
        SHAPES[args.shape] = {**SHAPES[args.shape], "num_hidden_layers": args.layers}

    bandwidth, ordinary_bandwidth, huge_bandwidth = roofline_bandwidth(device)
    meta = dict(common.metadata(device), shape=args.shape, layers=SHAPES[args.shape][
        "num_hidden_layers"], copy_bandwidth_gbps=round(bandwidth, 1),
        copy_bandwidth_ordinary_memory_gbps=round(ordinary_bandwidth, 1),
        copy_bandwidth_huge_pages_gbps=huge_bandwidth and round(huge_bandwidth, 1),
        prompt_tokens=args.prompt,
        new_tokens=args.new_tokens, group_size=GROUP_SIZE, dense_dtype=str(dtype)[6:])
    print(f"{meta['device']}: copy bandwidth {bandwidth:.1f} GB/s; {args.shape}, "
          f"{meta['layers']} layers", flush=True)
    rows: List[Dict[str, object]] = []
    skipped: List[Dict[str, object]] = []
    for config in configs:
        reason = peer_unavailable(config, device) if config in PEERS else None
        if reason:
            skipped.append(dict(model=config, reason=reason))
            print(f"[{config}] skipped: {reason}", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            model = build(config, args.shape, device, dtype)
        except Exception as exc:
            if config not in PEERS:
                raise
            skipped.append(dict(model=config, reason=f"{type(exc).__name__}: {exc}"[:300]))
            print(f"[{config}] skipped: {skipped[-1]['reason']}", flush=True)
            continue
        build_s = time.perf_counter() - t0
        for batch in batches:
            # the copy timed right before and after the row's decode: a shared machine's
            # bandwidth drifts between rows (2x within minutes seen), and the row's roofline
            # follows it
            before = roofline_bandwidth(device)[0]
            row = with_roofline(decode_row(config, model, batch, args, device),
                                (before + roofline_bandwidth(device)[0]) / 2)
            row["build_s"] = round(build_s, 1)
            rows.append(row)
            print(f"[{config}] batch {batch}: {row['tokens_per_s']:.1f} tok/s, "
                  f"{row['ms_per_step']:.3f} ms/step, {row['gbps']:.0f} GB/s = "
                  f"{row['pct_roofline']:.0f}% of roofline, {row['weight_bytes'] / 2**20:.0f} MiB "
                  f"({row['graphs']})", flush=True)
            common.write_results(out, meta, rows + [dict(op="skipped", **s) for s in skipped])
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()

    base = {r["batch"]: r for r in rows if r["model"] == "dense"}
    for r in rows:
        if r["batch"] in base:
            r["speedup_vs_dense"] = round(base[r["batch"]]["ms_per_step"] / r["ms_per_step"], 3)
    common.write_results(out, meta, rows + [dict(op="skipped", **s) for s in skipped])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
