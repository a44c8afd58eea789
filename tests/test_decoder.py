"""pyengine.Decoder (pyengine/decoder.py) against the model's own transformers forward, and the
native step operations (csrc/cpu/decode_ops.cpp) against torch."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

import pyengine
from pyengine import Decoder, DecoderUnsupported, QuantConfig, Recipe, decoder_blocker
from pyengine._ext import DTYPE_CODES, extension
from pyengine.backends import get_backend
from pyengine.model.random import random_model

from helpers import rel_err

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")

RECIPES = {
    "dense": None,
    "int4": Recipe({"_default": QuantConfig(4, 32)}),
    # every width, per layer, with an 8-bit head and int8 activations on the 2/4-bit layers
    "mixed": Recipe({r"model\.layers\.0\..*": QuantConfig(3, 32),
                     r"model\.layers\.1\..*": QuantConfig(2, 32, act_bits=8),
                     r"model\.layers\.2\.mlp\..*": QuantConfig(8, -1),
                     "lm_head": QuantConfig(8, 32),
                     "_default": QuantConfig(4, 64, act_bits=8)}),
    "matryoshka": Recipe({"_default": QuantConfig(8, 32, matryoshka=True)}),
}

native_ops = pytest.mark.skipif(extension() is None or not hasattr(extension(), "attention_step_cpu"),
                                reason="pyengine._C without the CPU step operations")


def _model(family: str, recipe: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    model = random_model(family, seed=seed)
    with torch.no_grad():  # peaked attention (random init gives near-uniform weights), so
        for layer in model.model.layers:  # scores, scale and positions all show in the logits
            attn = layer.self_attn
            for proj in ([attn.qkv_proj] if hasattr(attn, "qkv_proj")
                         else [attn.q_proj, attn.k_proj]):
                proj.weight.mul_(12)
    if RECIPES[recipe] is not None:  # float32 kept: the decoder's arithmetic checked at 1e-4
        pyengine.compress(model, RECIPES[recipe], show_progress=False, dtype=dtype)
    if recipe == "matryoshka":
        pyengine.set_precision(model, 4)
    return model


def _decoded_logits(decoder: Decoder, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of positions prompt-1 .. T-1: a prefill of ``prompt`` tokens, then one token per
    step."""
    out = [decoder.prefill(ids[:, :prompt])]
    for t in range(prompt, ids.shape[1]):
        out.append(decoder.forward(ids[:, t:t + 1]))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_logits_match_the_model(family, recipe):
    model = _model(family, recipe)
    # a seed of its own per case, the same in every process (str hashes are salted per process)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{family}-{recipe}".encode()) % 1000)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=gen)
    with torch.inference_mode():
        want = model(ids).logits[:, 5:]
    decoder = Decoder(model, max_len=24, batch=2)
    # the int8-activation layers run on rows interleaved by eights where the build reads them
    interleaves = recipe == "mixed" and get_backend("cpu").selected_isa() in ("avx2", "avx512")
    assert (decoder.prepared_bytes > 0) == interleaves, (family, recipe)
    # a model whose every layer linear is a prepared kernel call steps in one native call
    if hasattr(extension(), "StepProgram"):
        assert (decoder.program is not None) == (recipe in ("int4", "mixed")), (family, recipe)
        # the 8-bit head is a prepared call too: the final norm and it close the program, and
        # each step's logits are its own (stacked below, so a reused buffer would show)
        if recipe == "mixed":
            assert decoder.head_in_program, family
    for cache in decoder.k_cache + decoder.v_cache:
        cache.fill_(float("nan"))  # positions not yet written must never be read
    got = _decoded_logits(decoder, ids, prompt=6)
    assert got.shape == want.shape and torch.isfinite(got).all()
    # int8 activations ("mixed"): a last-bit difference in a normed input (the decoder's RMS
    # norm against transformers') can move an activation across an int8 rounding boundary
    tol = 5e-3 if recipe == "mixed" else 1e-4
    assert rel_err(got, want) < tol, (family, recipe)
    # again from the start: prefill resets the sequence
    assert rel_err(_decoded_logits(decoder, ids, prompt=6), want) < tol


@pytest.mark.parametrize("threads", [1, 2])
def test_a_quantized_table_is_looked_up_inside_the_step_program(threads):
    """A tied model whose table (and head) is quantized: the step program opens with the table
    lookup (no embedding call from Python per step) and ends with the head, and the logits still
    match the model's; a token id outside the table raises IndexError and leaves the decoder
    where it was."""
    model = random_model("llama", tie_word_embeddings=True)
    pyengine.compress(model, Recipe({"lm_head": QuantConfig(8, 32, act_bits=8),
                                     "_default": QuantConfig(4, 32, act_bits=8)}),
                      show_progress=False, dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=gen)
    with torch.inference_mode():
        want = model(ids).logits[:, 5:]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        decoder = Decoder(model, max_len=24, batch=2)
        if not hasattr(extension(), "StepProgram"):
            pytest.skip("pyengine._C without the step program")
        kinds = [op["op"] for op in decoder.program.profile()["ops"]]
        assert kinds[0] == "embedding" and kinds.count("embedding") == 1
        assert decoder.head_in_program
        got = _decoded_logits(decoder, ids, prompt=6)
        assert torch.isfinite(got).all() and rel_err(got, want) < 5e-3
        position = decoder.position
        with pytest.raises(IndexError, match="outside the table"):
            decoder.forward(torch.tensor([[1], [model.config.vocab_size]]))
        assert decoder.position == position
    finally:
        torch.set_num_threads(before)


