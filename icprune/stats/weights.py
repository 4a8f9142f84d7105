"""Data-free statistics: the same :class:`ChannelStats`, fed with a layer's weights.

For a prunable layer with C output channels, the weight ``W`` of shape ``(C, C_in/groups, *k)``
(conv) or ``(C, C_in)`` (linear) is read as C channels of ``K = W[0].numel()`` samples each: the
matrix A of ``docs/method.md`` is ``W.reshape(C, K)``. Biases are not included.

The weights go through the same backends as feature maps (:mod:`icprune.stats.backends`): by
default the C++ extension on the CPU and Triton on CUDA, whose Gram matrix ``W @ W.T`` is a
float32 product added in float64 (within 1e-5 of max|G| of the float64 reference, the contract
of docs/method.md). The classifier of a VGG is where this matters: its first Linear
(4096 x 25088) is a 4.2e11-MAC Gram, about 80 % of VGG-16-BN's data-free scoring in float64
(``bench/weight_stats.py`` measures both). ``backend="torch"`` keeps the float64 reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from torch import nn

from icprune.config import StatsConfig, with_options
from icprune.stats.channel_stats import ChannelStats
from icprune.structure.graph import prunable_layers
from icprune.structure.layers import out_channels


def weight_stats(
    model: nn.Module,
    *,
    layers: Iterable[str] | None = None,
    **options,
) -> dict[str, ChannelStats]:
    """Channel statistics of every prunable layer's weights (no data needed).

    Args:
        model: the network; not modified.
        layers: qualified names to use; None = every Conv/Linear layer except output layers.
        **options: ``stats_config=`` (:class:`icprune.StatsConfig`: ``bins``, ``range_mode``,
            ``nan_policy``, ``backend``) and/or its fields by name (``bins=32``), overriding the
            config's value. ``backend="auto"`` (default) is the C++ extension on the CPU and
            Triton on CUDA (float32 Gram products); ``"torch"`` the float64 reference. The
            result is deterministic for a given backend and machine.

    Returns:
        dict qualified layer name -> :class:`ChannelStats` with ``count = K`` samples per channel
        and ``read_at = "weights"``, on the device of each weight.

    Raises:
        ValueError: the model has no prunable layer, an unknown layer name, an untraceable model
            (``layers=None``), a backend that cannot run on a weight's device, or NaN/Inf in a
            weight with ``nan_policy="raise"`` (the message names the layer and its output
            channels).
        TypeError: a named layer is not a Conv/Linear module; an unknown keyword option.
    """
    (config,) = with_options("weight_stats", options, StatsConfig)
    selected = prunable_layers(model, layers)
    if not selected:
        raise ValueError(
            f"{type(model).__name__} has no prunable layer to score: no Conv/Linear module "
            f"other than its output layers (whose channels are the model's outputs)"
        )
    stats = {}
    for name, module in selected.items():
        weight = module.weight.detach()
        channels = out_channels(module)
        layer = ChannelStats(
            channels,
            **dataclasses.asdict(config),
            name=name,
            read_at="weights",
            device=weight.device,
        )
        # (C, K) -> K samples of C channels, laid out (N=K, C): a transposed view of the
        # row-major weight, which every backend reads in place (the Gram is W @ W.T).
        layer.update(weight.reshape(channels, -1).T)
        stats[name] = layer
    return stats
