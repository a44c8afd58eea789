"""Fused projections (q/k/v, gate/up in one op): same outputs, no extra memory, fewer ops."""

import pytest
import torch

import pyengine
from pyengine import QuantConfig, Recipe
from pyengine.model.random import random_model
from pyengine.ops import linear as linear_module
from pyengine.nn.fusion import ProjectionGroup, fused_groups, fusion_blocker

from helpers import rel_err

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3"]
# the table and the head kept dense: these tests count and compare the decoder's linear ops
UNIFORM = Recipe({"_default": QuantConfig(bits=4, group_size=32)}, embeddings=None)


def _ids(rng, batch=2, length=10, vocab=160):
    return torch.randint(3, vocab, (batch, length), generator=rng)


def _count_ops(monkeypatch):
    """Counts the matmuls run by pyengine's linear op (every call, eager or through the op,
    reaches its implementation once)."""
    calls = []
    original = linear_module._execute

    def counting(x, operand, *args, **kwargs):
        calls.append(tuple(x.shape))
        return original(x, operand, *args, **kwargs)

    monkeypatch.setattr(linear_module, "_execute", counting)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_model_computes_what_the_unfused_one_does(family, rng):
    fused = random_model(family)
    unfused = random_model(family)
    unfused.load_state_dict(fused.state_dict())
    pyengine.compress(fused, UNIFORM, show_progress=False, dtype=torch.float32)
    pyengine.compress(unfused, UNIFORM, show_progress=False, fuse=False, dtype=torch.float32)
    n_layers = fused.config.num_hidden_layers
    # phi3 stores q/k/v and gate/up as one linear each already: nothing left to fuse
    assert len(fused_groups(fused)) == (0 if family == "phi3" else 2 * n_layers)
    assert not fused_groups(unfused)
    ids = _ids(rng)
    with torch.no_grad():
        got, want = fused(ids).logits, unfused(ids).logits
        ref = pyengine.dequantize_model(fused)(ids).logits
    assert rel_err(got, want) < 1e-6
    assert rel_err(got, ref) < 1e-3
    assert pyengine.storage_bytes(fused) == pyengine.storage_bytes(unfused)


def test_one_op_per_group_and_members_are_views(monkeypatch, rng):
    model = random_model("llama")
    pyengine.compress(model, UNIFORM, show_progress=False)
    attn = model.model.layers[0].self_attn
    group = attn.q_proj._fusion[0]
    assert [m for m in group.members] == [attn.q_proj, attn.k_proj, attn.v_proj]
    base = group.weight.qweight.untyped_storage().data_ptr()
    for m in group.members:  # the layers' buffers live inside the fused tensors
        assert m.qweight.untyped_storage().data_ptr() == base
        assert m.scales.untyped_storage().data_ptr() == group.weight.scales.untyped_storage().data_ptr()
    calls = _count_ops(monkeypatch)
    with torch.no_grad():
        model(_ids(rng, batch=1, length=3))
    # per layer: q/k/v, o, gate/up, down
    assert len(calls) == 4 * model.config.num_hidden_layers
    assert group._pending is None, "the group must not keep the input alive once all are served"


def test_each_member_gets_its_own_columns_whatever_the_call_order(rng):
    torch.manual_seed(0)
    linears = [torch.nn.Linear(64, n, bias=True) for n in (48, 16, 16)]
    fused = [pyengine.QuantLinear.from_linear(l, QuantConfig(4, 32)) for l in linears]
    plain = [pyengine.QuantLinear.from_linear(l, QuantConfig(4, 32)) for l in linears]
    ProjectionGroup(fused)
    x1, x2 = torch.randn(3, 64, generator=rng), torch.randn(3, 64, generator=rng)
    with torch.no_grad():
        got = [fused[0](x1), fused[0](x2), fused[2](x1), fused[1](x2), fused[2](x2), fused[1](x1)]
        want = [plain[0](x1), plain[0](x2), plain[2](x1), plain[1](x2), plain[2](x2), plain[1](x1)]
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.equal(g, w)


def test_an_input_changed_in_place_is_recomputed(rng):
    linears = [torch.nn.Linear(64, 32, bias=False) for _ in range(2)]
    fused = [pyengine.QuantLinear.from_linear(l, QuantConfig(8, 32)) for l in linears]
    plain = [pyengine.QuantLinear.from_linear(l, QuantConfig(8, 32)) for l in linears]
    ProjectionGroup(fused)
    x = torch.randn(2, 64, generator=rng)
    with torch.no_grad():
        fused[0](x)
        x.mul_(-3.0)  # same tensor object, new values
        assert torch.equal(fused[1](x), plain[1](x))


def test_dtype_and_device_moves_rebind_the_group(rng):
    model = random_model("qwen2")  # q/k/v with biases
    pyengine.compress(model, UNIFORM, show_progress=False)
    reference = pyengine.dequantize_model(model).to(torch.bfloat16)
    model.to(torch.bfloat16)
    group = model.model.layers[1].mlp.gate_proj._fusion[0]
    assert group.weight is None, "moving the buffers must drop the stale fused copy"
    ids = _ids(rng)
    with torch.no_grad():
        got = model(ids).logits
        want = reference(ids).logits
    assert rel_err(got.float(), want.float()) < 2e-2
    assert group.weight is not None and group.weight.scales.dtype == torch.bfloat16
    for m in group.members:
        assert m.scales.untyped_storage().data_ptr() == group.weight.scales.untyped_storage().data_ptr()


