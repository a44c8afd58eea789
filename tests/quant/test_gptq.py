"""GPTQ's machinery: the column loop in pyengine._C (csrc/cpu/quant_ops.h), every instruction-set
build against the same steps written as torch calls and gptq_quantize with it against
gptq_quantize without it; the input Hessians of a layer's linears; the clip search's errors
(RTN's and GPTQ's groups) in pyengine._C against torch's."""

import pytest
import torch

import pyengine
from pyengine._ext import extension
import pyengine.quant.gptq as gptq
from pyengine.format.packing import unpack_codes

ISAS = pyengine.build_info().get("cpu_isas_usable", [])
needs_native = pytest.mark.skipif(not ISAS or not hasattr(extension(), "gptq_columns_cpu"),
                                  reason="pyengine._C has no CPU GPTQ loop")


def _block(rng, rows, n, groups):
    """A random block as gptq_quantize hands it over: w [rows, n], an upper-triangular factor
    [rows, rows] with a positive diagonal, group scales and zeros [groups, n]."""
    w = torch.randn(rows, n, generator=rng)
    h_inv = torch.triu(torch.randn(rows, rows, generator=rng) * 0.1)
    h_inv.diagonal().copy_(torch.rand(rows, generator=rng) + 0.5)
    scales = torch.rand(groups, n, generator=rng) * 0.3 + 0.05
    zeros = torch.rand(groups, n, generator=rng) * 7
    return w, h_inv, scales, zeros


def _run(w, h_inv, scales, zeros, code_row, group, start, stop, maxq, kp, isa, threads=2):
    """(w after the steps, err rows [start, stop), codes [kp, n]) from the native loop; err and
    codes are poisoned first."""
    rows, n = w.shape
    w = w.clone()
    err = torch.full_like(w, float("nan"))
    codes = torch.full((kp, n), 0xAB, dtype=torch.uint8)
    extension().gptq_columns_cpu(w.data_ptr(), n, h_inv.data_ptr(), rows, err.data_ptr(), n,
                                 codes.data_ptr(), n, code_row.data_ptr(), scales.data_ptr(),
                                 zeros.data_ptr(), n, group.data_ptr(), start, stop, rows, n,
                                 maxq, threads, isa)
    return w, err[start:stop], codes


def _reference(w, h_inv, scales, zeros, code_row, group, start, stop, maxq, kp):
    """The same steps as torch calls, in float64 (the kernel's fp32 rounding is then the only
    difference)."""
    w, h_inv = w.double().clone(), h_inv.double()
    scales, zeros = scales.double(), zeros.double()
    codes = torch.full((kp, w.shape[1]), 0xAB, dtype=torch.uint8)
    errs = []
    for i in range(start, stop):
        s, z = scales[group[i]], zeros[group[i]]
        q = torch.clamp(torch.round(w[i] / s + z), 0, maxq)
        codes[code_row[i]] = q.to(torch.uint8)
        e = (w[i] - (q - z) * s) / h_inv[i, i]
        w[i + 1:] -= h_inv[i, i + 1:, None] * e
        errs.append(e)
    return w, torch.stack(errs), codes


@needs_native
@pytest.mark.parametrize("rows,n,start,stop,maxq", [(128, 300, 0, 64, 15), (37, 129, 5, 37, 7),
                                                    (64, 1, 0, 64, 3), (17, 257, 16, 17, 255)])
def test_every_build_gives_the_same_bits_and_matches_the_steps(rng, rows, n, start, stop, maxq):
    kp = rows + 11
    w, h_inv, scales, zeros = _block(rng, rows, n, groups=3)
    code_row = torch.randperm(kp, generator=rng)[:rows].contiguous()   # columns in any order
    group = torch.randint(0, 3, (rows,), generator=rng)
    results = {isa: _run(w, h_inv, scales, zeros, code_row, group, start, stop, maxq, kp, isa)
               for isa in ISAS}
    first = results[ISAS[0]]
    for isa in ISAS[1:]:  # contraction is off: every build rounds alike
        assert all(torch.equal(a, b) for a, b in zip(results[isa], first)), isa
    w_out, err, codes = first
    # only the segment's code rows are written
    untouched = torch.ones(kp, dtype=torch.bool)
    untouched[code_row[start:stop]] = False
    assert bool((codes[untouched] == 0xAB).all())
    assert bool(torch.isfinite(err).all())
    ref_w, ref_err, ref_codes = _reference(w, h_inv, scales, zeros, code_row, group, start,
                                           stop, maxq, kp)
    # a code differs only where fp32 and fp64 round a value sitting on a half step apart
    written = code_row[start:stop]
    assert (codes[written] != ref_codes[written]).float().mean() <= 1e-3
    same = (codes[written] == ref_codes[written]).all(dim=0)  # output rows with no such flip
    assert bool(same.any())
    torch.testing.assert_close(err[:, same].double(), ref_err[:, same], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w_out[:, same].double(), ref_w[:, same], rtol=1e-4, atol=1e-4)
    # rows before `start` are left as they were
    assert torch.equal(w_out[:start], w[:start])