def test_a_decoder_without_layout_copies_holds_only_the_model_and_matches_it():
    """layout_copy=False: the int8-activation layers read the model's canonical rows (no
    prepared copy), in the same one-call step, and the logits still match the model's."""
    model = _model("llama", "mixed")
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=gen)
    with torch.inference_mode():
        want = model(ids).logits[:, 5:]
    decoder = Decoder(model, max_len=24, batch=2, layout_copy=False)
    assert decoder.prepared_bytes == 0
    if hasattr(extension(), "StepProgram"):
        assert decoder.program is not None
    got = _decoded_logits(decoder, ids, prompt=6)
    assert torch.isfinite(got).all() and rel_err(got, want) < 5e-3


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_the_torch_path_matches_the_native_step(family):
    """The torch-op path (other devices, or a build without the step operations) computes the
    same logits as the native step operations."""
    model = _model(family, "int4")
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.inference_mode():
        want = model(ids).logits[:, 3:]
    decoder = Decoder(model, max_len=16)
    decoder.native = None
    assert rel_err(_decoded_logits(decoder, ids, prompt=4), want) < 1e-4


def test_chunks_of_several_tokens_after_the_prompt():
    """forward() of several tokens at a later position (a masked, not causal-from-zero, step)."""
    model = _model("llama", "int4")
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.inference_mode():
        want = model(ids).logits
    decoder = Decoder(model, max_len=12, batch=2)
    assert rel_err(decoder.prefill(ids[:, :5]), want[:, 4]) < 1e-4
    assert rel_err(decoder.forward(ids[:, 5:9]), want[:, 8]) < 1e-4
    assert rel_err(decoder.forward(ids[:, 9:12]), want[:, 11]) < 1e-4
    assert decoder.position == 12
    with pytest.raises(ValueError, match="do not fit a cache of 12 positions"):
        decoder.forward(ids[:, :1])
    with pytest.raises(ValueError, match="made for 2"):
        decoder.prefill(ids[:1])


def test_a_compressed_model_in_its_default_float16():
    """pyengine.compress holds a model in float16 by default (quantized embedding and head
    included): the decoder runs it in float16."""
    model = random_model("qwen3")
    pyengine.compress(model, Recipe({"_default": QuantConfig(4, 32)}), show_progress=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.inference_mode():
        want = model(ids).logits[:, 4:].float()
    decoder = Decoder(model, max_len=9, batch=2)
    assert model.model.norm.weight.dtype == torch.float16
    assert decoder.dtype == torch.float32  # the CPU default: a float32 stream over 16-bit weights
    got = _decoded_logits(decoder, ids, prompt=5).float()
    assert rel_err(got, want) < 1e-2


def test_bfloat16_model():
    model = random_model("llama", dtype=torch.bfloat16)
    pyengine.compress(model, Recipe({"_default": QuantConfig(4, 32)}), show_progress=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.inference_mode():
        want = model(ids).logits[:, 3:].float()
    got = _decoded_logits(Decoder(model, max_len=8), ids, prompt=4).float()
    assert got.dtype == torch.float32 and rel_err(got, want) < 3e-2


def test_generate_matches_transformers_greedy_generation():
    model = _model("qwen2", "int4")
    ids = torch.randint(3, model.config.vocab_size, (2, 7))
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=9, min_new_tokens=9, do_sample=False,
                              attention_mask=torch.ones_like(ids), pad_token_id=0)
    assert torch.equal(pyengine.generate(model, ids, 9), want)
    decoder = Decoder(model, max_len=16, batch=2)
    assert torch.equal(decoder.generate(ids, 9), want)


def test_generate_stops_when_every_sequence_has_ended():
    model = _model("llama", "dense")
    ids = torch.randint(3, model.config.vocab_size, (2, 5))
    free = Decoder(model, max_len=32, batch=2).generate(ids, 12)
    stop = int(free[0, 7])  # the third token of sequence 0 becomes the end token
    out = Decoder(model, max_len=32, batch=2).generate(ids, 12, eos_token_id=[stop])
    ended = [(row[5:] == stop).nonzero()[0, 0].item() if (row[5:] == stop).any() else None
             for row in free]
    for row, end, full in zip(out, ended, free):
        if end is not None:  # identical up to its end token, then the end token repeated
            assert torch.equal(row[:5 + end + 1], full[:5 + end + 1])
            assert (row[5 + end:] == stop).all()
    if all(e is not None for e in ended):
        assert out.shape[1] == 5 + max(ended) + 1
    else:
        assert out.shape[1] == 5 + 12


def test_models_the_decoder_does_not_run_are_named_and_generate_falls_back():
    gemma = random_model("gemma2")
    assert "gemma2" in decoder_blocker(gemma)
    with pytest.raises(DecoderUnsupported, match="gemma2"):
        Decoder(gemma)
    ids = torch.randint(3, gemma.config.vocab_size, (1, 4))
    with torch.inference_mode():
        want = gemma.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                              attention_mask=torch.ones_like(ids), pad_token_id=0)
    assert torch.equal(pyengine.generate(gemma, ids, 3), want)

    from pyengine.slicing import structure
    sliced = random_model("llama")
    d = sliced.config.hidden_size
    basis = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0].float()
    n = sliced.config.num_hidden_layers
    structure.apply_bases(sliced, [basis[:, :48]] * n, [basis[:, :48]] * n, basis[:, :48])
    assert "it is sliced" in decoder_blocker(sliced)

    mistral = random_model("mistral", sliding_window=16)
    assert decoder_blocker(mistral, max_len=16) == ""
    assert "sliding window" in decoder_blocker(mistral, max_len=17)
    with pytest.raises(ValueError, match="max_len and batch"):
        Decoder(random_model("llama"), max_len=0)


