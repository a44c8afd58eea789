"""The seeds' algorithms: scores, bit allocation, dynamic slicing widths, GPTQ, PCA slicing."""

import pytest
import torch

import pyengine
from pyengine import QuantConfig, Recipe
from pyengine.pipeline.calibrate import LayerwiseRunner
from pyengine.model.random import random_model
from pyengine.pipeline.plan import allocate_bits, kept_widths, slice_fractions
from pyengine.quant.gptq import gptq_quantize
from pyengine.pipeline.scores import importance, zd_scores
from pyengine.slicing.pca import slice_model

from helpers import rel_err


def _calib(rng, n=6, seqlen=24):
    return torch.randint(3, 160, (n, seqlen), generator=rng)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---- scores ----------------------------------------------------------------------------------------

def test_an_identity_layer_is_the_least_important_and_most_redundant(rng):
    model = random_model("llama", num_hidden_layers=4)
    with torch.no_grad():  # layer 2 adds nothing to its input: output == input
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    s = pyengine.scores(model, _calib(rng), show_progress=False)
    assert set(s) == {"lim", "zd", "lr"} and all(len(v) == 4 for v in s.values())
    assert s["lr"][2] == pytest.approx(1.0, abs=1e-5) and s["lim"][2] == pytest.approx(-1.0, abs=1e-5)
    assert min(range(4), key=lambda i: s["lim"][i]) == 2
    assert max(range(4), key=lambda i: s["lr"][i]) == 2
    assert all(0.0 < z < 1.0 for z in s["zd"])


def test_zd_counts_weights_beyond_one_standard_deviation():
    model = random_model("llama", num_hidden_layers=2)
    with torch.no_grad():
        for p in model.model.layers[1].parameters():
            if p.dim() == 2:
                # 10% of entries at +-3, the rest at +-0.5, signs alternating so the mean is ~0:
                # sigma = sqrt(0.1*9 + 0.9*0.25) ~ 1.06, so exactly the +-3 entries have |z| > 1.
                flat = torch.full((p.numel(),), 0.5)
                flat[::10] = 3.0
                flat[1::2] *= -1
                p.copy_(flat.reshape(p.shape))
    zd = zd_scores(model)
    assert zd[1] == pytest.approx(0.1, abs=1e-3)
    assert 0.2 < zd[0] < 0.45  # gaussian-like weights: ~32% beyond one sigma


def test_importance_kinds():
    scores = {"lim": [0.1, 0.5, 0.3], "zd": [0.3, 0.2, 0.4], "lr": [-0.1, -0.5, -0.3]}
    assert importance("lim", scores, 3) == [0.1, 0.5, 0.3]
    assert importance("zd", scores, 3) == [-0.3, -0.2, -0.4]  # fewer outliers: more important
    assert sorted(importance("random", None, 5, seed=1)) == [0, 1, 2, 3, 4]
    assert importance("random", None, 5, seed=1) == importance("random", None, 5, seed=1)
    assert importance([3, 2, 1], None, 3) == [3.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="importance"):
        importance("loudest", scores, 3)
    with pytest.raises(ValueError, match="3 layers"):
        importance([1, 2], None, 3)


# ---- bit allocation -------------------------------------------------------------------------------

def _equal_layers(overhead=0.25):
    return lambda i, bits: ((bits + overhead) * 1000, 1000)


@pytest.mark.parametrize("target", [4.25, 3.75, 3.25, 2.75, 2.25])
def test_allocation_hits_the_average_and_demotes_the_least_important(target):
    imp = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4]
    bits, achieved = allocate_bits(imp, _equal_layers(), (4, 2), target)
    assert abs(achieved - target) <= 0.125 + 1e-9  # half of one layer's step (2 bits / 8 layers)
    low = [i for i, b in enumerate(bits) if b == 2]
    high = [i for i, b in enumerate(bits) if b == 4]
    assert not low or not high or max(imp[i] for i in low) < min(imp[i] for i in high)


