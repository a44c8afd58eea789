"""compress / dequantize_model / generate on tiny random models of every supported family."""

import pytest
import torch

import pyengine
from pyengine import QuantConfig, Recipe
from pyengine.model.random import random_model

from helpers import rel_err

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3"]

MIXED = Recipe({
    r"model\.layers\.0\..*": QuantConfig(bits=8, group_size=32),
    r".*\.mlp\.down_proj": QuantConfig(bits=3, group_size=64, symmetric=True),
    r".*\.self_attn\.v_proj": None,  # stays dense
    "_default": QuantConfig(bits=4, group_size=32),
})


def _ids(rng, batch=2, length=12, vocab=160):
    return torch.randint(3, vocab, (batch, length), generator=rng)


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_logits_match_the_dequantized_model(family, rng):
    model = random_model(family)
    pyengine.compress(model, MIXED, show_progress=False, dtype=torch.float32)
    reference = pyengine.dequantize_model(model)
    assert not any(isinstance(m, pyengine.QuantLinear) for m in reference.modules())
    ids = _ids(rng)
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert rel_err(got, want) < 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_the_recipe_decides_each_layer(family):
    model = random_model(family)
    pyengine.compress(model, MIXED, show_progress=False)
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, pyengine.QuantLinear)}
    layer0 = [m for n, m in quantized.items() if n.startswith("model.layers.0.")]
    assert layer0 and all(m.bits == 8 for m in layer0)
    downs = [m for n, m in quantized.items() if n.endswith("mlp.down_proj") and ".0." not in n]
    assert downs and all(m.bits == 3 and m.symmetric and m.group_size == 64 for m in downs)
    assert not any(n.endswith(".v_proj") and not n.startswith("model.layers.0.") for n in quantized)
    # the head and the table follow Recipe.embeddings (8 bits by default), never _default
    assert quantized["lm_head"].bits == 8 and quantized["lm_head"].group_size == 128
    assert isinstance(model.model.embed_tokens, pyengine.QuantEmbedding)


def test_the_head_is_quantized_only_when_named(rng):
    model = random_model("llama", tie_word_embeddings=True)
    pyengine.compress(model, Recipe({"_default": QuantConfig(4, 32), "lm_head": QuantConfig(8, 32)}),
                      show_progress=False)
    assert isinstance(model.lm_head, pyengine.QuantLinear) and model.lm_head.bits == 8
    assert model.config.tie_word_embeddings is False
    ids = _ids(rng)
    with torch.no_grad():
        assert rel_err(model(ids).logits, pyengine.dequantize_model(model)(ids).logits) < 1e-3


def test_embeddings_cannot_be_quantized():
    with pytest.raises(ValueError, match="embeddings"):
        pyengine.compress(random_model("llama"),
                          Recipe({r"model\.embed_tokens": QuantConfig(4)}), show_progress=False)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_generation_greedy_static_and_sampling(family, rng):
    model = random_model(family)
    pyengine.compress(model, MIXED, show_progress=False, dtype=torch.float32)
    reference = pyengine.dequantize_model(model)
    ids = _ids(rng, batch=1, length=6)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    greedy = model.generate(ids, **kwargs)
    assert torch.equal(greedy, reference.generate(ids, **kwargs))
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(static, greedy)
    torch.manual_seed(0)
    # min_new_tokens: a sampled end-of-sequence token must not end the run early
    sampled = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=True, top_k=20,
                             pad_token_id=0)
    assert sampled.shape == (1, 14) and int(sampled.max()) < model.config.vocab_size


def test_unsupported_models_list_the_supported_families():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(pyengine.UnsupportedModelError, match="llama.*phi3|gemma2.*llama"):
        pyengine.compress(model, Recipe({"_default": QuantConfig(4)}))
    assert {"llama", "mistral", "qwen2", "gemma2", "phi3"} <= set(pyengine.supported_architectures())