# ---- the native step operations against torch ---------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _step_isas():
    """The instruction-set builds of the step operations this CPU runs (each is tested)."""
    return pyengine.build_info().get("cpu_isas_usable") or [""]


@native_ops
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_silu_mul(dtype):
    ext = extension()
    x = torch.randn(3, 200, dtype=torch.float32).mul_(3).to(dtype)
    xs = torch.cat([x, torch.randn(3, 7).to(dtype)], dim=1)  # a row stride of 207
    w = torch.randn(200, dtype=dtype)
    gate_up = torch.randn(4, 2 * 77, dtype=torch.float32).mul_(4).to(dtype)
    g, u = gate_up.float()[:, :77], gate_up.float()[:, 77:]
    for isa in _step_isas():
        out = torch.full((3, 200), float("nan"), dtype=dtype)
        ext.rms_norm_cpu(xs.data_ptr(), DTYPE_CODES[dtype], 207, w.data_ptr(), DTYPE_CODES[dtype],
                         out.data_ptr(), DTYPE_CODES[dtype], 200, 3, 200, 1e-5, isa=isa)
        want = F.rms_norm(x.float(), (200,), w.float(), eps=1e-5)
        assert rel_err(out.float(), want) < TOL[dtype], isa

        act = torch.full((4, 77), float("nan"), dtype=dtype)
        ext.silu_mul_cpu(gate_up.data_ptr(), 2 * 77, act.data_ptr(), 77, DTYPE_CODES[dtype], 4,
                         77, isa=isa)
        assert rel_err(act.float(), F.silu(g) * u) < TOL[dtype], isa


@native_ops
def test_silu_mul_is_exact_to_float_precision_over_the_whole_range():
    """The step's SiLU computes e^-g by its own vector exponential: within a few ulp of
    torch's SiLU for every magnitude, and right where e^-g under- or overflows (|g| > 87)."""
    ext = extension()
    g = torch.cat([torch.linspace(-120, 120, 2401), torch.randn(1000) * 3,
                   torch.tensor([0.0, -0.0, 87.5, -87.5, 88.5, -88.5, 1e-30, -1e-30])])
    width = g.numel()
    gate_up = torch.cat([g, torch.ones(width)]).unsqueeze(0)
    want = F.silu(g.double())
    for isa in _step_isas():
        act = torch.full((1, width), float("nan"))
        ext.silu_mul_cpu(gate_up.data_ptr(), 2 * width, act.data_ptr(), width,
                         DTYPE_CODES[torch.float32], 1, width, isa=isa)
        err = (act[0].double() - want).abs() / want.abs().clamp_min(1e-20)  # relative, above 1e-20
        assert err.max() < 4e-7, (isa, g[err.argmax()].item(), err.max().item())


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


@native_ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, nh, nkv, hd, position, norms",
                         [(1, 9, 3, 64, 0, False), (2, 4, 4, 6, 5, True),
                          (3, 8, 2, 128, 300, False), (1, 2, 1, 1024, 2, True),
                          (2, 20, 2, 10, 11, False)])  # groups of 10 heads: taken in parts
