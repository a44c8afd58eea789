"""Calibration-based quantizers (GPTQ)."""
