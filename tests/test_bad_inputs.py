"""Bad inputs are clear errors, never silently wrong results: corrupt checkpoints (both load
paths, one table), a checkpoint loaded by transformers without pyengine, compressing twice, file
modes, and API misuse (bits, meta tensors, calibration batches, token ids, plan and perplexity
arguments). The command line's own cases are in test_cli.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable, Dict, Sequence

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import pyengine
from pyengine import CheckpointError, QuantConfig, Recipe
from pyengine.model.random import random_model
from pyengine.slicing import structure

Q = "model.layers.0.self_attn.q_proj"      # a plain 4-bit asymmetric layer
D = "model.layers.1.mlp.down_proj"          # 3-bit symmetric, behind a sliced residual projection
M = "model.layers.2.mlp.up_proj"            # a Matryoshka layer
RECIPE = {r".*down_proj": QuantConfig(3, 64, symmetric=True),
          r".*2\.mlp\.up_proj": QuantConfig(8, 32, matryoshka=True),
          r".*k_proj": None, "_default": QuantConfig(4, 32)}


def _basis(d: int, w: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))[0][:, :w]


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint with every kind of entry: quantized, symmetric, Matryoshka and dense layers,
    a sliced structure with projected (tied) embeddings, and a tied alias."""
    gen = torch.Generator().manual_seed(0)
    model = random_model("llama", tie_word_embeddings=True, vocab_size=1000)
    widths = [56, 40, 48]
    structure.apply_bases(model, [_basis(64, w, gen) for w in widths],
                          [_basis(64, w, gen) for w in widths], _basis(64, 44, gen))
    # the table kept dense (and tied): quantized tables' entries are checked in
    # tests/nn/test_quant_embedding.py
    pyengine.compress(model, Recipe(RECIPE, slicing=widths, embeddings=None), show_progress=False)
    path = tmp_path_factory.mktemp("good") / "ckpt"
    pyengine.save(model, path)
    qmeta = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qmeta["tied"] and qmeta["structure"] and "matryoshka" in qmeta["layers"][M]
    return path


# ---- corruptions: each edits a copy of the good checkpoint ---------------------------------------

