"""The criteria compared: icprune's scores (ICII and consumer-side) and the baselines.

A criterion maps a trained model (with its calibration data) to ``layer -> Tensor[C]`` scores
(float64, higher = keep) that :func:`icprune.plan` accepts. Per-layer criteria (L1, BN scale,
FPGM, icprune's ICII scores) give one vector per layer and leave the aggregation of a group's
members to :func:`icprune.plan` (mean of the members' min-max normalised scores), exactly what a
user of icprune gets; the group criteria of :mod:`icprune.criteria` give the same vector to every
member of a group.

Names (``data`` = reads calibration data; the others are data-free):

- ``L1``, ``BN scale``, ``FPGM``, ``random``: :mod:`icprune.baselines`;
- ``ICII wts``: ``icprune.score(model, criterion="icii")`` (icprune's data-free default before
  issue 13, the paper's form: entropy of each filter's weights and its distance to the other
  filters); ``IC wts``: its capacity term alone; ``ICII wts + L1``: z-scores of both added per
  layer;
- ``ICII feat``: ``icprune.score(model, data, criterion="icii")`` (feature maps after the
  BatchNorm; the data default before issue 13); ``ICII feat, act``: read after the activation;
  ``IC feat`` / ``II feat``: its capacity (entropy) / independence (mean distance) term alone;
- ``wE2``, ``wvar``, ``wcondvar``, ``greedy``, ``wbn``: the consumer-side group criteria of
  :mod:`icprune.criteria` (``wcondvar``/``greedy`` with ridge 1e-2 unless the name says ``r=``);
- ``E2``, ``var``, ``condvar``: experiment-only, the same without the consumer weight energy
  (:func:`unweighted`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import icprune
from bench.quality import models
from icprune.baselines import bn_scale, fpgm, l1_norm, random_scores
from icprune.calibrate import InputStats, calibrate_inputs
from icprune.consumers import followers, moments, ridged
from icprune.criteria import DATA_CRITERIA, group_scores


@dataclass
class Context:
    """What a criterion may look at.

    Attributes:
        model: the trained network (eval mode; never modified).
        groups: its dependency groups (:func:`icprune.dependency_groups`).
        calib: calibration batches, list of Tensor[N, ...] model inputs.
        seed: the model's seed (for ``random``).
        backend: :class:`icprune.ChannelStats` backend of the input statistics (``"torch"``:
            float64 Gram matrices; ``"auto"``: the fast float32 ones, for large models).
        example: a model input for shape-only passes (None: the digits nets' input).
        cache: statistics shared between criteria of one model.
    """

    model: nn.Module
    groups: list[icprune.Group]
    calib: list[torch.Tensor]
    seed: int
    backend: str = "torch"
    example: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        """The output layers of all groups (conv, linear and depthwise), in group order."""
        return list(dict.fromkeys(name for g in self.groups for name in g.layers))

    def modules(self) -> dict[str, nn.Module]:
        return dict(self.model.named_modules())

    def input_stats(self, images: int | None = None) -> InputStats:
        """Consumer input statistics (:func:`icprune.calibrate.calibrate_inputs`) over the
        calibration data, or over its first ``images`` images (each computed once)."""
        key = ("inputs", images)
        if key not in self.cache:
            example = self.example if self.example is not None else models.example_input()
            self.cache[key] = calibrate_inputs(
                self.model, subset(self.calib, images), example_inputs=example,
                backend=self.backend, progress=False,
            )  # fmt: skip
        return self.cache[key]


def subset(batches: list[torch.Tensor], images: int | None) -> list[torch.Tensor]:
    """The first ``images`` images of ``batches`` (all of them for None)."""
    if images is None:
        return batches
    out, left = [], images
    for batch in batches:
        if left <= 0:
            break
        out.append(batch[:left])
        left -= len(out[-1])
    return out


Criterion = Callable[[Context], dict[str, torch.Tensor]]


def _per_layer(fn: Callable[[nn.Module], torch.Tensor]) -> Criterion:
    def criterion(ctx: Context) -> dict[str, torch.Tensor]:
        modules = ctx.modules()
        return {name: fn(modules[name]) for name in ctx.layers}

    return criterion


def _bn_after(ctx: Context) -> dict[str, str]:
    return followers(ctx.model, ctx.layers)


def _bn_scale(ctx: Context) -> dict[str, torch.Tensor]:
    modules, follower = ctx.modules(), _bn_after(ctx)
    return {
        name: bn_scale(modules[follower[name]].weight)
        if name in follower
        else l1_norm(modules[name].weight)
        for name in ctx.layers
    }


def _random(ctx: Context) -> dict[str, torch.Tensor]:
    modules = ctx.modules()
    return {
        name: random_scores(modules[name].weight.shape[0], seed=1000 * ctx.seed + i)
        for i, name in enumerate(ctx.layers)
    }


def _icii(ctx: Context, data: bool, term: str = "score", read_at: str = "bn") -> dict:
    if data:
        scores = icprune.score(ctx.model, ctx.calib, criterion="icii", layers=ctx.layers,
                               read_at=read_at, progress=False)  # fmt: skip
    else:
        scores = icprune.score(ctx.model, criterion="icii", layers=ctx.layers)
    return {name: getattr(s, term) for name, s in scores.items()}


def _zsum(*parts: Criterion) -> Criterion:
    def criterion(ctx: Context) -> dict[str, torch.Tensor]:
        scored = [p(ctx) for p in parts]
        return {name: sum(_z(s[name]) for s in scored) for name in scored[0]}

    return criterion


def _z(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    std = v.std(unbiased=False)
    return (v - v.mean()) / std if std > 0 else torch.zeros_like(v)


def _group(criterion: str, ridge: float = 1e-2) -> Criterion:
    def fn(ctx: Context) -> dict[str, torch.Tensor]:
        stats = ctx.input_stats() if criterion in DATA_CRITERIA else None
        return group_scores(ctx.model, ctx.groups, criterion, stats, ridge=ridge)

    return fn


def unweighted(criterion: str, ridge: float = 1e-2) -> Criterion:
    """Experiment-only group criteria without the consumer weight energy: ``"E2"``
    (``E[x_c^2]``), ``"var"`` (``S_cc``) or ``"condvar"`` (``1 / (S + r I)^{-1}_cc``) of what
    each consumer reads, summed over the group's consumers (see :mod:`icprune.criteria`)."""

    def fn(ctx: Context) -> dict[str, torch.Tensor]:
        stats, out = ctx.input_stats(), {}
        for group in ctx.groups:
            score = torch.zeros(group.channels, dtype=torch.float64)
            for dep in group.dependencies:
                if dep.kind != "input" or dep.module not in stats:
                    continue
                _, second, cov = moments(stats[dep.module])
                if criterion == "E2":
                    value = second.diagonal()
                elif criterion == "var":
                    value = cov.diagonal()
                else:
                    value = 1.0 / torch.linalg.inv(ridged(cov, ridge)).diagonal()
                score += value[dep.offset : dep.offset + group.channels]
            out.update({layer: score for layer in group.layers})
        return out

    return fn


_L1 = _per_layer(lambda m: l1_norm(m.weight))

#: name -> (criterion, reads data)
REGISTRY: dict[str, tuple[Criterion, bool]] = {
    "random": (_random, False),
    "L1": (_L1, False),
    "BN scale": (_bn_scale, False),
    "FPGM": (_per_layer(lambda m: fpgm(m.weight)), False),
    "ICII wts": (lambda ctx: _icii(ctx, False), False),
    "IC wts": (lambda ctx: _icii(ctx, False, "capacity"), False),
    "ICII wts + L1": (_zsum(lambda ctx: _icii(ctx, False), _L1), False),
    "wbn": (_group("wbn"), False),
    "wbn + L1": (_zsum(_group("wbn"), _L1), False),
    "ICII feat": (lambda ctx: _icii(ctx, True), True),
    "ICII feat, act": (lambda ctx: _icii(ctx, True, read_at="activation"), True),
    "IC feat": (lambda ctx: _icii(ctx, True, "capacity"), True),
    "II feat": (lambda ctx: _icii(ctx, True, "independence"), True),
    "E2": (unweighted("E2"), True),
    "var": (unweighted("var"), True),
    "condvar": (unweighted("condvar"), True),
    "wE2": (_group("wE2"), True),
    "wvar": (_group("wvar"), True),
    "wcondvar": (_group("wcondvar"), True),
    "wcondvar, r=1e-4": (_group("wcondvar", 1e-4), True),
    "wcondvar, r=1": (_group("wcondvar", 1.0), True),
    "greedy": (_group("greedy"), True),
    "greedy, r=1e-1": (_group("greedy", 1e-1), True),
    "greedy, r=1": (_group("greedy", 1.0), True),
}


def registry() -> dict[str, tuple[Criterion, bool]]:
    """All criteria by name: ``name -> (criterion, needs data)``, in table order."""
    return dict(REGISTRY)
