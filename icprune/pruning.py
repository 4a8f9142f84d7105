"""One call from a model to its pruned version: score -> plan -> apply."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain

from torch import Tensor, nn

from icprune.applying import apply
from icprune.batches import batch_input
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
    ratio: float | None = None,
    flops_reduction: float | None = None,
    params_reduction: float | None = None,
    global_ranking: bool = True,
    max_layer_ratio: float = 0.9,
    min_channels: int = 1,
    round_to: int = 1,
    ignored_layers: Iterable[str] = (),
    inplace: bool = False,
    **score_options,
) -> PruneResult:
    """Score, plan and apply in one call.

    Args:
        model: the network; left untouched unless ``inplace=True``.
        data: calibration batches (Tensors or ``(input, target)`` tuples) for feature-map
            scores; None scores data-free from the weights (``source="weights"``).
        example_inputs: input for MAC counting, e.g. ``torch.randn(1, 3, 224, 224)``; by default
            the first sample of the first batch of ``data`` (required when ``data`` is None).
        ratio, flops_reduction, params_reduction, global_ranking, max_layer_ratio,
            min_channels, round_to, ignored_layers: see :func:`icprune.plan`.
        inplace: prune ``model`` itself instead of a copy.
        **score_options: passed to :func:`icprune.score` (``lam``, ``independence``, ``norm``,
            ``bins``, ``read_at``, ``max_batches``, ...; ``source`` defaults to ``"features"``
            with data and ``"weights"`` without).

    Returns:
        :class:`PruneResult` ``(model, plan, scores)``.

    Raises:
        ValueError: no ``example_inputs`` and no data to take them from, or any error of
            scoring, planning or applying.
    """
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
    score_options.setdefault("source", "features" if data is not None else "weights")
    scores = score(model, data, **score_options)
    chosen = plan(
        model,
        scores,
        example_inputs=example_inputs,
        ratio=ratio,
        flops_reduction=flops_reduction,
        params_reduction=params_reduction,
        global_ranking=global_ranking,
        max_layer_ratio=max_layer_ratio,
        min_channels=min_channels,
        round_to=round_to,
        ignored_layers=ignored_layers,
    )
    return PruneResult(apply(model, chosen, inplace=inplace), chosen, scores)
