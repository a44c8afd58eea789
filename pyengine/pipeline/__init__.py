"""The compression pipeline: measuring layers (``scores``, ``calibrate`` with ``data``),
planning (``plan``), compressing in memory (``compress``, with its reports) and on disk, one
decoder layer at a time (``streaming``)."""
