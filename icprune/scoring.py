"""Scores: how much each output channel of each prunable layer is worth keeping.

:func:`score` computes one of several criteria (:class:`icprune.ScoringConfig` ``criterion``).
The defaults are the ones a measured comparison chose on a selection split of nets and seeds and
confirmed on another (docs/quality.md): ``"greedy"`` with data, ``"wbn"`` without - the
consumer-side criteria of :mod:`icprune.criteria`, which score a channel by what the layers that
read it would lose.

``criterion="icii"`` is the paper's criterion (Tang et al., arXiv:2303.03645): information
capacity and independence fused into one score. On the comparison it did not beat L1 (the
feature-map form fell below random on residual nets; docs/quality.md). For a layer with
statistics ``stats`` (see ``docs/method.md`` for the exact estimators):

- capacity ``IC_c`` = entropy of channel c's histogram, in nats;
- independence ``II_c`` = ``1 - mean_{j != c} |Corr_cj|`` (``"correlation"``; a constant channel
  gets 0) or ``mean_{j != c} ||a_c - a_j||`` (``"distance"``); 0 for a single-channel layer;
- score ``S_c = normalize(IC)_c + lam * normalize(II)_c``, normalised within the layer (the
  ``normalization`` of :class:`icprune.ScoringConfig`).

Higher scores mean keep; lower scores are pruned first.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn

from icprune.batches import batch_input, iter_batches
from icprune.calibrate import CONSUMER_PARTS, InputStats, calibrate, calibrate_inputs
from icprune.config import CalibrationConfig, ScoringConfig, StatsConfig, with_options
from icprune.criteria import CRITERIA as CONSUMER_CRITERIA
from icprune.criteria import DATA_CRITERIA, group_scores
from icprune.stats.channel_stats import ChannelStats
from icprune.stats.weights import weight_stats
from icprune.structure.dependency import dependency_groups

#: Every criterion :func:`score` computes: the consumer-side ones and the paper's ``"icii"``.
CRITERIA = (*CONSUMER_CRITERIA, "icii")
SOURCES = ("features", "weights")
INDEPENDENCE_FORMS = ("correlation", "distance")
NORMALIZATIONS = ("minmax", "zscore", "none")


@dataclass(frozen=True)
class LayerScores:
    """Scores of the C output channels of one layer (each Tensor[C] float64, higher = keep).

    Attributes:
        capacity: information capacity, histogram entropy in nats (``"icii"`` only, else None).
        independence: information independence (``1 - mean |corr|`` in [0, 1], or the mean
            distance to the other channels in feature-map units; ``"icii"`` only, else None).
        score: ``normalize(capacity) + lam * normalize(independence)`` for ``"icii"``; the
            group's consumer-side score (:func:`icprune.criteria.group_scores`) otherwise.
    """

    capacity: torch.Tensor | None
    independence: torch.Tensor | None
    score: torch.Tensor


def independence_of(stats: ChannelStats, form: str = "correlation") -> torch.Tensor:
    """Information independence of each channel.

    Args:
        stats: statistics of one layer (at least 2 samples for ``"correlation"``).
        form: ``"correlation"``: ``1 - mean_{j != c} |Corr_cj|``, with 0 for constant channels
            (fully predictable); ``"distance"``: ``mean_{j != c} D_cj``.

    Returns:
        Tensor[C] float64; zeros for a layer with one channel.
    """
    if form not in INDEPENDENCE_FORMS:
        raise ValueError(f"independence must be one of {INDEPENDENCE_FORMS}, got {form!r}")
    c = stats.num_channels
    if c == 1:
        return torch.zeros(1, dtype=torch.float64, device=stats.device)
    if form == "correlation":
        others = stats.correlation().abs().sum(1) - 1.0  # the diagonal is exactly 1
        result = 1.0 - others / (c - 1)
        return torch.where(stats.constant(), torch.zeros_like(result), result)
    # The diagonal of the distance matrix is exactly 0.
    return stats.distance().sum(1).div_(c - 1)


def normalize(values: torch.Tensor, normalization: str = "minmax") -> torch.Tensor:
    """Normalise scores within a layer.

    Args:
        values: Tensor[C] float.
        normalization: ``"minmax"`` to [0, 1] (all zeros if the values are all equal),
            ``"zscore"`` to mean 0 and standard deviation 1 (all zeros if they are all equal),
            ``"none"``.

    Returns:
        Tensor[C], same dtype.

    Raises:
        ValueError: an unknown ``normalization``.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization (norm=) must be one of {NORMALIZATIONS}, got {normalization!r}"
        )
    if normalization == "none":
        return values
    if normalization == "minmax":
        low = values.min()
        spread = values.max() - low
    else:
        low, spread = values.mean(), (values.std(unbiased=False) if values.numel() > 1 else 0.0)
    spread = torch.as_tensor(spread, dtype=values.dtype, device=values.device)
    positive = spread > 0  # torch.where below, not a Python branch: nothing waits for the device
    safe = torch.where(positive, spread, 1.0)
    return torch.where(positive, (values - low) / safe, 0.0)


