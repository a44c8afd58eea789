"""Sliced models: folding norms and rotating keep the function; slicing runs with per-layer
widths and combines with quantization."""

import pytest
import torch

import pyengine
from pyengine import QuantConfig, Recipe
from pyengine.model.random import random_model
from pyengine.nn import ResidualProjection, SlicedDecoderLayer
from pyengine.slicing import structure

from helpers import rel_err

SLICEABLE = ["llama", "mistral", "qwen2", "qwen3", "phi3"]


def _basis(dim, width, gen):
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=gen))
    return q[:, :width]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", SLICEABLE)
def test_folding_and_rotating_keep_the_function(family, rng):
    model = random_model(family)
    ids = torch.randint(3, 160, (2, 10), generator=rng)
    original = _logits(model, ids)
    structure.fold_norms(model)
    assert all(isinstance(layer, SlicedDecoderLayer) for layer in model.model.layers)
    assert rel_err(_logits(model, ids), original) < 1e-5
    d, n = model.config.hidden_size, model.config.num_hidden_layers
    structure.apply_bases(model, [_basis(d, d, rng) for _ in range(n)],
                          [_basis(d, d, rng) for _ in range(n)], _basis(d, d, rng))
    assert rel_err(_logits(model, ids), original) < 1e-5


def test_tied_embeddings_stay_tied_and_are_stored_once(rng):
    from pyengine.nn.sliced import ProjectedEmbedding
    model = random_model("llama", tie_word_embeddings=True, vocab_size=1000)
    untied = random_model("llama", tie_word_embeddings=True, vocab_size=1000)
    ids = torch.randint(3, 1000, (2, 10), generator=rng)
    original = _logits(model, ids)
    d, n = model.config.hidden_size, model.config.num_hidden_layers
    bases = [_basis(d, w, rng) for w in (48, 40, 56)]
    mlp_bases = [_basis(d, w, rng) for w in (40, 48, 32)]
    head_basis = _basis(d, d, rng)
    # full width first: the function is kept exactly
    structure.apply_bases(model, [_basis(d, d, rng)] * n, [_basis(d, d, rng)] * n, head_basis)
    assert rel_err(_logits(model, ids), original) < 1e-5
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings
    # sliced: one [V, D] table, against the rotated-and-untied layout
    model = random_model("llama", tie_word_embeddings=True, vocab_size=1000)
    structure.apply_bases(model, bases, mlp_bases, _basis(d, 44, rng))
    structure.fold_norms(untied, project_embeddings=False)
    structure.apply_bases(untied, bases, mlp_bases, _basis(d, 44, rng))
    assert isinstance(model.model.embed_tokens, ProjectedEmbedding)
    assert tuple(model.model.embed_tokens.projection.shape) == (d, 48)
    assert tuple(model.model.norm.projection.shape) == (44, d)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    v = model.config.vocab_size
    saved = pyengine.storage_bytes(untied) - pyengine.storage_bytes(model)
    # untied: [V, 48] table + [V, 44] head; tied: one [V, D] table + [D, 48] and [44, D]
    assert saved == 4 * (v * (48 + 44 - d) - d * 48 - 44 * d)
    assert structure.keeps_tied_table(model, 48, 44)
    assert not structure.keeps_tied_table(model, 16, 16), "a narrower untied pair is smaller"
    assert torch.isfinite(_logits(model, ids)).all()


def test_per_layer_widths_run_and_combine_with_quantization(rng):
    model = random_model("llama", num_hidden_layers=4)
    d = model.config.hidden_size
    widths = [64, 48, 32, 56]
    structure.apply_bases(model, [_basis(d, w, rng) for w in widths],
                          [_basis(d, w, rng) for w in widths], _basis(d, 40, rng))
    assert structure.layer_widths(model) == widths
    layer = model.model.layers[1]
    assert layer.self_attn.q_proj.in_features == 48
    assert tuple(layer.self_attn.o_proj.shortcut.shape) == (48, 48)
    assert tuple(layer.mlp.down_proj.shortcut.shape) == (48, 32)
    assert model.model.embed_tokens.weight.shape[1] == 64 and model.lm_head.in_features == 40
    ids = torch.randint(3, 160, (2, 10), generator=rng)
    assert torch.isfinite(_logits(model, ids)).all()

    pyengine.compress(model, Recipe({"_default": QuantConfig(4, 32)}, slicing=widths),
                      show_progress=False, dtype=torch.float32)
    assert isinstance(model.model.layers[2].mlp.down_proj, ResidualProjection)
    assert isinstance(model.model.layers[2].mlp.down_proj.proj, pyengine.QuantLinear)
    reference = pyengine.dequantize_model(model)
    assert rel_err(_logits(model, ids), _logits(reference, ids)) < 1e-3
    out = model.generate(ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out, reference.generate(ids[:1], max_new_tokens=5, do_sample=False,
                                               pad_token_id=0))


def test_identity_shortcuts_are_dropped(rng):
    model = random_model("llama")
    d, n = model.config.hidden_size, model.config.num_hidden_layers
    bases = [_basis(d, 48, rng) for _ in range(n)]
    structure.apply_bases(model, bases, bases, bases[-1])  # same basis in and out of each block
    # every attention shortcut, and the last MLP's (the head reads the last layer's basis)
    assert structure.drop_identity_shortcuts(model, atol=1e-6) == n + 1
    assert all(layer.self_attn.o_proj.shortcut is None for layer in model.model.layers)
    assert model.model.layers[-1].mlp.down_proj.shortcut is None
    assert model.model.layers[0].mlp.down_proj.shortcut is not None


def test_gemma2_cannot_be_sliced():
    with pytest.raises(structure.SlicingError, match="gemma2"):
        structure.fold_norms(random_model("gemma2"))


def test_slicing_needs_calibration_or_a_sliced_model():
    model = random_model("llama")
    with pytest.raises(ValueError, match="calibration"):
        pyengine.compress(model, Recipe(slicing=[48, 48, 48]), show_progress=False)
    with pytest.raises(ValueError, match="3 layers"):
        pyengine.compress(model, Recipe(slicing=[48, 48]), show_progress=False)
