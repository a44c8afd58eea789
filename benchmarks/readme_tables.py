"""The README's benchmark tables, generated from the committed results under benchmarks/results/.

    python benchmarks/readme_tables.py            # rewrite the block in README.md
    python benchmarks/readme_tables.py --check    # exit 1 if README.md differs from the results

The block sits between the markers ``<!-- results:begin -->`` and ``<!-- results:end -->``;
every table names the device and date of the run it comes from. A result file that is absent
is left out of the block (the tables say which files they come from).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _load(name: str) -> Optional[Dict[str, object]]:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _source(name: str, meta: Dict[str, object]) -> str:
    """Where a table's figures come from: the file, the CPU or GPU (with a CPU's family / model
    and last-level cache where the run recorded them: CPUs of one name differ), the date."""
    date = str(meta.get("date", "?"))[:10]
    family, llc = meta.get("cpu_family_model"), meta.get("last_level_cache_mib")
    cpu = [f"family/model {family}" if family else "",
           f"{llc} MiB last-level cache" if llc else ""]
    details = ", ".join(c for c in cpu if c)
    device = f"{meta.get('device', '?')}" + (f" ({details})" if details else "")
    return f"`benchmarks/results/{name}`, {device}, {date}"


def _mib(nbytes: object) -> str:
    return f"{float(nbytes) / 2**20:.0f}"


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def seeds_table() -> List[str]:
    data = _load("seeds_smollm2.json")
    if data is None:
        return []
    wanted = ("fp32", "constant 25%", "dynamic 25% base 0.000", "constant 35%",
              "dynamic 35% base 0.000", "RTN 25% of layers 4->2 by lim",
              "RTN 25% of layers 4->2 by random", "RTN int4 g128", "GPTQ int4 g128",
              "RTN int3 g128", "GPTQ int3 g128")
    rows = [r for r in data["rows"] if r["config"] in wanted or r["section"] == "combined"]
    body = [[r["section"], r["config"], f"{r['ppl']:.2f}", _mib(r["weight_bytes"])] for r in rows]
    return ([f"**Seeds' algorithms on SmolLM2-135M** (perplexity on held-out text, 16 x 512 "
             f"tokens; {_source('seeds_smollm2.json', data['meta'])}; all rows in "
             f"`seeds_smollm2.md`)", ""]
            + _table(["section", "config", "perplexity", "MiB"], body))


def engine_table() -> List[str]:
    data = _load("engine_smollm2.json")
    if data is None:
        return []
    body = [[r["config"], f"{r['ppl']:.3f}", f"{r['ppl_change_pct']:+.1f}%",
             _mib(r["weight_bytes"]), _mib(r["predicted_bytes"])] for r in data["rows"]]
    return ([f"**Uniform RTN on SmolLM2-135M** (perplexity at seqlen 2048 on the whole held-out "
             f"split; {_source('engine_smollm2.json', data['meta'])})", ""]
            + _table(["config", "perplexity", "change", "MiB held", "MiB predicted"], body))


def matryoshka_table() -> List[str]:
    data = _load("matryoshka_smollm2.json")
    if data is None:
        return []
    body = [[r["config"], f"{r['avg_bits']:g}", f"{r['ppl']:.4g}",
             "" if r.get("code_bytes_read") is None else f"{r['code_bytes_read']:.3f}"]
            for r in data["rows"]]
    return ([f"**Matryoshka slices on SmolLM2-135M** "
             f"({_source('matryoshka_smollm2.json', data['meta'])})", ""]
            + _table(["config", "avg bits", "perplexity", "code bytes read (x int8)"], body))


def decode_table(name: str) -> List[str]:
    data = _load(name)
    if data is None:
        return []
    meta = data["meta"]
    rows = [r for r in data["rows"] if r.get("op") == "decode"]
    body = [[r["model"], str(r["batch"]), f"{r['tokens_per_s']:.1f}",
             f"{r.get('speedup_vs_dense', float('nan')):.2f}x", _mib(r["weight_bytes"]),
             f"{r['pct_roofline']:.0f}%", str(r.get("runner", "transformers")),
             str(r["graphs"])] for r in rows]
    skipped = [f"{r['model']} ({r['reason']})" for r in data["rows"] if r.get("op") == "skipped"]
    lines = ([f"**End-to-end decode**, random weights of {meta.get('shape')} shapes "
              f"({meta.get('layers')} layers), static KV cache, {meta.get('new_tokens')} greedy "
              f"steps after a {meta.get('prompt_tokens')}-token prompt; copy bandwidth "
              f"{meta.get('copy_bandwidth_gbps')} GB/s ({_source(name, meta)})", ""]
             + _table(["model", "batch", "tokens/s", "vs dense", "MiB", "of roofline",
                       "decode loop", "graphs"], body))
    if skipped:
        lines += ["", "Not run: " + "; ".join(skipped) + "."]
    return lines


# pyengine config -> the llama.cpp type of about the same bits per decoder weight
LLAMA_PEERS = {"dense": "F32", "int8": "Q8_0", "int4": "Q4_0", "int8_a8": "Q8_0",
               "int4_a8": "Q4_0", "int3_a8": "Q3_K_M", "int2_a8": "Q2_K",
               "int4_a8_nocopy": "Q4_0"}


def vs_llamacpp_table(name: str) -> List[str]:
    data = _load(name)
    if data is None:
        return []
    meta = data["meta"]
    rows = [r for r in data["rows"] if r.get("op") == "decode_vs_llamacpp"]
    speed = {(r["engine"], r["config"], r["threads"]): r for r in rows}
    body = []
    for r in rows:
        if r["engine"] != "pyengine":
            continue
        peer = speed.get(("llama.cpp", LLAMA_PEERS.get(r["config"], ""), r["threads"]))
        ratio = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if peer else ""
        roofline = r.get("pct_of_copy_bw")
        held = r["bytes"] + r.get("prepared_bytes", 0)
        body.append([r["config"], str(r["threads"]), f"{r['tokens_per_s']:.1f}",
                     f"{r['bits_per_weight']:.2f}", f"{held / 1e6:.0f}",
                     "" if roofline is None else f"{roofline:.0f}%",
                     peer["config"] if peer else "",
                     f"{peer['tokens_per_s']:.1f}" if peer else "",
                     f"{peer['bits_per_weight']:.2f}" if peer else "", ratio])
    copy = meta.get("copy_gbps_by_threads", {})
    copy_text = ", ".join(f"{v} GB/s with {t} thread{'s' if str(t) != '1' else ''}"
                          for t, v in copy.items())
    huge, plain = meta.get("copy_gbps_huge_pages"), meta.get("copy_gbps_ordinary_memory")
    huge_text = (f"; the faster of a copy in ordinary memory ({', '.join(map(str, plain.values()))}"
                 f" GB/s) and in huge pages ({', '.join(map(str, huge.values()))} GB/s), which "
                 f"hold the decoder's weight copies" if huge and plain else "")
    load = meta.get("competing_load")
    load_text = (f", while {load} other processes keep every core busy (a competing load)"
                 if load else "")
    return ([f"**Decode against llama.cpp**{load_text}, SmolLM2-135M from the same GGUF, batch 1, "
             f"{meta.get('new_tokens')} tokens, medians of {meta.get('rounds')} alternating "
             f"rounds; llama.cpp built for {meta.get('llama_cpp_isa')}, pyengine's "
             f"{meta.get('pyengine_cpu_isa', '?')} kernels through pyengine.Decoder; bits per "
             f"weight of the whole file / model; MB held: the model and the decoder's weight "
             f"copies (prepared_bytes); roofline: the model's bytes per token times "
             f"tokens/s against a copy's bandwidth with as many threads ({copy_text}, "
             f"measured in the run{huge_text}) "
             f"({_source(name, meta)})", ""]
            + _table(["pyengine", "threads", "tokens/s", "bits/weight", "MB held", "of roofline",
                      "llama.cpp", "tokens/s", "bits/weight", "pyengine / llama.cpp"], body))


def kernel_table(name: str, title: str, ms: Tuple[int, ...] = (1,)) -> List[str]:
    data = _load(name)
    if data is None:
        return []
    rows = [r for m in ms for r in data["rows"] if r.get("M") == m]
    speed_key = next((k for k in rows[0] if k.startswith("speedup_vs")), None) if rows else None

    def group(r: Dict[str, object]) -> str:
        g = r.get("group_size")
        return "" if not g else "channel" if g == -1 else str(g)

    body = [[r["op"], r["backend"], str(r["bits"]), group(r), str(r.get("activations", "")),
             str(r["M"]), f"{r['N']}x{r['K']}", f"{r['ms']:.3f}", f"{r['gbps']:.1f}",
             f"{r['pct_copy_bw']:.0f}%", "" if speed_key is None else f"{r[speed_key]:.2f}x"]
            for r in rows]
    at = " and ".join(str(m) for m in ms)
    huge = data["meta"].get("copy_bandwidth_huge_pages_gbps")
    huge_rounds = (f", {huge} GB/s in huge pages" if huge else "")
    huge_note = (f"{huge_rounds}, against which the rows8 rows (the decoder's interleaved copies, "
                 f"held in huge pages) are measured" if huge else "")
    interleaved = data["meta"].get("copy_measured")
    copy_note = (f"copy bandwidth, the median of the copies timed {interleaved}: "
                 f"{data['meta'].get('copy_bandwidth_gbps')} GB/s{huge_rounds}; each row is "
                 f"measured against the copy of its own rounds, the rows8 rows (the decoder's "
                 f"interleaved copies, held in huge pages) against the one in huge pages"
                 if interleaved else
                 f"copy bandwidth {data['meta'].get('copy_bandwidth_gbps')} GB/s{huge_note}")
    return ([f"**{title}** at M = {at} ({copy_note}; {_source(name, data['meta'])})", ""]
            + _table(["op", "backend", "bits", "group", "activations", "M", "N x K", "ms",
                      "GB/s", "of copy bw", speed_key or "speedup"], body))


def _static_backend(r: dict) -> str:
    """The column family of a static_gpu.json row: the CUDA decode GEMV, the CUDA tensor-core
    decode kernel, or Triton at its version."""
    if r["backend"] != "cuda":
        return f"triton {r['triton']}"
    return "cuda mma" if "decode_mma" in r["kernel"] else "cuda gemv"


def static_gpu_table() -> List[str]:
    """The issue-bound ceilings of benchmarks/static_gpu.py (compile-only figures): per weight
    and kernel, the ceiling against the H200's copy bandwidth and the warp instructions per
    512 B of weights, at M = 1 and 16, fp16 activations."""
    data = _load("static_gpu.json")
    if data is None:
        return []
    rows = [r for r in data["rows"] if r.get("ceiling_vs_copy") is not None and "M" in r
            and r.get("dtype", "float16") == "float16"]
    order = {"cuda mma": 0, "cuda gemv": 1}
    columns = sorted({(_static_backend(r), r["M"]) for r in rows},
                     key=lambda c: (order.get(c[0], 2), c[0], c[1]))
    weights = sorted({r["weight"] for r in rows}, key=lambda w: (w.startswith("planes"),
                                                                  -int(w[-1])))
    cell = {(r["weight"], _static_backend(r), r["M"]):
            f"{r['ceiling_vs_copy']:.2f}x ({r['warp_instructions_per_512B']:.0f})" for r in rows}
    body = [[w] + [cell.get((w, b, m), "") for b, m in columns] for w in weights]
    meta = data["meta"]
    target = meta["target"]
    return ([f"**Static issue-bound ceilings of the GPU decode kernels** (compiled for "
             f"{target['gpu']}, not run: the ceiling is {target['sms']} SMs x "
             f"{target['schedulers']} schedulers x {target['clock_ghz']} GHz of warp "
             f"instructions over the steady-state loop's warp instructions per weight byte, "
             f"against {target['copy_bandwidth_bytes_per_s'] / 1e12:.1f} TB/s; in brackets the "
             f"warp instructions per 512 B of weights; fp16 activations, "
             f"{meta['shape']['N']}x{meta['shape']['K']}, group {meta['shape']['group_size']}; "
             f"cuda mma: the tensor-core decode kernel (fragment-native layout), cuda gemv: "
             f"the decode GEMV on the canonical layout; "
             f"`benchmarks/results/static_gpu.json`, {meta['date']}, commit {meta['commit']})",
             ""]
            + _table(["weight"] + [f"{b} M={m}" for b, m in columns], body))


def rotation_table() -> List[str]:
    """Calibrated RTN, and GPTQ with and without Recipe.rotate at 4/3/2 bits (rotated: with the
    MLPs' online Walsh-Hadamard transform, and without it), beside llama.cpp's files of the
    same GGUF (benchmarks/size_vs_llamacpp.py --json rotation_smollm2.json)."""
    data = _load("rotation_smollm2.json")
    if data is None:
        return []
    meta = data["meta"]
    source = next((r for r in data["rows"] if str(r["config"]).startswith("source")), None)
    base = None if source is None else float(source["perplexity"])

    def change(ppl: float) -> str:
        return "" if base is None else f"{100 * (ppl / base - 1):+.0f}%"

    body = []
    for r in data["rows"]:
        ppl = float(r["perplexity"])
        label = str(r["config"])
        if r["engine"] == "pyengine":
            if "_gptq" not in label:
                label = (label.replace("_rot", "") + " RTN (calibrated)"
                         + (", rotated" if label.endswith("_rot") else ""))
            label = (label.replace("_gptq_rot_merged", " GPTQ, rotated (merged rotations only)")
                     .replace("_gptq_rot", " GPTQ, rotated").replace("_gptq", " GPTQ"))
            label = label.replace("_g64", " g64")
        body.append([r["engine"], label, f"{r['bits_per_weight']:.2f}", f"{ppl:.2f}",
                     change(ppl)])
    return ([f"**RTN, GPTQ and random rotations before GPTQ (`Recipe.rotate`)** on SmolLM2-135M "
             f"(held-out perplexity, {meta.get('max_windows')} x {meta.get('seqlen')} tokens, "
             f"the same code for both engines; bits per weight over the whole file; "
             f"{meta.get('calib_samples')} x 512 calibration tokens; "
             f"{_source('rotation_smollm2.json', meta)})", ""]
            + _table(["engine", "config", "bits/weight", "perplexity", "vs source"], body))


def scale_table() -> List[str]:
    """Compression and loading at real sizes (benchmarks/bench_scale.py)."""
    data = _load("scale_cpu.json")
    if data is None:
        return []
    meta = data["meta"]

    def compress_cells(step: Dict[str, object], bound: float) -> List[str]:
        if "seconds" not in step:
            return [f"not run: {step.get('skipped') or step.get('error', '?')}", "", ""]
        own = float(step["peak_rss_mib"]) - float(step["base_rss_mib"])
        return [f"{float(step['seconds']):.0f} s ({float(step['seconds_per_billion']):.0f} s/B)",
                f"{float(step['peak_rss_mib']):.0f} MiB", f"{own / bound:.2f}x"]

    shared = f"; {meta['shared_machine']}" if meta.get("shared_machine") else ""
    body = []
    for r in data["rows"]:
        bound = float(r["bound_mib"])
        load, int4, dense = r["load"], r["decode_int4"], r["decode_dense"]
        for name in ("sequential", "in_memory"):
            body.append([f"{r['shape']} ({float(r['params']) / 1e9:.2f} B, "
                         f"{r['checkpoint_mib']} MiB bf16, bound {r['bound_mib']} MiB)",
                         name.replace("_", "-")] + compress_cells(r[name], bound))
        cells = []
        if "first_seconds" in load:
            cells.append(f"load of the {r['output_mib']} MiB int4 checkpoint: "
                         f"{float(load['first_seconds']):.1f} s first, "
                         f"{float(load['second_seconds']):.2f} s again, files read in "
                         f"{float(load['read_files_seconds']):.2f} s; peak "
                         f"{float(load['peak_rss_mib']):.0f} MiB resident, "
                         f"{float(load['peak_anon_mib']):.0f} MiB anonymous")
        if "tokens_per_s" in int4:
            dense_text = (f"{float(dense['tokens_per_s']):.2f}" if "tokens_per_s" in dense
                          else f"not run ({dense.get('skipped', dense.get('error', '?'))})")
            cells.append(f"decode int4 {float(int4['tokens_per_s']):.2f} tokens/s, dense "
                         f"float32 {dense_text} ({int4['threads']} threads)")
        if cells:
            body.append([r["shape"], "load, decode", "; ".join(cells), "", ""])
    return ([f"**Compressing and loading at real sizes** (random weights of the real shapes "
             f"written as bf16 safetensors shards; RTN int4 g128, embeddings and head int8; each "
             f"step in a fresh process; *own memory* is the step's peak resident memory over "
             f"what the process held after its imports, divided by the largest decoder layer "
             f"plus embeddings and head{shared}; {_source('scale_cpu.json', meta)})", ""]
            + _table(["model", "path", "time", "peak resident", "own memory / bound"], body))


def quant_peers_table(name: str = "quant_peers.json") -> List[str]:
    """pyengine's quantizers against llm-compressor's GPTQ and HQQ
    (benchmarks/bench_gptq_peers.py)."""
    data = _load(name)
    if data is None:
        return []
    meta = data["meta"]
    body = [[r["engine"], f"{r['version']}",
             r["config"] + (f" ({float(r['plan_avg_bits']):.2f} bits/weight)"
                            if "plan_avg_bits" in r else ""),
             f"{float(r['seconds']):.0f} s ({', '.join(f'{s:.0f}' for s in r['all_seconds'])})",
             f"{float(r['perplexity']):.2f} (source {float(r['source_perplexity']):.2f})"]
            for r in data["rows"]]
    shared = (f"; {meta['shared_machine']}" if meta.get("shared_machine") else "")
    peers = sorted({r["engine"] for r in data["rows"] if not r["engine"].startswith("pyengine")})
    title = ("GPTQ against llm-compressor" if peers == ["llm-compressor"]
             else f"pyengine's quantizers against {' and '.join(peers)}")
    if any("layer_bits" in r for r in data["rows"]):
        title += (", on mixed-precision plans (each plan's per-layer bits from pyengine.plan by "
                  "LIM, the same for every engine)")
    return ([f"**{title}** on SmolLM2-135M (float32; one calibration "
             f"tensor for all that take one: {meta.get('calib')}; asymmetric groups; head "
             f"and embeddings dense; GPTQ: no activation order, damping 0.01; HQQ: its "
             f"dequantized weights; median of {meta.get('rounds')} alternating "
             f"rounds in one process, {meta.get('threads')} threads; held-out perplexity on "
             f"{meta.get('eval')}{shared}; {_source(name, meta)})", ""]
            + _table(["engine", "version", "config", "seconds (each round)", "perplexity"],
                     body))


def vllm_table(name: str) -> List[str]:
    """Decode tokens/s of vLLM with the pyengine plugin, vLLM dense and pyengine alone
    (benchmarks/bench_vllm.py)."""
    data = _load(name)
    if data is None:
        return []
    meta = data["meta"]
    by = {(r["engine"], r["threads"]): r for r in data["rows"]}
    threads = sorted({r["threads"] for r in data["rows"]})
    engines = [e for e in ("vllm-pyengine-sliced", "pyengine-sliced", "vllm-pyengine",
                           "vllm-dense", "vllm-pyengine-compiled", "vllm-dense-compiled",
                           "pyengine") if any(k[0] == e for k in by)]
    body = []
    for engine in engines:
        cells = []
        for t in threads:
            row = by.get((engine, t))
            cells.append("" if row is None else
                         f"{float(row['tokens_per_s']):.1f} "
                         f"({', '.join(f'{v:.1f}' for v in row['per_round'])})")
        first = by[next(k for k in by if k[0] == engine)]
        loop = " (transformers' generate)" if first.get("loop") == "transformers generate" else ""
        body.append([engine, first["model"] + loop] + cells)
    what = "a sliced pyengine checkpoint" if "sliced" in name else "a pyengine checkpoint"
    return ([f"**vLLM serving {what}** (batch-1 greedy decode tokens/s, median of "
             f"{meta.get('rounds')} alternating rounds, each a fresh process; {meta.get('vllm')}, "
             f"{meta.get('vllm_mode')}; {meta.get('dtype')}; pyengine's CPU kernels: "
             f"{meta.get('cpu_isa')} build; {_source(name, meta)})", ""]
            + _table(["engine", "model"] + [f"{t} thread{'s' if t > 1 else ''}"
                                            for t in threads], body))


def export_table() -> List[str]:
    """Perplexity of fractional, fitted and integer zero points, and the exports' sizes
    (benchmarks/bench_export.py)."""
    data = _load("export_smollm2.json")
    if data is None:
        return []
    meta = data["meta"]
    body = []
    for r in data["rows"]:
        if "perplexity" in r:
            note = (f"largest layer change {100 * r['worst_layer_change']:.2f}%"
                    if "worst_layer_change" in r else "")
            body.append([r["method"], r["config"], f"{r['perplexity']:.2f}", note])
        else:
            body.append([r["method"], r["config"], "",
                         f"{'exact' if r['exact'] else 'fitted'}, {r['export_s']:.1f} s, "
                         f"{_mib(r['export_bytes'])} MiB (pyengine's "
                         f"{_mib(r['pyengine_bytes'])} MiB)"])
    return ([f"**Exporting to stock formats** ({meta.get('model')}, {meta.get('recipe')}; "
             f"held-out perplexity, {meta.get('max_windows')} x {meta.get('seqlen')} tokens; "
             f"{meta.get('calib_samples')} x 512 calibration tokens; "
             + (f"seconds indicative only: {meta['shared_machine']}; "
                if meta.get("shared_machine") else "")
             + f"{_source('export_smollm2.json', meta)})", ""]
            + _table(["method", "config", "perplexity", "notes"], body))


def gpu_files() -> List[str]:
    """Result files of GPU runs (kernel benchmarks are named per device)."""
    return sorted(p.name for p in RESULTS.glob("gpu_kernels_*.json"))


def sections() -> List[Callable[[], List[str]]]:
    return ([seeds_table, engine_table, matryoshka_table, rotation_table, scale_table,
             quant_peers_table, lambda: quant_peers_table("quant_peers_g128.json"),
             lambda: quant_peers_table("quant_peers_mixed.json"),
             lambda: vllm_table("vllm_cpu.json"), lambda: vllm_table("vllm_cpu_avx2.json"),
             lambda: vllm_table("vllm_cpu_generic.json"),
             lambda: vllm_table("vllm_cpu_sliced.json"),
             lambda: vllm_table("vllm_cpu_sliced_avx2.json"),
             lambda: vllm_table("vllm_cpu_sliced_generic.json"), export_table,
             lambda: decode_table("decode_cuda.json"), lambda: decode_table("decode_cpu.json"),
             lambda: decode_table("decode_cpu_tinyllama.json"),
             lambda: vs_llamacpp_table("vs_llamacpp_native.json"),
             lambda: vs_llamacpp_table("vs_llamacpp_avx2.json"),
             lambda: vs_llamacpp_table("vs_llamacpp_generic.json"),
             # an AVX2-only CPU (AMD EPYC Zen 3, no AVX-512)
             lambda: decode_table("decode_cpu_tinyllama_zen3.json"),
             lambda: vs_llamacpp_table("vs_llamacpp_zen3.json"),
             lambda: vs_llamacpp_table("vs_llamacpp_zen3_generic_a8.json"),
             lambda: vs_llamacpp_table("vs_llamacpp_zen3_busy.json")]
            + [lambda name=name: kernel_table(name, "GPU kernels") for name in gpu_files()]
            + [lambda: kernel_table("cpu_kernels.json", "CPU kernels", (1, 8)),
               lambda: kernel_table("cpu_kernels_zen3.json", "CPU kernels, AVX2-only CPU"),
               lambda: kernel_table("cpu_kernels_zen3_generic.json",
                                    "CPU kernels, generic build on the AVX2-only CPU"),
               static_gpu_table])


def generate() -> str:
    """The markdown between the markers (markers excluded)."""
    lines: List[str] = []
    for section in sections():
        block = section()
        if block:
            lines += block + [""]
    if not gpu_files() and not (RESULTS / "decode_cuda.json").exists():
        lines += ["No GPU figure has been measured yet (no `gpu_kernels_*.json` or "
                  "`decode_cuda.json` under `benchmarks/results/`).", ""]
    return "\n".join(lines)


def splice(readme: str, block: str) -> str:
    """``readme`` with the text between the markers replaced by ``block``."""
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README.md has no {BEGIN} ... {END} block")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="only check that README.md matches the committed results")
    args = parser.parse_args(argv)
    current = README.read_text()
    wanted = splice(current, generate())
    if args.check:
        if wanted != current:
            print("README.md's results block is out of date: run "
                  "python benchmarks/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(wanted)
    print(f"rewrote the results block of {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