def layer_scores(stats: ChannelStats, **options) -> LayerScores:
    """Capacity, independence and fused score of one layer.

    The defaults are those of :func:`score`, chosen by the measured comparison in
    ``docs/quality.md``.

    Args:
        stats: the layer's statistics.
        **options: ``scoring_config=`` (:class:`icprune.ScoringConfig`: ``lam``,
            ``independence``, ``normalization``; its ``source`` plays no part here) and/or its
            fields by name (``lam=0.5``, ``norm="minmax"``), overriding the config's value.

    Returns:
        :class:`LayerScores` with three Tensor[C] float64.

    Raises:
        ValueError: ``lam`` not a finite number >= 0 (a bool is refused too), an unknown
            ``independence`` or ``normalization``, or statistics with too few samples (1 for
            entropy and distance, 2 for correlation).
        TypeError: an unknown keyword option.
    """
    (config,) = with_options("layer_scores", options, ScoringConfig)
    lam = config.lam
    ok = isinstance(lam, (int, float)) and not isinstance(lam, bool)
    if not ok or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    capacity = stats.entropy()
    indep = independence_of(stats, config.independence)
    fused = normalize(capacity, config.normalization) + lam * normalize(indep, config.normalization)
    return LayerScores(capacity=capacity, independence=indep, score=fused)