def test_allocation_with_three_choices_and_out_of_reach_targets():
    imp = list(range(6))
    bits, achieved = allocate_bits(imp, _equal_layers(0.0), (8, 4, 2), 4.0)
    assert achieved == pytest.approx(4.0) and bits == [4] * 6
    bits, achieved = allocate_bits(imp, _equal_layers(0.0), (2, 8, 4), 6.0)
    assert achieved == pytest.approx(6.0) and bits[:3] == [4, 4, 4] and bits[3:] == [8, 8, 8]
    with pytest.raises(ValueError, match="out of reach"):
        allocate_bits(imp, _equal_layers(0.0), (4, 2), 1.0)


# ---- slicing widths --------------------------------------------------------------------------------

def test_dynamic_slicing_keeps_the_mean_and_slices_redundant_layers_more():
    lr = [0.80, 0.95, 0.60, 0.90, 0.70, 0.99]
    for base in (None, 0.0, 0.1, 0.25):
        s = slice_fractions(lr, 0.25, "dynamic", base)
        assert sum(s) / len(s) == pytest.approx(0.25, abs=1e-12)
        assert min(s) == pytest.approx(0.125 if base is None else base)
        order = sorted(range(6), key=lambda i: lr[i])
        assert [s[i] for i in order] == sorted(s)
    assert slice_fractions(lr, 0.25, "constant") == [0.25] * 6
    with pytest.raises(ValueError, match="slice_base"):
        slice_fractions(lr, 0.25, "dynamic", 0.3)
    with pytest.raises(ValueError, match="slice_schedule"):
        slice_fractions(lr, 0.25, "zigzag")


def test_extreme_fractions_are_clamped_and_respread():
    s = slice_fractions([0.0] * 9 + [1.0], 0.5, "dynamic", 0.45)
    assert max(s) <= 0.9 + 1e-12 and sum(s) / 10 == pytest.approx(0.5)


def test_kept_widths_are_multiples_of_32_with_the_total_kept():
    fractions = slice_fractions([0.8, 0.95, 0.6, 0.9, 0.7, 0.99, 0.85, 0.75], 0.25)
    widths = kept_widths(fractions, 576)
    assert all(w % 32 == 0 and 32 <= w <= 576 for w in widths)
    assert sum(widths) == 8 * 432  # 25% of 576 removed on average, exactly
    assert kept_widths([0.0, 0.0], 576) == [576, 576]


# ---- plan ---------------------------------------------------------------------------------------------

def test_plan_builds_a_json_recipe_with_what_it_measured(rng):
    model = random_model("llama", num_hidden_layers=6, hidden_size=128, intermediate_size=256)
    recipe = pyengine.plan(model, _calib(rng), avg_bits=6.5, bit_choices=(8, 4), importance="lim",
                           method="rtn", group_size=64, slicing=0.25, show_progress=False)
    info = recipe.info
    # fp32 scales and zeros per group of 64 add 1 bit: int4 costs 5.0 bits/weight, int8 9.0
    assert abs(info["achieved_avg_bits"] - 6.5) < 0.7
    assert sorted(info["layer_bits"]).count(4) >= 1 and 8 in info["layer_bits"]
    assert len(recipe.slicing) == 6 and sum(recipe.slicing) == 6 * 96
    back = Recipe.from_json(recipe.to_json())
    assert back == recipe and back.info["layer_bits"] == info["layer_bits"]
    for i, bits in enumerate(info["layer_bits"]):
        assert recipe.config_for(f"model.layers.{i}.mlp.up_proj").bits == bits


# ---- GPTQ ---------------------------------------------------------------------------------------------

