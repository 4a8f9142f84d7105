"""Scores: information capacity and independence of each channel, fused into one score.

For a layer with statistics ``stats`` (see ``docs/method.md`` for the exact estimators):

- capacity ``IC_c`` = entropy of channel c's histogram, in nats;
- independence ``II_c`` = ``1 - mean_{j != c} |Corr_cj|`` (``"correlation"``; a constant channel
  gets 0) or ``mean_{j != c} ||a_c - a_j||`` (``"distance"``); 0 for a single-channel layer;
- score ``S_c = normalize(IC)_c + lam * normalize(II)_c``, normalised within the layer (the
  ``normalization`` of :class:`icprune.ScoringConfig`).

Higher scores mean keep; lower scores are pruned first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from icprune.calibrate import calibrate
from icprune.config import CalibrationConfig, ScoringConfig, StatsConfig, with_options
from icprune.stats.channel_stats import ChannelStats
from icprune.stats.weights import weight_stats

SOURCES = ("features", "weights")
INDEPENDENCE_FORMS = ("correlation", "distance")
NORMALIZATIONS = ("minmax", "zscore", "none")


@dataclass(frozen=True)
class LayerScores:
    """Scores of the C output channels of one layer (each Tensor[C] float64, higher = keep).

    Attributes:
        capacity: information capacity, histogram entropy in nats.
        independence: information independence (``1 - mean |corr|`` in [0, 1], or the mean
            distance to the other channels in feature-map units).
        score: ``normalize(capacity) + lam * normalize(independence)``.
    """

    capacity: torch.Tensor
    independence: torch.Tensor
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
    return stats.distance().sum(1) / (c - 1)


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
        low, spread = values.min(), values.max() - values.min()
    else:
        low, spread = values.mean(), (values.std(unbiased=False) if values.numel() > 1 else 0.0)
    spread = torch.as_tensor(spread, dtype=values.dtype, device=values.device)
    safe = torch.where(spread > 0, spread, torch.ones_like(spread))
    return torch.where(spread > 0, (values - low) / safe, torch.zeros_like(values))


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
    **options,
) -> dict[str, LayerScores]:
    """Score every output channel of every prunable layer of ``model``.

    The defaults are the variant that kept the most accurate channels in a measured comparison
    of criteria on real data (``docs/quality.md``, rerun with ``make quality``): data-free
    (weights), a layer-shared histogram range with 64 bins, distance-based independence,
    ``lam=1`` and z-score normalisation. ``score(model)`` is exactly that variant;
    ``score(model, data)`` uses the same settings on feature maps read after the BatchNorm.

    Args:
        model: the network; not modified.
        data: calibration batches for ``source="features"`` (see :func:`icprune.calibrate`).
        stats: statistics from an earlier :func:`icprune.calibrate` call, reused instead of
            ``data`` (``source="features"`` only).
        layers: qualified names of the layers to score (None: every Conv/Linear layer except
            the output layers).
        **options: the settings, as configs or field by field (a field overrides the config's
            value): ``scoring_config=`` (:class:`icprune.ScoringConfig`: ``source`` -
            ``"features"``, statistics of the feature maps over ``data`` or ``stats``;
            ``"weights"``, data-free, statistics of each layer's weights; None, ``"features"``
            when ``data`` or ``stats`` is given, else ``"weights"`` - and ``lam``,
            ``independence``, ``normalization``); ``stats_config=`` (:class:`icprune.StatsConfig`
            of the statistics computed here, from data or weights, ``backend`` included:
            :func:`icprune.weight_stats`); ``calibration_config=``
            (:class:`icprune.CalibrationConfig`, passed to :func:`icprune.calibrate`;
            ``source="features"`` with ``data`` only). E.g.
            ``score(model, data, lam=0.5, norm="minmax", bins=32, max_batches=8)``.

    Returns:
        dict qualified layer name -> :class:`LayerScores` (Tensors[C] float64, higher = keep).

    Raises:
        ValueError: inconsistent arguments (no data and no stats for ``source="features"``, both
            data and stats, data with ``source="weights"``), bad options, too few samples in a
            layer's statistics, or any error of calibration or of the weight statistics.
        TypeError: ``stats`` is not a mapping of :class:`ChannelStats`; an unknown keyword
            option or a config of the wrong class.
    """
    scoring_config, stats_config, calibration_config = with_options(
        "score", options, ScoringConfig, StatsConfig, CalibrationConfig
    )
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
