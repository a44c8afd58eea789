"""Sequential compression under a memory cap smaller than the checkpoint.

A child process imports everything, starts its thread pool, then caps its own address space
(RLIMIT_AS) at what it already maps plus ``MARGIN``: less than the checkpoint it compresses.
pyengine.pipeline.streaming.compress_checkpoint must finish under the cap and write what the
in-memory path (run here without a cap) writes; the in-memory path itself must fail under the same
cap, which shows the cap binds.

The tensors outside the decoder layers, freed one by one at the end of the run, must each leave
resident memory when freed, though they were read from one file (each is read through a mapping
of its own byte range; a mapping of the whole file would keep every page touched through it
resident while any tensor read through it lives).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="RLIMIT_AS and /proc/self/status are Linux's")

MARGIN = 100 << 20  # address space the capped child may add to what it maps after its imports

CHILD = textwrap.dedent('''
    import json, resource, sys
    import torch, pyengine
    from pyengine.quant.rtn import quantize
    from pyengine.quant.recipe import QuantConfig, Recipe
    from pyengine.pipeline.streaming import SourceCheckpoint, compress_checkpoint
    source, out, mode, margin = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    SourceCheckpoint(source).skeleton()       # imports the model's code
    quantize(torch.randn(256, 256), 4, 64)    # starts the thread pool

    def vm(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))

    base = vm("VmSize")
    resource.setrlimit(resource.RLIMIT_AS, (base + margin, base + margin))
    recipe = Recipe(quant={"_default": QuantConfig(4, 64)})
    try:
        if mode == "sequential":
            compress_checkpoint(source, out, recipe, show_progress=False)
        else:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
            pyengine.compress(model, recipe, show_progress=False)
            pyengine.save(model, out)
        print(json.dumps({"ok": True, "added": vm("VmPeak") - base}))
    except (MemoryError, RuntimeError, OSError) as exc:
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}))
''')


def run_capped(tmp_path: Path, source: Path, out: Path, mode: str) -> dict:
    script = tmp_path / "capped_child.py"
    script.write_text(CHILD)
    root = Path(__file__).resolve().parents[2]
    # RLIMIT_AS counts address space, not memory: glibc keeps freed blocks of a few MB in
    # its heap (released to the kernel by malloc_trim, but still mapped) unless they come
    # from their own mappings, which a fixed 1 MiB mmap threshold and one arena ensure
    env = dict(os.environ, MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_=str(1 << 20),
               PYENGINE_NO_PROGRESS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root),
                                                        os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(script), str(source), str(out), mode,
                           str(MARGIN)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def read_tensors(path: Path) -> dict:
    from safetensors.torch import load_file
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def test_sequential_compression_fits_under_a_cap_smaller_than_the_checkpoint(tmp_path):
    import pyengine
    from pyengine.model.random import save_random_checkpoint
    from pyengine.quant.recipe import QuantConfig, Recipe
    from transformers import AutoModelForCausalLM

    source = save_random_checkpoint(
        tmp_path / "source", "llama", "tiny", dtype=torch.float32, max_shard_bytes=16 << 20,
        hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=8000)
    checkpoint_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    assert checkpoint_bytes > 1.5 * MARGIN  # the cap is well below the model

    capped = run_capped(tmp_path, source, tmp_path / "sequential", "sequential")
    assert capped["ok"], capped
    assert capped["added"] <= MARGIN

    in_memory = run_capped(tmp_path, source, tmp_path / "in-memory-capped", "in_memory")
    assert not in_memory["ok"], "the in-memory path fit under the cap: the cap does not bind"

    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    pyengine.compress(model, Recipe(quant={"_default": QuantConfig(4, 64)}),
                      show_progress=False)
    pyengine.save(model, tmp_path / "reference")
    got, want = read_tensors(tmp_path / "sequential"), read_tensors(tmp_path / "reference")
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    got_config = json.loads((tmp_path / "sequential" / "config.json").read_text())
    want_config = json.loads((tmp_path / "reference" / "config.json").read_text())
    assert got_config == want_config


def resident_file_bytes() -> int:
    """Bytes of file pages mapped into this process and resident (RssFile)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


def test_a_dropped_tensor_outside_the_layers_leaves_memory_while_its_file_neighbour_stays(
        tmp_path):
    """The table and the head in one file, read for the end of compress_checkpoint: once the
    head is quantized and dropped, its pages are no longer resident though the table read from
    the same file still is (each tensor is read through a mapping of its own byte range)."""
    from pyengine.model.random import save_random_checkpoint
    from pyengine.pipeline.streaming import SourceCheckpoint, _release

    source = save_random_checkpoint(
        tmp_path / "source", "llama", "tiny", dtype=torch.float32, max_shard_bytes=1 << 30,
        vocab_size=8192, hidden_size=512, intermediate_size=512, num_hidden_layers=1,
        num_attention_heads=8, num_key_value_heads=4)
    src = SourceCheckpoint(source)
    assert src.stored["lm_head.weight"].file == src.stored["model.embed_tokens.weight"].file
    model = src.skeleton()
    src.materialize(model, None)
    head_bytes = src.stored["lm_head.weight"].nbytes

    before = resident_file_bytes()
    assert torch.isfinite(model.lm_head.weight.sum())  # reads (and maps) every page of it
    touched = resident_file_bytes()
    assert touched - before >= 0.9 * head_bytes
    _release(model.lm_head)
    assert touched - resident_file_bytes() >= 0.9 * head_bytes
    table = model.get_submodule("model.embed_tokens").weight
    assert table.device.type == "cpu" and torch.isfinite(table.sum())
