"""Quantized embedding tables and heads: the lookup op against its reference, one shared table
for tied models (sliced ones too), checkpoints, dtypes and the size on disk."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import pyengine
from pyengine import QuantConfig, QuantEmbedding, Recipe
from pyengine.model.random import random_model
from pyengine.ops import qembedding, reference_qembedding
from pyengine.slicing import structure


# ---- the op -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group_size,symmetric", [(8, 128, False), (8, -1, True), (4, 32, False),
                                                       (3, 64, True), (2, 128, False)])
@pytest.mark.parametrize("v,d", [(1, 32), (37, 70), (160, 257)])
def test_qembedding_matches_reference(bits, group_size, symmetric, v, d, rng):
    table = torch.randn(v, d, generator=rng)
    qw = pyengine.quantize(table, bits, group_size, symmetric, scale_dtype=torch.float16)
    for shape in [(1,), (3, 17), (2, 1, 5)]:
        ids = torch.randint(0, v, shape, generator=rng)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            out = torch.full(shape + (d,), float("nan"), dtype=dtype)  # poisoned
            got = qembedding(ids, qw, dtype=dtype, out=out)
            assert got is out
            want = reference_qembedding(ids, qw, dtype)
            assert not torch.isnan(got).any()
            assert torch.equal(got, want)
            assert torch.equal(qembedding(ids, qw, dtype=dtype), want)


def test_qembedding_bad_inputs(rng):
    qw = pyengine.quantize(torch.randn(10, 64, generator=rng), 8, 32)
    with pytest.raises(IndexError, match="token id 10 is outside the table's 10 rows"):
        qembedding(torch.tensor([3, 10]), qw)
    with pytest.raises(IndexError, match="token id -1"):
        qembedding(torch.tensor([-1]), qw)
    with pytest.raises(TypeError, match="integer tensor"):
        qembedding(torch.tensor([1.0]), qw)
    with pytest.raises(TypeError, match="QuantizedWeight"):
        qembedding(torch.tensor([1]), torch.randn(10, 64))
    with pytest.raises(TypeError, match="dtype must be"):
        qembedding(torch.tensor([1]), qw, dtype=torch.int32)
    with pytest.raises(ValueError, match="out must be"):
        qembedding(torch.tensor([1]), qw, out=torch.empty(1, 63, dtype=qw.dtype))


# ---- models -----------------------------------------------------------------------------------

def _tied_model(rng, sliced=False, **overrides):
    overrides.setdefault("vocab_size", 1000)  # the table larger than the layers
    model = random_model("llama", tie_word_embeddings=True, **overrides)
    widths = None
    if sliced:
        d = model.config.hidden_size
        q = lambda w: torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=rng))[0][:, :w]
        widths = [56, 40, 48]
        structure.apply_bases(model, [q(w) for w in widths], [q(w) for w in widths], q(44))
    return model, widths


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("sliced", [False, True])
def test_tied_table_is_one_quantized_tensor_everywhere(sliced, tmp_path, rng):
    model, widths = _tied_model(rng, sliced)
    pyengine.compress(model, Recipe({"_default": QuantConfig(4, 32)}, slicing=widths),
                      show_progress=False)
    table, head = model.model.embed_tokens, model.lm_head
    assert isinstance(table, QuantEmbedding) and isinstance(head, pyengine.QuantLinear)
    assert table.bits == 8 and head.bits == 8 and (table.projection is not None) == sliced
    assert head.qweight is table.qweight and head.scales is table.scales
    assert head.zeros is table.zeros
    # every dense tensor and every scale in float16 by default, activations too
    floats = [t for t in list(model.parameters()) + list(model.buffers(recurse=True))
              if t.is_floating_point() and not t.numel() == model.config.head_dim // 2]
    assert {t.dtype for t in floats} == {torch.float16}
    ids = torch.randint(0, 1000, (2, 9), generator=rng)
    expected = _logits(model, ids)
    assert expected.dtype == torch.float16 and torch.isfinite(expected).all()
    # against plain PyTorch with the same (dequantized) weights
    reference = _logits(pyengine.dequantize_model(model), ids).float()
    assert ((expected.float() - reference).norm() / reference.norm()) < 1e-2

    pyengine.save(model, tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.qweight" in keys and not any(k.startswith("lm_head.") for k in keys)
    meta = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert meta["format_version"] == 2
    assert meta["layers"]["model.embed_tokens"]["embedding"] == {"dtype": "float16"}
    for loaded in (pyengine.load(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert loaded.lm_head.qweight is loaded.model.embed_tokens.qweight
        assert loaded.lm_head.scales is loaded.model.embed_tokens.scales
        assert torch.equal(_logits(loaded, ids), expected)
        assert pyengine.storage_bytes(loaded) == pyengine.storage_bytes(model)
    held, predicted = pyengine.storage_bytes(model), pyengine.predicted_bytes(model)
    assert held == predicted


def test_recipe_keys_keep_embeddings_dense_or_untie_them(rng):
    model, _ = _tied_model(rng)
    pyengine.compress(model, Recipe({"_default": QuantConfig(4, 32)}, embeddings=None),
                      show_progress=False, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # dense and tied, as before
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.up_proj.scales.dtype == torch.float32

    model, _ = _tied_model(rng)  # the head named explicitly at another precision: two tensors
    pyengine.compress(model, Recipe({"lm_head": QuantConfig(4, 64), "_default": QuantConfig(4, 32)}),
                      show_progress=False)
    assert model.lm_head.bits == 4 and model.model.embed_tokens.bits == 8
    assert model.lm_head.qweight is not model.model.embed_tokens.qweight

    model, _ = _tied_model(rng)  # the head kept dense, the table quantized
    pyengine.compress(model, Recipe({"lm_head": None, "_default": QuantConfig(4, 32)}),
                      show_progress=False)
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert isinstance(model.lm_head, torch.nn.Linear)
    ids = torch.randint(0, 1000, (1, 5), generator=rng)
    assert torch.isfinite(_logits(model, ids)).all()


def test_untied_models_quantize_table_and_head_separately(tmp_path, rng):
    model = random_model("qwen2", tie_word_embeddings=False)
    pyengine.compress(model, Recipe({"_default": QuantConfig(4, 32)}), show_progress=False,
                      dtype=torch.bfloat16)
    assert model.lm_head.qweight is not model.model.embed_tokens.qweight
    assert model.model.embed_tokens.scales.dtype == torch.bfloat16
    ids = torch.randint(0, 160, (2, 7), generator=rng)
    expected = _logits(model, ids)
    assert expected.dtype == torch.bfloat16
    pyengine.save(model, tmp_path)
    assert torch.equal(_logits(pyengine.load(tmp_path), ids), expected)
    upcast = pyengine.load(tmp_path, dtype=torch.float32)  # fp32 on request
    got = _logits(upcast, ids)
    assert got.dtype == torch.float32
    assert ((got - expected.float()).norm() / got.norm()) < 2e-2


def test_recipe_embeddings_field_round_trips_and_old_recipes_stay_dense():
    recipe = Recipe({"_default": QuantConfig(4)}, embeddings=QuantConfig(8, -1, symmetric=True))
    assert Recipe.from_json(recipe.to_json()) == recipe
    assert Recipe.from_dict({"version": 2, "quant": {}}).embeddings == QuantConfig(8, 128)
    assert Recipe.from_dict({"version": 1, "quant": {}}).embeddings is None
    assert Recipe.from_dict({"version": 2, "embeddings": None}).embeddings is None
    with pytest.raises(ValueError, match="plain RTN"):
        Recipe(embeddings=QuantConfig(4, method="gptq"))
    with pytest.raises(ValueError, match="QuantConfig or None"):
        Recipe(embeddings=8)


@pytest.mark.parametrize("sliced", [False, True])
def test_storage_bytes_equal_the_bytes_on_disk(sliced, tmp_path, rng):
    model, widths = _tied_model(rng, sliced, vocab_size=8000, hidden_size=256,
                                intermediate_size=512)
    pyengine.compress(model, Recipe({"_default": QuantConfig(4, 128)}, slicing=widths),
                      show_progress=False)
    pyengine.save(model, tmp_path)
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    held = pyengine.storage_bytes(model)
    assert abs(on_disk - held) <= 0.01 * on_disk, (on_disk, held)
    bpw = pyengine.bits_per_weight(model)
    if not sliced:  # K = 256 and 512: no padding, 4 bits + an fp16 scale and zero per 128
        assert bpw["linears"] == pytest.approx(4 + 2 * 16 / 128)
        assert bpw["linears"] < bpw["model"] < 8.3


def test_bad_embedding_metadata_is_a_checkpoint_error(tmp_path, rng):
    model, _ = _tied_model(rng)
    pyengine.compress(model, Recipe({"_default": QuantConfig(4, 32)}), show_progress=False)
    pyengine.save(model, tmp_path)
    config_file = tmp_path / "config.json"
    original = config_file.read_text()

    def broken(edit, match):
        config = json.loads(original)
        edit(config["quantization_config"])
        config_file.write_text(json.dumps(config))
        for load in (pyengine.load, AutoModelForCausalLM.from_pretrained):
            with pytest.raises(pyengine.CheckpointError, match=match):
                load(tmp_path)

    table = "model.embed_tokens"
    broken(lambda q: q.update(format_version=1), "format_version 1 does not have")
    broken(lambda q: q["layers"][table].update(embedding={"dtype": "int8"}),
           "embedding.dtype must be one of")
    broken(lambda q: q["layers"][table].update(embedding=["float16"]), "embedding must be a mapping")
    broken(lambda q: q["layers"][table].update(bias=True), "has no bias")
    broken(lambda q: q["layers"][table].update(shape=[999, 64]), "embedding table is")
    broken(lambda q: q["layers"]["model.layers.0.mlp.up_proj"].update(embedding={"dtype": "float16"}),
           "not an embedding")
    broken(lambda q: q["layers"][table].update(scale_dtype="float32"), "expected float32")
    config_file.write_text(original)
    assert isinstance(pyengine.load(tmp_path).model.embed_tokens, QuantEmbedding)


def test_version_1_checkpoints_still_load(tmp_path, rng):
    """A checkpoint of the earlier format (dense table, fp32 scales, format_version 1)."""
    model = random_model("llama", tie_word_embeddings=True)
    pyengine.compress(model, Recipe({"_default": QuantConfig(4, 32)}, embeddings=None),
                      show_progress=False, dtype=torch.float32)
    pyengine.save(model, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert meta["format_version"] == 1
    meta["recipe"].pop("embeddings")
    meta["recipe"]["version"] = 1
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = meta
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, 160, (1, 6), generator=rng)
    for loaded in (pyengine.load(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert torch.equal(_logits(loaded, ids), _logits(model, ids))
        assert loaded.pyengine_recipe.embeddings is None