def test_attention_step(dtype, batch, nh, nkv, hd, position, norms):
    """Rope (and per-head q/k norms), the cache append and attention over positions 0..p
    against torch's scaled_dot_product_attention, threaded and not."""
    ext = extension()
    gen = torch.Generator().manual_seed(position + hd)
    max_len = position + 3
    qkv_width = (nh + 2 * nkv) * hd
    qkv = torch.randn(batch, qkv_width + 5, generator=gen).to(dtype)  # row stride > width
    k_cache = torch.randn(batch, nkv, max_len, hd, generator=gen).to(dtype)
    v_cache = torch.randn(batch, nkv, max_len, hd, generator=gen).to(dtype)
    angles = torch.rand(max_len, hd // 2, generator=gen) * 6.3
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(dtype)
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(dtype)
    signed_sin = sin.clone()
    signed_sin[:, :hd // 2].neg_()
    q_norm = torch.randn(hd, generator=gen).to(dtype) if norms else None
    k_norm = torch.randn(hd, generator=gen).to(dtype) if norms else None
    scale = hd ** -0.5

    q = qkv[:, :nh * hd].float().view(batch, nh, hd)
    k = qkv[:, nh * hd:(nh + nkv) * hd].float().view(batch, nkv, hd)
    v = qkv[:, (nh + nkv) * hd:qkv_width].float().view(batch, nkv, hd)
    if norms:
        q = F.rms_norm(q, (hd,), q_norm.float(), eps=1e-6)
        k = F.rms_norm(k, (hd,), k_norm.float(), eps=1e-6)
    c, s = cos[position].float(), sin[position].float()
    q, k = _rope(q, c, s), _rope(k, c, s)
    keys = k_cache.float().clone()
    values = v_cache.float().clone()
    keys[:, :, position], values[:, :, position] = k, v
    want = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys[:, :, :position + 1], values[:, :, :position + 1],
        enable_gqa=nh != nkv).reshape(batch, nh * hd)

    for isa, threads in [(isa, threads) for isa in _step_isas() for threads in (1, 2)]:
        kc, vc = k_cache.clone(), v_cache.clone()
        out = torch.full((batch, nh * hd), float("nan"), dtype=dtype)
        ext.attention_step_cpu(qkv.data_ptr(), qkv.stride(0), kc.data_ptr(), vc.data_ptr(),
                               kc.stride(0), kc.stride(1), cos.data_ptr(), signed_sin.data_ptr(),
                               _ptr(q_norm), _ptr(k_norm), DTYPE_CODES[dtype], 1e-6,
                               out.data_ptr(), nh * hd, DTYPE_CODES[dtype], batch, nh, nkv, hd,
                               position, scale, threads, isa=isa)
        assert rel_err(out.float(), want) < TOL[dtype] * 4, (isa, threads)
        assert rel_err(kc[:, :, position].float(), k) < TOL[dtype]
        assert torch.equal(vc[:, :, position],
                           qkv[:, (nh + nkv) * hd:qkv_width].view(batch, nkv, hd))
        others = [i for i in range(max_len) if i != position]  # nothing else written
        assert torch.equal(kc[:, :, others], k_cache[:, :, others])
        assert torch.equal(vc[:, :, others], v_cache[:, :, others])


def _embedding_rows(ext, ids, qw, out, round_dtype):
    """embedding_rows_cpu of the rows ``ids`` (int64 [rows]) of ``qw`` into ``out`` [rows, D]."""
    ext.embedding_rows_cpu(ids.data_ptr(), ids.numel(), qw.qweight.data_ptr(),
                           qw.qweight.stride(0), qw.scales.data_ptr(), _ptr(qw.zeros),
                           qw.scales.stride(0), DTYPE_CODES[qw.scales.dtype], qw.bits,
                           qw.group_size, qw.shape[0], qw.shape[1], out.data_ptr(),
                           DTYPE_CODES[out.dtype], out.stride(0), DTYPE_CODES[round_dtype])


@native_ops
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_native_embedding_rows_match_the_torch_lookup(bits):
    """The step program's table lookup (embedding_rows_cpu) gives exactly the rows of
    pyengine.ops.qembedding, rounded to the table's output dtype, for every width, grouped and
    per-row scales, with and without zeros, 32-bit and 16-bit scales, odd widths (codes of a
    partial block) and repeated ids; an id outside the table raises before anything is
    written."""
    from pyengine.ops import qembedding
    ext = extension()
    gen = torch.Generator().manual_seed(bits)
    cases = [(37, 100, 32, False, torch.float32), (50, 64, -1, True, torch.float16),
             (29, 136, 64, False, torch.bfloat16), (41, 33, 32, True, torch.float16)]
    for vocab, dim, group, symmetric, scale_dtype in cases:
        table = torch.randn(vocab, dim, generator=gen)
        qw = pyengine.quantize(table, bits, group, symmetric=symmetric, clip_search=False,
                               scale_dtype=scale_dtype)
        ids = torch.tensor([0, vocab - 1, 5, 5, 17], dtype=torch.int64)
        for round_dtype, out_dtype in ((torch.float32, torch.float32),
                                       (scale_dtype, torch.float32), (scale_dtype, scale_dtype)):
            want = qembedding(ids, qw, dtype=round_dtype).to(out_dtype)
            out = torch.full((len(ids), dim + 3), float("nan"), dtype=out_dtype)  # row stride
            _embedding_rows(ext, ids, qw, out, round_dtype)
            what = (bits, vocab, dim, group, symmetric, scale_dtype, round_dtype, out_dtype)
            assert torch.equal(out[:, :dim], want), what
            assert torch.isnan(out[:, dim:]).all(), what  # nothing past the row's dim written
        out = torch.full((2, dim), float("nan"))
        with pytest.raises(IndexError, match=f"token id {vocab} is outside the table's {vocab}"):
            _embedding_rows(ext, torch.tensor([1, vocab]), qw, out, torch.float32)
        with pytest.raises(IndexError, match="token id -1 is outside"):
            _embedding_rows(ext, torch.tensor([-1]), qw, out, torch.float32)
        assert torch.isnan(out).all()


@native_ops
def test_step_operations_refuse_bad_arguments():
    ext = extension()
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="unsupported dtype code 7"):
        ext.rms_norm_cpu(x.data_ptr(), 7, 8, x.data_ptr(), 0, x.data_ptr(), 0, 8, 2, 8, 1e-6)
    with pytest.raises(ValueError, match="rms_norm_cpu: bad sizes"):
        ext.rms_norm_cpu(x.data_ptr(), 0, 4, x.data_ptr(), 0, x.data_ptr(), 0, 8, 2, 8, 1e-6)
    with pytest.raises(ValueError, match="head_dim"):
        ext.attention_step_cpu(x.data_ptr(), 64, x.data_ptr(), x.data_ptr(), 64, 8,
                               x.data_ptr(), x.data_ptr(), 0, 0, 0, 0.0, x.data_ptr(), 8, 0, 1,
                               3, 2, 4, 0, 1.0, 1)
    with pytest.raises(ValueError, match="rms_norm_cpu: no kernels for instruction set 'sse9'"):
        ext.rms_norm_cpu(x.data_ptr(), 0, 8, x.data_ptr(), 0, x.data_ptr(), 0, 8, 2, 8, 1e-6,
                         isa="sse9")
    with pytest.raises(ValueError, match="StepProgram: no kernels for instruction set 'sse9'"):
        ext.StepProgram("sse9")
    qw = pyengine.quantize(torch.randn(10, 64), 4, 32, clip_search=False)
    ids, out = torch.zeros(1, dtype=torch.int64), torch.empty(1, 64)
    args = [ids.data_ptr(), 1, qw.qweight.data_ptr(), qw.qweight.stride(0), qw.scales.data_ptr(),
            qw.zeros.data_ptr(), qw.scales.stride(0), 0, 4, 32, 10, 64, out.data_ptr(), 0, 64, 0]
    for at, bad, why in ((8, 5, "bits must be 2, 3, 4 or 8"), (3, 4, "ldq holds fewer words"),
                         (6, 1, "lds holds fewer scales"), (14, 63, "ldo must be >= dim"),
                         (13, 7, "unsupported dtype code")):
        wrong = list(args)
        wrong[at] = bad
        with pytest.raises(ValueError, match=f"embedding_rows: {why}"):
            ext.embedding_rows_cpu(*wrong)
        with pytest.raises(ValueError, match=f"embedding_rows: {why}"):
            ext.StepProgram().add_embedding(*wrong)


