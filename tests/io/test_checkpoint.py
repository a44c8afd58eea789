"""save -> load (pyengine.load and AutoModelForCausalLM.from_pretrained) reproduces logits
exactly; bad checkpoints fail clearly."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import pyengine
from pyengine import QuantConfig, Recipe
from pyengine.model.random import random_model
from pyengine.slicing import structure

RECIPE = Recipe({
    r".*down_proj": QuantConfig(3, 64, symmetric=True),
    r".*k_proj": None,
    "_default": QuantConfig(4, 32),
})


def _compressed(family, rng, sliced=False, embeddings="default", **overrides):
    model = random_model(family, **overrides)
    slicing = None
    if sliced:
        d, n = model.config.hidden_size, model.config.num_hidden_layers
        q = lambda w: torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=rng))[0][:, :w]
        widths = [56, 40, 48][:n]
        structure.apply_bases(model, [q(w) for w in widths], [q(w) for w in widths], q(44))
        slicing = widths
    recipe = (Recipe(RECIPE.quant, slicing=slicing) if embeddings == "default"
              else Recipe(RECIPE.quant, slicing=slicing, embeddings=embeddings))
    return pyengine.compress(model, recipe, show_progress=False)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family,sliced", [("llama", False), ("llama", True), ("qwen2", True),
                                           ("gemma2", False), ("phi3", True)])
def test_save_load_is_exact_both_ways(family, sliced, tmp_path, rng):
    model = _compressed(family, rng, sliced)
    ids = torch.randint(3, 160, (2, 9), generator=rng)
    expected = _logits(model, ids)
    own = model.config.architectures  # None for a model built from a config
    pyengine.save(model, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and "config.json" in files
    # a sliced checkpoint names the vLLM plugin's model class (transformers builds from
    # model_type); the model saved keeps its own config
    written = json.loads((tmp_path / "config.json").read_text()).get("architectures")
    assert written == (["PyengineStructuredForCausalLM"] if sliced else own)
    assert model.config.architectures == own
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]

    loaded = pyengine.load(tmp_path)
    assert torch.equal(_logits(loaded, ids), expected)
    assert loaded.pyengine_recipe == model.pyengine_recipe
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(hf, ids), expected)


@pytest.mark.parametrize("head", ["tied", "quantized"])
def test_sliced_tied_models_round_trip(head, tmp_path, rng):
    """Sliced models with tied embeddings kept dense keep one table (ProjectedEmbedding +
    final-norm projection); a quantized head on such a model reads the original basis
    (quantized tables: tests/nn/test_quant_embedding.py)."""
    from pyengine.nn.sliced import ProjectedEmbedding
    model = random_model("llama", tie_word_embeddings=True, vocab_size=1000)  # table > layers
    d = model.config.hidden_size
    q = lambda w: torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=rng))[0][:, :w]
    widths = [56, 40, 48]
    structure.apply_bases(model, [q(w) for w in widths], [q(w) for w in widths], q(44))
    quant = dict(RECIPE.quant)
    if head == "quantized":
        quant = {"lm_head": QuantConfig(8, 32), **quant}
    pyengine.compress(model, Recipe(quant, slicing=widths, embeddings=None), show_progress=False)
    assert isinstance(model.model.embed_tokens, ProjectedEmbedding)
    if head == "tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert isinstance(model.lm_head, pyengine.QuantLinear) and not model.config.tie_word_embeddings
    ids = torch.randint(3, 160, (2, 9), generator=rng)
    expected = _logits(model, ids)
    pyengine.save(model, tmp_path)
    for loaded in (pyengine.load(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert isinstance(loaded.model.embed_tokens, ProjectedEmbedding)
        assert torch.equal(_logits(loaded, ids), expected)
        if head == "tied":
            assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        else:
            assert isinstance(loaded.lm_head, pyengine.QuantLinear)
    held, predicted = pyengine.storage_bytes(model), pyengine.predicted_bytes(model)
    assert abs(held - predicted) <= 0.05 * predicted


def test_tied_embeddings_are_saved_once_and_tied_again(tmp_path, rng):
    model = _compressed("llama", rng, embeddings=None, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    pyengine.save(model, tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    loaded = pyengine.load(tmp_path)
    ids = torch.randint(3, 160, (1, 7), generator=rng)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_sharded_checkpoints(tmp_path, rng):
    model = _compressed("qwen2", rng)
    pyengine.save(model, tmp_path, max_shard_bytes=20_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids = torch.randint(3, 160, (1, 7), generator=rng)
    assert torch.equal(_logits(pyengine.load(tmp_path), ids), _logits(model, ids))
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path), ids),
                       _logits(model, ids))


def test_load_converts_dtype(tmp_path, rng):
    model = _compressed("llama", rng)
    pyengine.save(model, tmp_path)
    half = pyengine.load(tmp_path, dtype=torch.bfloat16)
    assert half.model.layers[0].mlp.up_proj.scales.dtype == torch.bfloat16
    assert half.model.embed_tokens.scales.dtype == torch.bfloat16
    assert half.model.norm.weight.dtype == torch.bfloat16
    ids = torch.randint(3, 160, (1, 7), generator=rng)
    assert torch.isfinite(_logits(half, ids).float()).all()


def test_truncated_checkpoint_is_a_clear_error(tmp_path, rng):
    pyengine.save(_compressed("llama", rng), tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(pyengine.CheckpointError, match="model.safetensors"):
        pyengine.load(tmp_path)


def test_checkpoint_that_disagrees_with_its_metadata(tmp_path, rng):
    pyengine.save(_compressed("llama", rng), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    layer = config["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"]
    layer["bits"] = 8  # the stored codes are 4-bit
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(pyengine.CheckpointError, match="wrong shape"):
        pyengine.load(tmp_path)


def test_missing_or_foreign_directories(tmp_path):
    with pytest.raises(pyengine.CheckpointError, match="config.json"):
        pyengine.load(tmp_path)
    random_model("llama").save_pretrained(tmp_path)
    with pytest.raises(pyengine.CheckpointError, match="not written by pyengine"):
        pyengine.load(tmp_path)