def test_gptq_beats_rtn_on_the_model_s_own_activations(rng):
    model = random_model("llama", num_hidden_layers=2, hidden_size=128, intermediate_size=256)
    runner = LayerwiseRunner(model, _calib(rng, n=16, seqlen=128))  # 1024 tokens to fit
    captured = []
    for index, layer, inputs in runner:
        if index == 1:
            handle = layer.mlp.up_proj.register_forward_hook(
                lambda m, a, o: captured.append(a[0].reshape(-1, a[0].shape[-1])))
            runner.advance()
            handle.remove()
        else:
            runner.advance()
    x = torch.cat(captured)
    w = model.model.layers[1].mlp.up_proj.weight.detach()
    half = x.shape[0] // 2
    fit, held_out = x[:half], x[half:]
    for bits in (4, 3, 2):
        g = gptq_quantize(w, fit.T @ fit, bits, 64).dequantize()
        r = pyengine.quantize(w, bits, 64).dequantize()
        for xs in (fit, held_out):
            assert rel_err(xs @ g.T, xs @ w.T) < rel_err(xs @ r.T, xs @ w.T)


def test_gptq_act_order_and_symmetric_store_the_canonical_layout(rng):
    w = torch.randn(48, 200, generator=rng) * 0.05
    x = torch.randn(512, 200, generator=rng)
    for sym in (False, True):
        qw = gptq_quantize(w, x.T @ x, 3, 32, symmetric=sym, act_order=True)
        assert qw.method == "gptq" and qw.symmetric == sym and qw.shape == (48, 200)
        y = pyengine.ops.dequant_matmul(x, qw)
        assert rel_err(y, x @ qw.dequantize().T) < 1e-4


def test_gptq_clips_by_output_error(rng):
    """Group parameters are judged by what their rounding costs the output: the clip search
    takes, per group, the candidate with the least weighted error; and in GPTQ an input the
    calibration activations hardly use no longer sets its group's range, so the other columns
    keep finer steps than a plain clip search gives them."""
    from pyengine.quant.rtn import _rtn_groups, _scale_zero
    from pyengine.quant.gptq import CLIP_FACTORS
    w = torch.randn(16, 2, 32, generator=rng)
    cost = torch.rand(1, 2, 32, generator=rng) ** 4

    def weighted_error(scale, zero):
        q = torch.clamp(torch.round(w / scale[..., None] + zero[..., None]), 0, 7)
        return (((q - zero[..., None]) * scale[..., None] - w) ** 2 * cost).sum(-1)
    lo = w.amin(-1).clamp(max=0.0)
    hi = w.amax(-1).clamp(min=0.0)
    best = torch.stack([weighted_error(*_scale_zero(lo * p, hi * p, 7, False, torch.float32,
                                                    1e-30)) for p in CLIP_FACTORS]).amin(0)
    # the clip search alone takes the best candidate
    _, scales, zeros = _rtn_groups(w, 64, 3, False, torch.float32, CLIP_FACTORS, cost,
                                   refit_rounds=0)
    assert torch.allclose(weighted_error(scales, zeros), best, rtol=1e-5)
    # the least-squares refit never loses to it, and wins in most groups
    codes, scales, zeros = _rtn_groups(w, 64, 3, False, torch.float32, CLIP_FACTORS, cost)
    refit = weighted_error(scales, zeros)
    assert (refit <= best * (1 + 1e-6)).all()
    assert (refit < best * 0.999).float().mean() > 0.5
    assert torch.equal(codes.float(), torch.clamp(torch.round(w / scales[..., None]
                                                              + zeros[..., None]), 0, 7))
    # GPTQ: input 0 carries 1000x less signal; its weights are large
    w2 = torch.randn(32, 128, generator=rng) * 0.05
    w2[:, 0] = 2.0
    x = torch.randn(400, 128, generator=rng)
    x[:, 0] *= 1e-3
    qw = gptq_quantize(w2, x.T @ x, 3, 64)
    plain = pyengine.quantize(w2, 3, 64)
    assert (qw.scales[:, 0] / plain.scales[:, 0]).median() < 0.6