def test_weight_bytes_match_the_format(rng):
    model = random_model("qwen2")
    pyengine.compress(model, MIXED, show_progress=False)
    held, predicted = pyengine.storage_bytes(model), pyengine.predicted_bytes(model)
    assert abs(held - predicted) <= 0.05 * predicted, (held, predicted)
    dense = random_model("qwen2")
    assert held < 0.5 * pyengine.storage_bytes(dense)


def test_layer_report_lists_every_linear():
    model = random_model("llama")
    pyengine.compress(model, MIXED, show_progress=False)
    rows = {r["name"]: r for r in pyengine.layer_report(model)}
    assert rows["model.layers.1.mlp.down_proj"]["bits"] == 3
    assert rows["model.layers.1.self_attn.v_proj"]["kind"] == "dense"
    assert rows["lm_head"]["kind"] == "quantized" and rows["lm_head"]["bits"] == 8
    assert rows["model.embed_tokens"]["kind"] == "quantized"
    assert len(rows) == 3 * 7 + 2


# ---- recipes ------------------------------------------------------------------------------------

def test_recipe_json_round_trip():
    recipe = Recipe(MIXED.quant, slicing=[48, 40, 56])
    back = Recipe.from_json(recipe.to_json())
    assert back == recipe
    assert back.config_for("model.layers.2.mlp.down_proj") == QuantConfig(3, 64, True)
    assert back.config_for("model.layers.2.self_attn.v_proj") is None
    assert back.config_for("lm_head", is_head=True) == QuantConfig(8, 128)  # Recipe.embeddings
    assert Recipe(MIXED.quant, embeddings=None).config_for("lm_head", is_head=True) is None


@pytest.mark.parametrize("bad, message", [
    (lambda: QuantConfig(bits=5), "bits"),
    (lambda: QuantConfig(bits=4, group_size=100), "group_size"),
    (lambda: QuantConfig(bits=4, method="awq"), "method"),
    (lambda: QuantConfig(bits=4, matryoshka=True), "Matryoshka"),
    (lambda: Recipe({"(": QuantConfig(4)}), "regex"),
    (lambda: Recipe({"_default": 4}), "QuantConfig"),
    (lambda: Recipe(slicing=[64, 0]), "positive"),
    (lambda: Recipe.from_dict({"quant": {"_default": {"bits": 4, "colour": 1}}}), "unknown"),
])
def test_bad_recipes_say_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


def test_gptq_without_calibration_is_an_error():
    with pytest.raises(ValueError, match="calibration"):
        pyengine.compress(random_model("llama"), Recipe({"_default": QuantConfig(4, method="gptq")}),
                          show_progress=False)


def _compiled_static_decode_matches_eager(model, ids, backend):
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    eager = model.generate(ids, **kwargs)
    eager_forward = model.forward
    # fullgraph=True: any graph break (from pyengine's ops or modules) is an error
    model.forward = torch.compile(model.forward, fullgraph=True, backend=backend, dynamic=False)
    try:
        compiled = model.generate(ids, **kwargs)
    finally:
        model.forward = eager_forward
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("sliced", [False, True])
def test_static_cache_decode_compiles_without_graph_breaks(sliced, rng):
    from pyengine.slicing import structure
    model = random_model("llama")
    widths = None
    if sliced:
        d, n = model.config.hidden_size, model.config.num_hidden_layers
        q = lambda w: torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=rng))[0][:, :w]
        structure.apply_bases(model, [q(48)] * n, [q(40)] * n, q(44))
        widths = [48] * n
    pyengine.compress(model, Recipe({"_default": QuantConfig(4, 32)}, slicing=widths),
                      show_progress=False)
    _compiled_static_decode_matches_eager(model, _ids(rng, batch=1, length=6), "aot_eager")


@pytest.mark.gpu
def test_static_cache_decode_compiles_on_gpu(rng):
    model = random_model("llama", dtype=torch.float16).cuda()
    pyengine.compress(model, Recipe({"_default": QuantConfig(4, 32)}), show_progress=False)
    _compiled_static_decode_matches_eager(model, _ids(rng, batch=1, length=6).cuda(), "inductor")
