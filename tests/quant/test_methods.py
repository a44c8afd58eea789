"""The quantization-method registry (pyengine.quant.methods): versioned options, what
QuantConfig accepts, a method registered from outside run by compress, the one module swap."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

import pyengine
from pyengine import QuantConfig, Recipe
from pyengine.model.random import random_model
from pyengine.nn.matryoshka_linear import MatryoshkaLinear
from pyengine.nn.quant_linear import QuantLinear
from pyengine.quant import methods
from pyengine.quant.methods import (GPTQOptions, MatQuantOptions, MethodOptions, QuantMethod,
                                    RTNOptions, get_method, method_names, register_method,
                                    replace_linear, resolve_options)


def _calib(rng, n=4, seqlen=16):
    return torch.randint(3, 160, (n, seqlen), generator=rng)


@pytest.fixture
def registry():
    """Restores the registry after a test that registers a method."""
    saved = dict(methods._METHODS)
    yield
    methods._METHODS.clear()
    methods._METHODS.update(saved)


def test_the_built_in_methods():
    assert method_names() == ("rtn", "gptq", "matquant")
    rtn, gptq, matquant = (get_method(n) for n in method_names())
    assert not rtn.needs_calibration and gptq.needs_calibration and matquant.needs_calibration
    assert (rtn.plain, rtn.matryoshka) == (True, True)
    assert (gptq.plain, gptq.matryoshka) == (True, False)
    assert (matquant.plain, matquant.matryoshka) == (False, True)
    with pytest.raises(ValueError, match="unknown quantization method 'awq'.*known"):
        get_method("awq")
    with pytest.raises(ValueError, match="needs exactly one handler"):
        QuantMethod("both", RTNOptions, True, False)


@pytest.mark.parametrize("options", [
    RTNOptions(), RTNOptions(clip_search=False, clip_grid=5, min_clip=0.5),
    RTNOptions(integer_zeros=True),
    GPTQOptions(), GPTQOptions(damp=0.05), GPTQOptions(integer_zeros=True),
    MatQuantOptions(), MatQuantOptions(weights={8: 1.0, 2: 4.0}, steps=3, batch_size=2)])
def test_options_round_trip_through_json_with_their_version(options):
    d = json.loads(json.dumps(options.to_dict()))
    assert d["version"] == type(options).VERSION
    assert type(options).from_dict(d) == options
    assert type(options).coerce(d) == options and type(options).coerce(options) is options
    assert type(options).coerce(None) == type(options)()


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="version 3 is not one"):
        RTNOptions.from_dict({"version": 3})
    # a version-1 dict (written before integer_zeros existed) still reads
    assert RTNOptions.from_dict({"version": 1, "clip_grid": 5}) == RTNOptions(clip_grid=5)
    with pytest.raises(ValueError, match=r"unknown GPTQOptions fields: \['block'\]"):
        GPTQOptions.from_dict({"block": 64})
    with pytest.raises(ValueError, match="expected RTNOptions, got GPTQOptions"):
        RTNOptions.coerce(GPTQOptions())
    for bad in (dict(clip_grid=0), dict(clip_grid=2.0), dict(min_clip=0.0), dict(min_clip=1.5),
                dict(clip_search=1), dict(integer_zeros=1)):
        with pytest.raises(ValueError, match="RTNOptions"):
            RTNOptions(**bad)
    for bad in (0.0, 2.0, True, "0.1"):
        with pytest.raises(ValueError, match="GPTQOptions.damp"):
            GPTQOptions(damp=bad)
    with pytest.raises(ValueError, match="precisions"):
        MatQuantOptions(weights={5: 1.0})
    with pytest.raises(ValueError, match="MatQuantOptions.batch_size"):
        MatQuantOptions(batch_size=0)
    with pytest.raises(ValueError, match="unknown quantization methods \\['awq'\\]"):
        resolve_options({"awq": {}})


def test_quant_config_follows_the_registry(registry):
    with pytest.raises(ValueError, match="QuantConfig.method must be one of"):
        QuantConfig(4, method="halfrtn")
    with pytest.raises(ValueError, match="Matryoshka parent is made by method"):
        QuantConfig(8, matryoshka=True, method="gptq")
    with pytest.raises(ValueError, match="method 'matquant' makes Matryoshka parents"):
        QuantConfig(8, method="matquant")
    register_method(QuantMethod("halfrtn", RTNOptions, plain=True, matryoshka=False,
                                quantize_layer=lambda *a, **k: {}))
    assert QuantConfig(4, method="halfrtn").method == "halfrtn"
    with pytest.raises(ValueError, match=r"made by method \('rtn', 'matquant'\)"):
        QuantConfig(8, matryoshka=True, method="halfrtn")


def test_a_registered_calibrated_method_runs_through_compress(rng, registry):
    """A method registered from outside: compress runs it layer by layer on calibration data
    (after GPTQ, in registry order) and puts its weights in place; it refuses to run without
    calibration data."""
    seen = []

    def plain_rtn_layer(model, layer, inputs, configs, options, *, scale_dtype=None,
                        compute_device=None, report=None):
        seen.append(sorted(configs))
        return {name: pyengine.quantize(model.get_submodule(name).weight.detach(), cfg.bits,
                                        cfg.group_size, scale_dtype=scale_dtype,
                                        clip_search=options.clip_search)
                for name, cfg in configs.items()}

    register_method(QuantMethod("plainrtn", RTNOptions, plain=True, matryoshka=False,
                                quantize_layer=plain_rtn_layer))
    recipe = Recipe({r".*\.mlp\..*": QuantConfig(4, 32, method="plainrtn"),
                     "_default": QuantConfig(4, 32)}, embeddings=None)
    with pytest.raises(ValueError, match="method 'plainrtn' needs calibration data"):
        pyengine.compress(random_model("llama"), recipe, None, show_progress=False)
    calib = _calib(rng)
    model = random_model("llama", num_hidden_layers=2)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules()
             if n.endswith(("gate_proj", "up_proj", "down_proj"))}
    pyengine.compress(model, recipe, calib, show_progress=False, dtype=torch.float32,
                      options={"plainrtn": {"clip_search": False}}, fuse=False)
    assert seen == [
        [f"model.layers.{i}.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
        for i in range(2)]
    for name, weight in dense.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.method == "rtn"
        want = pyengine.quantize(weight, 4, 32, scale_dtype=torch.float32, clip_search=False)
        assert torch.equal(layer.quantized_weight.dequantize(), want.dequantize())


def test_compress_takes_rtn_options(rng):
    """options={"rtn": RTNOptions(...)} reaches every RTN linear (the clip search off: each
    layer equals pyengine.quantize without it)."""
    model = random_model("llama", num_hidden_layers=1)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in n}
    pyengine.compress(model, Recipe({"_default": QuantConfig(3, 32)}, embeddings=None),
                      show_progress=False, dtype=torch.float32, fuse=False,
                      options={"rtn": RTNOptions(clip_search=False)})
    for name, weight in dense.items():
        want = pyengine.quantize(weight, 3, 32, scale_dtype=torch.float32, clip_search=False)
        got = model.get_submodule(name).quantized_weight
        assert torch.equal(got.dequantize(), want.dequantize()), name


def test_matquant_options_given_twice_are_refused(rng):
    recipe = Recipe({"_default": QuantConfig(8, 32, matryoshka=True, method="matquant")},
                    embeddings=None)
    with pytest.raises(ValueError, match="given twice"):
        pyengine.compress(random_model("llama"), recipe, _calib(rng), show_progress=False,
                          options={"matquant": MatQuantOptions()},
                          matquant_options={"grid": 4})


def test_replace_linear_is_the_one_swap(rng):
    """A QuantizedWeight becomes a QuantLinear (with the config's act_bits), a
    MatryoshkaWeight a MatryoshkaLinear; the linear's bias is kept, and each computes what
    its weight does."""
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(64, 24)
    bias = holder.proj.bias
    x = torch.randn(3, 64, generator=rng)
    qw = pyengine.quantize(holder.proj.weight.detach(), 4, 32)
    layer = replace_linear(holder, "proj", qw, QuantConfig(4, 32, act_bits=8))
    assert holder.proj is layer and isinstance(layer, QuantLinear) and layer.act_bits == 8
    assert torch.equal(layer.bias, bias)

    holder.proj = torch.nn.Linear(64, 24)
    parent = get_method("rtn").quantize_linear(holder.proj, QuantConfig(8, 32, matryoshka=True),
                                               RTNOptions())
    layer = replace_linear(holder, "proj", parent, QuantConfig(8, 32, matryoshka=True))
    assert isinstance(layer, MatryoshkaLinear)
    ref = torch.nn.functional.linear(x, parent.dequantize(), layer.bias)
    assert torch.allclose(layer(x), ref, rtol=1e-5, atol=1e-5)


@dataclass(frozen=True)
class _TaggedOptions(MethodOptions):
    tag: int = 0


def test_a_registered_uncalibrated_method_gets_its_own_options(registry):
    """compress hands each uncalibrated method its own options (not RTN's)."""
    got = []

    def tagged_rtn(linear, config, options, scale_dtype=None, input_weights=None):
        got.append(options)
        return pyengine.quantize(linear.weight.detach(), config.bits, config.group_size,
                                 scale_dtype=scale_dtype)

    register_method(QuantMethod("tagged", _TaggedOptions, plain=True, matryoshka=False,
                                quantize_linear=tagged_rtn))
    model = random_model("llama", num_hidden_layers=1)
    pyengine.compress(model, Recipe({"_default": QuantConfig(4, 32, method="tagged")},
                                    embeddings=None),
                      show_progress=False, options={"tagged": {"tag": 3}})
    assert len(got) == 7 and all(o == _TaggedOptions(tag=3) for o in got)


def test_the_pass_batch_size_comes_from_the_options():
    """The layer-by-layer pass runs MatQuant's batch_size windows per forward, every other
    method one."""
    assert MatQuantOptions(batch_size=3).pass_batch_size == 3
    assert RTNOptions().pass_batch_size == 1 and GPTQOptions().pass_batch_size == 1