def test_mixed_formats_are_not_fused():
    model = random_model("llama")
    recipe = Recipe({
        r".*\.self_attn\.v_proj": QuantConfig(bits=8, group_size=32),
        r".*\.mlp\.up_proj": None,  # dense
        "_default": QuantConfig(bits=4, group_size=32),
    })
    pyengine.compress(model, recipe, show_progress=False)
    assert fused_groups(model) == []
    attn = model.model.layers[0].self_attn
    assert "bits differs" in fusion_blocker([attn.q_proj, attn.k_proj, attn.v_proj])
    mlp = model.model.layers[0].mlp
    assert "plain QuantLinear" in fusion_blocker([mlp.gate_proj, mlp.up_proj])
    with pytest.raises(ValueError, match="cannot fuse"):
        ProjectionGroup([attn.q_proj, attn.v_proj])


def test_fused_checkpoint_round_trip(tmp_path, rng):
    model = random_model("llama", tie_word_embeddings=True)
    pyengine.compress(model, UNIFORM, show_progress=False)
    assert fused_groups(model)
    pyengine.save(model, tmp_path / "fused")
    loaded = pyengine.load(tmp_path / "fused")
    assert len(fused_groups(loaded)) == len(fused_groups(model))
    ids = _ids(rng)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # each layer's rows were saved under its own name, at its own size
    from safetensors import safe_open
    with safe_open(str(tmp_path / "fused" / "model.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.qweight")
    assert torch.equal(q, model.model.layers[0].self_attn.q_proj.qweight)
    # tied embeddings come back as one Parameter, so the byte accounting agrees
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert pyengine.predicted_bytes(loaded) == pyengine.predicted_bytes(model)
    assert pyengine.storage_bytes(loaded) == pyengine.storage_bytes(model)


def test_compiled_forward_runs_each_member_once(monkeypatch, rng):
    """Under torch.compile the members run their own ops on their row views: one op per
    layer, never the fused op once per member."""
    from pyengine.backends.cpu import CpuBackend
    from pyengine.backends.torch_ref import TorchBackend
    model = random_model("llama")
    pyengine.compress(model, UNIFORM, show_progress=False)
    ids = _ids(rng, batch=1, length=4)
    with torch.no_grad():
        want = model(ids).logits
    shapes = []
    for backend in (CpuBackend, TorchBackend):
        original = backend.matmul

        def counting(self, x, weight, n, k, *args, _original=original, **kwargs):
            shapes.append((n, k))
            return _original(self, x, weight, n, k, *args, **kwargs)
        monkeypatch.setattr(backend, "matmul", counting)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        compiled(ids)  # compiles
        shapes.clear()
        got = compiled(ids).logits
    assert rel_err(got, want) < 1e-6
    cfg = model.config
    assert len(shapes) == 7 * cfg.num_hidden_layers, shapes
    assert max(n for n, _ in shapes) == cfg.intermediate_size, "no fused (wider) op may run"


def test_inference_mode_inputs(rng):
    linears = [torch.nn.Linear(64, 32, bias=False) for _ in range(3)]
    fused = [pyengine.QuantLinear.from_linear(l, QuantConfig(4, 32)) for l in linears]
    plain = [pyengine.QuantLinear.from_linear(l, QuantConfig(4, 32)) for l in linears]
    ProjectionGroup(fused)
    with torch.inference_mode():
        x = torch.randn(2, 64, generator=rng)
        for f, p in zip(fused, plain):
            assert torch.equal(f(x), p(x))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])  # phi3's are fused modules
def test_load_reads_each_group_into_its_fused_buffer(family, tmp_path, rng, monkeypatch):
    """pyengine.load reads a fused group's members back to back into one buffer per tensor:
    fusing then copies nothing, and the model computes what the saved one did."""
    model = random_model(family)
    pyengine.compress(model, UNIFORM, show_progress=False)
    pyengine.save(model, tmp_path / "ckpt")
    cat_calls = []
    original_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: cat_calls.append(1) or original_cat(*a, **k))
    loaded = pyengine.load(tmp_path / "ckpt")
    monkeypatch.setattr(torch, "cat", original_cat)
    groups = fused_groups(loaded)
    assert groups and len(groups) == len(fused_groups(model))
    assert not cat_calls  # every group was bound on the buffers it was read into
    for group in groups:
        start = group.weight.qweight.data_ptr()
        for member, offset in zip(group.members, group.offsets):
            row_bytes = member.qweight.shape[1] * member.qweight.element_size()
            assert member.qweight.data_ptr() == start + offset * row_bytes
            assert member.scales.untyped_storage().data_ptr() == \
                group.weight.scales.untyped_storage().data_ptr()
    ids = _ids(rng)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    unfused = pyengine.load(tmp_path / "ckpt", fuse=False)
    assert not fused_groups(unfused)
    with torch.no_grad():
        assert torch.equal(unfused(ids).logits, model(ids).logits)


def test_concatenated_copies_only_parts_that_are_not_back_to_back():
    from pyengine.nn.fusion import _concatenated
    whole = torch.arange(60, dtype=torch.int32).reshape(10, 6)
    parts = [whole[0:3], whole[3:4], whole[4:10]]
    joined = _concatenated(parts)
    assert joined.data_ptr() == whole.data_ptr() and torch.equal(joined, whole)
    for shuffled in ([whole[3:4], whole[0:3], whole[4:10]],     # out of order
                     [whole[0:3], whole[4:10]],                 # a gap
                     [whole[0:3], whole[3:4].clone()]):         # another storage
        got = _concatenated(shuffled)
        assert torch.equal(got, torch.cat(shuffled))
        assert got.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr()