def test_decode_speed_measurements_pick_the_loop():
    from pyengine import benchmarking as bm
    llama, gemma = random_model("llama"), random_model("gemma2")
    assert bm.pick_runner(llama, 32) == "decoder"
    assert bm.pick_runner(gemma, 32) == "transformers"
    assert bm.pick_runner(llama, 32, "transformers") == "transformers"
    with pytest.raises(ValueError, match="cannot run this model: .*gemma2"):
        bm.pick_runner(gemma, 32, "decoder")
    with pytest.raises(ValueError, match="runner must be one of"):
        bm.pick_runner(llama, 32, "fast")
    ids = torch.randint(3, llama.config.vocab_size, (1, 4))
    tps, out = bm.decode_tokens_per_s(llama, ids, new_tokens=5, runner="decoder")
    assert tps > 0 and torch.equal(out, pyengine.generate(llama, ids, 5))


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["dense", "int4"])
def test_decoder_on_a_gpu_matches_the_model(recipe):
    """On CUDA the decoder runs its torch-op path with the ops' GPU backends (fp16)."""
    model = _model("llama", recipe).to("cuda", torch.float16)
    ids = torch.randint(0, model.config.vocab_size, (2, 10), device="cuda")
    with torch.inference_mode():
        want = model(ids).logits[:, 5:].float()
    decoder = Decoder(model, max_len=16, batch=2)
    assert decoder.native is None and decoder.k_cache[0].device.type == "cuda"
    assert rel_err(_decoded_logits(decoder, ids, prompt=6).float(), want) < 1e-2


