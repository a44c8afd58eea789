"""Triton kernels of pyengine (``pyengine.kernels``; not a top-level ``kernels`` package, which
would shadow the PyPI project of that name that transformers imports).

Importing this package does not import triton; each kernel module does, and the ``triton``
backend of pyengine.ops loads them only when triton is installed.
"""
