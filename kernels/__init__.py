"""Triton kernels of pyengine, installed as ``pyengine.kernels``.

Importing this package does not import triton; each kernel module does, and the ``triton``
backend of pyengine.ops loads them only when triton is installed.
"""
