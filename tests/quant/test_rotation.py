"""Random orthogonal rotations (pyengine.quant.rotation, Recipe.rotate): they keep the
model's function exactly, compose with slicing and quantization, survive a checkpoint, and run
in the lean decoder."""

import pytest
import torch

import pyengine
from pyengine import QuantConfig, Recipe
from pyengine.decoder import Decoder, decoder_blocker
from pyengine.model.random import random_model
from pyengine.ops.hadamard import hadamard_transform
from pyengine.nn import SlicedDecoderLayer
from pyengine.quant.rotation import (RotationError, random_orthogonal, rotate_mlp_inner,
                                          rotate_model, rotate_residual, rotate_value_heads)

from helpers import rel_err

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3"]
VOCAB = 160


def _model(family, tied=False, **overrides):
    return random_model(family, tie_word_embeddings=tied, vocab_size=VOCAB, **overrides)


def _ids(rng, batch=2, length=9):
    return torch.randint(3, VOCAB, (batch, length), generator=rng)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_random_orthogonal_is_orthogonal_and_seeded():
    q = random_orthogonal(24, torch.Generator().manual_seed(5))
    assert q.dtype == torch.float64 and q.shape == (24, 24)
    assert torch.allclose(q.T @ q, torch.eye(24, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, random_orthogonal(24, torch.Generator().manual_seed(5)))
    assert not torch.allclose(q, random_orthogonal(24, torch.Generator().manual_seed(6)))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_rotation_keeps_the_function_and_changes_the_weights(family, tied, rng):
    model = _model(family, tied)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    ids = _ids(rng)
    original = _logits(model, ids)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rotate_model(model, seed=3)
    assert rel_err(_logits(model, ids), original) < 1e-5
    layer = model.model.layers[0]
    assert isinstance(layer, SlicedDecoderLayer)
    assert layer.attn_out.shortcut is None and layer.mlp_out.shortcut is None
    attn = layer.self_attn
    values = attn.v_proj if family != "phi3" else attn.qkv_proj
    name = ("model.layers.0.self_attn." + ("v_proj" if family != "phi3" else "qkv_proj")
            + ".weight")
    assert not torch.allclose(values.weight, before[name]), "the projection was not rotated"
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_value_heads_alone_keep_the_function(family, rng):
    """On the unfolded model (qwen2: the value bias is rotated too; phi3: the value rows of
    the fused qkv projection)."""
    model = _model(family)
    ids = _ids(rng)
    original = _logits(model, ids)
    out_before = model.model.layers[1].self_attn.o_proj.weight.detach().clone()
    rotate_value_heads(model, seed=1)
    assert rel_err(_logits(model, ids), original) < 1e-5
    assert not torch.allclose(model.model.layers[1].self_attn.o_proj.weight, out_before)


def test_a_value_rotation_without_its_readers_is_caught(rng):
    """The function tests can fail: rotating v_proj's heads without o_proj changes the logits."""
    model = _model("llama")
    ids = _ids(rng)
    original = _logits(model, ids)
    d = model.config.head_dim
    r = random_orthogonal(d, torch.Generator().manual_seed(0)).to(torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.self_attn.v_proj.weight
            w[:d] = r.T @ w[:d]
    assert rel_err(_logits(model, ids), original) > 1e-2


def test_rotation_refuses_what_it_cannot_do(rng):
    with pytest.raises(RotationError, match="gemma2 models cannot be rotated"):
        rotate_model(random_model("gemma2"))
    model = _model("llama")
    rotate_residual(model)
    with pytest.raises(RotationError, match="already folded"):
        rotate_residual(model)
    quantized = _model("llama")
    pyengine.compress(quantized, Recipe(quant={"_default": QuantConfig(bits=4, group_size=32)}),
                      show_progress=False, dtype=torch.float32)
    with pytest.raises(ValueError, match="already compressed"):
        pyengine.compress(quantized, Recipe(quant={}, rotate=True), show_progress=False)
    with pytest.raises(RotationError, match="rotate before quantizing"):
        rotate_value_heads(quantized)


def test_recipe_fields_round_trip_and_are_checked():
    recipe = Recipe(quant={"_default": QuantConfig(bits=3)}, rotate=True, rotation_seed=7)
    again = Recipe.from_json(recipe.to_json())
    assert again.rotate is True and again.rotation_seed == 7 and again == recipe
    old = recipe.to_dict()
    del old["rotate"], old["rotation_seed"]
    old["version"] = 2
    assert Recipe.from_dict(old).rotate is False
    with pytest.raises(ValueError, match="Recipe.rotate must be True or False"):
        Recipe(rotate=1)
    with pytest.raises(ValueError, match="rotation_seed must be an integer >= 0"):
        Recipe(rotate=True, rotation_seed=-1)


def _recipe(bits=8, **kw):
    return Recipe(quant={"_default": QuantConfig(bits=bits, group_size=32)}, **kw)


@pytest.mark.parametrize("table", ["int8", "dense"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_compress_with_rotation_checkpoint_and_decoder(tied, table, rng, tmp_path):
    """An 8-bit rotated model is close to the original; saved and loaded it gives the same
    logits; the lean decoder runs it and matches its forward (a tied table, quantized or
    dense, keeps its basis and is projected after the lookup)."""
    model = _model("llama", tied)
    ids = _ids(rng, length=10)
    original = _logits(model, ids)
    extra = {} if table == "int8" else {"embeddings": None}
    pyengine.compress(model, _recipe(rotate=True, rotation_seed=2, **extra), show_progress=False,
                      dtype=torch.float16 if table == "dense" else torch.float32)
    out = _logits(model, ids).float()
    assert rel_err(out, original) < 2e-2
    pyengine.save(model, tmp_path / "ckpt")
    loaded = pyengine.load(tmp_path / "ckpt")
    assert loaded.pyengine_recipe.rotate and loaded.pyengine_recipe.rotation_seed == 2
    assert rel_err(_logits(loaded, ids).float(), out) < 1e-6
    assert decoder_blocker(loaded, 16) == ""
    decoder = Decoder(loaded, max_len=16, batch=2)
    decoder.prefill(ids[:, :6])
    for t in range(6, 10):
        last = decoder.forward(ids[:, t:t + 1])
    # the decoder runs float32 on a CPU; the float16 model rounds its activations
    assert rel_err(last, out[:, -1]) < (1e-4 if table == "int8" else 5e-3)
    if table == "int8":  # float32 both ways: the same greedy tokens
        greedy = pyengine.generate(loaded, ids[:, :4], 5)
        with torch.no_grad():
            want = loaded.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
        assert torch.equal(greedy, want)


def test_rotation_inside_slicing_keeps_the_sliced_function(rng):
    """A sliced model rotated within its kept subspaces computes what the same slicing without
    rotation computes (the same subspaces are kept)."""
    calibration = torch.randint(3, VOCAB, (4, 16), generator=rng)
    widths = [56, 48, 64, 40][:random_model("llama").config.num_hidden_layers]
    plain, rotated = _model("llama"), _model("llama")
    dense = Recipe(quant={}, embeddings=None, slicing=widths)
    pyengine.compress(plain, dense, calibration, show_progress=False, dtype=torch.float32)
    pyengine.compress(rotated, Recipe(quant={}, embeddings=None, slicing=widths, rotate=True),
                      calibration, show_progress=False, dtype=torch.float32)
    ids = _ids(rng)
    assert rel_err(_logits(rotated, ids), _logits(plain, ids)) < 1e-4
    w_plain = plain.model.layers[1].mlp.gate_proj.weight
    w_rot = rotated.model.layers[1].mlp.gate_proj.weight
    assert w_plain.shape == w_rot.shape and not torch.allclose(w_plain, w_rot, atol=1e-3)
    assert "sliced" in decoder_blocker(rotated, 16)


def test_rotation_spreads_outlier_channels():
    """What the rotation is for: input channels much larger than the rest (here 4 of 64, x12)
    are spread over all coordinates, so no group of a row is dominated by them. (Its effect on
    perplexity is measured on SmolLM2 in benchmarks/rotation_smollm2.py.)"""
    model = _model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[:, :4] *= 12.0

    def column_peak(weight):  # largest column norm over the mean column norm
        norms = weight.detach().norm(dim=0)
        return (norms.max() / norms.mean()).item()

    before = column_peak(model.model.layers[0].mlp.gate_proj.weight)
    rotate_model(model, seed=0)
    after = column_peak(model.model.layers[0].mlp.gate_proj.weight)
    assert before > 5 and after < 2, (before, after)


# ---- the MLP's inner activation, rotated online ---------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_inner_rotation_keeps_the_function(family, rng):
    """Permutation and signs merged into gate/up (phi3: the fused gate_up rows), the block
    Walsh-Hadamard transform applied online before down_proj and held by its columns."""
    model = _model(family, mlp_bias=True) if family == "llama" else _model(family)
    ids = _ids(rng)
    original = _logits(model, ids)
    rotate_residual(model, seed=1)
    mlp = model.model.layers[0].mlp
    inputs = [mlp.get_submodule(n).weight.detach().clone()
              for n in ("gate_up_proj",) if family == "phi3"] or \
        [mlp.gate_proj.weight.detach().clone(), mlp.up_proj.weight.detach().clone()]
    down = mlp.down_proj.proj.weight.detach().clone()
    rotate_mlp_inner(model, seed=4)
    assert rel_err(_logits(model, ids), original) < 1e-5
    width = model.config.intermediate_size
    assert mlp.down_proj.hadamard_block == 32 and width % 32 == 0   # 96 = 3 x 32
    assert not torch.allclose(mlp.down_proj.proj.weight, down, atol=1e-3)
    after = ([mlp.gate_up_proj.weight] if family == "phi3"
             else [mlp.gate_proj.weight, mlp.up_proj.weight])
    for old, new in zip(inputs, after):
        assert not torch.equal(old, new)
        # rows are permuted (and sign-flipped): the same set of row norms
        assert torch.allclose(old.norm(dim=1).sort().values, new.norm(dim=1).sort().values,
                              atol=1e-5)


def test_the_online_transform_is_needed(rng):
    """The check can fail: without the online transform the rotated MLP computes something
    else."""
    model = _model("llama")
    ids = _ids(rng)
    original = _logits(model, ids)
    rotate_model(model, seed=0, mlp_inner=True)
    assert rel_err(_logits(model, ids), original) < 1e-5
    for layer in model.model.layers:
        layer.mlp.down_proj.hadamard_block = 0
    assert rel_err(_logits(model, ids), original) > 1e-2


def test_mlp_inner_rotation_refuses_what_it_cannot_do():
    with pytest.raises(RotationError, match="needs a folded model"):
        rotate_mlp_inner(_model("llama"))
    model = _model("llama")
    rotate_model(model, mlp_inner=True)
    with pytest.raises(RotationError, match="already rotated"):
        rotate_mlp_inner(model)
    odd = _model("llama", intermediate_size=72)                  # 72 = 8 x 9: blocks of 8
    rotate_residual(odd)
    with pytest.raises(RotationError, match="width 72 has no power-of-two factor of at least 16"):
        rotate_mlp_inner(odd)
    with pytest.raises(RotationError, match="gemma2 models cannot be rotated"):
        rotate_mlp_inner(random_model("gemma2"))


def test_gptq_sees_the_transformed_input(rng):
    """The Hessian of a rotated down projection is that of the input its linear really reads
    (after the online transform), not of the MLP's raw output."""
    from pyengine.pipeline.calibrate import capture_first_layer_inputs, run_layer
    from pyengine.quant.layerwise import input_hessians
    model = _model("llama")
    rotate_model(model, seed=0, mlp_inner=True)
    layer = model.model.layers[0]
    inputs = capture_first_layer_inputs(model, torch.randint(3, VOCAB, (2, 7), generator=rng))
    seen = []
    handle = layer.mlp.down_proj.proj.register_forward_hook(
        lambda mod, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    name = "model.layers.0.mlp.down_proj"
    try:  # what the linear reads when the layer runs (input_hessians stops before it runs)
        run_layer(layer, inputs)
    finally:
        handle.remove()
    hessians, counts = input_hessians(model, layer, inputs, [name], torch.device("cpu"))
    x = torch.cat(seen).to(torch.float32)
    assert counts[name] == x.shape[0] == 14
    assert rel_err(hessians[name], x.T @ x) < 1e-5
    raw = torch.cat([hadamard_transform(v, 32) for v in seen])      # the MLP's own output
    assert rel_err(hessians[name], raw.T @ raw) > 0.1


def test_recipe_online_hadamard_field():
    recipe = Recipe(quant={}, rotate=True)
    assert recipe.online_hadamard is True
    assert Recipe.from_json(recipe.to_json()).online_hadamard is True
    off = Recipe(quant={}, rotate=True, online_hadamard=False)
    assert Recipe.from_dict(off.to_dict()) == off
    old = recipe.to_dict()
    del old["online_hadamard"]
    old["version"] = 3                   # rotated before the field existed: no online transform
    assert Recipe.from_dict(old).online_hadamard is False
    with pytest.raises(ValueError, match="Recipe.online_hadamard must be True or False"):
        Recipe(online_hadamard="yes")


def test_checkpoint_metadata_of_the_transform_is_checked(rng, tmp_path):
    import json

    from pyengine.io.checks import CheckpointError
    model = _model("llama")
    pyengine.compress(model, _recipe(rotate=True), show_progress=False, dtype=torch.float32)
    pyengine.save(model, tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    layers = config["quantization_config"]["structure"]["layers"]
    assert [layer["mlp_hadamard_block"] for layer in layers] == [32] * len(layers)
    for bad, message in ((12, "must be 0 or a power of two"), (64, "does not divide")):
        layers[0]["mlp_hadamard_block"] = bad
        config_file.write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=message):
            pyengine.load(tmp_path / "ckpt")
