"""Calibration-based quantizers (GPTQ, MatQuant) and what they share (layerwise.py)."""