def test_compress_weighs_rtn_by_the_calibration_inputs(rng, monkeypatch):
    """With calibration data, compress gives each decoder-layer RTN linear the mean square of
    its inputs (layer 0's, measured here on the dense model, must match); the head stays
    unweighed; without calibration data nothing is weighed."""
    from pyengine.quant import rtn as rtn_module
    calib = _calib(rng)
    recipe = Recipe({"_default": QuantConfig(3, 32), "lm_head": QuantConfig(8, 32)},
                    embeddings=None)
    for calibration in (calib, None):
        model = random_model("llama")
        names = {m.weight.data_ptr(): n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear)}
        first = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
        squares = {n: 0 for n in first}
        hooks = [model.get_submodule(n).register_forward_hook(
            lambda mod, args, out, n=n: squares.__setitem__(
                n, squares[n] + args[0].reshape(-1, args[0].shape[-1]).square().sum(0)))
            for n in first]
        _logits(model, calib)
        for hook in hooks:
            hook.remove()
        seen = {}
        original = rtn_module.quantize

        def spy(weight, *args, input_weights=None, **kwargs):  # RTN of one linear's weight
            seen[names[weight.data_ptr()]] = input_weights
            return original(weight, *args, input_weights=input_weights, **kwargs)
        monkeypatch.setattr(rtn_module, "quantize", spy)
        pyengine.compress(model, recipe, calibration, show_progress=False, dtype=torch.float32)
        monkeypatch.undo()
        # every decoder linear (7 per layer), and the head
        assert len(seen) == 7 * model.config.num_hidden_layers + 1
        assert seen["lm_head"] is None
        layer_linears = [n for n in seen if n != "lm_head"]
        if calibration is None:
            assert all(seen[n] is None for n in layer_linears)
            continue
        assert all(seen[n] is not None and seen[n].shape == (model.get_submodule(n).in_features,)
                   for n in layer_linears)
        tokens = calib.numel()
        for n in first:
            assert torch.allclose(seen[n], squares[n] / tokens, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_refit_solves_the_output_least_squares(symmetric, rng):
    """refit_group_params: for fixed codes, each row's scales and zeros reach the minimum of
    (w - w_q) H (w - w_q)^T (checked against a dense least-squares solve of the same problem),
    with K not a multiple of the group and a dead input."""
    from pyengine.quant.gptq import hessian_for_refit, refit_group_params
    n, k, gs, bits = 12, 80, 32, 3
    x = torch.randn(300, k, generator=rng) * (torch.rand(k, generator=rng) + 0.2)
    x[:, 7] = 0.0  # dead input
    hessian = x.T @ x
    dead = torch.diag(hessian) == 0
    w = torch.randn(n, k, generator=rng) * 0.05
    qw = gptq_quantize(w, hessian, bits, gs, symmetric, refit=False, scale_dtype=torch.float32)
    codes = pyengine.format.packing.unpack_codes(qw.qweight, bits)[:, :k].float()
    groups = qw.scales.shape[1]
    zeros = (torch.full_like(qw.scales, 2.0 ** (bits - 1)) if symmetric else qw.zeros).float()
    h = hessian_for_refit(hessian, dead, 0.01)
    scales, new_zeros = refit_group_params(w, codes, qw.scales.float(), zeros, h, gs, symmetric,
                                           torch.float32)

    def loss(s, z):
        deq = (codes - z.repeat_interleave(gs, 1)[:, :k]) * s.repeat_interleave(gs, 1)[:, :k]
        e = (w - deq).double()
        return ((e @ h.double()) * e).sum(1)
    # the optimum, row by row: least squares in the H-norm over (s_g, b_g) (symmetric: s_g)
    chol = torch.linalg.cholesky(h.double()).T  # h = chol^T chol
    group_of = torch.arange(k) // gs
    best = []
    for row in range(n):
        one_hot = torch.nn.functional.one_hot(group_of, groups).double()  # [k, G]
        q = codes[row].double()
        columns = ([(q - zeros[row, 0].double()).unsqueeze(1) * one_hot] if symmetric
                   else [q.unsqueeze(1) * one_hot, one_hot])
        a = torch.cat(columns, dim=1)
        theta = torch.linalg.lstsq(chol @ a, chol @ w[row].double().unsqueeze(1)).solution
        e = w[row].double() - (a @ theta).squeeze(1)
        best.append(e @ h.double() @ e)
    best = torch.stack(best)
    before, after = loss(qw.scales.float(), zeros), loss(scales, new_zeros)
    assert (after <= before * (1 + 1e-6)).all()
    assert torch.allclose(after, best, rtol=1e-3)
    assert (after < before * 0.999).any()


def test_gptq_damping_comes_from_the_quant_config(rng):
    model_a, model_b = random_model("llama"), random_model("llama")
    calib = _calib(rng)
    for model, damp in ((model_a, 0.01), (model_b, 0.5)):
        recipe = Recipe({"_default": QuantConfig(3, 32, method="gptq", damp=damp)},
                        embeddings=None)
        pyengine.compress(model, recipe, calib, show_progress=False, dtype=torch.float32)
    codes_a = model_a.model.layers[0].mlp.up_proj.qweight
    codes_b = model_b.model.layers[0].mlp.up_proj.qweight
    assert not torch.equal(codes_a, codes_b)
    assert QuantConfig.from_dict(QuantConfig(4, damp=0.1).to_dict()).damp == 0.1
    for bad in (0, -0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="QuantConfig.damp must be a number in"):
            QuantConfig(4, damp=bad)


def test_compress_with_gptq_recipe(rng):
    model = random_model("qwen2")
    recipe = Recipe({"_default": QuantConfig(4, 32, method="gptq"),
                     r".*down_proj": QuantConfig(3, 32, method="gptq", act_order=True)},
                    embeddings=None)  # the GPTQ layers alone, in float32 (compared at 1e-3)
    pyengine.compress(model, recipe, _calib(rng), show_progress=False, dtype=torch.float32)
    assert all(m.method == "gptq" for m in model.modules() if isinstance(m, pyengine.QuantLinear))
    ids = _calib(rng, n=1, seqlen=8)
    assert rel_err(_logits(model, ids), _logits(pyengine.dequantize_model(model), ids)) < 1e-3


# ---- PCA slicing ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_pca_rotation_without_slicing_keeps_the_logits(family, rng):
    model = random_model(family)
    ids = _calib(rng, n=2, seqlen=10)
    before = _logits(model, ids)
    slice_model(model, [model.config.hidden_size] * 3, _calib(rng), show_progress=False)
    assert rel_err(_logits(model, ids), before) < 1e-5


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_pca_slicing_then_quantization_through_compress(method, rng, tmp_path):
    # widths that differ between layers: every block output projection runs fused with a
    # shortcut (GPTQ must still see its inputs)
    model = random_model("llama", num_hidden_layers=4)
    widths = [64, 32, 64, 32]
    recipe = Recipe({"_default": QuantConfig(4, 32, method=method)}, slicing=widths,
                    embeddings=None)
    # float32 (not the float16 default): the kernels are compared at 1e-3
    pyengine.compress(model, recipe, _calib(rng), show_progress=False, dtype=torch.float32)
    from pyengine.slicing.structure import layer_widths
    assert layer_widths(model) == widths
    assert all(m.method == method for m in model.modules() if isinstance(m, pyengine.QuantLinear))
    ids = _calib(rng, n=1, seqlen=8)
    assert rel_err(_logits(model, ids), _logits(pyengine.dequantize_model(model), ids)) < 1e-3
    pyengine.save(model, tmp_path)
    assert torch.equal(_logits(pyengine.load(tmp_path), ids), _logits(model, ids))


def test_pca_captures_a_low_rank_stream_exactly(rng):
    # With the residual stream confined to a 32-dim subspace, keeping 32 principal directions
    # loses nothing at the embeddings.
    model = random_model("llama", num_hidden_layers=1)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(64, 32, generator=rng))
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ q @ q.T)
    from pyengine.pipeline.calibrate import capture_first_layer_inputs
    from pyengine.slicing.pca import principal_basis
    x = capture_first_layer_inputs(model, _calib(rng)).hidden
    basis = principal_basis(x)[:, :32]
    flat = torch.cat([h.reshape(-1, 64) for h in x]).to(torch.float64)
    assert rel_err(flat @ basis @ basis.T, flat) < 1e-6
