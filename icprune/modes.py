"""Context managers that temporarily change a module's train/eval and autograd state."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["frozen"]


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with ``model`` in eval mode and autograd disabled, then restore it.

    On entry every submodule's ``training`` flag is recorded, ``model.eval()`` is called and
    ``torch.no_grad()`` is entered. On exit (normal or via an exception) grad mode is
    restored and each submodule gets back exactly the ``training`` flag it had, so mixed
    train/eval trees survive unchanged. Parameters and buffers are never touched.

    Args:
        model: any ``nn.Module``.

    Yields:
        ``model`` itself, for ``with frozen(net) as m:`` convenience.
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield model
    finally:
        for module, was_training in flags:
            module.training = was_training
