"""Torch-Pruning 1.6 importance criterion from icprune's information scores.

:class:`InformationImportance` plugs icprune's scores (information capacity + independence, see
:func:`icprune.score`) into Torch-Pruning's pruners (``tp.pruner.BasePruner`` /
``MetaPruner``)::

    importance = InformationImportance(model, batches)  # calibrated on real feature maps
    importance = InformationImportance(model)           # data-free, from the weights
    pruner = tp.pruner.MetaPruner(model, example_inputs, importance, pruning_ratio=0.5,
                                  ignored_layers=[model.fc])
    pruner.step()

**Group score.** Torch-Pruning asks for one score per channel of a group's root. Every member of
the group that prunes the *output* channels of a Conv/Linear layer icprune scores (handlers
``prune_conv_out_channels``, ``prune_depthwise_conv_out_channels``,
``prune_linear_out_channels``) contributes its layer's score vector, min-max normalised to [0, 1]
within the layer (:func:`icprune.planning.normalized_scores`), at the member's channel indices,
mapped to the root's channels through Torch-Pruning's ``root_idxs``. A root channel's score is the
mean over the members that cover it: exactly the group score :func:`icprune.plan` ranks by, so
``global_pruning=True`` ranks all groups on one scale. Higher = keep. Root channels that no scored
member covers (possible when a ``cat`` joins a scored and an unscored layer) get 1.0, the top of
the scale: they are pruned last. A group with no scored member gets None (Torch-Pruning skips
it). BatchNorms and layers pruned on their input side carry no icprune score and do not vote.

**Iterative pruning** (``iterative_steps > 1``) shrinks layers between calls, and with them the
feature maps of every layer after them. The policy per source:

- data-free (``InformationImportance(model)``): the weight statistics of a group's layers are
  recomputed from the current weights at every call, so every step sees the pruned (and, if the
  user trained in between, the trained) weights;
- calibrated with data (``InformationImportance(model, data)``): the model is re-calibrated on
  ``data`` at the first call after any scored layer's weight shape changed, i.e. once per step
  that pruned something; ``data`` must therefore be re-iterable (a list or DataLoader, not a
  generator);
- calibrated statistics only (``InformationImportance(model, stats=icprune.calibrate(...))``): a
  changed layer raises a ValueError naming it. Statistics of the smaller model cannot be derived
  exactly from those of the original: dropping channel rows of a layer's histogram and Gram
  matrix would be exact only if its inputs had not changed, but pruning the previous layers
  changes them. Pass ``data`` instead, or use ``iterative_steps=1``.

Scores are deterministic (same model, data and options -> same scores). Exact ties are ordered
by Torch-Pruning (``torch.topk``), not by channel index as in :func:`icprune.plan`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

try:
    import torch_pruning as tp
except ImportError as exc:
    raise ImportError(
        f"icprune.integrations.torch_pruning needs Torch-Pruning 1.6 ({exc}): "
        "pip install 'icprune[torch-pruning]'"
    ) from exc

from icprune.calibrate import calibrate
from icprune.config import CalibrationConfig, ScoringConfig, StatsConfig, with_options
from icprune.planning import normalized_scores
from icprune.scoring import SOURCES, score
from icprune.stats.channel_stats import ChannelStats
from icprune.structure.layers import PRUNABLE_TYPES, out_channels

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
    """Torch-Pruning importance: icprune's fused capacity + independence score of each channel.

    Args:
        model: the network Torch-Pruning will prune (the same object; it is pruned in place by
            the pruner, never by this class, which only reads it).
        data: calibration batches (a re-iterable of Tensors ``[N, ...]`` or ``(input, target)``
            tuples, e.g. a list or a DataLoader; see :func:`icprune.calibrate`). The model is
            calibrated now, and again after each pruning step that changed it.
        stats: statistics from an earlier ``icprune.calibrate(model, data)`` call, used instead
            of ``data`` (valid only until the model is pruned; see the module docstring).
        layers: qualified names of the layers to score (None: every Conv/Linear except the output
            layers). Groups with no scored layer are skipped by the pruner.
        **options: the settings, as configs or field by field (a field overrides the config's
            value): ``scoring_config=`` (:class:`icprune.ScoringConfig`: ``source`` -
            ``"features"``, feature-map statistics of ``data`` or ``stats``; ``"weights"``,
            data-free; None, ``"features"`` when ``data`` or ``stats`` is given, else
            ``"weights"``, as for :func:`icprune.score` - and how capacity and independence are
            fused: ``lam``, ``independence``, ``normalization``); ``stats_config=``
            (:class:`icprune.StatsConfig`, the histogram settings of the statistics);
            ``calibration_config=`` (:class:`icprune.CalibrationConfig` of every calibration,
            unused for ``source="weights"`` or given ``stats``; its ``checkpoint`` must stay
            None: the model changes between calibrations). E.g. ``lam=0.5, norm="minmax",
            bins=32, max_batches=8, progress=False``.

    Attributes:
        source: ``"features"`` or ``"weights"``.
        stats: ``layer -> ChannelStats`` currently in use (``source="features"``), else None.
        calibrations: how many calibration passes over ``data`` have run so far.

    Calling the instance on a Torch-Pruning group returns a Tensor[len(group[0].idxs)] float64
    on the CPU (values in [0, 1], higher = keep), or None when no member of the group is scored.

    Raises:
        TypeError: ``model`` is no ``nn.Module``, ``stats`` is no mapping of ChannelStats,
            ``data`` is a one-shot iterator.
        ValueError: inconsistent arguments (data and stats, data with ``source="weights"``, no
            data for ``source="features"``), bad options (a calibration checkpoint among them),
            statistics that do not match the model, or any error of :func:`icprune.calibrate` /
            :func:`icprune.score`.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable | None = None,
        *,
        stats: Mapping[str, ChannelStats] | None = None,
        layers: Iterable[str] | None = None,
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
        source = scoring_config.source
        if source is None:
            source = "weights" if data is None and stats is None else "features"
        if source not in SOURCES:
            raise ValueError(
                f"InformationImportance: source must be one of {SOURCES} or None, got {source!r}"
            )
        if layers is not None and not isinstance(layers, str):
            layers = list(layers)  # read again at every re-calibration
        self.model = model
        self.source = source
        self.data = data
        self.stats: dict[str, ChannelStats] | None = None
        self.calibrations = 0
        # Torch-Pruning prunes modules in place, so these module -> name keys stay valid.
        self._names = {module: name for name, module in model.named_modules()}
        self._layers_option = layers
        self._scoring_config = dataclasses.replace(scoring_config, source=source)
        self._stats_config = stats_config
        self._calibration_config = calibration_config
        self._vectors: dict[str, Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        if source == "weights":
            if data is not None or stats is not None:
                raise ValueError(
                    "InformationImportance: source='weights' is data-free: pass neither data nor "
                    "stats"
                )
            # Scoring every layer once now checks the options and the weights early.
            self._layers = frozenset(self._weight_vectors(layers))
        elif stats is not None:
            if data is not None:
                raise ValueError(
                    "InformationImportance: pass either data (re-calibrated after every pruning "
                    "step) or stats (from icprune.calibrate), not both"
                )
            self._use(stats)
        elif data is None:
            raise ValueError(
                "InformationImportance: source='features' needs calibration data "
                "(InformationImportance(model, data)) or stats=icprune.calibrate(model, data); "
                "without data use InformationImportance(model) (data-free)"
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
                without ``data``) a scored layer changed shape since calibration.
        """
        if self.source == "features":
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
        if self.source == "features":
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
        """Normalised data-free score vectors of ``layers`` from the current weights."""
        scores = score(
            self.model,
            layers=layers,
            scoring_config=self._scoring_config,
            stats_config=self._stats_config,
        )
        return normalized_scores(scores, self.model)

    def _calibrate(self) -> None:
        stats = calibrate(
            self.model,
            self.data,
            layers=self._layers_option,
            stats_config=self._stats_config,
            calibration_config=self._calibration_config,
        )
        self._use(stats)
        self.calibrations += 1

    def _use(self, stats: Mapping[str, ChannelStats]) -> None:
        """Check ``stats`` against the model, score them, remember the weight shapes."""
        if not isinstance(stats, Mapping) or not all(
            isinstance(layer, ChannelStats) for layer in stats.values()
        ):
            raise TypeError(
                "InformationImportance: stats must be the dict layer -> ChannelStats that "
                f"icprune.calibrate returns, got {type(stats).__name__}"
            )
        if not stats:
            raise ValueError(
                "InformationImportance: stats is empty, so no group could be scored; pass the "
                "statistics icprune.calibrate returned for this model"
            )
        modules = dict(self.model.named_modules())
        for name, layer in stats.items():
            module = modules.get(name)
            if not isinstance(module, PRUNABLE_TYPES):
                raise ValueError(
                    f"InformationImportance: stats[{name!r}] names no Conv/Linear layer of this "
                    f"model; pass the statistics icprune.calibrate returned for this model"
                )
            if out_channels(module) != layer.num_channels:
                raise ValueError(
                    f"InformationImportance: stats[{name!r}] holds {layer.num_channels} channels "
                    f"but the layer has {out_channels(module)} output channels; calibrate this "
                    f"model as it is now"
                )
        self.stats = dict(stats)
        self._vectors = normalized_scores(
            score(self.model, stats=self.stats, scoring_config=self._scoring_config), self.model
        )
        self._shapes = {name: tuple(modules[name].weight.shape) for name in self.stats}

    def _refresh(self) -> None:
        """Re-calibrate if a scored layer changed shape (pruned) since the last calibration."""
        modules = dict(self.model.named_modules())
        for name, shape in self._shapes.items():
            now = tuple(modules[name].weight.shape) if name in modules else None
            if now == shape:
                continue
            if self.data is None:
                raise ValueError(
                    f"InformationImportance: layer {name!r} has changed from weight shape "
                    f"{shape} to {now} since its statistics were calibrated (an earlier pruning "
                    f"step, e.g. with iterative_steps > 1). The pruned model's statistics cannot "
                    f"be derived from the original's (its remaining channels see other inputs). "
                    f"Pass the data instead, InformationImportance(model, data), to re-calibrate "
                    f"after every step; or score data-free, InformationImportance(model); or "
                    f"prune in one step (iterative_steps=1)."
                )
            self._calibrate()
            return
