"""Int8 activations (act_bits=8): the reference quantizer, the CPU kernels' integer path (2, 3, 4
and 8 bits at decode sizes) and exact fallback on every instruction-set build against the reference
product on the quantized activations, every other backend through the op, the layers, the
recipe and checkpoint fields, and the errors."""

from __future__ import annotations

import itertools

import pytest
import torch

import pyengine
from pyengine import QuantConfig, Recipe, ops
from pyengine.backends import CpuBackend, PackedOperand, get_backend, reference_matmul
from pyengine.format.packing import pack_codes
from pyengine.ops.act_quant import ACT_BLOCK, quantize_activations

from helpers import (BITS, DTYPES, GROUP_SIZES, assert_matches, native_backends, poisoned,
                     random_weight)

CPU_BUILDS = [b for _, b in native_backends("cpu") if isinstance(b, CpuBackend)]


def test_quantize_activations_is_int8_per_block_of_32(rng):
    x = torch.randn(3, 100, generator=rng) * torch.rand(3, 100, generator=rng) * 5
    x[1, 32:64] = 0.0                                   # an all-zero block stays zero
    xhat = quantize_activations(x)
    assert xhat.shape == x.shape and xhat.dtype == torch.float32
    for b in range(0, 100, ACT_BLOCK):
        block, got = x[:, b:b + ACT_BLOCK], xhat[:, b:b + ACT_BLOCK]
        d = block.abs().amax(dim=1, keepdim=True) / 127
        levels = torch.where(d > 0, got / torch.where(d > 0, d, torch.ones_like(d)),
                             torch.zeros_like(got))
        assert torch.allclose(levels, levels.round(), atol=1e-3)  # on the int8 grid
        assert bool((levels.abs() <= 127.001).all())
        assert bool(((got - block).abs() <= d / 2 + 1e-7).all())  # round to nearest
    assert bool((xhat[1, 32:64] == 0).all())
    # ties go to even: 0.5 and 1.5 steps of d = 1 (a block whose max is 127)
    tie = torch.zeros(1, 32)
    tie[0, :3] = torch.tensor([127.0, 0.5, 1.5])
    assert quantize_activations(tie)[0, :3].tolist() == [127.0, 0.0, 2.0]


def _operand(qw):
    return PackedOperand(qw.qweight, qw.scales, qw.zeros, qw.bits, qw.effective_group_size)


@pytest.mark.parametrize("backend", CPU_BUILDS, ids=[b.isa for b in CPU_BUILDS])
@pytest.mark.parametrize("bits", BITS)
def test_cpu_kernels_match_the_product_on_quantized_activations(backend, bits, rng):
    """Every ISA build, bits x group x dtype, decode M (the integer path) and
    larger M (the exact kernels on the quantized activations), odd N and K, bias and the
    shortcut epilogue, into NaN-poisoned outputs."""
    for case, (group_size, dtype) in enumerate(itertools.product(GROUP_SIZES, DTYPES)):
        n, k = (45, 200) if case % 2 else (33, 576)
        qw = pyengine.quantize(random_weight(n, k, rng), bits, group_size, scale_dtype=dtype,
                               clip_search=False)
        operand = _operand(qw)
        for m in (1, 3, 8, 17):
            x = (torch.randn(m, k, generator=rng) * 2).to(dtype)
            bias = torch.randn(n, generator=rng).to(dtype) if m % 2 else None
            res = torch.randn(m, 7, generator=rng).to(dtype) if m == 3 else None
            sc = (torch.randn(7, n, generator=rng) * 0.1).to(dtype) if m == 3 else None
            out = poisoned((m, n), dtype, "cpu")
            backend.matmul(x, operand, n, k, bias, res, sc, out=out, act_bits=8)
            ref = reference_matmul(quantize_activations(x), operand, n, k, bias, res, sc)
            assert_matches(out.float(), ref, dtype,
                           f"{backend.isa} {bits}-bit g{group_size} {dtype} M={m} [{n}, {k}]")


