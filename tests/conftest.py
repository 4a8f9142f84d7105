"""Test configuration: Triton's interpreter on CPU-only machines, and the `gpu` marker.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so it is set here,
at collection start, whenever no CUDA device is present.
"""

import os

import pytest
import torch

HAVE_CUDA = torch.cuda.is_available()
if not HAVE_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAVE_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
