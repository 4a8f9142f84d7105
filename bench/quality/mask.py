"""Channel masking: pruned channels are zeroed at their BatchNorm's output.

Zeroing a channel after its BatchNorm (and so after the ReLU that follows) makes it contribute
nothing to the layer that consumes it, in the forward and the backward pass, exactly as if the
filter had been removed; BN recalibration and fine-tuning of the masked model are therefore
those of the physically pruned one.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from bench.quality.models import Prunable


def masked(
    model: nn.Module, pruned: Sequence[Prunable], keep: Mapping[str, torch.Tensor]
) -> nn.Module:
    """A deep copy of ``model`` in which layer ``p.layer`` keeps only the channels with
    ``keep[p.layer]`` True (Tensor[C] bool): a forward hook on ``p.bn`` multiplies its output
    (Tensor[N, C, H, W]) by the mask. ``model`` itself is not modified."""
    copied = copy.deepcopy(model)
    modules = dict(copied.named_modules())
    for p in pruned:
        if p.layer not in keep:
            continue
        mask = keep[p.layer].to(torch.float32).view(1, -1, 1, 1)
        if not keep[p.layer].any():
            raise ValueError(f"masked: layer '{p.layer}' would keep no channel")
        modules[p.bn].register_forward_hook(lambda _m, _i, out, mask=mask: out * mask)
    return copied
