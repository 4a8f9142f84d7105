"""The criteria compared: icprune's scores, the consumer-side prototypes and the baselines.

A criterion maps a trained model (with its calibration data) to ``layer -> Tensor[C]`` scores
(float64, higher = keep) that :func:`icprune.plan` accepts. Per-layer criteria (L1, BN scale,
FPGM, icprune's ICII scores) give one vector per layer and leave the aggregation of a group's
members to :func:`icprune.plan` (mean of the members' min-max normalised scores), exactly what a
user of icprune gets; the group criteria of :mod:`bench.quality.prototypes` give the same vector
to every member of a group.

Names (``data`` = reads calibration data; the others are data-free):

- ``L1``, ``BN scale``, ``FPGM``, ``random``: :mod:`icprune.baselines`;
- ``ICII wts``: ``icprune.score(model)`` (icprune's data-free default, the paper's form: entropy
  of each filter's weights and its distance to the other filters); ``IC wts``: its capacity
  term alone; ``ICII wts + L1``: z-scores of both added per layer;
- ``ICII feat``: ``icprune.score(model, data)`` (feature maps after the BatchNorm); ``ICII feat,
  act``: read after the activation; ``IC feat`` / ``II feat``: its capacity (entropy) /
  independence (mean distance) term alone;
- ``E2``, ``var``, ``condvar``, ``wE2``, ``wvar``, ``wcondvar``, ``greedy``, ``wbn``: the
  consumer-side group criteria of :mod:`bench.quality.prototypes` (``condvar``/``wcondvar``/
  ``greedy`` with ridge 1e-2 unless the name says ``r=``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import icprune
from bench.quality import models, prototypes
from icprune.baselines import bn_scale, fpgm, l1_norm, random_scores


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

    def input_stats(self) -> prototypes.InputStats:
        """Consumer input statistics over the calibration data (computed once)."""
        if "inputs" not in self.cache:
            consumers = prototypes.consumers_of(self.groups)
            self.cache["inputs"] = prototypes.input_stats(
                self.model, self.calib, consumers, backend=self.backend
            )
        return self.cache["inputs"]


Criterion = Callable[[Context], dict[str, torch.Tensor]]


def _per_layer(fn: Callable[[nn.Module], torch.Tensor]) -> Criterion:
    def criterion(ctx: Context) -> dict[str, torch.Tensor]:
        modules = ctx.modules()
        return {name: fn(modules[name]) for name in ctx.layers}

    return criterion


def _bn_after(ctx: Context) -> dict[str, str]:
    return ctx.input_stats().follower


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
        scores = icprune.score(ctx.model, ctx.calib, layers=ctx.layers, read_at=read_at,
                               progress=False)  # fmt: skip
    else:
        scores = icprune.score(ctx.model, layers=ctx.layers)
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
        stats = ctx.input_stats() if criterion in prototypes.DATA_CRITERIA else None
        example = ctx.example if ctx.example is not None else models.example_input()
        return prototypes.group_scores(
            ctx.model, ctx.groups, criterion, stats, ridge=ridge, example=example
        )

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
    "E2": (_group("E2"), True),
    "var": (_group("var"), True),
    "condvar": (_group("condvar"), True),
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
