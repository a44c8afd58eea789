"""Quantization: the recipe and per-layer configs (recipe.py), RTN with clip search (rtn.py), the
calibration-based quantizers GPTQ and MatQuant and what they share (layerwise.py), random
orthogonal rotations (rotation.py)."""