@native_ops
def test_step_program_refuses_positions_outside_its_caches():
    model = _model("llama", "int4")
    decoder = Decoder(model, max_len=8)
    assert decoder.program is not None and len(decoder.program) > 0
    with pytest.raises(ValueError, match="outside the caches"):
        decoder.program.run(8, 1)
    with pytest.raises(ValueError, match="outside the caches"):
        decoder.program.run(-1, 1)


@native_ops
def test_step_program_gives_the_same_logits_on_any_number_of_threads():
    """The step program cuts each matmul into per-thread row slices inside one parallel
    region: every row is computed alike, so the logits do not depend on the thread count."""
    model = _model("qwen2", "mixed")
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=gen)
    threads = torch.get_num_threads()
    got = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            decoder = Decoder(model, max_len=16, batch=2)
            assert decoder.program is not None
            got.append(_decoded_logits(decoder, ids, prompt=4))
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(got[0]).all()
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


@native_ops
def test_step_program_times_both_schedules_and_runs_either_alike():
    """With several threads a run takes the parallel or the one-thread schedule, whichever has
    been faster lately, and tries the other now and then: both get measured, every run is
    counted (the first after a switch of schedule untimed), and a schedule forced either way
    gives the same hidden state bit for bit."""
    model = _model("llama", "int4")
    decoder = Decoder(model, max_len=48)
    program, stream = decoder.program, decoder._program_buffers[0]
    assert program is not None
    gen = torch.Generator().manual_seed(5)
    start = torch.randn(stream.shape, generator=gen)
    runs = 40
    for position in range(runs):
        stream.copy_(start)
        program.run(position, 2)
        if position == 0:  # a program opens with the one-thread schedule (never slow)
            assert program.step_times["serial_runs"] == 1
            assert program.step_times["parallel_runs"] == 0
            assert program.last_run_threads == 1
    times = program.step_times
    assert times["parallel_runs"] + times["serial_runs"] == runs
    assert times["serial_ms"] > 0
    assert 1 <= times["serial_timed"] <= times["serial_runs"]
    # the parallel schedule runs, or is known from an earlier program to be the slower one
    # (then it is tried after the one-thread schedule has run 32 of its estimated step times)
    if times["parallel_runs"]:
        # its first run came right after a one-thread run: a switch, not timed
        assert times["parallel_timed"] < times["parallel_runs"]
        if times["parallel_timed"]:
            assert times["parallel_ms"] > 0
    results = []
    for threads, adaptive in ((2, False), (1, False)):
        stream.copy_(start)
        program.run(runs, threads, adaptive)
        assert program.last_run_threads == threads  # what the decoder's head then takes
        results.append(stream.clone())
    assert torch.equal(results[0], results[1])


@native_ops
def test_step_program_profile_times_every_operation_of_each_schedule():
    """With profiling on, a one-thread run times each operation; a parallel run times each
    stretch between barriers and sets it on the operation before the barrier (the others of its
    group read 0). The times add up to no more than the runs took; turning profiling on again
    clears them; matmuls carry their shapes and widths in the program's order."""
    import time
    model = _model("qwen2", "mixed")
    decoder = Decoder(model, max_len=32)
    program, stream = decoder.program, decoder._program_buffers[0]
    assert program is not None and not program.profiling
    empty = program.profile()
    assert empty["serial_runs"] == empty["parallel_runs"] == 0
    assert all(op["serial_ms"] == op["parallel_ms"] == 0 for op in empty["ops"])
    start = torch.randn(stream.shape, generator=torch.Generator().manual_seed(2))
    program.profiling = True
    wall = {}
    for schedule, threads, runs in (("serial", 1, 3), ("parallel", 2, 2)):
        t0 = time.perf_counter()
        for position in range(runs):
            stream.copy_(start)
            program.run(position, threads, False)
        wall[schedule] = (time.perf_counter() - t0) * 1e3
    prof = program.profile()
    assert prof["serial_runs"] == 3 and prof["parallel_runs"] == 2
    ops = prof["ops"]
    assert len(ops) == len(program)
    layers = model.config.num_hidden_layers
    kinds = [op["op"] for op in ops]
    assert decoder.head_in_program  # the final norm and the head close the program
    assert kinds.count("attention") == layers and kinds.count("rms_norm") == 2 * layers + 1
    assert kinds.count("silu_mul") == layers
    linears = [c for layer in decoder.layers for c in layer.linears()] + [decoder.head]
    matmuls = [op for op in ops if op["op"] == "qmatmul"]
    assert [op["n"] for op in matmuls] == [c.out_features for c in linears]
    assert all(op["k"] > 0 and op["bits"] in (2, 3, 4, 8) for op in matmuls)
    assert all(op["n"] == op["k"] == op["bits"] == 0 for op in ops if op["op"] != "qmatmul")
    assert all(op["serial_ms"] > 0 for op in ops)  # every operation timed on its own
    assert 0 < sum(op["serial_ms"] for op in ops) <= wall["serial"]
    # one time per barrier, on the operation before it (the one that says it ends at a barrier)
    assert sum(op["barrier_after"] for op in ops) == program.barriers
    assert [op["parallel_ms"] > 0 for op in ops] == [op["barrier_after"] for op in ops]
    assert 0 < sum(op["parallel_ms"] for op in ops) <= wall["parallel"]
    program.profiling = False
    stream.copy_(start)
    program.run(0, 1, False)  # not recorded
    assert program.profile()["serial_runs"] == 3
    program.profiling = True  # clears
    cleared = program.profile()
    assert cleared["serial_runs"] == 0 and all(op["serial_ms"] == 0 for op in cleared["ops"])


