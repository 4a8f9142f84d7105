"""One call from a model to its pruned version: score -> plan -> apply -> repair."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain

from torch import Tensor, nn

from icprune.applying import apply
from icprune.batches import batch_input
from icprune.calibrate import CONSUMER_PARTS, calibrate_inputs
from icprune.config import CalibrationConfig, PlanConfig, ScoringConfig, StatsConfig, with_options
from icprune.criteria import DATA_CRITERIA
from icprune.planning import PruningPlan, plan
from icprune.scoring import LayerScores, resolved_criterion, score


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
    repair: bool | None = None,
    **options,
) -> PruneResult:
    """Score, plan, apply and repair in one call.

    With data the defaults are the pipeline docs/quality.md measured best on networks that
    played no part in choosing it: ``"greedy"`` scores from the statistics of what each consumer
    layer reads, then repair of those consumers from the same statistics (one calibration pass
    serves both). Re-estimating the BatchNorm statistics afterwards
    (:func:`icprune.recalibrate_bn`) is the caller's step: it helps with enough representative
    data and hurts with very little (it warns then).

    Args:
        model: the network; left untouched unless ``inplace=True``.
        data: calibration batches (Tensors or ``(input, target)`` tuples); None scores
            data-free (criterion ``"wbn"``) and does not repair.
        example_inputs: input for MAC counting, e.g. ``torch.randn(1, 3, 224, 224)``; by default
            the first sample of the first batch of ``data`` (required when ``data`` is None).
        layers: the layers to score (``criterion="icii"`` only, see :func:`icprune.score`).
        inplace: prune ``model`` itself instead of a copy.
        repair: repair the consumers of pruned channels from the statistics of their inputs
            (:func:`icprune.recovery.repair.repair`, with the scoring config's ``ridge``); None
            (default): True with data, False without (repair needs data).
        **options: the settings, as configs or field by field (a field overrides the config's
            value): ``plan_config=`` (:class:`icprune.PlanConfig`: target, ranking, limits; see
            :func:`icprune.plan`), and ``scoring_config=``, ``stats_config=``,
            ``calibration_config=`` (see :func:`icprune.score`: ``criterion`` defaults to
            ``"greedy"`` with data and ``"wbn"`` without). E.g.
            ``prune(model, data, flops_reduction=0.5, max_batches=8)``.

    Returns:
        :class:`PruneResult` ``(model, plan, scores)``.

    Raises:
        ValueError: no ``example_inputs`` and no data to take them from, ``repair=True``
            without data, or any error of scoring, planning, applying or repairing.
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
    if repair is None:
        repair = data is not None
    if repair and data is None:
        raise ValueError("prune: repair=True needs calibration data (data=...)")
    criterion = resolved_criterion(scoring_config, data, None)
    configs = {"stats_config": stats_config, "calibration_config": calibration_config}
    ignored = plan_config.ignored_layers
    stats = None
    if criterion in DATA_CRITERIA or repair:
        if criterion == "icii" and iter(data) is data:
            raise ValueError(
                "prune: criterion='icii' with repair reads data twice (feature maps, then the "
                "consumers' inputs); pass a list or a DataLoader, not a one-shot iterator - or "
                "repair=False"
            )
        inputs = dataclasses.replace(calibration_config, read_at="input")
        stats = calibrate_inputs(
            model, data, example_inputs=example_inputs, ignored_layers=ignored,
            stats_config=dataclasses.replace(stats_config, parts=CONSUMER_PARTS),
            calibration_config=inputs,
        )  # fmt: skip
    if criterion == "icii":
        data_free = scoring_config.source == "weights" or (
            scoring_config.source is None and data is None
        )  # the weights' form is data-free even when data came for the repair
        scores = score(model, None if data_free else data, layers=layers,
                       scoring_config=scoring_config, **configs)  # fmt: skip
    else:
        scoring_config = dataclasses.replace(scoring_config, criterion=criterion)
        scores = score(
            model, stats=stats if criterion in DATA_CRITERIA else None,
            example_inputs=example_inputs, ignored_layers=ignored, layers=layers,
            scoring_config=scoring_config, **configs,
        )  # fmt: skip
    chosen = plan(model, scores, example_inputs=example_inputs, plan_config=plan_config)
    pruned = apply(
        model, chosen, inplace=inplace, stats=stats if repair else None, ridge=scoring_config.ridge
    )
    return PruneResult(pruned, chosen, scores)
