"""Decompresses a compressed-tensors checkpoint with the compressed-tensors library itself (run
by tests/io/test_export.py with a Python that has it, e.g. vLLM's environment):

    python ct_decompress.py CHECKPOINT_DIR OUT.safetensors

The config is validated as the library's QuantizationConfig; every target module's tensors go
through its PackedQuantizationCompressor.decompress; OUT holds each module's dense weight
(float32) under "<module>.weight".
"""

import json
import sys
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig
from safetensors import safe_open
from safetensors.torch import save_file


def main(checkpoint: str, out: str) -> None:
    directory = Path(checkpoint)
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(config)
    files = sorted(directory.glob("*.safetensors"))
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {key: h for h in handles for key in h.keys()}
    dense = {}
    for scheme in parsed.config_groups.values():
        for module in scheme.targets:
            state = {name: where[f"{module}.{name}"].get_tensor(f"{module}.{name}")
                     for name in ("weight_packed", "weight_scale", "weight_shape",
                                  "weight_zero_point") if f"{module}.{name}" in where}
            result = PackedQuantizationCompressor.decompress(state, scheme)
            dense[f"{module}.weight"] = result["weight"].to(torch.float32).contiguous()
    save_file(dense, out)
    print(f"decompressed {len(dense)} modules")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
