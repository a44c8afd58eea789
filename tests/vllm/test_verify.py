"""pyengine.vllm.verify's verdicts, without vLLM: how token runs that part are judged, and how
weights read back from vLLM's kernels are held to pyengine's."""

import pytest
import torch

import pyengine
from pyengine.vllm.verify import (compare, compare_weights, describe_weights,
                                  weight_tolerance_steps)


def _pyengine_run(tokens, margins, runners_up):
    return {"tokens": tokens, "first_logprobs": [-1.0] * len(tokens),
            "top2_margin": margins, "runner_up": runners_up}


def test_equal_tokens_are_ok_and_the_log_probability_gap_is_held_to_the_tolerance():
    pe = _pyengine_run([[5, 6, 7]], [[1.0, 1.0, 1.0]], [[9, 9, 9]])
    vl = {"tokens": [[5, 6, 7]], "first_logprobs": [-1.0 + 4e-3]}
    assert compare(vl, pe, logprob_tol=5e-3)["ok"]
    verdict = compare(vl, pe, logprob_tol=3e-3)
    assert not verdict["ok"] and verdict["parted_at_near_tie"] == [None]


@pytest.mark.parametrize("vllm_token, margin, near_tie", [
    (9, 0.015, True),     # pyengine's runner-up, margin under 2 x 1e-2
    (9, 0.025, False),    # runner-up, but pyengine chose by more than the noise can move
    (8, 0.001, False),    # a token pyengine ranked below its runner-up
])
def test_runs_may_part_only_where_vllm_takes_pyengines_runner_up_at_a_near_tie(
        vllm_token, margin, near_tie):
    pe = _pyengine_run([[5, 6, 7, 1], [5, 6, 7, 1]],
                       [[1.0, 1.0, margin, 0.0], [1.0, 1.0, 1.0, 1.0]],
                       [[2, 2, 9, 2], [2, 2, 2, 2]])
    vl = {"tokens": [[5, 6, vllm_token, 3], [5, 6, 7, 1]], "first_logprobs": [-1.0, -1.0]}
    verdict = compare(vl, pe, logprob_tol=1e-2)
    assert verdict["first_token_difference"] == [2, None]
    assert verdict["parted_at_near_tie"] == [near_tie, None]
    assert verdict["ok"] is near_tie


def test_a_run_that_stops_early_or_has_no_margins_is_not_a_near_tie():
    vl = {"tokens": [[5, 6]], "first_logprobs": [-1.0]}
    short = _pyengine_run([[5]], [[0.0]], [[6]])
    assert compare(vl, short, 1e-2)["parted_at_near_tie"] == [False]
    no_margins = {"tokens": [[5, 7]], "first_logprobs": [-1.0]}
    assert not compare(vl, no_margins, 1e-2)["ok"]


def _layers(rng_seed: int = 0):
    """Two pyengine layers (q/k of one fused vLLM layer) and one alone: int4 g32, asymmetric."""
    gen = torch.Generator().manual_seed(rng_seed)
    return {name: pyengine.quantize(torch.randn(n, 96, generator=gen), 4, 32, symmetric=False)
            for name, n in (("m.q_proj", 24), ("m.k_proj", 8), ("m.o_proj", 40))}


def _read_back(layers, dtype=torch.bfloat16):
    """What an exact 16-bit kernel gives: pyengine's weights rounded to ``dtype``."""
    def rounded(*names):
        return torch.cat([layers[n].dequantize(torch.float32) for n in names]).to(dtype).float()
    return {"weights": {"m.qk_proj": rounded("m.q_proj", "m.k_proj"),
                        "m.o_proj": rounded("m.o_proj")},
            "packed": {"qk_proj": ["q_proj", "k_proj"]}, "dtype": str(dtype)[6:]}


