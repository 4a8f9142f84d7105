"""Triton kernels of icprune, installed as ``icprune.kernels``.

Nothing here queries a GPU at import time. Kernels run on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1`` (which must be set before this package is imported).
"""
