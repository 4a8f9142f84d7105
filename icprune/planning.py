"""Pruning plans: which output channels of every prunable layer to keep.

:func:`plan` turns per-layer channel scores into a :class:`PruningPlan` over the model's
dependency groups (:mod:`icprune.structure.dependency`):

1. **Group scores.** Each scored layer of a group (its conv/linear and depthwise layers) has its
   score vector min-max normalised to [0, 1] within the layer (:func:`icprune.scoring.normalize`;
   a constant vector becomes all zeros). The group score of channel c is the mean of its scored
   members' normalised scores at c. Normalising makes scores of different layers and criteria
   comparable, so one global threshold can rank channels of every group. A group none of whose
   layers has scores is left whole.
2. **Order.** Within a group, channels are pruned lowest score first, ties broken by channel
   index (lower first). With ``global_ranking=True`` all groups' channels are merged into one
   order by (score, group index, channel index); with ``global_ranking=False`` every group
   prunes the same fraction of its channels.
3. **Limits.** A group prunes at most ``floor(max_layer_ratio * C)`` channels and keeps at least
   ``min_channels``; then its kept count is rounded *up* to a multiple of ``round_to`` (never
   above C).
4. **Target.** ``ratio`` prunes that fraction of the scored channels (globally, or of every
   group). ``flops_reduction`` / ``params_reduction`` search the global threshold (or the
   uniform fraction) by bisection on the analytic cost (:mod:`icprune.structure.cost`) until the
   reduction is within 1 percentage point of the target; an unreachable target raises.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from icprune.config import PlanConfig, with_options
from icprune.scoring import LayerScores, normalize
from icprune.structure.cost import AXIS, CostModel
from icprune.structure.counting import as_inputs
from icprune.structure.dependency import (
    KINDS,
    SCORED_KINDS,
    Dependency,
    Group,
    trace_dependencies,
)
from icprune.structure.layers import channel_structure, sizes

FORMAT = "icprune.plan"
#: Version 2 added ``structure``; version 3 calls the BatchNorm dependency kind ``"batchnorm"``
#: (it was ``"norm"``). Plans of versions 1 (without ``structure``) and 2 are still read.
VERSION = 3
READ_VERSIONS = (1, 2, 3)
#: Dependency kinds as versions 1 and 2 wrote them, where they differ from today's.
_OLD_KINDS = {"norm": "batchnorm"}
#: Largest allowed gap between a FLOPs/params target and the plan's reduction.
TOLERANCE = 0.01
_UNIFORM_STEPS = 10_000


@dataclass(frozen=True)
class PruningPlan:
    """Which channels of every dependency group to keep.

    Attributes:
        groups: the model's dependency groups (see :class:`icprune.structure.dependency.Group`).
        kept: one sorted LongTensor per group, the indices of its kept channels.
        sizes: ``module -> (out, in)`` full channel counts of every module the groups touch
            (to check that a model matches the plan).
        macs: ``(before, after)`` multiply-accumulates for the ``example_inputs`` of
            :func:`plan` (analytic; equal to ``icprune.count`` of the applied model).
        params: ``(before, after)`` parameter counts.
        settings: the options the plan was made with (JSON values).
        structure: ``module -> (type name, out, in, groups)`` of every conv, linear and
            BatchNorm module of the model the plan was made for
            (:func:`icprune.structure.graph.channel_structure`); :func:`icprune.apply` refuses a
            model whose structure differs. None for plans read from version 1 files (then only the
            modules in ``sizes`` are checked).

    Raises:
        ValueError: an inconsistent plan (e.g. edited by hand): a group with no channel or
            keeping none, kept indices not strictly increasing (duplicates) or outside
            ``[0, channels)``, an unknown dependency kind, a dependency reaching past its
            module's channels, or ``sizes`` disagreeing with ``structure``. The message names
            the group (by its first layer) and the value.
    """

    groups: tuple[Group, ...]
    kept: tuple[Tensor, ...]
    sizes: dict[str, tuple[int, int]]
    macs: tuple[int, int]
    params: tuple[int, int]
    settings: dict = field(default_factory=dict)
    structure: dict[str, tuple[str, int, int, int]] | None = None

    def __post_init__(self) -> None:
        if len(self.groups) != len(self.kept):
            raise ValueError(
                f"PruningPlan: {len(self.groups)} groups but {len(self.kept)} kept index lists"
            )
        for index, (group, kept) in enumerate(zip(self.groups, self.kept, strict=True)):
            where = f"PruningPlan: group {index}"
            if group.layers:
                where += f" (first layer {group.layers[0]!r})"
            if not _is_int(group.channels) or group.channels < 1:
                raise ValueError(f"{where} has {group.channels!r} channels; it needs >= 1")
            if not isinstance(kept, Tensor) or kept.dtype != torch.int64 or kept.dim() != 1:
                raise ValueError(f"{where}: kept indices must be a 1-D LongTensor")
            if kept.numel() == 0:
                raise ValueError(
                    f"{where} keeps no channel; every group keeps at least one (a layer with "
                    f"0 channels is no layer)"
                )
            low, high = int(kept.min()), int(kept.max())
            if low < 0 or high >= group.channels:
                bad = low if low < 0 else high
                raise ValueError(
                    f"{where} keeps channel index {bad}, outside [0, {group.channels}) (negative "
                    f"indices are refused, not wrapped)"
                )
            if kept.numel() > 1 and not bool((kept[1:] > kept[:-1]).all()):
                raise ValueError(
                    f"{where}: kept indices must be strictly increasing (sorted, no duplicates), "
                    f"got {kept.tolist()[:12]}"
                )
            for dep in group.dependencies:
                self._check_dependency(where, group, dep)
        if self.structure is not None:
            # LayerNorms and parameters are not in the recorded structure (see
            # icprune.structure.layers)
            unrecorded = {
                d.module
                for g in self.groups
                for d in g.dependencies
                if d.kind in ("layernorm", "parameter", "heads")
            }
            for name, size in self.sizes.items():
                if name in unrecorded:
                    continue
                entry = self.structure.get(name)
                if entry is None or tuple(entry[1:3]) != tuple(size):
                    raise ValueError(
                        f"PruningPlan: sizes[{name!r}] = {tuple(size)} but the recorded model "
                        f"structure has {entry!r}; the plan is inconsistent"
                    )

    def _check_dependency(self, where: str, group: Group, dep: Dependency) -> None:
        if dep.kind not in KINDS:
            raise ValueError(f"{where}: dependency kind {dep.kind!r} is not one of {KINDS}")
        if dep.module not in self.sizes:
            raise ValueError(f"{where}: module {dep.module!r} has no entry in sizes")
        if not (_is_int(dep.offset) and _is_int(dep.repeat)) or dep.offset < 0 or dep.repeat < 1:
            raise ValueError(
                f"{where}: module {dep.module!r} has offset {dep.offset!r} and repeat "
                f"{dep.repeat!r}; they must be ints >= 0 and >= 1"
            )
        size = self.sizes[dep.module][0 if AXIS[dep.kind] == "out" else 1]
        end = dep.offset + group.channels * dep.repeat
        if end > size:
            raise ValueError(
                f"{where} reaches channel {end - 1} of {dep.module!r} ({AXIS[dep.kind]} axis), "
                f"which has {size}"
            )

    def indices(self, module: str, axis: str) -> Tensor | None:
        """Kept channel indices along one axis of a module.

        Args:
            module: qualified module name.
            axis: ``"out"`` (conv/linear output channels, BatchNorm channels, depthwise
                channels) or ``"in"`` (conv/linear input channels or features).

        Returns:
            sorted LongTensor of kept indices, or None if the plan does not touch that axis.

        Raises:
            ValueError: ``axis`` is neither ``"out"`` nor ``"in"``.
        """
        if axis not in ("out", "in"):
            raise ValueError(f"indices: axis must be 'out' or 'in', got {axis!r}")
        size = self.sizes[module][0 if axis == "out" else 1] if module in self.sizes else 0
        mask = None
        for group, kept in zip(self.groups, self.kept, strict=True):
            for dep in group.dependencies:
                if dep.module != module or AXIS[dep.kind] != axis:
                    continue
                if mask is None:
                    mask = torch.ones(size, dtype=torch.bool)
                pruned = torch.ones(group.channels, dtype=torch.bool)
                pruned[kept] = False
                cut = pruned.nonzero().flatten()
                span = dep.offset + cut[:, None] * dep.repeat + torch.arange(dep.repeat)
                mask[span.flatten()] = False
        return None if mask is None else mask.nonzero().flatten()

    @property
    def keep(self) -> dict[str, Tensor]:
        """``layer -> sorted LongTensor`` of the kept output channels of every prunable layer
        (conv, linear, depthwise conv) in a group."""
        layers = dict.fromkeys(name for g in self.groups for name in g.layers)
        return {name: self.indices(name, "out") for name in layers}

    @property
    def flops_reduction(self) -> float:
        """Fraction of MACs (= FLOPs) removed, in [0, 1]."""
        return 1.0 - self.macs[1] / self.macs[0] if self.macs[0] else 0.0

    @property
    def params_reduction(self) -> float:
        """Fraction of parameters removed, in [0, 1]."""
        return 1.0 - self.params[1] / self.params[0] if self.params[0] else 0.0

    def to_json(self) -> str:
        """The plan as a JSON string (see :meth:`from_json`)."""
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "groups": [
                    {
                        "channels": g.channels,
                        "kept": k.tolist(),
                        "dependencies": [
                            [d.module, d.kind, d.offset, d.repeat] for d in g.dependencies
                        ],
                    }
                    for g, k in zip(self.groups, self.kept, strict=True)
                ],
                "sizes": {name: list(size) for name, size in self.sizes.items()},
                "macs": list(self.macs),
                "params": list(self.params),
                "settings": self.settings,
                "structure": None
                if self.structure is None
                else {name: list(entry) for name, entry in self.structure.items()},
            }
        )

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        """Rebuild a plan written by :meth:`to_json` (version 3; 2 and 1, without ``structure``,
        are read too).

        Every value is checked (types, ranges, consistency; see the class docstring) before the
        plan is built.

        Raises:
            ValueError: the text is not JSON, not an icprune plan of a supported version, lacks
                a key, or holds a value of the wrong type or an inconsistent one (the message
                names the key or group).
        """
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"from_json: the text is not JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("from_json: this is not an icprune pruning plan (no 'format' tag)")
        version = data.get("version")
        if not _is_int(version) or version not in READ_VERSIONS:
            raise ValueError(
                f"from_json: plan version {version!r} is not supported (this icprune "
                f"reads versions {', '.join(map(str, READ_VERSIONS))})"
            )
        keys = ["groups", "sizes", "macs", "params", "settings"]
        keys += ["structure"] if version >= 2 else []
        missing = [key for key in keys if key not in data]
        if missing:
            raise ValueError(f"from_json: the plan lacks the key(s) {missing}")
        groups, kept = [], []
        if not isinstance(data["groups"], list):
            raise ValueError("from_json: 'groups' must be a list")
        for index, g in enumerate(data["groups"]):
            where = f"from_json: groups[{index}]"
            if not isinstance(g, dict) or not {"channels", "kept", "dependencies"} <= set(g):
                raise ValueError(f"{where} must hold 'channels', 'kept' and 'dependencies'")
            deps = g["dependencies"]
            ok = isinstance(deps, list) and all(
                isinstance(d, list)
                and len(d) == 4
                and isinstance(d[0], str)
                and isinstance(d[1], str)
                and _is_int(d[2])
                and _is_int(d[3])
                for d in deps
            )
            if not ok:
                raise ValueError(
                    f"{where}: 'dependencies' must be a list of [module, kind, offset, repeat]"
                )
            if not isinstance(g["kept"], list) or not all(
                _is_int(i) and abs(i) < 2**62 for i in g["kept"]
            ):
                raise ValueError(f"{where}: 'kept' must be a list of channel indices (ints)")
            if version < 3:
                deps = [[d[0], _OLD_KINDS.get(d[1], d[1]), *d[2:]] for d in deps]
            groups.append(Group(g["channels"], tuple(Dependency(*d) for d in deps)))
            kept.append(torch.tensor(g["kept"], dtype=torch.int64))
        sizes = _int_table(data["sizes"], "sizes", 2)
        structure = data.get("structure")
        if structure is not None:
            if not isinstance(structure, dict) or not all(
                isinstance(entry, list)
                and len(entry) == 4
                and isinstance(entry[0], str)
                and all(_is_int(v) and v >= 1 for v in entry[1:])
                for entry in structure.values()
            ):
                raise ValueError(
                    "from_json: 'structure' must map module names to [type, out, in, groups]"
                )
            structure = {name: tuple(entry) for name, entry in structure.items()}
        pairs = {}
        for key in ("macs", "params"):
            value = data[key]
            if not (isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value)):
                raise ValueError(f"from_json: '{key}' must be [before, after] ints")
            pairs[key] = tuple(value)
        if not isinstance(data["settings"], dict):
            raise ValueError("from_json: 'settings' must be a dict")
        return cls(
            tuple(groups),
            tuple(kept),
            sizes,
            pairs["macs"],
            pairs["params"],
            data["settings"],
            structure,
        )

    def table(self) -> str:
        """A plain-text table: one row per group (its first layer, how many layers it couples,
        channels before and after), then MACs and parameters before and after."""
        rows = [
            f"{'group (first layer)':<34} {'layers':>6} {'channels':>8} {'kept':>6} {'pruned':>7}"
        ]
        for group, kept in zip(self.groups, self.kept, strict=True):
            share = 1 - len(kept) / group.channels
            rows.append(
                f"{group.layers[0]:<34} {len(group.layers):>6} {group.channels:>8} "
                f"{len(kept):>6} {share:>7.1%}"
            )
        rows.append(
            f"MACs {self.macs[0]:,} -> {self.macs[1]:,} (-{self.flops_reduction:.1%}); "
            f"params {self.params[0]:,} -> {self.params[1]:,} (-{self.params_reduction:.1%})"
        )
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def normalized_scores(
    scores: Mapping[str, LayerScores | Tensor], model: nn.Module
) -> dict[str, Tensor]:
    """Per-layer score vectors on one common scale, the parts a group score averages.

    Args:
        scores: ``layer -> LayerScores`` or ``layer -> Tensor[C]`` (float, higher = keep).
        model: the network the scores are for (names and output channel counts are checked).

    Returns:
        dict layer -> Tensor[C] float64 on the CPU, min-max normalised to [0, 1] within the layer
        (:func:`icprune.scoring.normalize`; a constant vector becomes all zeros).

    Raises:
        TypeError: scores of the wrong type.
        ValueError: an unknown layer name, a vector whose length is not the layer's output
            channel count, or NaN/Inf values.
    """
    if not isinstance(scores, Mapping):
        raise TypeError(
            "scores must map layer names to LayerScores (from icprune.score) or Tensor[C] "
            f"scores, got {type(scores).__name__}"
        )
    modules = dict(model.named_modules())
    vectors = {}
    for name, value in scores.items():
        vec = value.score if isinstance(value, LayerScores) else value
        if name not in modules:
            raise ValueError(f"scores: the model has no layer named {name!r}")
        if not isinstance(vec, Tensor) or vec.dim() != 1 or not vec.is_floating_point():
            raise TypeError(
                f"scores[{name!r}] must be a 1-D floating-point Tensor[C] (or LayerScores), got "
                f"{type(vec).__name__}{tuple(vec.shape) if isinstance(vec, Tensor) else ''}"
            )
        size = sizes(modules[name])
        if size is not None and size[0] != vec.numel():
            raise ValueError(
                f"scores[{name!r}] has {vec.numel()} values but the layer has {size[0]} output "
                f"channels (an attention block: heads)"
            )
        vec = vec.detach().to("cpu", torch.float64)
        if not torch.isfinite(vec).all():
            raise ValueError(f"scores[{name!r}] holds NaN or Inf; scores must be finite")
        vectors[name] = normalize(vec, "minmax")
    return vectors


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_table(value: object, key: str, width: int) -> dict[str, tuple[int, ...]]:
    """A JSON dict name -> list of ``width`` ints >= 1, as tuples (else a ValueError)."""
    ok = isinstance(value, dict) and all(
        isinstance(row, list) and len(row) == width and all(_is_int(v) and v >= 1 for v in row)
        for row in value.values()
    )
    if not ok:
        raise ValueError(f"from_json: '{key}' must map module names to {width} ints >= 1")
    return {name: tuple(row) for name, row in value.items()}


def _group_score(group: Group, vectors: Mapping[str, Tensor]) -> Tensor | None:
    """Mean of the normalised scores (:func:`normalized_scores`) of the group's scored layers
    (None: no scores)."""
    parts = [
        vectors[dep.module][dep.offset : dep.offset + group.channels]
        for dep in group.dependencies
        if dep.kind in SCORED_KINDS and dep.module in vectors
    ]
    return torch.stack(parts).mean(0) if parts else None


def _check_fraction(name: str, value: object, upper_open: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value >= 1 if upper_open else value > 1):
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{name} must be a number in {bound}, got {value!r}")
    return float(value)


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class _Allocator:
    """Kept channel counts per group as a monotone function of one integer parameter t."""

    def __init__(
        self,
        channels: list[int],
        group_scores: list[Tensor | None],
        caps: list[int],
        round_to: int,
        global_ranking: bool,
    ) -> None:
        self.channels, self.caps, self.round_to = channels, caps, round_to
        self.global_ranking = global_ranking
        # Prune order within each group: lowest score first, ties by channel index.
        self.orders = [
            None if s is None else torch.sort(s, stable=True).indices for s in group_scores
        ]
        if global_ranking:
            entries = [
                (float(group_scores[g][c]), g, int(c))
                for g, order in enumerate(self.orders)
                if order is not None
                for c in order[: caps[g]]
            ]
            entries.sort()
            self.owner = np.array([g for _, g, _ in entries], dtype=np.int64)
            self.steps = len(entries)
        else:
            self.steps = _UNIFORM_STEPS

    def pruned(self, t: int) -> list[int]:
        """Channels pruned per group (before rounding) at parameter t in [0, steps]."""
        if self.global_ranking:
            counts = np.bincount(self.owner[:t], minlength=len(self.channels))
            return [int(x) for x in counts]
        return [
            0 if order is None else min(c * t // _UNIFORM_STEPS, cap)
            for c, cap, order in zip(self.channels, self.caps, self.orders, strict=True)
        ]

    def kept(self, t: int) -> list[int]:
        """Kept channels per group at parameter t, rounded up to multiples of round_to."""
        out = []
        for c, p in zip(self.channels, self.pruned(t), strict=True):
            keep = c - p
            if p and self.round_to > 1:
                keep = min(c, -(-keep // self.round_to) * self.round_to)
            out.append(keep)
        return out

    def indices(self, kept: list[int]) -> tuple[Tensor, ...]:
        """Sorted kept indices of every group for the given kept counts."""
        result = []
        for c, keep, order in zip(self.channels, kept, self.orders, strict=True):
            if order is None or keep == c:
                result.append(torch.arange(c))
            else:
                result.append(order[c - keep :].sort().values)
        return tuple(result)


def plan(
    model: nn.Module,
    scores: Mapping[str, LayerScores | Tensor],
    *,
    example_inputs: Tensor | Sequence[Tensor],
    **options,
) -> PruningPlan:
    """Choose the output channels to keep in every dependency group of ``model``.

    Args:
        model: the network; not modified.
        scores: ``layer -> LayerScores`` (from :func:`icprune.score`) or ``layer -> Tensor[C]``
            (any criterion; float, higher = keep). Layers in no group (the classifier, ignored
            or opaque ones) are skipped; groups with no scored layer are kept whole.
        example_inputs: Tensor or tuple of Tensors for ``model(*example_inputs)`` at the
            resolution the MACs should be counted for, e.g. ``torch.randn(1, 3, 224, 224)``.
        **options: ``plan_config=`` (:class:`icprune.PlanConfig`: the target - exactly one of
            ``ratio``, ``flops_reduction``, ``params_reduction`` - and ``global_ranking``,
            ``max_layer_ratio``, ``min_channels``, ``round_to``, ``ignored_layers``) and/or its
            fields by name (``flops_reduction=0.5, round_to=8``), overriding the config's
            value.

    Returns:
        :class:`PruningPlan`; ``plan.keep`` maps each prunable layer to its sorted kept
        output-channel indices (LongTensor).

    Raises:
        ValueError: bad options, bad scores (wrong length, NaN/Inf), an untraceable model,
            ``example_inputs`` the model fails on (naming the module), a target above 0 when no
            channel at all can be pruned (the message says why: no prunable group, no scored
            group, every group at its limits, or ``round_to``), or a target that cannot be
            reached (or not within 1 percentage point) under the limits.
        TypeError: scores or ``example_inputs`` of the wrong type; an unknown keyword option or
            a config of the wrong class.
    """
    (config,) = with_options("plan", options, PlanConfig)
    targets = {"ratio": config.ratio, "flops_reduction": config.flops_reduction}
    targets["params_reduction"] = config.params_reduction
    given = {k: v for k, v in targets.items() if v is not None}
    if len(given) != 1:
        raise ValueError(
            "plan: give exactly one of ratio=, flops_reduction= or params_reduction= "
            f"(got {', '.join(given) or 'none'})"
        )
    global_ranking, ignored_layers = config.global_ranking, config.ignored_layers
    ((target_name, target),) = given.items()
    target = _check_fraction(target_name, target)
    max_layer_ratio = _check_fraction("max_layer_ratio", config.max_layer_ratio, upper_open=False)
    if max_layer_ratio == 0:
        raise ValueError("max_layer_ratio must be > 0 (it is the most a group may lose)")
    min_channels = _check_count("min_channels", config.min_channels)
    round_to = _check_count("round_to", config.round_to)
    ignored = list(ignored_layers) if not isinstance(ignored_layers, str) else ignored_layers
    vectors = normalized_scores(scores, model)
    deps = trace_dependencies(model, example_inputs, ignored_layers=ignored)
    channels = [g.channels for g in deps.groups]
    group_scores = [_group_score(g, vectors) for g in deps.groups]
    caps = [max(0, min(math.floor(max_layer_ratio * c), c - min_channels)) for c in channels]
    alloc = _Allocator(channels, group_scores, caps, round_to, global_ranking)
    if target > 0:
        limits = {"max_layer_ratio": max_layer_ratio, "min_channels": min_channels}
        reason = _nothing_prunable(deps.groups, group_scores, caps, alloc, vectors, ignored, limits)
        if reason is not None:
            raise ValueError(
                f"plan: {target_name}={target} cannot be met: no channel of "
                f"{type(model).__name__} can be pruned: {reason}"
            )
    cost = CostModel(deps)
    before = cost(channels)

    if target_name == "ratio":
        if global_ranking:
            total = sum(c for c, s in zip(channels, group_scores, strict=True) if s is not None)
            t = round(target * total)
            if t > alloc.steps:
                raise ValueError(
                    f"ratio={target} asks to prune {t} of {total} channels but at most "
                    f"{alloc.steps} can go under max_layer_ratio={max_layer_ratio} and "
                    f"min_channels={min_channels}; lower ratio or raise max_layer_ratio"
                )
        else:
            if target > max_layer_ratio:
                raise ValueError(
                    f"ratio={target} is above max_layer_ratio={max_layer_ratio}; raise "
                    f"max_layer_ratio or lower ratio"
                )
            t = round(target * _UNIFORM_STEPS)
        kept = alloc.kept(t)
    else:
        which = 0 if target_name == "flops_reduction" else 1

        def reduction(t: int) -> float:
            return 1.0 - cost(alloc.kept(t))[which] / before[which]

        kept = alloc.kept(_search(reduction, alloc.steps, target, target_name))

    after = cost(kept)
    sizes = {
        dep.module: (deps.shapes[dep.module].out_channels, deps.shapes[dep.module].in_channels)
        for g in deps.groups
        for dep in g.dependencies
    }
    settings = {
        target_name: target,
        "global_ranking": bool(global_ranking),
        "max_layer_ratio": max_layer_ratio,
        "min_channels": min_channels,
        "round_to": round_to,
        "ignored_layers": sorted(ignored),
        "example_inputs": [list(t.shape) for t in as_inputs(example_inputs, "plan")],
    }
    return PruningPlan(
        deps.groups,
        alloc.indices(kept),
        sizes,
        (before[0], after[0]),
        (before[1], after[1]),
        settings,
        channel_structure(model),
    )


def _nothing_prunable(
    groups: Sequence[Group],
    group_scores: Sequence[Tensor | None],
    caps: Sequence[int],
    alloc: _Allocator,
    vectors: Mapping[str, Tensor],
    ignored: Sequence[str],
    limits: dict,
) -> str | None:
    """Why no channel at all can be pruned (a sentence), or None if some can."""
    if not groups:
        rest = (
            "the channels of every conv/linear layer reach the model's output or pass an "
            "operation icprune cannot follow (see icprune.dependency_groups)"
        )
        if ignored:
            rest = (
                f"ignored_layers={sorted(ignored)} excludes those layers with their groups, "
                f"and {rest.replace('every', 'every other')}"
            )
        return f"the dependency trace found no prunable group: {rest}"
    scored = [s is not None for s in group_scores]
    if not any(scored):
        layers = [name for g in groups for name in g.layers]
        return (
            f"no group has scores: the scores name {sorted(vectors)[:5]} but the prunable "
            f"groups' layers are {layers[:5]}{' ...' if len(layers) > 5 else ''}"
        )
    if not any(cap > 0 for cap, ok in zip(caps, scored, strict=True) if ok):
        largest = max(g.channels for g, ok in zip(groups, scored, strict=True) if ok)
        return (
            f"every scored group is at its limit: max_layer_ratio={limits['max_layer_ratio']} "
            f"and min_channels={limits['min_channels']} leave no channel to prune (the largest "
            f"scored group has {largest} channels)"
        )
    if alloc.kept(alloc.steps) == [g.channels for g in groups]:
        return (
            "round_to rounds every group's kept channel count back up to all its channels; use "
            "a smaller round_to"
        )
    return None


def _search(reduction, steps: int, target: float, name: str) -> int:
    """The parameter t in [0, steps] whose reduction is closest to ``target`` (bisection on the
    monotone ``reduction(t)``), within :data:`TOLERANCE`."""
    top = reduction(steps)
    if top < target - TOLERANCE:
        raise ValueError(
            f"{name}={target:.3f} cannot be reached: pruning as much as max_layer_ratio, "
            f"min_channels, round_to and ignored_layers allow removes {top:.3f}; lower the target "
            f"or relax those limits"
        )
    low, high = 0, steps  # reduction(high) >= target or high == steps
    while low < high:
        mid = (low + high) // 2
        if reduction(mid) >= target:
            high = mid
        else:
            low = mid + 1
    best = min({low, max(low - 1, 0)}, key=lambda t: (abs(reduction(t) - target), t))
    if abs(reduction(best) - target) > TOLERANCE:
        raise ValueError(
            f"{name}={target:.3f} cannot be met within {TOLERANCE:.0%}: the nearest plans remove "
            f"{reduction(max(low - 1, 0)):.3f} and {reduction(low):.3f} (one group's rounding "
            f"step is too coarse); use a smaller round_to or another target"
        )
    return best
