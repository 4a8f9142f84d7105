"""Why feature-map scores fail on residual nets: each criterion against the true damage.

For every channel c of every dependency group of the selection split's residual net, the
*oracle damage* is the mean KL divergence ``KL(p_full || p_without_c)`` of the softmax outputs
over the first :data:`ORACLE_IMAGES` calibration images when channel c is zeroed at the output
of every BatchNorm of its group (for a residual-stream group that zeroes the stream channel
everywhere, as pruning does), with no recovery. A criterion is judged by the Spearman rank
correlation between its group scores and the oracle damage, averaged over the groups of each
type: *stream* groups (several convs write the channel: the residual stream) and *inner*
groups (one conv, e.g. the first conv of a block). Per-layer criteria are aggregated over a
group's members as :func:`icprune.plan` does (mean of min-max normalised member scores).

Also reported, per member of the stream groups: the standard deviation of its BatchNorm output
(its scale in the sum) and the Spearman correlation of that member's own ``ICII feat`` scores
with the oracle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from statistics import mean

import torch
import torch.nn.functional as F

import icprune
from bench.quality import criteria, data, models
from bench.quality.train import Recipe, trained
from icprune.consumers import moments

ORACLE_IMAGES = 256
#: Criteria compared with the oracle (names of :func:`bench.quality.criteria.registry`, plus
#: ``ICII at input``: icprune's ICII estimator on the statistics of the consumer's input).
COMPARED = ("random", "L1", "BN scale", "ICII wts", "ICII feat", "IC feat", "II feat",
            "ICII feat, act", "ICII at input", "E2", "var", "wE2", "wvar", "wcondvar", "greedy",
            "wbn")  # fmt: skip


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two Tensor[C] (average ranks for ties; 0 if constant)."""

    def ranks(v: torch.Tensor) -> torch.Tensor:
        v = v.double()
        order = v.argsort(stable=True)
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in v.unique():  # average ranks of ties
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else 0.0


def group_vector(group: icprune.Group, scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """The group's channel scores as :func:`icprune.plan` forms them: the mean of the scored
    output layers' min-max normalised scores."""
    parts = []
    for dep in group.dependencies:
        if dep.kind in ("output", "depthwise") and dep.module in scores:
            v = scores[dep.module].double()[dep.offset : dep.offset + group.channels]
            spread = v.max() - v.min()
            parts.append((v - v.min()) / spread if spread > 0 else torch.zeros_like(v))
    return torch.stack(parts).mean(0)


def oracle(model, group: icprune.Group, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    """Tensor[C]: mean KL(full || channel c zeroed at every BatchNorm of the group)."""
    modules = dict(model.named_modules())
    norms = [modules[d.module] for d in group.dependencies if d.kind == "batchnorm"]
    x = torch.cat(list(batches))
    with torch.no_grad():
        full = F.log_softmax(model(x), 1)
        damage = torch.zeros(group.channels, dtype=torch.float64)
        for c in range(group.channels):
            mask = torch.ones(group.channels)
            mask[c] = 0.0
            mask = mask.view(1, -1, 1, 1)
            handles = [n.register_forward_hook(lambda _m, _i, out, k=mask: out * k)
                       for n in norms]  # fmt: skip
            try:
                cut = F.log_softmax(model(x), 1)
            finally:
                for h in handles:
                    h.remove()
            damage[c] = F.kl_div(cut, full, log_target=True, reduction="batchmean").item()
    return damage


def run(
    arch: str,
    seeds: Sequence[int],
    digits: data.Digits,
    recipe: Recipe,
    cache: Path | None = None,
    progress: bool = True,
) -> dict:
    """The diagnosis tables for ``arch`` (a residual net) over ``seeds``.

    Returns:
        ``{"arch", "seeds", "criteria": {name: {"stream": [per-seed mean rho], "inner": [...]}},
        "members": [{"layer", "std", "rho"} per stream member, per seed]}``.
    """
    registry = criteria.registry()
    table = {name: {"stream": [], "inner": []} for name in COMPARED}
    members = []
    calib = data.load(None).calib if digits is None else digits.calib
    oracle_batches = [torch.cat(calib)[:ORACLE_IMAGES]]
    for seed in seeds:
        model = trained(arch, seed, digits.train_x, digits.train_y, recipe, cache, progress)
        groups = icprune.dependency_groups(model, models.example_input())
        ctx = criteria.Context(model, groups, calib, seed)
        damage = [oracle(model, g, oracle_batches) for g in groups]
        stream = [len(g.layers) > 1 for g in groups]
        inputs = ctx.input_stats()
        for name in COMPARED:
            if name == "ICII at input":
                scores = {}
                for g in groups:
                    reader = next(d for d in g.dependencies if d.kind == "input")
                    s = icprune.layer_scores(inputs[reader.module]).score
                    for layer in g.layers:
                        scores[layer] = s[reader.offset : reader.offset + g.channels]
            else:
                scores = registry[name][0](ctx)
            rhos = {"stream": [], "inner": []}
            for g, dmg, is_stream in zip(groups, damage, stream, strict=True):
                rho = spearman(group_vector(g, scores), dmg)
                rhos["stream" if is_stream else "inner"].append(rho)
            for kind in ("stream", "inner"):
                if rhos[kind]:
                    table[name][kind].append(mean(rhos[kind]))
        feat = registry["ICII feat"][0](ctx)
        bn_stats = icprune.calibrate(model, calib, layers=ctx.layers, progress=False)
        for g, dmg, is_stream in zip(groups, damage, stream, strict=True):
            if not is_stream:
                continue
            for layer in g.layers:
                s = bn_stats[layer]
                _, _, cov = moments(s)
                members.append({
                    "seed": seed,
                    "layer": layer,
                    "channels": g.channels,
                    "std": float(cov.diagonal().clamp(min=0).sqrt().mean()),
                    "rho": spearman(feat[layer], dmg),
                })  # fmt: skip
    return {"arch": arch, "seeds": list(seeds), "criteria": table, "members": members}
