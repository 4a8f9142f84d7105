"""Torch-Pruning 1.6 importance criterion from icprune's scores.

:class:`InformationImportance` plugs the scores of :func:`icprune.score` into Torch-Pruning's
pruners (``tp.pruner.BasePruner`` / ``MetaPruner``), with the same criteria and defaults
(docs/quality.md)::

    importance = InformationImportance(model, batches)   # "greedy", from real data
    importance = InformationImportance(model, example_inputs=example_inputs)  # "wbn", data-free
    pruner = tp.pruner.MetaPruner(model, example_inputs, importance, pruning_ratio=0.5,
                                  ignored_layers=[model.fc])
    pruner.step()

**Criteria** (``criterion=``, as :func:`icprune.score`): with data (or
:class:`icprune.calibrate.InputStats`, ``icprune.calibrate(model, data, read_at="input")``) the
default is ``"greedy"``, from the statistics of what each consumer layer reads; without data
``"wbn"``, from the consumers' weights and the BatchNorm parameters (it traces the model, so it
needs ``example_inputs=``, the pruner's). These consumer-side criteria (:mod:`icprune.criteria`,
also ``"wcondvar"``, ``"wvar"``, ``"wE2"``) score whole dependency groups. ``criterion="icii"``
is the paper's capacity + independence score of each layer's feature maps (from data or from
per-layer statistics, ``icprune.calibrate(model, data)``) or of its weights (data-free); it is
also the default for per-layer statistics and whenever ``source=`` is given, as for
:func:`icprune.score`.

**Group score.** Torch-Pruning asks for one score per channel of a group's root. Every member of
the group that prunes the *output* channels of a Conv/Linear layer icprune scores (handlers
``prune_conv_out_channels``, ``prune_depthwise_conv_out_channels``,
``prune_linear_out_channels``) contributes the score vector :func:`icprune.score` gives its
layer, min-max normalised to [0, 1] within the layer (:func:`icprune.planning.normalized_scores`),
at the member's channel indices, mapped to the root's channels through Torch-Pruning's
``root_idxs``. A root channel's score is the mean over the members that cover it: exactly the
group score :func:`icprune.plan` ranks by, so ``global_pruning=True`` ranks all groups on one
scale. For a consumer-side criterion every layer of a group holds its part of the group's one
vector, so the members agree up to their per-layer normalisation (and where each layer covers
all the group's channels, the score is that vector normalised); for ``"icii"`` it averages the
layers' own scores. Higher = keep. Root channels that no scored member covers (possible when a
``cat`` joins a scored and an unscored layer) get 1.0, the top of the scale: they are pruned
last. A group with no scored member gets None (Torch-Pruning skips it). BatchNorms and layers
pruned on their input side carry no score of their own and do not vote (a consumer-side
criterion reads them into the group's vector).

**Iterative pruning** (``iterative_steps > 1``) shrinks layers between steps, and with them what
every later layer reads. The policy per source:

- data-free (``"wbn"``, or ``"icii"`` without data): every call scores from the current weights
  (and, for ``"wbn"``, the current BatchNorm parameters and running variances), so every step
  sees the pruned (and, if the user trained in between, the trained) model. ``"wbn"`` re-traces
  the whole model at each call (one trace per group and step); ``"icii"`` reads only the group's
  layers;
- calibrated with data (``InformationImportance(model, data)``): the model is re-calibrated on
  ``data`` - the consumers' inputs (``read_at="input"``) for the consumer-side criteria, each
  layer's feature maps for ``"icii"`` - and re-scored at the first call after any watched layer's
  weight shape changed, i.e. once per step that pruned something (Torch-Pruning scores all groups
  of a step before it prunes any). The watched layers are every Conv/Linear of the model for the
  consumer-side criteria, the calibrated layers for ``"icii"``. Between two re-calibrations the
  scores stay those of the model as it was calibrated. ``data`` must therefore be re-iterable (a
  list or DataLoader, not a generator);
- calibrated statistics only (``InformationImportance(model, stats=...)``): a changed watched
  layer raises a ValueError naming it. Statistics of the smaller model cannot be derived exactly
  from those of the original: dropping channel rows of a histogram or Gram matrix would be exact
  only if the layer's inputs had not changed, but pruning the previous layers changes them. Pass
  ``data`` instead, or use ``iterative_steps=1``.

Scores are deterministic (same model, data and options -> same scores). Exact ties are ordered
by Torch-Pruning (``torch.topk``), not by channel index as in :func:`icprune.plan`; ``"greedy"``
gives each channel of a group a distinct rank, but equal ranks of equal-sized groups tie under
``global_pruning=True``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

try:
    import torch_pruning as tp
except ImportError as exc:
    raise ImportError(
        f"icprune.integrations.torch_pruning needs Torch-Pruning 1.6 ({exc}): "
        "pip install 'icprune[torch-pruning]'"
    ) from exc

from icprune.calibrate import CONSUMER_PARTS, InputStats, calibrate, calibrate_inputs
from icprune.config import CalibrationConfig, ScoringConfig, StatsConfig, with_options
from icprune.criteria import DATA_FREE_CRITERIA
from icprune.planning import normalized_scores
from icprune.scoring import CRITERIA, SOURCES, resolved_criterion, score
from icprune.stats.channel_stats import ChannelStats
from icprune.structure.layers import PRUNABLE_TYPES, in_channels, out_channels

if not tp.__version__.startswith("1.6."):
    warnings.warn(
        f"icprune.integrations.torch_pruning is written and tested for Torch-Pruning 1.6.x; "
        f"version {tp.__version__} is installed",
        stacklevel=2,
    )

#: Torch-Pruning handlers that prune the output channels of a layer icprune can score.
OUTPUT_HANDLERS = (
    tp.pruner.function.prune_conv_out_channels,
    tp.pruner.function.prune_depthwise_conv_out_channels,
    tp.pruner.function.prune_linear_out_channels,
)


class InformationImportance(tp.importance.Importance):
    """Torch-Pruning importance: the channel scores of :func:`icprune.score`, per group.

    Args:
        model: the network Torch-Pruning will prune (the same object; it is pruned in place by
            the pruner, never by this class, which only reads it).
        data: calibration batches (a re-iterable of Tensors ``[N, ...]`` or ``(input, target)``
            tuples, e.g. a list or a DataLoader; see :func:`icprune.calibrate`). The model is
            calibrated now, and again after each pruning step that changed it.
        stats: statistics from an earlier calibration, used instead of ``data`` (valid only
            until the model is pruned; see the module docstring), of the kind the criterion
            scores from: the :class:`icprune.calibrate.InputStats` of ``icprune.calibrate(model,
            data, read_at="input")`` for the consumer-side criteria (scored by ``"greedy"``
            unless ``criterion=`` says otherwise), or the per-layer statistics of
            ``icprune.calibrate(model, data)`` for ``"icii"`` (its default for them).
        layers: ``"icii"`` only: qualified names of the layers to score (None: every Conv/Linear
            except the output layers). Groups with no scored layer are skipped by the pruner.
            The consumer-side criteria score every group; leave groups unpruned with the
            pruner's ``ignored_layers``.
        example_inputs: consumer-side criteria: input for icprune's dependency trace (shapes
            only; a Tensor ``[1, ...]`` such as the pruner's ``example_inputs``); default: the
            first sample of ``data`` (or the shape ``stats`` were traced on); required for
            ``"wbn"``. Unused by ``"icii"``.
        **options: the settings, as configs or field by field (a field overrides the config's
            value), as for :func:`icprune.score`: ``scoring_config=``
            (:class:`icprune.ScoringConfig`: ``criterion`` - None for the defaults above -,
            ``ridge``, and ``"icii"``'s ``source`` - ``"features"``, statistics of the feature
            maps of ``data`` or ``stats``; ``"weights"``, data-free -, ``lam``,
            ``independence``, ``normalization``); ``stats_config=``
            (:class:`icprune.StatsConfig`, the settings of the statistics); ``calibration_config=``
            (:class:`icprune.CalibrationConfig` of every calibration, unused without ``data``;
            its ``checkpoint`` must stay None: the model changes between calibrations). E.g.
            ``criterion="icii", lam=0.5, norm="minmax", bins=32, max_batches=8,
            progress=False``.

    Attributes:
        criterion: the criterion scored, one of :data:`icprune.scoring.CRITERIA`.
        source: ``"icii"``'s source, ``"features"`` or ``"weights"``; None for the consumer-side
            criteria.
        stats: the statistics currently in use (:class:`icprune.calibrate.InputStats`, or
            ``layer -> ChannelStats`` for ``"icii"``), None when scoring data-free.
        calibrations: how many calibration passes over ``data`` have run so far.

    Calling the instance on a Torch-Pruning group returns a Tensor[len(group[0].idxs)] float64
    on the CPU (values in [0, 1], higher = keep), or None when no member of the group is scored.

    Raises:
        TypeError: ``model`` is no ``nn.Module``, ``stats`` is no mapping of ChannelStats,
            ``data`` is a one-shot iterator, an unknown keyword option.
        ValueError: inconsistent arguments (data and stats, data or stats with a data-free
            criterion, no data and no stats for a data criterion, ``"wbn"`` without
            ``example_inputs``, ``layers`` or ``source`` with a consumer-side criterion),
            statistics of the wrong kind for the criterion (the message says which
            ``icprune.calibrate`` call gives the right ones), bad options (an unknown criterion,
            a calibration checkpoint), statistics that do not match the model, or any error of
            :func:`icprune.calibrate` / :func:`icprune.score`.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable | None = None,
        *,
        stats: Mapping[str, ChannelStats] | None = None,
        layers: Iterable[str] | None = None,
        example_inputs: Tensor | Sequence[Tensor] | None = None,
        **options,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"InformationImportance: model must be the torch.nn.Module to prune, got "
                f"{type(model).__name__}"
            )
        scoring_config, stats_config, calibration_config = with_options(
            "InformationImportance", options, ScoringConfig, StatsConfig, CalibrationConfig
        )
        if calibration_config.checkpoint is not None:
            raise ValueError(
                "InformationImportance: checkpoint= cannot be used: the model is re-calibrated "
                "after every pruning step, and a checkpoint holds one model's statistics; "
                "calibrate once with icprune.calibrate(..., checkpoint=...) and pass stats= instead"
            )
        if scoring_config.criterion is not None and scoring_config.criterion not in CRITERIA:
            raise ValueError(
                f"InformationImportance: criterion must be one of {CRITERIA} or None (the "
                f"defaults: 'greedy' with data, 'wbn' without), got {scoring_config.criterion!r}"
            )
        criterion = resolved_criterion(scoring_config, data, stats)
        if layers is not None and not isinstance(layers, str):
            layers = list(layers)  # read again at every re-calibration
        self.model = model
        self.criterion = criterion
        self.source: str | None = None
        self.data = data
        self.stats: dict[str, ChannelStats] | None = None
        self.calibrations = 0
        # Torch-Pruning prunes modules in place, so these module -> name keys stay valid.
        self._names = {module: name for name, module in model.named_modules()}
        self._layers_option = layers
        self._example_inputs = example_inputs
        self._stats_config = stats_config
        self._calibration_config = calibration_config
        self._vectors: dict[str, Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        if criterion == "icii":
            self._init_icii(scoring_config, data, stats, layers)
        else:
            self._init_consumer(scoring_config, data, stats, layers)

    def _init_icii(self, scoring_config, data, stats, layers) -> None:
        source = scoring_config.source
        if source is None:
            source = "weights" if data is None and stats is None else "features"
        if source not in SOURCES:
            raise ValueError(
                f"InformationImportance: source must be one of {SOURCES} or None, got {source!r}"
            )
        self.source = source
        self._scoring_config = dataclasses.replace(scoring_config, criterion="icii", source=source)
        if source == "weights":
            if data is not None or stats is not None:
                raise ValueError(
                    "InformationImportance: source='weights' is data-free: pass neither data nor "
                    "stats"
                )
            # Scoring every layer once now checks the options and the weights early.
            self._layers = frozenset(self._weight_vectors(layers))
        else:
            self._init_data(data, stats)

    def _init_consumer(self, scoring_config, data, stats, layers) -> None:
        criterion = self.criterion
        given = [
            what
            for what, value in (("layers=", layers), ("source=", scoring_config.source))
            if value is not None
        ]
        if given:
            raise ValueError(
                f"InformationImportance: criterion={criterion!r} scores whole dependency groups "
                f"and takes no {' or '.join(given)} (settings of criterion='icii'); drop it "
                f"(leave groups unpruned with the pruner's ignored_layers), or pass "
                f"criterion='icii'"
            )
        self._scoring_config = dataclasses.replace(scoring_config, criterion=criterion)
        if criterion not in DATA_FREE_CRITERIA:
            self._init_data(data, stats)
            return
        if data is not None or stats is not None:
            raise ValueError(
                f"InformationImportance: criterion={criterion!r} is data-free: pass neither data "
                f"nor stats, only example_inputs=...; with data drop criterion= (the default "
                f"with data is 'greedy')"
            )
        if self._example_inputs is None:
            raise ValueError(
                f"InformationImportance: criterion={criterion!r} (data-free, the default "
                f"without data) traces the model's dependency groups: pass example_inputs=... "
                f"(the pruner's example inputs, e.g. torch.randn(1, 3, 224, 224)); or pass "
                f"calibration data; or criterion='icii' for the paper's data-free weight scores, "
                f"which need none"
            )
        # Scoring every group once now checks the options, the trace and the weights early.
        self._layers = frozenset(self._weight_vectors(None))

    def _init_data(self, data, stats) -> None:
        """Calibrate on ``data`` or take ``stats`` (the criteria scored from statistics)."""
        if stats is not None:
            if data is not None:
                raise ValueError(
                    "InformationImportance: pass either data (re-calibrated after every pruning "
                    "step) or stats (from icprune.calibrate), not both"
                )
            self._use(stats)
        elif data is None:
            calibrate_call = (
                "icprune.calibrate(model, data)"
                if self.criterion == "icii"
                else "icprune.calibrate(model, data, read_at='input')"
            )
            what = (
                "source='features'" if self.criterion == "icii" else f"criterion={self.criterion!r}"
            )
            free = (
                "InformationImportance(model, criterion='icii') (data-free)"
                if self.criterion == "icii"
                else "InformationImportance(model, example_inputs=...) (data-free, 'wbn')"
            )
            raise ValueError(
                f"InformationImportance: {what} needs calibration data "
                f"(InformationImportance(model, data)) or stats={calibrate_call}; without data "
                f"use {free}"
            )
        else:
            if isinstance(data, Iterator):
                raise TypeError(
                    f"InformationImportance: data is a one-shot {type(data).__name__}, but it is "
                    f"read again after every pruning step; pass a list of batches or a DataLoader"
                )
            self._calibrate()

    @torch.no_grad()
    def __call__(self, group) -> Tensor | None:
        """Score the channels of one Torch-Pruning group.

        Args:
            group: a ``torch_pruning.dependency.Group`` of ``model`` (as the pruner passes it).

        Returns:
            Tensor[len(group[0].idxs)] float64 on the CPU, in [0, 1] (higher = keep), one score
            per root channel in the order of ``group[0].root_idxs``; None if no member of the
            group is a layer icprune scores.

        Raises:
            ValueError: the group holds a layer that is not part of ``model``; or (``stats`` given
                without ``data``) a watched layer changed shape since calibration.
        """
        from_stats = self.stats is not None
        if from_stats:
            self._refresh()
            scored = self._vectors.keys()
        else:
            scored = self._layers
        members = [
            (self._name_of(dep.target.module), idxs, group[i].root_idxs)
            for i, (dep, idxs) in enumerate(group)
            if dep.handler in OUTPUT_HANDLERS
        ]
        members = [m for m in members if m[0] in scored]
        if not members:
            return None
        if from_stats:
            vectors = self._vectors
        else:
            vectors = self._weight_vectors(list(dict.fromkeys(m[0] for m in members)))
        positions = {root: i for i, root in enumerate(group[0].root_idxs)}
        total = torch.zeros(len(positions), dtype=torch.float64)
        count = torch.zeros(len(positions), dtype=torch.float64)
        for name, idxs, roots in members:
            # Channels without a root channel (Torch-Pruning marks them None) do not vote.
            pairs = [
                (idx, positions[root])
                for idx, root in zip(idxs, roots, strict=True)
                if root in positions
            ]
            if not pairs:
                continue
            channel, where = torch.tensor(pairs, dtype=torch.int64).T
            total.index_add_(0, where, vectors[name][channel])
            count.index_add_(0, where, torch.ones(len(pairs), dtype=torch.float64))
        if not count.any():
            return None
        return torch.where(count > 0, total / count.clamp(min=1), torch.ones_like(total))

    def _name_of(self, module: nn.Module) -> str:
        name = self._names.get(module)
        if name is None:
            raise ValueError(
                f"InformationImportance: Torch-Pruning's group holds a {type(module).__name__} "
                f"that is not a module of the model this importance was built for; build it "
                f"with the model the pruner prunes: InformationImportance(model, ...)"
            )
        return name

    def _weight_vectors(self, layers: Iterable[str] | None) -> dict[str, Tensor]:
        """Normalised data-free score vectors from the current weights: of ``layers`` for
        ``"icii"``, of every group for a consumer-side criterion (one trace of the model)."""
        if self.criterion == "icii":
            scores = score(
                self.model,
                layers=layers,
                scoring_config=self._scoring_config,
                stats_config=self._stats_config,
            )
        else:
            scores = score(
                self.model,
                example_inputs=self._example_inputs,
                scoring_config=self._scoring_config,
                stats_config=self._stats_config,
            )
        return normalized_scores(scores, self.model)

    def _calibrate(self) -> None:
        if self.criterion == "icii":
            stats = calibrate(
                self.model,
                self.data,
                layers=self._layers_option,
                stats_config=self._stats_config,
                calibration_config=self._calibration_config,
            )
        else:  # what the consumers read, as icprune.score and icprune.prune calibrate
            stats = calibrate_inputs(
                self.model,
                self.data,
                example_inputs=self._example_inputs,
                stats_config=dataclasses.replace(self._stats_config, parts=CONSUMER_PARTS),
                calibration_config=dataclasses.replace(self._calibration_config, read_at="input"),
            )
        self._use(stats)
        self.calibrations += 1

    def _use(self, stats: Mapping[str, ChannelStats]) -> None:
        """Check ``stats`` against the criterion and the model, score them, remember the weight
        shapes of the watched layers."""
        if not isinstance(stats, Mapping) or not all(
            isinstance(layer, ChannelStats) for layer in stats.values()
        ):
            wanted = (
                "the dict layer -> ChannelStats that icprune.calibrate returns"
                if self.criterion == "icii"
                else "the InputStats that icprune.calibrate(model, data, read_at='input') returns"
            )
            raise TypeError(
                f"InformationImportance: stats must be {wanted}, got {type(stats).__name__}"
            )
        if not stats:
            raise ValueError(
                "InformationImportance: stats is empty, so no group could be scored; pass the "
                "statistics icprune.calibrate returned for this model"
            )
        self._check_kind(stats)
        modules = dict(self.model.named_modules())
        consumer = self.criterion != "icii"
        for name, layer in stats.items():
            module = modules.get(name)
            if not isinstance(module, PRUNABLE_TYPES):
                raise ValueError(
                    f"InformationImportance: stats[{name!r}] names no Conv/Linear layer of this "
                    f"model; pass the statistics icprune.calibrate returned for this model"
                )
            channels = in_channels(module) if consumer else out_channels(module)
            if channels != layer.num_channels:
                side = "input" if consumer else "output"
                raise ValueError(
                    f"InformationImportance: stats[{name!r}] holds {layer.num_channels} channels "
                    f"but the layer has {channels} {side} channels; calibrate this model as it "
                    f"is now"
                )
        self.stats = stats if consumer else dict(stats)
        if consumer:
            scores = score(
                self.model,
                stats=stats,
                example_inputs=self._example_inputs,
                scoring_config=self._scoring_config,
                stats_config=self._stats_config,
                calibration_config=self._calibration_config,
            )
            watched = [name for name, m in modules.items() if isinstance(m, PRUNABLE_TYPES)]
        else:
            scores = score(self.model, stats=self.stats, scoring_config=self._scoring_config)
            watched = list(self.stats)
        self._vectors = normalized_scores(scores, self.model)
        self._shapes = {name: tuple(modules[name].weight.shape) for name in watched}

    def _check_kind(self, stats: Mapping[str, ChannelStats]) -> None:
        """Raise if ``stats`` are not the kind of statistics the criterion scores from."""
        if self.criterion == "icii" and isinstance(stats, InputStats):
            raise ValueError(
                "InformationImportance: criterion='icii' scores each layer's own feature maps, "
                "but stats holds what each consumer layer reads (InputStats, read_at='input'); "
                "pass stats=icprune.calibrate(model, data) (per-layer statistics), or drop "
                "criterion= (and source=) to score these by the default 'greedy'"
            )
        if self.criterion != "icii" and not isinstance(stats, InputStats):
            raise ValueError(
                f"InformationImportance: criterion={self.criterion!r} scores from what each "
                f"consumer layer reads, but stats holds per-layer feature-map statistics; pass "
                f"stats=icprune.calibrate(model, data, read_at='input'), or "
                f"criterion='icii' to score these"
            )

    def _refresh(self) -> None:
        """Re-calibrate if a watched layer changed shape (pruned) since the last calibration."""
        modules = dict(self.model.named_modules())
        for name, shape in self._shapes.items():
            now = tuple(modules[name].weight.shape) if name in modules else None
            if now == shape:
                continue
            if self.data is None:
                free = (
                    "InformationImportance(model, criterion='icii')"
                    if self.criterion == "icii"
                    else "InformationImportance(model, example_inputs=...)"
                )
                raise ValueError(
                    f"InformationImportance: layer {name!r} has changed from weight shape "
                    f"{shape} to {now} since its statistics were calibrated (an earlier pruning "
                    f"step, e.g. with iterative_steps > 1). The pruned model's statistics cannot "
                    f"be derived from the original's (its remaining channels see other inputs). "
                    f"Pass the data instead, InformationImportance(model, data), to re-calibrate "
                    f"after every step; or score data-free, {free}; or prune in one step "
                    f"(iterative_steps=1)."
                )
            self._calibrate()
            return