def score(
    model: nn.Module,
    data: Iterable | None = None,
    *,
    stats: Mapping[str, ChannelStats] | None = None,
    layers: Iterable[str] | None = None,
    example_inputs: torch.Tensor | None = None,
    ignored_layers: Iterable[str] = (),
    **options,
) -> dict[str, LayerScores]:
    """Score every output channel of every prunable layer of ``model``.

    The default criterion is the best one the given inputs can serve, chosen on the selection
    split and confirmed on the confirmation split of ``make quality`` (docs/quality.md): with
    ``data`` (or :class:`icprune.calibrate.InputStats`), ``"greedy"`` - backward elimination
    of the channels whose loss the consumer layers feel least after a least-squares re-fit, from
    the statistics of what each consumer reads; without data, ``"wbn"`` - the consumers' weight
    energy times the BatchNorm's second moment (:mod:`icprune.criteria`). ``"icii"`` is the
    paper's criterion and the default before; it is chosen when ``source`` is given or
    ``stats`` are per-layer feature-map statistics of :func:`icprune.calibrate`: capacity and
    independence of the feature maps (``source="features"``) or of the weights
    (``source="weights"``; layer-shared range, 64 bins, distance, ``lam=1``, z-scores).

    Args:
        model: the network; not modified.
        data: calibration batches (see :func:`icprune.calibrate`).
        stats: statistics from an earlier :func:`icprune.calibrate` call, reused instead of
            ``data``: :class:`icprune.calibrate.InputStats` (``read_at="input"``) for the
            consumer-side criteria, per-layer statistics for ``"icii"``.
        layers: ``"icii"``: qualified names of the layers to score (None: every Conv/Linear
            layer except the output layers).
        example_inputs: consumer-side criteria: input for the dependency trace (shapes only),
            e.g. ``torch.randn(1, 3, 224, 224)``; default: the first sample of ``data`` (or the
            shape ``stats`` were traced on); required for ``"wbn"``.
        ignored_layers: consumer-side criteria: module names left unpruned (their groups get no
            scores), as :func:`icprune.plan`.
        **options: the settings, as configs or field by field (a field overrides the config's
            value): ``scoring_config=`` (:class:`icprune.ScoringConfig`: ``criterion``,
            ``ridge``, and ``"icii"``'s ``source`` - ``"features"``, statistics of the feature
            maps over ``data`` or ``stats``; ``"weights"``, data-free, statistics of each layer's
            weights; None, ``"features"`` when ``data`` or ``stats`` is given, else
            ``"weights"`` - ``lam``, ``independence``, ``normalization``); ``stats_config=``
            (:class:`icprune.StatsConfig` of the statistics computed here, from data or weights,
            ``backend`` included: :func:`icprune.weight_stats`); ``calibration_config=``
            (:class:`icprune.CalibrationConfig`, passed to :func:`icprune.calibrate`; with data
            only). E.g. ``score(model, data, max_batches=8)`` or
            ``score(model, data, criterion="icii", lam=0.5)``.

    Returns:
        dict qualified layer name -> :class:`LayerScores` (Tensors[C] float64, higher = keep).
        For a consumer-side criterion every output layer of a dependency group holds the same
        vector, and ``capacity``/``independence`` are None.

    Raises:
        ValueError: inconsistent arguments (no data and no stats for ``source="features"``, both
            data and stats, data with ``source="weights"`` or a data-free criterion, ``source``
            with a consumer-side criterion, ``"wbn"`` without ``example_inputs``), bad options,
            too few samples in a layer's statistics, or any error of calibration or of the
            weight statistics.
        TypeError: ``stats`` of the wrong type for the criterion; an unknown keyword option or
            a config of the wrong class.
    """
    scoring_config, stats_config, calibration_config = with_options(
        "score", options, ScoringConfig, StatsConfig, CalibrationConfig
    )
    criterion = resolved_criterion(scoring_config, data, stats)
    if criterion != "icii":
        given = [k for k, v in (("source", scoring_config.source), ("layers", layers)) if v]
        defaults = ScoringConfig()
        given += [
            f"{name}={getattr(scoring_config, name)!r}"
            for name in ("lam", "independence", "normalization")
            if getattr(scoring_config, name) != getattr(defaults, name)
        ]
        if calibration_config.read_at not in ("bn", "input"):  # "bn": the default, unset
            given.append(f"read_at={calibration_config.read_at!r}")
        if given:
            given = ", ".join(given)
            raise ValueError(
                f"criterion={criterion!r} scores whole dependency groups from what each consumer "
                f"reads and does not take {given} (the 'icii' criterion's settings); drop it or "
                f"pass criterion='icii'"
            )
        return _consumer_scores(
            model, data, stats, criterion, scoring_config.ridge, example_inputs,
            ignored_layers, stats_config, calibration_config,
        )  # fmt: skip
    source = scoring_config.source
    if source is None:
        source = "weights" if data is None and stats is None else "features"
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "weights":
        if data is not None or stats is not None:
            raise ValueError("source='weights' is data-free: pass neither data nor stats")
        stats = weight_stats(model, layers=layers, stats_config=stats_config)
    elif stats is not None:
        if data is not None:
            raise ValueError("pass either data or precomputed stats, not both")
        if not isinstance(stats, Mapping) or not all(
            isinstance(layer, ChannelStats) for layer in stats.values()
        ):
            raise TypeError(
                "stats must be the dict layer name -> ChannelStats that icprune.calibrate "
                f"returns, got {type(stats).__name__}"
                + (
                    f" holding {sorted({type(v).__name__ for v in stats.values()})}"
                    if isinstance(stats, Mapping)
                    else ""
                )
            )
    elif data is None:
        raise ValueError(
            "source='features' needs calibration data (data=...) or precomputed stats "
            "(stats=icprune.calibrate(...)); without data use source='weights'"
        )
    else:
        stats = calibrate(
            model,
            data,
            layers=layers,
            stats_config=stats_config,
            calibration_config=calibration_config,
        )
    return {
        name: layer_scores(layer, scoring_config=scoring_config) for name, layer in stats.items()
    }


