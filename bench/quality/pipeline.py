"""Prune one trained model with one criterion at one target, recover, measure.

Pruning is icprune's own: :func:`icprune.plan` with ``global_ranking=False`` and one
``ratio`` (every dependency group prunes the same fraction of its channels, so every criterion
keeps the same number of channels per group at a given target and only *which* channels
differs), the smallest ratio that removes at least the target fraction of the MACs, then
:func:`icprune.apply`. Recovery steps (a :class:`Pipeline`):
repair from statistics (:func:`icprune.recovery.repair.repair`) and/or
:func:`icprune.recalibrate_bn`; none of them trains.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

import icprune
from bench.quality.criteria import Context, subset
from bench.quality.train import accuracy
from icprune.recovery.repair import repair


@dataclass(frozen=True)
class Pipeline:
    """What happens after the channels are removed.

    Attributes:
        name: table label.
        repair: ``None`` (no repair), ``"bias"`` (mean compensation only) or ``"lstsq"``
            (least-squares re-fit of the kept weights plus mean compensation).
        ridge: relative ridge of the least-squares fit.
        bn: re-estimate the BatchNorm statistics afterwards.
        images: calibration images used by repair and BN re-estimation (None: all).
    """

    name: str
    repair: str | None = None
    ridge: float = 1e-2
    bn: bool = False
    images: int | None = None


PIPELINES = {
    p.name: p
    for p in (
        Pipeline("none"),
        Pipeline("bn", bn=True),
        Pipeline("bias", repair="bias"),
        Pipeline("repair", repair="lstsq"),
        Pipeline("repair+bn", repair="lstsq", bn=True),
        Pipeline("repair r=1e-4", repair="lstsq", ridge=1e-4),
        Pipeline("repair r=1e-1", repair="lstsq", ridge=1e-1),
        Pipeline("repair r=1", repair="lstsq", ridge=1.0),
        Pipeline("bn, 64 img", bn=True, images=64),
        Pipeline("repair, 64 img", repair="lstsq", images=64),
        Pipeline("repair+bn, 64 img", repair="lstsq", bn=True, images=64),
    )
}


def uniform_ratio(ctx: Context, target: float, example: torch.Tensor) -> float:
    """The smallest fraction r (bisection to 1e-4) such that pruning r of every group's channels
    (``icprune.plan(ratio=r, global_ranking=False)``) removes at least ``target`` of the MACs.
    The counts do not depend on the scores, so r is computed once per model and target."""
    key = ("ratio", target)
    if key not in ctx.cache:
        ones = {name: torch.ones(m.weight.shape[0], dtype=torch.float64)
                for name, m in ctx.modules().items() if name in ctx.layers}  # fmt: skip

        def reduction(r: float) -> float:
            plan = icprune.plan(ctx.model, ones, example_inputs=example, ratio=r,
                                global_ranking=False)  # fmt: skip
            return plan.flops_reduction

        low, high = 0.0, 0.9
        if reduction(high) < target:
            raise ValueError(f"a {target:.0%} MAC reduction is out of reach")
        while high - low > 1e-4:
            mid = (low + high) / 2
            low, high = (low, mid) if reduction(mid) >= target else (mid, high)
        ctx.cache[key] = high
    return ctx.cache[key]


def make_plan(ctx: Context, scores: dict[str, torch.Tensor], target: float, example):
    """The plan that removes at least ``target`` of the MACs with one pruning fraction shared by
    every group (:func:`uniform_ratio`): the same per-group counts for every criterion."""
    ratio = uniform_ratio(ctx, target, example)
    return icprune.plan(
        ctx.model, scores, example_inputs=example, ratio=ratio, global_ranking=False
    )


def recover(
    ctx: Context,
    plan: icprune.PruningPlan,
    pruned: nn.Module,
    pipeline: Pipeline,
) -> nn.Module:
    """A copy of ``pruned`` after ``pipeline``'s steps (``pruned`` is untouched)."""
    model = copy.deepcopy(pruned)
    data = subset(ctx.calib, pipeline.images)
    if pipeline.repair is not None:
        stats = ctx.input_stats(pipeline.images)
        repair(
            ctx.model, model, plan, stats, ridge=pipeline.ridge, lstsq=pipeline.repair == "lstsq"
        )
    if pipeline.bn:
        icprune.recalibrate_bn(model, data, progress=False)
    return model


def measure(
    ctx: Context,
    scores: dict[str, torch.Tensor],
    target: float,
    pipelines: Sequence[Pipeline],
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    example: torch.Tensor,
) -> tuple[float, dict[str, float]]:
    """Prune at ``target`` and measure test accuracy after each pipeline.

    Returns:
        (MAC reduction reached, ``pipeline name -> accuracy`` in [0, 1]).
    """
    plan = make_plan(ctx, scores, target, example)
    pruned = icprune.apply(ctx.model, plan)
    accs = {p.name: accuracy(recover(ctx, plan, pruned, p), test_x, test_y) for p in pipelines}
    return plan.flops_reduction, accs
