"""Test configuration: Triton's interpreter on CPU-only machines, the `gpu` marker, and
tests/torchvision/ collected only where torchvision is installed.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so it is set here,
at collection start, whenever no CUDA device is present.

tests/torchvision/ needs torchvision, which lives in the second venv .venv-tv (torch 2.14.1 and
torchvision 0.29.1; the Makefile builds it). Where torchvision is not installed (the main .venv)
that folder is not collected, and the report header says so.
"""

import importlib.metadata
import os

import pytest
import torch

HAVE_CUDA = torch.cuda.is_available()
if not HAVE_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _installed(distribution: str) -> bool:
    # by its metadata: an import check would find tests/torchvision/ itself (tests/ is on
    # sys.path), a namespace package that shadows the name where torchvision is absent
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


HAVE_TORCHVISION = _installed("torchvision")
collect_ignore = [] if HAVE_TORCHVISION else ["torchvision"]


def pytest_report_header(config):
    if not HAVE_TORCHVISION:
        return (
            "tests/torchvision/: not collected, torchvision is not installed here (it runs in "
            ".venv-tv: make .venv-tv/.icprune-installed; .venv-tv/bin/python -m pytest "
            "tests/torchvision)"
        )
    return None


def pytest_collection_modifyitems(config, items):
    if HAVE_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    """A folder of real photographs (crops of scikit-learn's bundled samples) as PNG and JPEG
    files, 6 per class in two class subfolders ``a/`` and ``b/``, 40-64 px on a side."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("photos")
    photos = load_sample_images().images
    for c, name in enumerate("ab"):
        (root / name).mkdir()
        for i in range(6):
            side = 40 + 4 * i
            crop = np.ascontiguousarray(photos[c][50 * i : 50 * i + side, 30 : 30 + side + 8])
            suffix = ".png" if i % 2 else ".jpg"
            Image.fromarray(crop).save(root / name / f"img{i}{suffix}")
    return root
