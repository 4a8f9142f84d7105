"""Scores: information capacity and independence of each channel, fused into one score.

For a layer with statistics ``stats`` (see ``docs/method.md`` for the exact estimators):

- capacity ``IC_c`` = entropy of channel c's histogram, in nats;
- independence ``II_c`` = ``1 - mean_{j != c} |Corr_cj|`` (``"correlation"``; a constant channel
  gets 0) or ``mean_{j != c} ||a_c - a_j||`` (``"distance"``); 0 for a single-channel layer;
- score ``S_c = norm(IC)_c + lam * norm(II)_c``, normalised within the layer.

Higher scores mean keep; lower scores are pruned first.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from icprune.calibrate import calibrate
from icprune.stats.channel_stats import ChannelStats
from icprune.stats.weights import weight_stats

SOURCES = ("features", "weights")
INDEPENDENCE_FORMS = ("correlation", "distance")
NORMS = ("minmax", "zscore", "none")


@dataclass(frozen=True)
class LayerScores:
    """Scores of the C output channels of one layer (each Tensor[C] float64, higher = keep).

    Attributes:
        capacity: information capacity, histogram entropy in nats.
        independence: information independence (``1 - mean |corr|`` in [0, 1], or the mean
            distance to the other channels in feature-map units).
        score: ``norm(capacity) + lam * norm(independence)``.
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


def normalize(values: torch.Tensor, norm: str = "minmax") -> torch.Tensor:
    """Normalise scores within a layer.

    Args:
        values: Tensor[C] float.
        norm: ``"minmax"`` to [0, 1] (all zeros if the values are all equal), ``"zscore"`` to
            mean 0 and standard deviation 1 (all zeros if they are all equal), ``"none"``.

    Returns:
        Tensor[C], same dtype.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm == "none":
        return values
    if norm == "minmax":
        low, spread = values.min(), values.max() - values.min()
    else:
        low, spread = values.mean(), (values.std(unbiased=False) if values.numel() > 1 else 0.0)
    spread = torch.as_tensor(spread, dtype=values.dtype, device=values.device)
    safe = torch.where(spread > 0, spread, torch.ones_like(spread))
    return torch.where(spread > 0, (values - low) / safe, torch.zeros_like(values))


def layer_scores(
    stats: ChannelStats,
    *,
    lam: float = 1.0,
    independence: str = "distance",
    norm: str = "zscore",
) -> LayerScores:
    """Capacity, independence and fused score of one layer.

    The defaults are those of :func:`score`, chosen by the measured comparison in
    ``docs/quality.md``.

    Args:
        stats: the layer's statistics.
        lam: weight of independence in the score (finite, >= 0).
        independence: ``"distance"`` or ``"correlation"`` (see :func:`independence_of`).
        norm: normalisation of both terms (see :func:`normalize`).

    Returns:
        :class:`LayerScores` with three Tensor[C] float64.

    Raises:
        ValueError: ``lam`` not a finite number >= 0 (a bool is refused too), an unknown
            ``independence`` or ``norm``, or statistics with too few samples (1 for entropy and
            distance, 2 for correlation).
    """
    ok = isinstance(lam, (int, float)) and not isinstance(lam, bool)
    if not ok or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    capacity = stats.entropy()
    indep = independence_of(stats, independence)
    fused = normalize(capacity, norm) + lam * normalize(indep, norm)
    return LayerScores(capacity=capacity, independence=indep, score=fused)


def score(
    model: nn.Module,
    data: Iterable | None = None,
    *,
    source: str | None = None,
    lam: float = 1.0,
    independence: str = "distance",
    norm: str = "zscore",
    stats: Mapping[str, ChannelStats] | None = None,
    layers: Iterable[str] | None = None,
    bins: int = 64,
    range_mode: str = "layer",
    read_at: str = "bn",
    nan_policy: str = "raise",
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    backend: str = "auto",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    distributed: bool = False,
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
        source: ``"features"`` - statistics of the feature maps over ``data`` (or ``stats``);
            ``"weights"`` - data-free, statistics of each layer's weights; None (default) -
            ``"features"`` when ``data`` or ``stats`` is given, else ``"weights"``.
        lam: weight of independence against capacity (>= 0).
        independence: ``"distance"`` (default) or ``"correlation"``.
        norm: per-layer normalisation of both terms: ``"zscore"`` (default), ``"minmax"`` or
            ``"none"``.
        stats: statistics from an earlier :func:`icprune.calibrate` call, reused instead of
            ``data`` (``source="features"`` only).
        layers, bins, range_mode, read_at, nan_policy, max_batches, device, progress, backend,
            checkpoint, checkpoint_every, distributed: passed to
            :func:`icprune.calibrate` (``layers``, ``bins``, ``range_mode``, ``nan_policy`` also
            to the weight statistics).

    Returns:
        dict qualified layer name -> :class:`LayerScores` (Tensors[C] float64, higher = keep).

    Raises:
        ValueError: inconsistent arguments (no data and no stats for ``source="features"``, both
            data and stats, data with ``source="weights"``), bad options, too few samples in a
            layer's statistics, or any error of calibration or of the weight statistics.
        TypeError: ``stats`` is not a mapping of :class:`ChannelStats`.
    """
    if source is None:
        source = "weights" if data is None and stats is None else "features"
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "weights":
        if data is not None or stats is not None:
            raise ValueError("source='weights' is data-free: pass neither data nor stats")
        stats = weight_stats(
            model, layers=layers, bins=bins, range_mode=range_mode, nan_policy=nan_policy
        )
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
            bins=bins,
            range_mode=range_mode,
            read_at=read_at,
            nan_policy=nan_policy,
            max_batches=max_batches,
            device=device,
            progress=progress,
            backend=backend,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            distributed=distributed,
        )
    return {
        name: layer_scores(layer, lam=lam, independence=independence, norm=norm)
        for name, layer in stats.items()
    }
