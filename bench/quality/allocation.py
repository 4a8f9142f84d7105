"""How many and which channels each pruned layer keeps for a MAC-reduction target.

This module is the comparison's stand-in for ``icprune.plan``: when physical pruning lands,
:func:`same_counts` and :func:`own_allocation` are what it replaces. MACs are counted per image
for every Conv/Linear layer; a layer that keeps ``k_out`` of its ``C_out`` output channels and
reads ``k_in`` of its ``C_in`` input channels costs ``full * k_out/C_out * k_in/C_in``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bench.quality.models import Prunable
from icprune.graph import out_channels
from icprune.modes import frozen
from icprune.scoring import normalize


@dataclass(frozen=True)
class Costs:
    """MAC accounting of one model.

    Attributes:
        full: MACs per image of every Conv/Linear layer of the unpruned model (int).
        channels: output channel count C of every pruned layer.
        pruned: the pruned layers, in forward order.
    """

    full: dict[str, int]
    channels: dict[str, int]
    pruned: tuple[Prunable, ...]

    @property
    def total(self) -> int:
        """MACs per image of the unpruned model."""
        return sum(self.full.values())


def costs(model: nn.Module, pruned: Sequence[Prunable], example: torch.Tensor) -> Costs:
    """Count the MACs per image of every Conv/Linear layer of ``model`` with one forward pass of
    ``example`` (Tensor[N, ...], any N): convolutions ``numel(output)/N * C_in/groups * prod(
    kernel)``, linear layers ``in_features * out_features``."""
    full: dict[str, int] = {}
    handles = []

    def hook(name):
        def record(module, _inputs, output):
            if isinstance(module, nn.Linear):
                full[name] = module.in_features * module.out_features
            else:
                per_out = module.in_channels // module.groups * module.weight[0, 0].numel()
                full[name] = output[0].numel() * per_out

        return record

    modules = dict(model.named_modules())
    for name, module in modules.items():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with frozen(model):
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    channels = {p.layer: out_channels(modules[p.layer]) for p in pruned}
    return Costs(full, channels, tuple(pruned))


def macs(costs: Costs, counts: Mapping[str, int]) -> float:
    """MACs per image when pruned layer ``l`` keeps ``counts[l]`` channels (all if absent)."""
    keep = {p.layer: counts.get(p.layer, costs.channels[p.layer]) / costs.channels[p.layer]
            for p in costs.pruned}  # fmt: skip
    consumed = {p.consumer: keep[p.layer] for p in costs.pruned}
    return sum(f * keep.get(name, 1.0) * consumed.get(name, 1.0) for name, f in costs.full.items())


def reduction(costs: Costs, counts: Mapping[str, int]) -> float:
    """Fraction of the model's MACs removed (0 = none) by keeping ``counts``."""
    return 1.0 - macs(costs, counts) / costs.total


def _check_target(target: float) -> None:
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be a MAC reduction in (0, 1), got {target!r}")


def same_counts(costs: Costs, target: float) -> dict[str, int]:
    """Channel counts from one pruning ratio r shared by every pruned layer: layer l keeps
    ``max(1, round(C_l * (1 - r)))`` channels, with r the smallest ratio (bisection to 1e-9)
    whose MAC reduction reaches ``target``.

    Raises:
        ValueError: the target is not in (0, 1) or cannot be reached with one channel per layer.
    """
    _check_target(target)

    def counts_at(ratio: float) -> dict[str, int]:
        return {name: max(1, round(c * (1.0 - ratio))) for name, c in costs.channels.items()}

    if reduction(costs, counts_at(1.0)) < target:
        raise ValueError(
            f"a {target:.0%} MAC reduction is out of reach: keeping one channel per pruned layer "
            f"removes only {reduction(costs, counts_at(1.0)):.1%}"
        )
    low, high = 0.0, 1.0
    while high - low > 1e-9:
        mid = (low + high) / 2
        low, high = (low, mid) if reduction(costs, counts_at(mid)) >= target else (mid, high)
    return counts_at(high)


def keep_top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Tensor[C] bool: the ``count`` highest of ``scores`` (Tensor[C]); ties keep the lower
    channel index."""
    order = sorted(range(len(scores)), key=lambda c: (-float(scores[c]), c))
    keep = torch.zeros(len(scores), dtype=torch.bool)
    keep[order[:count]] = True
    return keep


def own_allocation(
    costs: Costs, scores: Mapping[str, torch.Tensor], target: float
) -> dict[str, torch.Tensor]:
    """The criterion allocates: each layer's scores are min-max normalised to [0, 1]
    (:func:`icprune.scoring.normalize`), all channels of all pruned layers are ranked together,
    and they are removed lowest first (ties: earlier layer, then lower channel index) until the
    MAC reduction reaches ``target``; the last channel of a layer is never removed.

    Args:
        costs: from :func:`costs`.
        scores: pruned layer -> Tensor[C] float scores, higher = keep.
        target: MAC reduction in (0, 1).

    Returns:
        pruned layer -> Tensor[C] bool, True = kept.

    Raises:
        ValueError: the target is out of reach with one channel per layer.
    """
    _check_target(target)
    layers = [p.layer for p in costs.pruned]
    normalized = [normalize(scores[name].double()).tolist() for name in layers]
    ranked = sorted((v, i, c) for i, values in enumerate(normalized) for c, v in enumerate(values))
    keep = {name: torch.ones(costs.channels[name], dtype=torch.bool) for name in layers}
    counts = dict(costs.channels)
    for _, i, c in ranked:
        if reduction(costs, counts) >= target:
            return keep
        layer = layers[i]
        if counts[layer] > 1:
            keep[layer][c] = False
            counts[layer] -= 1
    if reduction(costs, counts) >= target:
        return keep
    raise ValueError(
        f"a {target:.0%} MAC reduction is out of reach: keeping one channel per pruned layer "
        f"removes only {reduction(costs, counts):.1%}"
    )