def resolved_criterion(config: ScoringConfig, data: Iterable | None, stats: Mapping | None) -> str:
    """The criterion :func:`score` computes for ``config`` (see :class:`icprune.ScoringConfig`):
    ``config.criterion``, or by default ``"icii"`` when ``config.source`` is set or ``stats``
    are per-layer statistics, else ``"greedy"`` with data or stats and ``"wbn"`` without.

    Raises:
        ValueError: an unknown criterion.
    """
    criterion = config.criterion
    if criterion is None:
        per_layer = stats is not None and not isinstance(stats, InputStats)
        if config.source is not None or per_layer:
            return "icii"
        return "greedy" if data is not None or stats is not None else "wbn"
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    return criterion


def _consumer_scores(
    model: nn.Module,
    data: Iterable | None,
    stats: Mapping[str, ChannelStats] | None,
    criterion: str,
    ridge: float,
    example_inputs: torch.Tensor | None,
    ignored_layers: Iterable[str],
    stats_config: StatsConfig,
    calibration_config: CalibrationConfig,
) -> dict[str, LayerScores]:
    """:func:`score` for the criteria of :mod:`icprune.criteria`."""
    if data is not None and stats is not None:
        raise ValueError("pass either data or precomputed stats, not both")
    if criterion not in DATA_CRITERIA:
        if data is not None or stats is not None:
            raise ValueError(
                f"criterion={criterion!r} is data-free: pass neither data nor stats (only "
                f"example_inputs)"
            )
    elif stats is not None:
        if not isinstance(stats, InputStats):
            raise TypeError(
                f"criterion={criterion!r} reads what each consumer layer reads: pass the stats "
                f"of icprune.calibrate(model, data, read_at='input'), got "
                f"{type(stats).__name__}"
            )
    elif data is None:
        raise ValueError(
            f"criterion={criterion!r} needs calibration data (data=...) or precomputed stats "
            f"(stats=icprune.calibrate(model, data, read_at='input')); without data use "
            f"criterion='wbn' with example_inputs=..."
        )
    else:
        if example_inputs is None:
            batches = iter_batches(data, None)
            first = next(batches, None)
            if first is None:
                raise ValueError("data yielded no batches; pass at least one batch of inputs")
            example_inputs = batch_input(first)[:1]
            if iter(data) is data:  # a one-shot iterator: put the first batch back
                data = chain([first], batches)
        stats = calibrate_inputs(
            model, data, example_inputs=example_inputs, ignored_layers=ignored_layers,
            stats_config=dataclasses.replace(stats_config, parts=CONSUMER_PARTS),
            calibration_config=dataclasses.replace(calibration_config, read_at="input"),
        )  # fmt: skip
    if example_inputs is None and isinstance(stats, InputStats):
        example_inputs = stats.example
    if example_inputs is None:
        raise ValueError(
            f"criterion={criterion!r} traces the model's dependency groups: pass "
            f"example_inputs=... (e.g. torch.randn(1, 3, 224, 224)); or criterion='icii' "
            f"with source='weights' for the paper's data-free scores, which need none"
        )
    groups = dependency_groups(model, example_inputs, ignored_layers=ignored_layers)
    vectors = group_scores(model, groups, criterion, stats, ridge=ridge)
    return {name: LayerScores(None, None, vec) for name, vec in vectors.items()}
