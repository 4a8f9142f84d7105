"""One call from a model to its pruned version: score -> plan -> apply."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain

from torch import Tensor, nn

from icprune.applying import apply
from icprune.batches import batch_input
from icprune.config import CalibrationConfig, PlanConfig, ScoringConfig, StatsConfig, with_options
from icprune.planning import PruningPlan, plan
from icprune.scoring import LayerScores, score


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune` returns.

    Attributes:
        model: the pruned model.
        plan: the :class:`PruningPlan` applied.
        scores: ``layer -> LayerScores`` the plan was made from.
    """

    model: nn.Module
    plan: PruningPlan
    scores: dict[str, LayerScores]


def prune(
    model: nn.Module,
    data: Iterable | None = None,
    *,
    example_inputs: Tensor | Sequence[Tensor] | None = None,
    layers: Iterable[str] | None = None,
    inplace: bool = False,
    **options,
) -> PruneResult:
    """Score, plan and apply in one call.

    Args:
        model: the network; left untouched unless ``inplace=True``.
        data: calibration batches (Tensors or ``(input, target)`` tuples) for feature-map
            scores; None scores data-free from the weights (``source="weights"``).
        example_inputs: input for MAC counting, e.g. ``torch.randn(1, 3, 224, 224)``; by default
            the first sample of the first batch of ``data`` (required when ``data`` is None).
        layers: the layers to score (see :func:`icprune.score`).
        inplace: prune ``model`` itself instead of a copy.
        **options: the settings, as configs or field by field (a field overrides the config's
            value): ``plan_config=`` (:class:`icprune.PlanConfig`: target, ranking, limits; see
            :func:`icprune.plan`), and ``scoring_config=``, ``stats_config=``,
            ``calibration_config=`` (see :func:`icprune.score`; ``source`` defaults to
            ``"features"`` with data and ``"weights"`` without). E.g.
            ``prune(model, data, flops_reduction=0.5, lam=0.5, bins=32, max_batches=8)``.

    Returns:
        :class:`PruneResult` ``(model, plan, scores)``.

    Raises:
        ValueError: no ``example_inputs`` and no data to take them from, or any error of
            scoring, planning or applying.
        TypeError: an unknown keyword option or a config of the wrong class.
    """
    plan_config, scoring_config, stats_config, calibration_config = with_options(
        "prune", options, PlanConfig, ScoringConfig, StatsConfig, CalibrationConfig
    )
    if example_inputs is None:
        if data is None:
            raise ValueError(
                "prune: without data, pass example_inputs (e.g. torch.randn(1, 3, 224, 224)) to "
                "count MACs at the right resolution"
            )
        batches = iter(data)
        first = next(batches, None)
        if first is None:
            raise ValueError("prune: data yielded no batches")
        example_inputs = batch_input(first)[:1]
        if batches is data:  # a one-shot iterator: put the first batch back
            data = chain([first], batches)
    if scoring_config.source is None:
        source = "features" if data is not None else "weights"
        scoring_config = dataclasses.replace(scoring_config, source=source)
    scores = score(
        model,
        data,
        layers=layers,
        scoring_config=scoring_config,
        stats_config=stats_config,
        calibration_config=calibration_config,
    )
    chosen = plan(model, scores, example_inputs=example_inputs, plan_config=plan_config)
    return PruneResult(apply(model, chosen, inplace=inplace), chosen, scores)
