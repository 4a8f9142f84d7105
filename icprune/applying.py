"""Apply a pruning plan: build the physically smaller model.

Every module a plan's groups touch gets new, smaller parameters and buffers, sliced with
:func:`icprune.slicing.slice_channels` (C++ fused gather on the CPU):

- conv: weight ``W[out_idx][:, in_idx]``, bias ``b[out_idx]``, ``out_channels``/``in_channels``;
  a depthwise conv keeps ``groups == in_channels == out_channels``; a grouped conv keeps its
  ``groups``, the plan keeping the same positions in every group (its weight's columns are the
  kept positions within one group);
- linear: the same with ``out_features``/``in_features`` (a flattened conv map keeps
  ``prod(spatial)`` features per kept channel);
- BatchNorm: ``weight``, ``bias``, ``running_mean``, ``running_var`` and ``num_features``
  (``num_batches_tracked`` is kept as is);
- LayerNorm: ``weight``, ``bias`` and ``normalized_shape``;
- a per-channel parameter (ConvNeXt's ``layer_scale``): sliced along its channel axis;
- an attention block losing heads: replaced by an :class:`icprune.attention.
  PrunedMultiheadAttention` (Swin's: an :class:`icprune.attention.PrunedWindowAttention`)
  holding the kept heads' q, k and v rows and per-head parameters (its output projection is
  the same linear layer, whose input columns the plan slices like any consumer's);
  ``embed_dim`` and ``head_dim`` stay.

The pruned model computes exactly what the original computes with the pruned channels zeroed at
the output of every module in their group (up to float round-off); for attention, with the
pruned heads' outputs zeroed before ``out_proj``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from icprune.attention import PrunedMultiheadAttention, PrunedWindowAttention
from icprune.calibrate import InputStats
from icprune.planning import PruningPlan
from icprune.recovery.repair import fits, write
from icprune.slicing import slice_channels
from icprune.structure.layers import (
    BATCHNORM_TENSORS,
    LAYERNORM_TENSORS,
    PRUNABLE_TYPES,
    channel_structure,
    groups,
    in_channels,
    is_attention,
    is_batchnorm,
    is_conv,
    is_depthwise,
    is_layernorm,
    is_window_attention,
    out_channels,
    owned_parameter,
    parameter_axis,
    set_channels,
    sizes,
)


def _replace(module: nn.Module, name: str, value: Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        module.register_buffer(
            name, value, persistent=name not in module._non_persistent_buffers_set
        )


def check_model(model: nn.Module, plan: PruningPlan, caller: str = "apply") -> None:
    """Check that ``model`` is the model ``plan`` was made for.

    With the structure a plan records (:attr:`PruningPlan.structure`), the whole model is
    compared: the same conv, linear and BatchNorm modules (names and types) with the same
    channel counts and groups, no module missing and none added. A plan without it (read from
    a version 1 file) is checked against the modules it touches. Every module the plan prunes
    must also be of a kind its dependencies can prune (conv/linear for ``output``/``input``, a
    depthwise conv for ``depthwise``, a BatchNorm for ``batchnorm``, a LayerNorm for
    ``layernorm``, an attention block for ``heads``).

    Raises:
        TypeError: ``plan`` is not a :class:`PruningPlan`.
        ValueError: the model differs from the plan's (the message starts with ``caller``,
            names the first differing modules and says what differs).
    """
    if not isinstance(plan, PruningPlan):
        raise TypeError(
            f"{caller}: plan must be a PruningPlan (from icprune.plan or PruningPlan.from_json), "
            f"got {type(plan).__name__}"
        )
    modules = dict(model.named_modules())
    if plan.structure is not None:
        _compare_structure(channel_structure(model), plan.structure, caller)
    parameters = {d.module for g in plan.groups for d in g.dependencies if d.kind == "parameter"}
    for name, size in plan.sizes.items():
        if name in parameters:
            _check_parameter(model, name, tuple(size), caller)
            continue
        module = modules.get(name)
        expected = sizes(module) if module is not None else None
        if expected != tuple(size):
            found = "no such module" if module is None else f"{type(module).__name__}{expected}"
            raise ValueError(
                f"{caller}: the plan does not match this model at {name!r}: it expects (out, in) "
                f"channels {tuple(size)}, the model has {found}. Make the plan on this same model."
            )
    for group in plan.groups:
        for dep in group.dependencies:
            if dep.kind == "parameter":
                continue  # checked above
            module = modules[dep.module]
            if not _prunable_as(module, dep.kind):
                raise ValueError(
                    f"{caller}: the plan prunes {dep.module!r} as {dep.kind!r}, but it is a "
                    f"{type(module).__name__}{sizes(module)}; make the plan on this same model"
                )
    for name in plan.sizes:
        module = modules.get(name)
        if module is not None and is_conv(module) and groups(module) > 1:
            if not is_depthwise(module):
                _check_grouped(module, name, plan, caller)


def _check_parameter(model: nn.Module, name: str, size: tuple[int, int], caller: str) -> None:
    """Raise unless ``name`` is a per-channel parameter of ``size[0]`` channels (see
    :func:`icprune.structure.layers.parameter_axis`)."""
    owned = owned_parameter(model, name)
    axis = parameter_axis(getattr(*owned)) if owned is not None else None
    found = tuple(getattr(*owned).shape) if owned is not None else None
    if axis is None or found[axis] != size[0]:
        raise ValueError(
            f"{caller}: the plan does not match this model at {name!r}: it expects a per-channel "
            f"parameter of {size[0]} channels, the model has "
            f"{'no such parameter' if found is None else f'one of shape {found}'}. Make the plan "
            f"on this same model."
        )


def _prune_parameter(model: nn.Module, name: str, out_idx: Tensor) -> None:
    """Keep the channels ``out_idx`` of a per-channel parameter, along its channel axis."""
    owner, attr = owned_parameter(model, name)
    old = getattr(owner, attr)
    value = old.detach().index_select(parameter_axis(old), out_idx.to(old.device))
    setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad))


def _prunable_as(module: nn.Module, kind: str) -> bool:
    """Whether a dependency of ``kind`` can prune ``module`` (see :data:`icprune.structure.
    dependency.KINDS`)."""
    if kind == "batchnorm":
        return is_batchnorm(module)
    if kind == "layernorm":
        return is_layernorm(module)
    if kind == "heads":
        return is_attention(module)
    if kind == "depthwise":
        return is_depthwise(module)
    return isinstance(module, PRUNABLE_TYPES) and not is_depthwise(module)


def _prune_heads(model: nn.Module, name: str, kept: Tensor) -> None:
    """Replace the attention block ``name`` of ``model`` by the
    :class:`~icprune.attention.PrunedMultiheadAttention` (or, for window attention,
    :class:`~icprune.attention.PrunedWindowAttention`) of its heads ``kept`` (none lost: left
    as it is)."""
    module = model.get_submodule(name)
    if len(kept) == module.num_heads:
        return
    kind = PrunedWindowAttention if is_window_attention(module) else PrunedMultiheadAttention
    model.set_submodule(name, kind.keeping(module, kept), strict=True)


def within_groups(idx: Tensor, size: int, count: int) -> Tensor | None:
    """The positions a grouped conv keeps in each of its ``count`` groups, when the kept
    channel indices ``idx`` (of ``size``) keep the same positions in every group; else None."""
    per = size // count
    if len(idx) % count:
        return None
    tiles = idx.view(count, -1) - torch.arange(count).view(-1, 1) * per
    return tiles[0] if bool((tiles == tiles[0]).all()) else None


def _check_grouped(module: nn.Module, name: str, plan: PruningPlan, caller: str) -> None:
    """Raise unless a plan keeps the same positions in every group of a grouped conv."""
    for axis, size in (("out", out_channels(module)), ("in", in_channels(module))):
        idx = plan.indices(name, axis)
        if idx is not None and within_groups(idx, size, groups(module)) is None:
            raise ValueError(
                f"{caller}: the plan keeps {axis}put channels {idx.tolist()[:12]} of the grouped "
                f"conv {name!r} ({groups(module)} groups of {size // groups(module)}), not the "
                f"same positions in every group; make the plan with icprune.plan on this model"
            )


def _compare_structure(mine: dict, theirs: dict, caller: str) -> None:
    """Raise naming the first modules where two channel structures differ."""
    if mine == {name: tuple(entry) for name, entry in theirs.items()}:
        return
    added = [n for n in mine if n not in theirs]
    missing = [n for n in theirs if n not in mine]
    changed = [n for n in mine if n in theirs and tuple(theirs[n]) != mine[n]]
    parts = []
    if changed:
        name = changed[0]
        parts.append(
            f"{len(changed)} module(s) differ, first {name!r}: the model has "
            f"{_describe(mine[name])}, the plan {_describe(theirs[name])}"
        )
    if missing:
        parts.append(
            f"{len(missing)} of the plan's module(s) missing, first {missing[0]!r}: the model "
            f"has no such module"
        )
    if added:
        parts.append(
            f"{len(added)} module(s) the plan does not know, first {added[0]!r} "
            f"({_describe(mine[added[0]])})"
        )
    raise ValueError(
        f"{caller}: the plan does not match this model (it was made for another model, or the "
        f"model changed since): {'; '.join(parts)}. Make the plan on this same model "
        f"(icprune.plan(model, ...))."
    )


def _describe(entry) -> str:
    kind, out, inp, groups = entry
    return f"{kind}(out={out}, in={inp}{f', groups={groups}' if groups != 1 else ''})"


def _prune_module(module: nn.Module, out_idx: Tensor | None, in_idx: Tensor | None) -> None:
    out_full, in_full = sizes(module)
    if is_batchnorm(module) or is_layernorm(module):
        for attr in BATCHNORM_TENSORS if is_batchnorm(module) else LAYERNORM_TENSORS:
            value = getattr(module, attr)
            if value is not None and out_idx is not None:
                _replace(module, attr, slice_channels(value, out_idx.to(value.device)))
        set_channels(module, len(out_idx) if out_idx is not None else out_full, in_full)
        return
    depthwise = is_depthwise(module)
    if depthwise:
        in_idx = None  # one input channel per group: follows out_idx through groups
    elif in_idx is not None and groups(module) > 1:  # grouped: the weight holds one group's
        in_idx = within_groups(in_idx, in_full, groups(module))  # positions (checked before)
    device = module.weight.device
    rows = out_idx.to(device) if out_idx is not None else torch.arange(out_full, device=device)
    cols = in_idx.to(device) if in_idx is not None else None
    _replace(module, "weight", slice_channels(module.weight, rows, cols))
    if module.bias is not None and out_idx is not None:
        _replace(module, "bias", slice_channels(module.bias, rows))
    out_n = len(rows)
    in_n = out_n if depthwise else in_full
    if cols is not None:
        in_n = len(cols) * groups(module)
    set_channels(module, out_n, in_n)


def apply(
    model: nn.Module,
    plan: PruningPlan,
    *,
    inplace: bool = False,
    stats: InputStats | None = None,
    ridge: float = 1e-2,
) -> nn.Module:
    """Build the pruned model a plan describes, and repair it when ``stats`` are given.

    Args:
        model: the network the plan was made for (from :func:`icprune.plan`).
        plan: which channels to keep.
        inplace: prune ``model`` itself; if False (default) a deep copy is pruned and ``model``
            is left bit-identical.
        stats: :class:`icprune.calibrate.InputStats` of ``model``
            (``icprune.calibrate(model, data, read_at="input")``, the same statistics the
            default criterion scores from): every consumer of pruned channels is then repaired
            - least-squares re-fit of its kept weights and bias compensation
            (:func:`icprune.recovery.repair.repair`; evidence in docs/quality.md). None: the
            pruned model computes exactly the original with the pruned channels zeroed.
        ridge: relative ridge of the repair's least-squares fit (with ``stats``).

    Returns:
        the pruned model (``model`` itself when ``inplace=True``), on the same devices, with the
        same dtypes and ``requires_grad`` flags and the same train/eval mode.

    Raises:
        TypeError: ``plan`` is not a :class:`PruningPlan`, or ``stats`` not
            :class:`InputStats`.
        ValueError: the plan was made for another model, or the model changed since (see
            :func:`check_model`: any conv, linear or BatchNorm module added, missing, of
            another type or with other channel counts), or bad ``stats``/``ridge`` (see
            :func:`icprune.recovery.repair.fits`); nothing is changed then.
    """
    check_model(model, plan)
    repaired = None if stats is None else fits(model, plan, stats, ridge=ridge)
    target = model if inplace else copy.deepcopy(model)
    modules = dict(target.named_modules())
    parameters = {d.module for g in plan.groups for d in g.dependencies if d.kind == "parameter"}
    for name in plan.sizes:
        out_idx, in_idx = plan.indices(name, "out"), plan.indices(name, "in")
        with torch.no_grad():
            if name in parameters:
                _prune_parameter(target, name, out_idx)
            elif is_attention(modules[name]):  # its out_proj stays: sliced by its own entry
                _prune_heads(target, name, out_idx)
            else:
                _prune_module(modules[name], out_idx, in_idx)
    if repaired is not None:
        write(target, repaired)
    return target