@needs_native
def test_bad_arguments_are_refused():
    w, h_inv, scales, zeros = _block(torch.Generator().manual_seed(0), 8, 16, 1)
    code_row = torch.arange(8)
    group = torch.zeros(8, dtype=torch.int64)
    with pytest.raises(ValueError, match="maxq"):
        _run(w, h_inv, scales, zeros, code_row, group, 0, 8, 0, 8, "")
    with pytest.raises(ValueError, match="bad sizes"):
        _run(w, h_inv, scales, zeros, code_row, group, 5, 3, 15, 8, "")
    with pytest.raises(ValueError, match="instruction set"):
        _run(w, h_inv, scales, zeros, code_row, group, 0, 8, 15, 8, "sse9")


def _output_error(w, qw, h):
    e = w - qw.dequantize()
    return float(((e @ h) * e).sum())


@needs_native
@pytest.mark.parametrize("n,k,bits,group_size,symmetric,act_order", [
    (129, 200, 4, 32, False, True), (300, 577, 4, 64, False, False), (64, 384, 3, 128, True, True),
    (17, 100, 8, -1, False, False), (200, 256, 2, 64, False, False)])
def test_gptq_with_the_native_loop_matches_the_torch_loop(rng, monkeypatch, n, k, bits,
                                                          group_size, symmetric, act_order):
    w = torch.randn(n, k, generator=rng) * torch.rand(n, 1, generator=rng)
    mixing = torch.eye(k) + 0.3 * torch.randn(k, k, generator=rng) / k ** 0.5
    x = torch.randn(3 * k, k, generator=rng) @ mixing  # correlated inputs
    h = x.T @ x
    native = gptq.gptq_quantize(w, h, bits, group_size, symmetric, act_order=act_order)
    monkeypatch.setattr(gptq, "_native_columns", lambda wt: None)
    torch_loop = gptq.gptq_quantize(w, h, bits, group_size, symmetric, act_order=act_order)
    codes_native = unpack_codes(native.qweight, bits, k)
    codes_torch = unpack_codes(torch_loop.qweight, bits, k)
    assert (codes_native != codes_torch).float().mean() <= 1e-3
    assert _output_error(w, native, h) == pytest.approx(_output_error(w, torch_loop, h), rel=1e-3)


