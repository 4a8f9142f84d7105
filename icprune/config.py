"""The settings of each pipeline step, as small frozen dataclasses.

- :class:`StatsConfig`: how a layer's channel statistics are kept (histogram bins, range,
  non-finite policy, backend);
- :class:`CalibrationConfig`: how calibration data is run through the model (read point, batches,
  device, progress, checkpoint, processes);
- :class:`ScoringConfig`: how channels are scored (criterion, ridge; the paper's criterion's
  source, weights and normalization);
- :class:`PlanConfig`: what a pruning plan aims at (target, ranking, limits, rounding).

Every function that takes a config (:func:`icprune.calibrate`, :func:`icprune.score`,
:func:`icprune.plan`, :func:`icprune.prune`,
:class:`icprune.integrations.torch_pruning.InformationImportance`) also takes each of its fields
as a keyword argument - ``score(model, data, bins=32, lam=0.5)`` - which overrides the field of
the config given (or of the default one): :func:`with_options` builds the configs from them.
The values are checked where they are used (the messages name the keyword).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StatsConfig:
    """How the statistics of each layer are kept (see :class:`icprune.ChannelStats`).

    Attributes:
        bins: B, histogram bins per channel (int, 2 to ``ChannelStats.MAX_BINS``); the data of
            a channel (or layer) occupies between about B/2 and B of them.
        range_mode: histogram range: ``"layer"`` (one bin layout shared by a layer's channels)
            or ``"channel"`` (each channel binned over its own range).
        nan_policy: NaN/Inf in a feature map or weight: ``"raise"`` (a ValueError naming the
            layer) or ``"zero"`` (read as 0 and counted in ``ChannelStats.nonfinite``).
        backend: who computes a batch's statistics: ``"auto"`` (Triton for CUDA tensors, the C++
            extension for CPU tensors, else torch), ``"triton"``, ``"cpp"`` or ``"torch"`` (the
            float64 reference). Weight statistics always use ``"torch"`` (weights are small).
        parts: the optional statistics kept, a subset of ``ChannelStats.PARTS``:
            ``"histogram"`` (capacity, the entropy) and ``"gram"`` (independence: correlation,
            distance; the Gram matrix is most of calibration's cost). Default both; e.g.
            ``("gram",)`` for a criterion or repair step that reads only second moments.
    """

    bins: int = 64
    range_mode: str = "layer"
    nan_policy: str = "raise"
    backend: str = "auto"
    parts: tuple[str, ...] = ("histogram", "gram")


@dataclass(frozen=True)
class CalibrationConfig:
    """How calibration data is run through the model (see :func:`icprune.calibrate`).

    Attributes:
        read_at: where a layer's feature map is read: ``"output"`` (the conv/linear output),
            ``"bn"`` (the BatchNorm that directly follows it) or ``"activation"`` (after the
            activation that follows that); the point actually used per layer, which can be an
            earlier one where the requested one does not exist, is stored in
            ``ChannelStats.read_at``. ``"output"`` needs no fx trace. ``"input"``: what every
            consumer layer of a dependency group reads (:func:`icprune.calibrate.calibrate_inputs`,
            for the default criterion and for repair).
        max_batches: stop after this many batches (an int >= 1; None: the whole of the data).
        device: device to run on (batches are moved there); None: the model's device. The model
            itself is never moved.
        progress: show a tqdm progress bar (only on a terminal).
        checkpoint: file that makes calibration resumable (None: no checkpoint). Every
            ``checkpoint_every`` batches, and at the end, the statistics, the number of batches
            done, the settings and fingerprints of the model and of the data seen are written to
            it atomically (a temporary file in the same folder renamed over it, so an
            interrupted write leaves the previous checkpoint; read back with
            ``torch.load(weights_only=True)``, and every value is validated). While calibration
            runs it holds an advisory lock, ``PATH.lock`` (removed at the end; released by the
            system if the process dies; none on Windows), so a second calibration into the same
            file fails at once instead of overwriting it. If the file exists when calibration
            starts, it resumes: the statistics are loaded and the batches already done are
            drawn from the data but not run through the model, so the data must yield the same
            batches in the same order (no shuffling, or a seeded one) - checked by the
            fingerprint (shape, dtype and 4096 evenly spaced values of every batch input). The
            result is bit-identical to an uninterrupted run. The file is kept after success,
            holding the final statistics: a rerun returns them without running the model
            (delete the file to start over). With ``distributed=True`` each process needs its
            own file (it holds that process's statistics).
        checkpoint_every: batches between checkpoint writes (an int >= 1; used with
            ``checkpoint``).
        distributed: combine the statistics of all processes of the default
            ``torch.distributed`` process group (:func:`icprune.all_reduce_stats`): every
            process calibrates its own shard of the batches (a shard may be empty) and gets the
            statistics of all of them, identical on every process and equal to one process
            calibrating every batch. An error on one process (e.g. a non-finite feature map
            raised during its forward) leaves the others waiting until the process group's
            timeout.
        gram_from_input: derive the Gram matrix of a 1x1 conv + BatchNorm layer read at
            ``"bn"`` from the Gram matrix of the conv's input (exact algebra, C_in^2 instead of
            C_out^2 work per sample: most of ResNet-50's Gram work; equal to the direct Gram
            within float32 rounding; :mod:`icprune.input_gram`) where it is cheaper and safe:
            CPU statistics (C++ backend), ``nan_policy="raise"``, and a calibration of more
            samples than the derivation's break-even (below it, the direct matrix, bit for bit).
            False: every Gram matrix from the feature map itself.
    """

    read_at: str = "bn"
    max_batches: int | None = None
    device: torch.device | str | None = None
    progress: bool = True
    checkpoint: str | os.PathLike | None = None
    checkpoint_every: int = 100
    distributed: bool = False
    gram_from_input: bool = True


@dataclass(frozen=True)
class ScoringConfig:
    """How channels are scored (see :func:`icprune.score`), higher = keep.

    Attributes:
        criterion: ``"greedy"``, ``"wcondvar"``, ``"wvar"``, ``"wE2"`` or ``"wbn"`` - the
            consumer-side criteria of :mod:`icprune.criteria` - or ``"icii"``, the paper's
            ``S_c = normalize(IC)_c + lam * normalize(II)_c`` within the layer; None: the
            measured defaults (docs/quality.md), ``"greedy"`` with data and ``"wbn"`` without,
            or ``"icii"`` when ``source`` is set or the statistics are per-layer feature maps.
        ridge: relative ridge (> 0) of the least-squares fits of ``"greedy"`` and
            ``"wcondvar"`` (and of the repair :func:`icprune.prune` runs).

    The other fields are ``"icii"``'s:
        source: where the statistics come from: ``"features"`` (feature maps over calibration
            data, or given statistics), ``"weights"`` (data-free: each layer's weights) or None
            (``"features"`` when data or statistics are given, else ``"weights"``).
        lam: weight of information independence against information capacity (a finite
            number >= 0; the capacity's weight is 1).
        independence: ``"distance"`` (mean Euclidean distance to the layer's other channels,
            in feature-map units) or ``"correlation"`` (``1 - mean |Pearson correlation|``).
        normalization: per-layer normalisation of both terms: ``"zscore"``, ``"minmax"`` (to
            [0, 1]) or ``"none"``. The keyword ``norm=`` sets it too.
    """

    criterion: str | None = None
    ridge: float = 1e-2
    source: str | None = None
    lam: float = 1.0
    independence: str = "distance"
    normalization: str = "zscore"


@dataclass(frozen=True)
class PlanConfig:
    """What a pruning plan aims at (see :func:`icprune.plan`). Exactly one of ``ratio``,
    ``flops_reduction`` and ``params_reduction`` must be set when planning.

    Attributes:
        ratio: fraction of channels to prune, in [0, 1): of all scored channels
            (``global_ranking=True``) or of each group.
        flops_reduction: fraction of MACs (= FLOPs) to remove, in [0, 1).
        params_reduction: fraction of parameters to remove, in [0, 1).
        global_ranking: rank the channels of all groups together (True) or prune every group by
            the same fraction (False).
        max_layer_ratio: at most this fraction of a group's channels is pruned, in (0, 1].
        min_channels: every group keeps at least this many channels (int >= 1).
        round_to: kept channel counts are rounded up to a multiple of this (int >= 1; 8 or 16
            keeps CPU/GPU kernels efficient).
        ignored_layers: module names never pruned (see
            :func:`icprune.structure.dependency.trace_dependencies`).
    """

    ratio: float | None = None
    flops_reduction: float | None = None
    params_reduction: float | None = None
    global_ranking: bool = True
    max_layer_ratio: float = 0.9
    min_channels: int = 1
    round_to: int = 1
    ignored_layers: Iterable[str] = ()


#: Keyword arguments that set a config field under another name: keyword -> field.
ALIASES = {"norm": "normalization"}


def with_options(where: str, options: Mapping[str, object], *classes: type) -> tuple:
    """The configs of a call, each with the keyword options that name its fields applied.

    Args:
        where: the function's name, for messages (e.g. ``"score"``).
        options: the call's keyword arguments: configs by their keyword (``stats_config=`` for
            a :class:`StatsConfig`, ``calibration_config=``, ``scoring_config=``,
            ``plan_config=``; None or absent: the defaults) and fields by name (``{"bins": 32,
            "lam": 0.5}``), each a field (or an :data:`ALIASES` key) of exactly one of
            ``classes``.
        classes: the config classes the function takes.

    Returns:
        A tuple with one instance per class, in order: the config given (or the defaults) with
        the fields named in ``options`` replaced.

    Raises:
        TypeError: a config of the wrong class, or an option that is no field of any config
            (the message lists the ones accepted).
        ValueError: a field given twice, by its name and by an alias (``norm`` and
            ``normalization``).
    """
    options = dict(options)
    configs = [(cls, options.pop(_keyword(cls), None)) for cls in classes]
    fields = {}
    for index, (cls, given) in enumerate(configs):
        if given is not None and not isinstance(given, cls):
            keyword = _keyword(cls)
            raise TypeError(
                f"{where}: {keyword} must be an icprune.{cls.__name__} or None, got "
                f"{type(given).__name__}"
            )
        fields.update({f.name: index for f in dataclasses.fields(cls)})
    changes: list[dict[str, object]] = [{} for _ in classes]
    for key, value in options.items():
        name = ALIASES.get(key, key)
        if name not in fields:
            accepted = sorted([*fields, *(a for a, f in ALIASES.items() if f in fields)])
            raise TypeError(
                f"{where}() got an unexpected keyword argument {key!r}; its settings are "
                f"{', '.join(accepted)} (or the configs "
                f"{', '.join(_keyword(cls) for cls in classes)})"
            )
        if name != key and name in options:
            raise ValueError(f"{where}: pass {name}= or its short form {key}=, not both")
        changes[fields[name]][name] = value
    return tuple(
        dataclasses.replace(cls() if given is None else given, **change)
        for (cls, given), change in zip(configs, changes, strict=True)
    )


def _keyword(cls: type) -> str:
    """The keyword a config class is passed by: StatsConfig -> ``stats_config``."""
    return cls.__name__.removesuffix("Config").lower() + "_config"