def test_weights_rounded_to_bfloat16_pass_and_fused_layers_are_split_by_the_mapping():
    layers = _layers()
    verdict = compare_weights(_read_back(layers), layers)
    assert verdict["ok"], verdict
    assert verdict["modules"] == 3 and verdict["unmatched"] == [] and verdict["dtype"] == "bfloat16"
    assert set(verdict["error_steps"]) == {"m.qk_proj", "m.o_proj"}
    assert 0 < max(verdict["error_steps"].values()) <= weight_tolerance_steps(4, "bfloat16") < 0.5
    assert "largest error 0." in describe_weights(verdict)
    # as vLLM's worker gives them: (name, weight) pairs read one layer at a time
    streamed = _read_back(layers)
    streamed["weights"] = iter(list(streamed["weights"].items()))
    assert compare_weights(streamed, layers) == verdict


@pytest.mark.parametrize("misread", ["code", "scale", "order"])
def test_a_misread_weight_fails(misread):
    layers = _layers()
    read_back = _read_back(layers)
    fused = read_back["weights"]["m.qk_proj"]
    step = float(layers["m.q_proj"].scales[3, 1].float().abs())
    if misread == "code":      # one code off by one in q_proj's row 3, group 1
        fused[3, 40] += step
    elif misread == "scale":   # a group's scale read 5% off
        fused[3, 32:64] *= 1.05
    else:                      # the fused layer's parts stacked the other way round
        read_back["weights"]["m.qk_proj"] = torch.cat([fused[24:], fused[:24]])
    verdict = compare_weights(read_back, layers)
    assert not verdict["ok"] and verdict["over_tolerance"] == ["m.qk_proj"]


def test_a_layer_vllm_does_not_have_fails_and_dense_layers_are_not_compared():
    layers = _layers()
    read_back = _read_back(layers)
    del read_back["weights"]["m.o_proj"]
    read_back["weights"]["lm_head"] = torch.zeros(3, 96)   # dense in pyengine: skipped
    verdict = compare_weights(read_back, layers)
    assert not verdict["ok"] and verdict["unmatched"] == ["m.o_proj"] and verdict["modules"] == 2


def test_widths_bfloat16_cannot_resolve_are_reported_unresolved():
    assert weight_tolerance_steps(4, "bfloat16") == pytest.approx(3 * 2 ** -8 * 16)
    assert weight_tolerance_steps(8, "bfloat16") >= 0.5
    assert weight_tolerance_steps(8, "float32") < 1e-3
    gen = torch.Generator().manual_seed(1)
    layers = {"m.o_proj": pyengine.quantize(torch.randn(16, 64, generator=gen), 8, 32)}
    rounded = layers["m.o_proj"].dequantize(torch.float32).bfloat16().float()
    verdict = compare_weights({"weights": {"m.o_proj": rounded}, "packed": {},
                               "dtype": "bfloat16"}, layers)
    assert verdict["ok"] and verdict["unresolved"] == ["m.o_proj"]


def test_a_read_back_of_another_shape_is_an_error_naming_the_layer():
    layers = _layers()
    read_back = _read_back(layers)
    read_back["weights"]["m.o_proj"] = read_back["weights"]["m.o_proj"][:, :64]
    with pytest.raises(ValueError, match=r"o_proj is \(40, 64\), pyengine's m.o_proj \(40, 96\)"):
        compare_weights(read_back, layers)


@pytest.mark.parametrize("fraction, ok", [(0.9, True), (1.1, False)])
def test_the_tolerance_is_weight_tolerance_steps_of_the_layers_bits(fraction, ok):
    layers = _layers()
    read_back = _read_back(layers, dtype=torch.float32)  # exact: only the nudge below differs
    read_back["dtype"] = "bfloat16"
    step = float(layers["m.o_proj"].scales[5, 2].float().abs())
    nudge = fraction * weight_tolerance_steps(4, "bfloat16") * step
    read_back["weights"]["m.o_proj"][5, 70] += nudge
    verdict = compare_weights(read_back, layers)
    assert verdict["ok"] is ok and verdict["over_tolerance"] == ([] if ok else ["m.o_proj"])