def _meta(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        edit(config["quantization_config"])
        (path / "config.json").write_text(json.dumps(config))
    return apply


def _edit_config(path: Path, **fields) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(fields)
    (path / "config.json").write_text(json.dumps(config))


def _layer(name: str, field: str, value=None, delete: bool = False):
    def edit(q: dict) -> None:
        if delete:
            del q["layers"][name][field]
        else:
            q["layers"][name][field] = value
    return _meta(edit)


def _top(field: str, value=None, delete: bool = False):
    def edit(q: dict) -> None:
        if delete:
            del q[field]
        else:
            q[field] = value
    return _meta(edit)


def _tensors(edit: Callable[[Dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        tensors = load_file(str(path / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return apply


def _set(key: str, make: Callable[[Dict[str, torch.Tensor]], torch.Tensor]):
    return _tensors(lambda t: t.__setitem__(key, make(t)))


def _truncate(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _structure(edit: Callable[[dict], None]):
    return _meta(lambda q: edit(q["structure"]))


CONFIG = "config.json"
CORRUPTIONS = {
    # layer entries: the message names config.json, the layer and the field
    "bits missing": (_layer(Q, "bits", delete=True), [CONFIG, Q, "'bits'", "missing"]),
    "shape missing": (_layer(Q, "shape", delete=True), [CONFIG, Q, "'shape'", "missing"]),
    "symmetric missing": (_layer(Q, "symmetric", delete=True), [CONFIG, Q, "'symmetric'"]),
    "group_size missing": (_layer(Q, "group_size", delete=True), [CONFIG, Q, "'group_size'"]),
    "scale_dtype missing": (_layer(Q, "scale_dtype", delete=True), [CONFIG, Q, "'scale_dtype'"]),
    "bias missing": (_layer(Q, "bias", delete=True), [CONFIG, Q, "'bias'"]),
    "scale_dtype float8": (_layer(Q, "scale_dtype", "float8"), [CONFIG, Q, "scale_dtype", "float8"]),
    "bits 5": (_layer(Q, "bits", 5), [CONFIG, Q, "bits", "got 5"]),
    "bits as a string": (_layer(Q, "bits", "4"), [CONFIG, Q, "bits", "'4'"]),
    "bits as a float": (_layer(Q, "bits", 4.0), [CONFIG, Q, "bits", "4.0"]),
    "shape of one number": (_layer(Q, "shape", [64]), [CONFIG, Q, "shape", "[64]"]),
    "negative shape": (_layer(Q, "shape", [-64, 64]), [CONFIG, Q, "shape"]),
    "group_size 100": (_layer(Q, "group_size", 100), [CONFIG, Q, "group_size", "100"]),
    "symmetric not a bool": (_layer(Q, "symmetric", "no"), [CONFIG, Q, "symmetric", "'no'"]),
    "unknown method": (_layer(Q, "method", "awq"), [CONFIG, Q, "method", "'awq'"]),
    "unknown field": (_layer(Q, "codebook", 1), [CONFIG, Q, "unknown fields", "codebook"]),
    "entry not a mapping": (_meta(lambda q: q["layers"].__setitem__(Q, [4, 32])), [CONFIG, Q]),
    "matryoshka layout": (_meta(lambda q: q["layers"][M]["matryoshka"].__setitem__("layout", "x")),
                          [CONFIG, M, "matryoshka", "layout"]),
    "matryoshka precision": (_meta(lambda q: q["layers"][M]["matryoshka"].__setitem__("precision", 5)),
                             [CONFIG, M, "precision", "5"]),
    "matryoshka bits": (_layer(M, "bits", 4), [CONFIG, M, "matryoshka", "8-bit"]),
    "layer the model lacks": (_meta(lambda q: q["layers"].__setitem__(
        "model.layers.9.mlp.up_proj", dict(q["layers"][Q]))), [CONFIG, "model.layers.9.mlp.up_proj"]),
    "layer that is not linear": (_meta(lambda q: q["layers"].__setitem__(
        "model.layers.0.mlp", dict(q["layers"][Q]))), [CONFIG, "'model.layers.0.mlp'", "not a linear"]),
    # the rest of the metadata
    "format_version v2": (_top("format_version", "v2"), [CONFIG, "format_version", "'v2'"]),
    "format_version 99": (_top("format_version", 99), [CONFIG, "format_version", "99", "newer"]),
    "format_version missing": (_top("format_version", delete=True), [CONFIG, "format_version"]),
    "layers a list": (_top("layers", []), [CONFIG, "layers", "list"]),
    "tied a list": (_top("tied", [1]), [CONFIG, "tied"]),
    "tied to a missing key": (_top("tied", {"lm_head.weight": "model.nothing.weight"}),
                              [CONFIG, "tied", "lm_head.weight", "model.nothing.weight"]),
    "tied alias the model lacks": (_top("tied", {"nothing.weight": "model.norm.weight"}),
                                   [CONFIG, "tied", "nothing.weight"]),
    "recipe bits 5": (_meta(lambda q: q["recipe"]["quant"].__setitem__("_default", {"bits": 5})),
                      [CONFIG, "recipe", "bits", "5"]),
    "recipe version v2": (_meta(lambda q: q["recipe"].__setitem__("version", "v2")),
                          [CONFIG, "recipe", "version", "'v2'"]),
    "structure field missing": (_structure(lambda s: s.pop("head_width")),
                                [CONFIG, "structure", "head_width", "missing"]),
    "structure width too large": (_structure(lambda s: s["layers"][1].__setitem__("attn_width", 999)),
                                  [CONFIG, "structure.layers[1].attn_width", "999"]),
    "structure layer count": (_structure(lambda s: s["layers"].pop()), [CONFIG, "structure"]),
    # tensors: the message names the file, the layer and the tensor
    "tensor missing": (_tensors(lambda t: t.pop(f"{Q}.scales")), ["model.safetensors", Q, "'scales'"]),
    "tied source missing": (_tensors(lambda t: t.pop("model.embed_tokens.weight")),
                            [CONFIG, "tied", "model.embed_tokens.weight"]),
    "tensor unexpected": (_set(f"{Q}.extra", lambda t: torch.zeros(3)),
                          ["model.safetensors", Q, "'extra'"]),
    "symmetric flipped": (_layer(Q, "symmetric", True), ["model.safetensors", Q, "'zeros'"]),
    "tensor of the wrong shape": (_set(f"{Q}.scales", lambda t: torch.zeros(3, 3)),
                                  ["model.safetensors", Q, "'scales'", "wrong shape"]),
    "codes of the wrong dtype": (_set(f"{Q}.qweight", lambda t: t[f"{Q}.qweight"].float()),
                                 ["model.safetensors", Q, "'qweight'", "int32"]),
    "scales of another dtype": (_set(f"{D}.proj.scales", lambda t: t[f"{D}.proj.scales"].float()),
                                ["model.safetensors", D, "'scales'", "float16"]),
    "tied alias stored too": (_set("lm_head.weight", lambda t: t["model.embed_tokens.weight"].clone()),
                              [CONFIG, "tied", "lm_head.weight", "also stored"]),
    "truncated file": (_truncate, ["model.safetensors"]),
}


def _load_hf(path: Path):
    return AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("loader", ["pyengine.load", "from_pretrained"])
@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_checkpoints_are_one_clear_error_on_both_load_paths(case, loader, good_checkpoint,
                                                                    tmp_path):
    edit, fragments = CORRUPTIONS[case]
    path = tmp_path / "ckpt"
    shutil.copytree(good_checkpoint, path)
    edit(path)
    load = pyengine.load if loader == "pyengine.load" else _load_hf
    with pytest.raises(CheckpointError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"


@pytest.mark.parametrize("fields, fragments", [
    (dict(quantization_config=[1]), ["quantization_config must be a mapping, got list"]),
    (dict(quantization_config={"quant_method": "awq"}), ["quant_method is 'awq'"]),
])
def test_foreign_quantization_configs_are_refused_by_load(fields, fragments, good_checkpoint,
                                                          tmp_path):
    """(from_pretrained hands these to transformers' own quantizers, or refuses them through the
    guard, before pyengine sees them)"""
    path = tmp_path / "ckpt"
    shutil.copytree(good_checkpoint, path)
    _edit_config(path, **fields)
    with pytest.raises(CheckpointError) as info:
        pyengine.load(path)
    assert all(f in str(info.value) for f in [CONFIG, "not written by pyengine.save", *fragments])


@pytest.mark.parametrize("loader", ["pyengine.load", "from_pretrained"])
def test_the_good_checkpoint_loads_the_same_on_both_paths(loader, good_checkpoint):
    load = pyengine.load if loader == "pyengine.load" else _load_hf
    model = load(good_checkpoint)
    reference = pyengine.load(good_checkpoint)
    ids = torch.randint(3, 1000, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again
    assert not hasattr(model.config, "transformers_weights")


def _sharded(tmp_path: Path) -> Path:
    path = tmp_path / "sharded"
    model = pyengine.compress(random_model("qwen2"), Recipe({"_default": QuantConfig(4, 32)}),
                              show_progress=False)
    pyengine.save(model, path, max_shard_bytes=20_000)
    return path


def test_sharded_index_problems_are_clear(tmp_path):
    path = _sharded(tmp_path)
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    per_shard = {f: [k for k, g in index["weight_map"].items() if g == f] for f in shards}
    key = next(keys[0] for keys in per_shard.values() if len(keys) > 1)
    good = json.dumps(index)

    other = next(f for f in shards if f != index["weight_map"][key])
    index["weight_map"][key] = other  # listed in a file that does not hold it
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"index puts tensor '{key}' in {other}"):
        pyengine.load(path)

    index = json.loads(good)
    del index["weight_map"][key]  # held by a shard, not listed
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="which the index does not list"):
        pyengine.load(path)

    index_file.write_text(good)
    (path / shards[-1]).unlink()  # a shard missing
    with pytest.raises(CheckpointError, match=f"names {shards[-1]}, which is not in"):
        pyengine.load(path)

    index_file.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid index"):
        pyengine.load(path)


def test_from_pretrained_checks_shards_too(tmp_path):
    path = _sharded(tmp_path)
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    key = sorted(k for k in index["weight_map"] if k.endswith(".scales"))[0]
    shard = path / index["weight_map"].pop(key)
    index_file.write_text(json.dumps(index))
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"none of its .* files holds tensor 'scales' of "
                                              f"'{key[:-len('.scales')]}'"):
        AutoModelForCausalLM.from_pretrained(path)


# ---- transformers without pyengine ---------------------------------------------------------------

def test_from_pretrained_without_pyengine_fails_loudly(good_checkpoint):
    """A fresh interpreter that never imports pyengine: transformers must refuse the checkpoint
    (before: it skipped the unknown quantization method and returned random linear layers)."""
    script = textwrap.dedent(f"""
        import sys
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(good_checkpoint)!r})
        except ValueError as exc:
            assert "pyengine" not in sys.modules, "pyengine was imported"
            print("REFUSED:", exc)
        else:
            print("LOADED")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env=env, cwd="/")
    assert result.returncode == 0, result.stderr
    assert "REFUSED:" in result.stdout, result.stdout + result.stderr
    assert "pyengine.register_with_transformers()" in result.stdout
    assert "pyengine.load" in result.stdout


def _fresh_interpreter(script: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(Path(pyengine.__file__).parents[1])  # this pyengine, built or not
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                            text=True, timeout=300, env=env, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_registration_is_explicit(good_checkpoint, tmp_path):
    """Registration with transformers: ``import pyengine`` registers when transformers is
    already imported and never imports it itself; otherwise from_pretrained is refused (the
    guard says what to call) until pyengine.register_with_transformers(); a checkpoint with
    the guard an earlier pyengine wrote loads the same."""
    earlier = tmp_path / "earlier"
    shutil.copytree(good_checkpoint, earlier)
    _edit_config(earlier, transformers_weights=(
        "this is a pyengine checkpoint: run `import pyengine` before from_pretrained, or load "
        "it with pyengine.load(DIR)"))
    out = _fresh_interpreter(f"""
        import sys
        import pyengine
        print("TRANSFORMERS_IMPORTED:", "transformers" in sys.modules)
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(good_checkpoint)!r})
        except ValueError as exc:
            print("REFUSED:", "register_with_transformers" in str(exc))
        pyengine.register_with_transformers()
        for path in ({str(good_checkpoint)!r}, {str(earlier)!r}):
            model = AutoModelForCausalLM.from_pretrained(path)
            print("LOADED:", type(model.model.layers[0].mlp.up_proj).__name__)
    """)
    assert "TRANSFORMERS_IMPORTED: False" in out
    assert "REFUSED: True" in out
    assert out.count("LOADED: QuantLinear") == 2, out
    out = _fresh_interpreter(f"""
        from transformers import AutoModelForCausalLM
        import pyengine
        print("LOADED:", type(AutoModelForCausalLM.from_pretrained(
            {str(good_checkpoint)!r}).model.layers[0].mlp.up_proj).__name__)
    """)
    assert "LOADED: QuantLinear" in out


# ---- compress twice, file modes ------------------------------------------------------------------

def test_compress_refuses_an_already_compressed_model(good_checkpoint):
    model = pyengine.compress(random_model("llama"), Recipe({"_default": QuantConfig(8, 32)}),
                              show_progress=False)
    before = model.pyengine_recipe
    with pytest.raises(ValueError, match="already compressed .*quantized layers"):
        pyengine.compress(model, Recipe({"_default": QuantConfig(2, 32)}), show_progress=False)
    assert model.pyengine_recipe is before  # nothing changed, the recipe included
    assert model.model.layers[0].mlp.up_proj.bits == 8
    loaded = pyengine.load(good_checkpoint)
    with pytest.raises(ValueError, match="already compressed"):
        pyengine.compress(loaded, Recipe({"_default": QuantConfig(2, 32)}), show_progress=False)
    hf = AutoModelForCausalLM.from_pretrained(good_checkpoint)
    with pytest.raises(ValueError, match="already compressed"):
        pyengine.compress(hf, Recipe({"_default": QuantConfig(2, 32)}), show_progress=False)


def test_a_compressed_model_that_quantized_nothing_is_refused_too():
    model = pyengine.compress(random_model("llama"), Recipe({}, embeddings=None),
                              show_progress=False)
    with pytest.raises(ValueError, match="already compressed .*recipe"):
        pyengine.compress(model, Recipe({"_default": QuantConfig(4, 32)}), show_progress=False)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoint_files_get_the_umask_mode(umask, tmp_path):
    model = pyengine.compress(random_model("llama"), Recipe({"_default": QuantConfig(4, 32)}),
                              show_progress=False)
    old = os.umask(umask)
    try:
        pyengine.save(model, tmp_path / "one")
        pyengine.save(model, tmp_path / "sharded", max_shard_bytes=20_000)
    finally:
        os.umask(old)
    files = list((tmp_path / "one").iterdir()) + list((tmp_path / "sharded").iterdir())
    assert sum(f.suffix == ".safetensors" for f in files) > 2
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, (f.name, oct(f.stat().st_mode))


# ---- API misuse: one clear line each -------------------------------------------------------------

W = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("call, fragments", [
    (lambda: pyengine.quantize(W, 4.0), ["bits", "integer", "4.0"]),
    (lambda: pyengine.quantize(W, True), ["bits", "True"]),
    (lambda: pyengine.quantize(W, 4, 128.0), ["group_size", "128.0"]),
    (lambda: pyengine.quantize(torch.empty(64, 64, device="meta"), 4), ["meta device"]),
    (lambda: QuantConfig(4.0), ["QuantConfig.bits", "4.0"]),
    (lambda: QuantConfig(4, symmetric="yes"), ["QuantConfig.symmetric", "'yes'"]),
    (lambda: pyengine.calibration_data(None, n_samples=2.5, seqlen=8), ["n_samples", "2.5"]),
])
def test_bad_arguments_of_quantize_and_configs(call, fragments):
    with pytest.raises(ValueError) as info:
        call()
    assert all(f in str(info.value) for f in fragments), str(info.value)


CALIB = torch.randint(3, 150, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("calibration, fragments", [
    (CALIB[:0], ["calibration is empty", "(0, 16)"]),
    (CALIB[:, :0], ["calibration is empty", "(2, 0)"]),
    (CALIB.float(), ["integer token ids", "float32"]),
    (CALIB + 1000, ["token ids from", "vocabulary [0, 160)"]),
    (CALIB - 100, ["token ids from -", "vocabulary"]),
    (CALIB[0], ["[n_samples, seqlen]", "(16,)"]),
    ([[1, 2, 3]], ["tensor of token ids", "list"]),
])
@pytest.mark.parametrize("entry", ["scores", "plan", "compress (slicing)", "compress (gptq)"])
def test_bad_calibration_is_refused_before_any_work(entry, calibration, fragments):
    model = random_model("llama")
    calls = {
        "scores": lambda: pyengine.scores(model, calibration, show_progress=False),
        "plan": lambda: pyengine.plan(model, calibration, avg_bits=6, bit_choices=(8, 4),
                                      show_progress=False),
        "compress (slicing)": lambda: pyengine.compress(model, Recipe(slicing=[32] * 3),
                                                        calibration, show_progress=False),
        "compress (gptq)": lambda: pyengine.compress(
            model, Recipe({"_default": QuantConfig(4, 32, method="gptq")}), calibration,
            show_progress=False),
    }
    with pytest.raises(ValueError) as info:
        calls[entry]()
    assert all(f in str(info.value) for f in fragments), str(info.value)
    assert not structure.is_folded(model) and not hasattr(model, "pyengine_recipe")


@pytest.mark.parametrize("kwargs, fragments", [
    (dict(bit_choices=()), ["bit_choices is empty"]),
    (dict(bit_choices=(4.0, 2)), ["bit_choices", "4.0"]),
    (dict(bit_choices=(5, 4)), ["bit_choices", "5"]),
    (dict(bit_choices="42"), ["bit_choices", "'42'"]),
    (dict(avg_bits=float("nan")), ["avg_bits", "nan"]),
    (dict(group_size=100), ["group_size", "100"]),
    (dict(method="awq"), ["method", "'awq'"]),
    (dict(slicing=0.95), ["slicing", "0.95"]),
    (dict(slicing=0.2, slice_schedule="random"), ["slice_schedule", "'random'"]),
])
def test_bad_plan_arguments_fail_before_measuring(kwargs, fragments, monkeypatch):
    plan_module = sys.modules["pyengine.pipeline.plan"]  # pyengine.plan is the function
    monkeypatch.setattr(plan_module, "compute_scores",
                        lambda *a, **k: pytest.fail("scores computed before the arguments were checked"))
    with pytest.raises(ValueError) as info:
        pyengine.plan(random_model("llama"), CALIB, **{"avg_bits": 6, **kwargs})
    assert all(f in str(info.value) for f in fragments), str(info.value)


def test_plan_refuses_sliced_or_compressed_models():
    gen = torch.Generator().manual_seed(0)
    sliced = random_model("llama")
    bases = [_basis(64, 48, gen) for _ in range(3)]
    structure.apply_bases(sliced, bases, bases, bases[-1])
    with pytest.raises(ValueError, match=r"already sliced \(kept widths \[48, 48, 48\]\)"):
        pyengine.plan(sliced, CALIB, avg_bits=6, bit_choices=(8, 4), slicing=0.2,
                      show_progress=False)
    compressed = pyengine.compress(random_model("llama"), Recipe({"_default": QuantConfig(4, 32)}),
                                   show_progress=False)
    with pytest.raises(ValueError, match="already compressed"):
        pyengine.plan(compressed, CALIB, avg_bits=6, bit_choices=(8, 4), show_progress=False)


class _CharTokenizer:
    """Token ids = character codes modulo ``vocab`` (a tokenizer in shape only)."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, text: str, **kwargs) -> Dict[str, Sequence[int]]:
        return {"input_ids": [ord(c) % self.vocab for c in text[:4000]]}


@pytest.mark.parametrize("kwargs, fragments", [
    (dict(seqlen=1), ["seqlen", ">= 2", "got 1"]),
    (dict(seqlen=0), ["seqlen", "got 0"]),
    (dict(seqlen=16.0), ["seqlen", "16.0"]),
    (dict(seqlen=16, max_windows=0), ["max_windows", "got 0"]),
])
def test_bad_perplexity_arguments(kwargs, fragments):
    with pytest.raises(ValueError) as info:
        pyengine.perplexity(random_model("llama"), _CharTokenizer(150), show_progress=False,
                            **kwargs)
    assert all(f in str(info.value) for f in fragments), str(info.value)


def test_perplexity_refuses_a_tokenizer_beyond_the_vocabulary():
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 160\)"):
        pyengine.perplexity(random_model("llama"), _CharTokenizer(1000), seqlen=16,
                            max_windows=1, show_progress=False)