@native_ops
def test_a_busy_verdict_holds_new_programs_on_one_thread_until_their_shared_budget_is_spent():
    """A program learned that parallel steps are 2x slower or more (a busy machine): a new
    program then opens without parallel steps, however old the verdict. The programs relying on
    it share one budget, their one-thread time since it was learned: once that reaches 32 of the
    estimated parallel steps, the program running then tries the parallel schedule and writes the
    verdict anew, so short decoders revise it as one long one would (one noisy program must not
    keep every later one on one thread). A verdict that says parallel steps are merely slower
    does not hold a new program: it opens with parallel steps and measures its own."""
    model = _model("llama", "int4")
    decoder = Decoder(model, max_len=48)
    ext = decoder.program
    assert ext is not None
    step_program = type(ext)
    saved = step_program.machine_verdict()

    def parallel_runs_of_a_new_program(steps: int) -> int:
        fresh = Decoder(model, max_len=48)  # holds the program's buffers
        program = fresh.program
        for position in range(steps):
            program.run(position, 2)
        return program.step_times["parallel_runs"]

    try:
        for age_s in (0.0, 3600.0):
            # parallel steps 1000x slower: a budget of 32 000 one-thread steps (this model's take
            # about 40 us), which no scheduling hiccup of the machine spends within 16 steps (at
            # 5x the budget was 6 ms, and a stalled step or two sometimes spent it)
            step_program.set_machine_verdict(1000.0, age_s)
            # the opening would be 3 one-thread steps, then 3 parallel ones
            assert parallel_runs_of_a_new_program(8) == 0
            spent = step_program.machine_verdict()["reliant_ms"]
            assert spent > 0
            assert parallel_runs_of_a_new_program(8) == 0
            assert step_program.machine_verdict()["reliant_ms"] > spent  # one budget for all

        # at a ratio of 10 the budget is about 320 one-thread steps: short programs of 24 steps
        # each, on their own, would never try a parallel step, and together they do (the first
        # two leave a margin of about 270 steps, 11 ms here, for a stalled step: at a ratio of 2
        # that margin was 16 steps, and a stall sometimes made the second program try)
        step_program.set_machine_verdict(10.0, 0.0)
        runs = [parallel_runs_of_a_new_program(24) for _ in range(20)]
        tried = next((i for i, n in enumerate(runs) if n), None)
        assert tried is not None and tried >= 2, runs  # after 48 or more one-thread steps
        verdict = step_program.machine_verdict()
        assert verdict["age_s"] < 60 and verdict["parallel_over_serial"] != 10.0  # measured

        for ratio in (1.5, 0.0):  # not busy, or none: a new program measures its own
            step_program.set_machine_verdict(ratio, 0.0)
            assert parallel_runs_of_a_new_program(8) > 0
    finally:
        step_program.set_machine_verdict(saved["parallel_over_serial"], max(saved["age_s"], 0))
    with pytest.raises(ValueError, match=">= 0"):
        step_program.set_machine_verdict(-1.0, 0.0)


