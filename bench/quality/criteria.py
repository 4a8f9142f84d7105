"""The criteria compared: ICII variants (icprune.score) and the baselines (icprune.baselines).

Every criterion maps a trained model to one score per channel of each pruned layer (Tensor[C]
float64, higher = keep). The ICII grid is one axis at a time around two base variants, not the
full Cartesian product:

- ``feat``: ``source="features"``, ``read_at="bn"``, ``range_mode="layer"``, ``bins=64``,
  ``independence="correlation"``, ``lam=1``, ``norm="minmax"`` (icprune's defaults before this
  comparison);
- ``wts``: ``source="weights"``, ``range_mode="layer"``, ``bins=64``,
  ``independence="distance"``, ``lam=1``, ``norm="minmax"`` (the best data-free variant of the
  first experiment in the project's METHOD notes);

each varied along read point, range mode, independence form, lambda, bins and normalisation,
plus capacity alone (``IC``) and independence alone (``II``). Independence alone on weights with
``distance`` ranks channels as FPGM does (see :func:`icprune.baselines.fpgm`), so it is left to
the ``FPGM`` row.

Two more rows call :func:`icprune.score` with no scoring argument at all, so the table always
measures icprune's current defaults: ``icprune default`` (data-free, ``score(model)``) and
``icprune default, feat`` (the same settings on feature maps, ``score(model, data)``). They are
not candidates for the best variant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

import icprune
from bench.quality.models import Prunable
from icprune.baselines import bn_scale, fpgm, hrank, l1_norm, random_scores
from icprune.graph import read_points
from icprune.modes import frozen


@dataclass
class Context:
    """What a criterion may look at: the trained model, the calibration batches
    (list of Tensor[N, 1, H, W]), the pruned layers and the model's seed. ``cache`` keeps
    feature statistics between ICII variants that share them."""

    model: nn.Module
    calib: list[torch.Tensor]
    pruned: Sequence[Prunable]
    seed: int
    cache: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Variant:
    """One ICII variant: the arguments of :func:`icprune.score`, and which term is used
    (``"score"``, ``"capacity"`` or ``"independence"``)."""

    source: str
    read_at: str = "bn"
    range_mode: str = "layer"
    bins: int = 64
    independence: str = "correlation"
    lam: float = 1.0
    norm: str = "minmax"
    term: str = "score"

    def __call__(self, ctx: Context) -> dict[str, torch.Tensor]:
        layers = [p.layer for p in ctx.pruned]
        kwargs = dict(lam=self.lam, independence=self.independence, norm=self.norm)
        if self.source == "weights":
            scores = icprune.score(
                ctx.model,
                source="weights",
                layers=layers,
                bins=self.bins,
                range_mode=self.range_mode,
                **kwargs,
            )
        else:
            key = (self.read_at, self.bins, self.range_mode)
            if key not in ctx.cache:
                ctx.cache[key] = icprune.calibrate(
                    ctx.model,
                    ctx.calib,
                    layers=layers,
                    bins=self.bins,
                    range_mode=self.range_mode,
                    read_at=self.read_at,
                    progress=False,
                )
            scores = icprune.score(ctx.model, stats=ctx.cache[key], **kwargs)
        return {name: getattr(s, self.term) for name, s in scores.items()}

    def arguments(self) -> str:
        """The variant as ``icprune.score`` keyword arguments."""
        args = [f'source="{self.source}"']
        if self.source == "features":
            args.append(f'read_at="{self.read_at}"')
        args += [
            f'range_mode="{self.range_mode}"',
            f"bins={self.bins}",
            f'independence="{self.independence}"',
            f"lam={self.lam:g}",
            f'norm="{self.norm}"',
        ]
        return ", ".join(args)


FEAT = Variant("features")
WTS = Variant("weights", independence="distance")


def _module_param(ctx: Context, name: str, attr: str) -> torch.Tensor:
    return getattr(dict(ctx.model.named_modules())[name], attr)


def _l1(ctx: Context) -> dict[str, torch.Tensor]:
    return {p.layer: l1_norm(_module_param(ctx, p.layer, "weight")) for p in ctx.pruned}


def _bn_scale(ctx: Context) -> dict[str, torch.Tensor]:
    return {p.layer: bn_scale(_module_param(ctx, p.bn, "weight")) for p in ctx.pruned}


def _fpgm(ctx: Context) -> dict[str, torch.Tensor]:
    return {p.layer: fpgm(_module_param(ctx, p.layer, "weight")) for p in ctx.pruned}


def _random(ctx: Context) -> dict[str, torch.Tensor]:
    weights = {p.layer: _module_param(ctx, p.layer, "weight") for p in ctx.pruned}
    return {
        name: random_scores(w.shape[0], seed=1000 * ctx.seed + i)
        for i, (name, w) in enumerate(weights.items())
    }


def _hrank(ctx: Context) -> dict[str, torch.Tensor]:
    """HRank on the feature maps after the activation (where HRank reads them), averaged over
    all calibration images."""
    modules = dict(ctx.model.named_modules())
    layers = {p.layer: modules[p.layer] for p in ctx.pruned}
    points = read_points(ctx.model, layers, "activation")
    sums = {name: torch.zeros(modules[name].out_channels, dtype=torch.float64) for name in layers}
    handles = []

    def hook(name, activation):
        def record(_module, _inputs, output):
            maps = output if activation is None else activation(output)
            sums[name] += hrank(maps.detach()) * len(maps)

        return record

    for name, point in points.items():
        handles.append(modules[point.module].register_forward_hook(hook(name, point.activation)))
    try:
        with frozen(ctx.model):
            for batch in ctx.calib:
                ctx.model(batch)
    finally:
        for handle in handles:
            handle.remove()
    images = sum(len(batch) for batch in ctx.calib)
    return {name: total / images for name, total in sums.items()}


def _default_weights(ctx: Context) -> dict[str, torch.Tensor]:
    scores = icprune.score(ctx.model, layers=[p.layer for p in ctx.pruned])
    return {name: s.score for name, s in scores.items()}


def _default_features(ctx: Context) -> dict[str, torch.Tensor]:
    layers = [p.layer for p in ctx.pruned]
    scores = icprune.score(ctx.model, ctx.calib, layers=layers, progress=False)
    return {name: s.score for name, s in scores.items()}


Criterion = Callable[[Context], dict[str, torch.Tensor]]


def registry() -> dict[str, Criterion]:
    """All criteria, by name, in table order: ICII variants, icprune's defaults, baselines."""
    icii: dict[str, Variant] = {
        "ICII feat": FEAT,
        "ICII feat, read=output": replace(FEAT, read_at="output"),
        "ICII feat, read=activation": replace(FEAT, read_at="activation"),
        "ICII feat, range=channel": replace(FEAT, range_mode="channel"),
        "ICII feat, II=distance": replace(FEAT, independence="distance"),
        "ICII feat, lam=0.5": replace(FEAT, lam=0.5),
        "ICII feat, lam=2": replace(FEAT, lam=2.0),
        "ICII feat, bins=16": replace(FEAT, bins=16),
        "ICII feat, bins=256": replace(FEAT, bins=256),
        "ICII feat, norm=zscore": replace(FEAT, norm="zscore"),
        "IC feat": replace(FEAT, term="capacity"),
        "IC feat, range=channel": replace(FEAT, range_mode="channel", term="capacity"),
        "II feat": replace(FEAT, term="independence"),
        "ICII wts": WTS,
        "ICII wts, II=correlation": replace(WTS, independence="correlation"),
        "ICII wts, range=channel": replace(WTS, range_mode="channel"),
        "ICII wts, lam=0.5": replace(WTS, lam=0.5),
        "ICII wts, lam=2": replace(WTS, lam=2.0),
        "ICII wts, bins=16": replace(WTS, bins=16),
        "ICII wts, bins=256": replace(WTS, bins=256),
        "ICII wts, norm=zscore": replace(WTS, norm="zscore"),
        "IC wts": replace(WTS, term="capacity"),
    }
    defaults: dict[str, Criterion] = {
        "icprune default": _default_weights,
        "icprune default, feat": _default_features,
    }
    baselines: dict[str, Criterion] = {
        "L1 norm": _l1,
        "BN scale": _bn_scale,
        "FPGM": _fpgm,
        "HRank": _hrank,
        "random": _random,
    }
    return {**icii, **defaults, **baselines}


def variants() -> dict[str, Variant]:
    """The ICII variants of :func:`registry` that fuse capacity and independence (candidates
    for icprune's defaults)."""
    return {
        name: c for name, c in registry().items() if isinstance(c, Variant) and c.term == "score"
    }