@pytest.mark.parametrize("backend", CPU_BUILDS, ids=[b.isa for b in CPU_BUILDS])
def test_cpu_3bit_integer_path_at_step_and_row_edges(backend, rng):
    """3-bit codes on the integer path read a step of 2 (AVX2) or 4 (AVX-512) blocks of 32
    codes and a few packed words past it: K from one block to just over a step's multiple, a
    single row, and the last rows, whose last step the kernel reads from a copy."""
    for k, n, group_size in ((32, 1, 32), (96, 7, -1), (128, 17, 64), (136, 3, 32),
                             (352, 9, 128), (4000, 5, 64)):
        qw = pyengine.quantize(random_weight(n, k, rng), 3, group_size, clip_search=False)
        operand = _operand(qw)
        for m in (1, 2, 5, 8):
            x = torch.randn(m, k, generator=rng) * 3
            out = poisoned((m, n), torch.float32, "cpu")
            backend.matmul(x, operand, n, k, None, None, None, out=out, act_bits=8)
            ref = reference_matmul(quantize_activations(x), operand, n, k, None, None, None)
            assert_matches(out, ref, torch.float32, f"{backend.isa} 3-bit g{group_size} M={m} "
                                                    f"[{n}, {k}]")


@pytest.mark.parametrize("backend", CPU_BUILDS, ids=[b.isa for b in CPU_BUILDS])
@pytest.mark.parametrize("bits", BITS)
def test_cpu_integer_paths_at_extreme_codes(backend, bits, rng):
    """The integer sums at their largest: codes 0 and 2^bits - 1 side by side and activation
    blocks of +-127 (each block's max), where an int16 lane or pair sum too narrow for them
    would wrap (the portable path of the generic build sums four products per int16 lane)."""
    n, k = 24, 640
    qw = pyengine.quantize(random_weight(n, k, rng), bits, 64, clip_search=False)
    codes = qw.codes()
    codes[:, ::2] = 2 ** bits - 1
    codes[: n // 2, 1::2] = 0
    qw = pyengine.QuantizedWeight(pack_codes(codes, bits), qw.scales, qw.zeros, bits=bits,
                                  group_size=64, shape=tuple(qw.shape), method=qw.method)
    operand = _operand(qw)
    for m in (1, 4, 8):
        x = torch.where(torch.rand(m, k, generator=rng) < 0.9, 1.0, -1.0) * 5.0
        x[:, 1::2] = x[:, ::2]          # the same sign across each pair: no cancellation
        out = poisoned((m, n), torch.float32, "cpu")
        backend.matmul(x, operand, n, k, None, None, None, out=out, act_bits=8)
        ref = reference_matmul(quantize_activations(x), operand, n, k, None, None, None)
        assert_matches(out, ref, torch.float32, f"{backend.isa} {bits}-bit extremes M={m}")


def test_every_backend_serves_act_bits_through_the_op(rng):
    """Backends without an integer path get the quantized activations (fp32) and their exact
    kernels; packed and Matryoshka weights; results in x's dtype."""
    names = [b for b in pyengine.available_backends()
             if get_backend(b).unsupported_reason(
                 pyengine.backends.LinearCase("cpu", torch.float16, "packed", 4)) is None]
    assert "torch" in names
    qw = pyengine.quantize(random_weight(40, 96, rng), 4, 32, scale_dtype=torch.float16,
                           clip_search=False)
    mw = pyengine.MatryoshkaWeight.from_quantized(
        pyengine.quantize(random_weight(40, 96, rng), 8, 32, scale_dtype=torch.float16,
                          clip_search=False))
    x = torch.randn(2, 3, 96, generator=rng).to(torch.float16)
    bias = torch.randn(40, generator=rng).to(torch.float16)
    for weight, dense in ((qw, qw.dequantize(torch.float32)),
                          (mw.at(3), mw.dequantize(3, torch.float32))):
        ref = quantize_activations(x) @ dense.T + bias.float()
        for name in names:
            y = ops.qlinear(x, weight, bias, act_bits=8, backend=name)
            assert y.dtype == torch.float16 and y.shape == (2, 3, 40)
            assert_matches(y.float(), ref, torch.float16, f"{name} {type(weight).__name__}")


def test_layers_recipes_and_checkpoints_keep_act_bits(tmp_path, rng):
    from pyengine.model.random import random_model
    model = random_model("llama")
    recipe = Recipe({"_default": QuantConfig(bits=4, group_size=32, act_bits=8)})
    pyengine.compress(model, recipe, show_progress=False, dtype=torch.float32)
    layers = [m for name, m in model.named_modules()
              if isinstance(m, pyengine.QuantLinear) and name.startswith("model.layers.")]
    assert layers and all(m.act_bits == 8 for m in layers)
    assert model.lm_head.act_bits == 0  # the head: Recipe.embeddings' 8-bit weights
    ids = torch.randint(3, 160, (2, 9), generator=rng)
    with torch.no_grad():
        logits = model(ids).logits
    pyengine.save(model, tmp_path / "ck")
    loaded = pyengine.load(tmp_path / "ck")
    assert all(m.act_bits == 8 for name, m in loaded.named_modules()
               if isinstance(m, pyengine.QuantLinear) and name.startswith("model.layers."))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    # a layer's forward is the product on its quantized input
    layer = layers[0]
    x = torch.randn(4, layer.in_features, generator=rng)
    with torch.no_grad():
        want = quantize_activations(x) @ layer.dequantize(torch.float32).T
        assert_matches(layer(x), want, torch.float32, "QuantLinear act_bits=8")
    assert QuantConfig.from_dict(recipe.quant["_default"].to_dict()).act_bits == 8


def test_bad_act_bits_are_clear_errors(rng):
    qw = pyengine.quantize(random_weight(8, 64, rng), 4, 32, clip_search=False)
    x = torch.randn(2, 64)
    for bad in (4, 16, True, 8.0):
        with pytest.raises(ValueError, match="act_bits must be 0"):
            ops.qlinear(x, qw, act_bits=bad)
    with pytest.raises(ValueError, match="dense"):
        ops.qlinear(x, random_weight(8, 64, rng), act_bits=8)
    with pytest.raises(ValueError, match="act_bits"):
        QuantConfig(bits=8, matryoshka=True, act_bits=8)
    with pytest.raises(ValueError, match="act_bits"):
        QuantConfig(bits=4, act_bits=4)


def test_gradient_passes_the_rounding_straight_through(rng):
    qw = pyengine.quantize(random_weight(12, 64, rng), 4, 32, clip_search=False)
    x = torch.randn(3, 64, generator=rng, requires_grad=True)
    y = ops.qlinear(x, qw, act_bits=8)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    assert_matches(gx, torch.ones(3, 12) @ qw.dequantize(torch.float32), torch.float32,
                   "straight-through gradient")


def test_a_tied_head_on_int8_activations_shares_the_table(tmp_path, rng):
    """act_bits changes the head's product, not its storage: a tied head stored like the table
    stays the table's tensors (one copy in memory and on disk) and computes on int8
    activations, also after a save and load."""
    from pyengine.model.random import random_model
    model = random_model("llama", tie_word_embeddings=True)
    recipe = Recipe({"lm_head": QuantConfig(8, 32, act_bits=8),
                     "_default": QuantConfig(4, 32, act_bits=8)},
                    embeddings=QuantConfig(8, 32))
    pyengine.compress(model, recipe, show_progress=False, dtype=torch.float32)
    table, head = model.model.embed_tokens, model.lm_head
    assert isinstance(table, pyengine.QuantEmbedding) and head.act_bits == 8
    assert head.qweight.data_ptr() == table.qweight.data_ptr()
    ids = torch.randint(3, 160, (2, 9), generator=rng)
    with torch.no_grad():
        logits = model(ids).logits
        h = torch.randn(3, head.in_features, generator=rng)
        want = quantize_activations(h) @ head.dequantize(torch.float32).T
        assert_matches(head(h), want, torch.float32, "tied head act_bits=8")
    pyengine.save(model, tmp_path / "ck")
    loaded = pyengine.load(tmp_path / "ck")
    assert loaded.lm_head.act_bits == 8
    assert loaded.lm_head.qweight.data_ptr() == loaded.model.embed_tokens.qweight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)


def test_plan_gives_every_quantized_layer_int8_activations():
    from pyengine.model.random import random_model
    model = random_model("llama", num_hidden_layers=4)
    # avg_bits counts scales and zeros: the small random model's layers store several bits per
    # weight of them
    recipe = pyengine.plan(model, avg_bits=7.0, bit_choices=(4, 3), importance="random",
                           method="rtn", act_bits=8, show_progress=False)
    configs = [c for c in recipe.quant.values() if c is not None]
    assert {c.bits for c in configs} == {3, 4}  # the 3-bit layers too: integer path
    for c in configs:
        assert c.act_bits == 8, c
    assert recipe.info["act_bits"] == 8
