"""The formats: the canonical quantized weight (``qweight``: QuantizedWeight, the float dtype
table) and its bit packing (``packing``), as docs/FORMAT.md specifies them. The Matryoshka bit
planes live with the Matryoshka weight (pyengine.matryoshka)."""