@native_ops
def test_every_thread_computes_the_norm_or_silu_that_only_its_matmuls_read():
    """A parallel run has no barrier after an RMS norm or SiLU-multiply whose output the next
    matmuls read whole (each thread computes it, the first into the buffer and the others into
    a copy that their slices read): the same products as a one-thread run, every time. It keeps
    the barrier where the norm works in place, or a matmul of the group reads the norm's output
    only in part or writes what the norm reads."""
    from pyengine.backends import CpuBackend
    from helpers import packed_operand
    backend = CpuBackend()
    gen = torch.Generator().manual_seed(12)
    k, hidden, rows = 256, 96, 2
    x = torch.randn(rows, k, generator=gen)
    w = torch.rand(k, generator=gen) + 0.5

    def bound(n, kk):
        qw = pyengine.quantize(torch.randn(n, kk, generator=gen), 4, 64, clip_search=False)
        return backend.bind(packed_operand(qw), n, kk, None, act_bits=8)

    first, second, down = bound(64, k), bound(32, k), bound(k, hidden)  # n, K
    wide = bound(16, k + 32)  # reads past the norm's output

    def program_of(norm_out, group, silu=True):
        """norm(x) -> matmuls of `group` ((kernel, input, output) each), then SiLU-multiply of
        the first output's columns and the down projection of that into x (accumulating)."""
        program = extension().StepProgram()
        program.add_rms_norm(x.data_ptr(), 0, k, w.data_ptr(), 0, norm_out.data_ptr(), 0,
                             norm_out.stride(0), rows, k, 1e-6)
        for kernel, inp, out in group:
            program.add_call(kernel.native_call, inp.data_ptr(), inp.stride(0), out.data_ptr(),
                             out.stride(0), rows, False)
        if silu:
            program.add_silu_mul(gate_up.data_ptr(), gate_up.stride(0), act.data_ptr(),
                                 act.stride(0), 0, rows, hidden)
            program.add_call(down.native_call, act.data_ptr(), act.stride(0), x.data_ptr(),
                             x.stride(0), rows, True)
        return program

    def runs_alike(program, outputs):
        """outputs: what the program writes (poisoned before each run)."""
        start = x.clone()
        results = []
        for threads in [1] + [2] * 20:
            x.copy_(start)
            for out in outputs:
                out.fill_(float("nan"))
            program.run(0, threads, False)
            results.append([t.clone() for t in outputs + [x]])
        x.copy_(start)
        for got in results[1:]:
            for a, b in zip(got, results[0]):
                assert torch.equal(a, b)
        assert all(torch.isfinite(t).all() for t in results[0])

    h = torch.randn(rows, k + 32, generator=gen)  # the norm writes h[:, :k]
    gate_up = torch.empty(rows, 2 * hidden)
    q_out = torch.empty(rows, 32)
    act = torch.empty(rows, hidden)
    group = [(bound(2 * hidden, k), h, gate_up), (second, h, q_out)]
    program = program_of(h, group)
    # norm -> two matmuls (no barrier after the norm or the first), silu -> down: 2 barriers
    assert len(program) == 5 and program.barriers == 2
    runs_alike(program, [h[:, :k], gate_up, q_out, act])

    # in place: the norm overwrites what it reads, every thread cannot compute it
    in_place = program_of(x, [(first, x, torch.empty(rows, 64))], silu=False)
    assert in_place.barriers == 2
    # a matmul that reads past the norm's output waits for it (a barrier before it)
    wide_out = torch.empty(rows, 16)
    partial = program_of(h, [(second, h, q_out), (wide, h, wide_out)], silu=False)
    assert partial.barriers == 2
    runs_alike(partial, [h[:, :k], q_out, wide_out])
    # a matmul writing what the norm reads
    writes_input = program_of(h, [(second, h, q_out), (bound(k, k), h, x)], silu=False)
    assert writes_input.barriers == 2


@native_ops
def test_step_program_waits_only_between_dependent_matmuls():
    """A parallel run of a StepProgram has no barrier between consecutive matmuls that neither
    read nor write what the other writes (three projections of one input into the columns of
    one buffer), and keeps it where one reads the other's output; both give the product of a
    one-thread run, on two threads, every time."""
    from pyengine.backends import CpuBackend
    from helpers import packed_operand
    backend = CpuBackend()
    gen = torch.Generator().manual_seed(11)
    k, widths = 256, (64, 32, 32)
    x = torch.randn(1, k, generator=gen)
    out = torch.zeros(1, sum(widths))
    chained = torch.zeros(1, 48)
    kernels, want = [], []
    for n in widths:
        qw = pyengine.quantize(torch.randn(n, k, generator=gen), 4, 64, clip_search=False)
        kernels.append(backend.bind(packed_operand(qw), n, k, None, act_bits=8))
        want.append(pyengine.ops.qlinear(x, qw, act_bits=8, backend="torch"))
    qw2 = pyengine.quantize(torch.randn(48, sum(widths), generator=gen), 4, 32, clip_search=False)
    second = backend.bind(packed_operand(qw2), 48, sum(widths), None, act_bits=8)
    program = extension().StepProgram()
    start = 0
    for kernel, n in zip(kernels, widths):  # out[:, start:start + n] = x @ W^T: independent
        program.add_call(kernel.native_call, x.data_ptr(), k, out[:, start:].data_ptr(),
                         out.stride(0), 1, False)
        start += n
    # reads out: depends on all three
    program.add_call(second.native_call, out.data_ptr(), out.stride(0), chained.data_ptr(), 48,
                     1, False)
    assert len(program) == 4 and program.barriers == 2
    want_out = torch.cat(want, dim=1)
    want_chained = pyengine.ops.qlinear(want_out, qw2, act_bits=8, backend="torch")
    for _ in range(20):
        out.fill_(float("nan"))
        chained.fill_(float("nan"))
        program.run(0, 2, False)
        assert torch.allclose(out, want_out, rtol=1e-4, atol=1e-4)
        assert torch.allclose(chained, want_chained, rtol=1e-3, atol=1e-3)
