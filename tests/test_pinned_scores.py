"""Scores and plans pinned to values stored before the package was regrouped (tests/data/).

A move of code must not move a number: data-free scores (float64 reference backend) of resnet20
and mobilenet_v2, float64 feature-map scores of resnet20 and the kept channels of a 50 % FLOPs
plan for both resnet20 cases, against ``tests/data/pinned_scores.json``. The defaults since issue
13 are pinned too (stored when the greedy elimination was rewritten with deferred downdates, from
the explicit rank-1 version's output, which it matched): the ``wbn`` data-free scores of both
nets and the ``greedy`` elimination steps of resnet20 from float64 input statistics, with their
plans. Greedy steps are integers compared within the same tolerance, i.e. exactly. Scores are
compared within a relative 1e-9 of each vector's largest magnitude: the float64 Gram products
are BLAS calls whose last bits differ between CPUs (histogram counts, hence capacities, are
exact everywhere). The plans' kept indices are compared exactly; their adjacent group scores lie at
least 4e-6 apart (or tie exactly at 0 and 1, the ends of the min-max scale), far beyond that
tolerance.
"""

import json
from pathlib import Path

import pytest
import torch

import icprune
from icprune import models

PINNED = json.loads((Path(__file__).parent / "data" / "pinned_scores.json").read_text())
TOLERANCE = PINNED["tolerance"]


def _model(name: str) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    torch.manual_seed(0)
    if name == "resnet20":
        return models.resnet20(), (3, 32, 32)
    return models.mobilenet_v2(num_classes=10), (3, 64, 64)


def _scores(kind: str, model: torch.nn.Module, shape) -> dict:
    if kind == "weights":  # the default before issue 13: the paper's criterion, by name, on the
        return icprune.score(model, criterion="icii", backend="torch")  # float64 reference
    if kind == "wbn":  # the data-free default since issue 13
        return icprune.score(model, example_inputs=torch.zeros(1, *shape))
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(2, *shape, generator=g, dtype=torch.float64) for _ in range(2)]
    criterion = "greedy" if kind == "greedy_float64" else "icii"  # greedy: the default with data
    scores = icprune.score(
        model.double(), data, criterion=criterion, backend="torch", progress=False
    )
    model.float()
    return scores


CASES = [(name, kind) for name, kinds in PINNED["cases"].items() for kind in kinds]


@pytest.mark.parametrize(("name", "kind"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_scores_and_plan_are_pinned(name, kind):
    expected = PINNED["cases"][name][kind]
    model, shape = _model(name)
    scores = _scores(kind, model, shape)
    for layer, parts in expected["scores"].items():
        for part, values in parts.items():
            want = torch.tensor(values, dtype=torch.float64)
            got = getattr(scores[layer], part)
            scale = float(want.abs().max())
            torch.testing.assert_close(
                got, want, rtol=TOLERANCE, atol=TOLERANCE * scale, msg=f"{layer}.{part}"
            )
    if "plan_flops_reduction_0.5" not in expected:
        return
    chosen = icprune.plan(model, scores, example_inputs=torch.zeros(1, *shape), flops_reduction=0.5)
    kept = {g.layers[0]: k.tolist() for g, k in zip(chosen.groups, chosen.kept, strict=True)}
    assert kept == expected["plan_flops_reduction_0.5"]
    assert list(chosen.macs) == expected["macs"]