def test_input_hessians_stop_once_every_input_is_read(rng):
    """Each Hessian is the sum of x^T x over the inputs the layer's linears read, q/k/v share
    one tensor, and a batch stops before the last linear runs (its output is not needed)."""
    from pyengine.model.random import random_model
    from pyengine.pipeline.calibrate import capture_first_layer_inputs, run_layer
    from pyengine.quant.layerwise import input_hessians
    model = random_model("llama", num_hidden_layers=1)
    layer = model.model.layers[0]
    inputs = capture_first_layer_inputs(model, torch.randint(3, 100, (3, 9), generator=rng))
    modules = {"q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj,
               "o": layer.self_attn.o_proj, "down": layer.mlp.down_proj}
    read = {key: [] for key in modules}
    ran = []
    handles = [m.register_forward_hook(
        lambda mod, args, out, key=key: read[key].append(args[0].reshape(-1, args[0].shape[-1])))
        for key, m in modules.items()]
    try:
        run_layer(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()
    names = {key: f"model.layers.0.{'self_attn' if key in 'qko' else 'mlp'}.{key}_proj"
             for key in modules}
    handle = layer.mlp.down_proj.register_forward_hook(lambda *a: ran.append(1))
    try:
        hessians, counts = input_hessians(model, layer, inputs, list(names.values()), None)
    finally:
        handle.remove()
    assert not ran  # the last linear never ran
    for key, name in names.items():
        x = torch.cat(read[key])
        assert counts[name] == x.shape[0] == 27
        torch.testing.assert_close(hessians[name], x.T @ x, rtol=1e-5, atol=1e-4)
    assert hessians[names["q"]] is hessians[names["k"]]  # one product for one input


# ---- the clip search's errors (RTN and GPTQ's groups) -------------------------------------------

needs_clip_native = pytest.mark.skipif(not ISAS or not hasattr(extension(), "clip_errors_cpu"),
                                       reason="pyengine._C has no CPU clip search")


@needs_clip_native
@pytest.mark.parametrize("isa", ISAS or ["none"])
@pytest.mark.parametrize("candidates,rows,groups,group_size,maxq", [
    (24, 33, 3, 64, 15), (5, 1, 1, 128, 7), (2, 17, 9, 32, 3), (1, 4, 2, 577, 255)])
def test_clip_errors_match_the_torch_steps(rng, isa, candidates, rows, groups, group_size, maxq):
    w = torch.randn(rows, groups, group_size, generator=rng)
    cost = torch.rand(groups, group_size, generator=rng)
    cost[0, :3] = 0.0                                   # padding columns weigh nothing
    scales = torch.rand(candidates, rows, groups, generator=rng) * 0.5 + 1e-3
    zeros = torch.rand(candidates, rows, groups, generator=rng) * maxq
    err = torch.full((candidates, rows, groups), float("nan"))
    extension().clip_errors_cpu(w.data_ptr(), cost.data_ptr(), scales.data_ptr(),
                                zeros.data_ptr(), err.data_ptr(), candidates, rows, groups,
                                group_size, maxq, 2, isa)
    s, z = scales.unsqueeze(-1), zeros.unsqueeze(-1)
    q = torch.clamp(torch.round(w / s + z), 0, maxq)
    expected = ((((q - z) * s - w) ** 2) * cost).sum(dim=-1)
    torch.testing.assert_close(err, expected, rtol=1e-5, atol=1e-6)


@needs_clip_native
def test_clip_errors_refuse_bad_arguments():
    t = torch.ones(4)
    with pytest.raises(ValueError, match="maxq"):
        extension().clip_errors_cpu(t.data_ptr(), t.data_ptr(), t.data_ptr(), t.data_ptr(),
                                    t.data_ptr(), 1, 1, 1, 4, 0, 1, "")
    with pytest.raises(ValueError, match="bad sizes"):
        extension().clip_errors_cpu(t.data_ptr(), t.data_ptr(), t.data_ptr(), t.data_ptr(),
                                    t.data_ptr(), 1, 1, 0, 4, 15, 1, "")


@needs_clip_native
@pytest.mark.parametrize("bits,group_size,symmetric,weighed", [
    (4, 64, False, True), (3, 128, True, False), (2, 32, False, True), (8, -1, False, False)])
def test_rtn_with_the_native_errors_matches_the_torch_errors(rng, monkeypatch, bits, group_size,
                                                             symmetric, weighed):
    """The clip search picks the same candidates (up to near ties, where either costs the
    same) with the errors from pyengine._C as with torch's."""
    import pyengine.quant.rtn as rtn
    w = torch.randn(70, 333, generator=rng) * torch.rand(70, 1, generator=rng)
    weights = torch.rand(333, generator=rng) if weighed else None
    native = pyengine.quantize(w, bits, group_size, symmetric, input_weights=weights)
    monkeypatch.setattr(rtn, "_native_clip_errors", lambda w, cost: None)
    torch_errors = pyengine.quantize(w, bits, group_size, symmetric, input_weights=weights)
    same = (native.scales == torch_errors.scales).float().mean()
    assert same >= 0.98
    cost = torch.ones(333) if weights is None else weights

    def weighed_error(qw):
        return float((((qw.dequantize() - w) ** 2) * cost).sum())
    assert weighed_error(native) == pytest.approx(weighed_error(torch_errors), rel=1e-3)
