"""SliceGPT with per-layer widths: structure transforms (structure.py) and PCA (pca.py)."""
