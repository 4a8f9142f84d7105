"""Apply a pruning plan: build the physically smaller model.

Every module a plan's groups touch gets new, smaller parameters and buffers, sliced with
:func:`icprune.slicing.slice_channels` (C++ fused gather on the CPU):

- conv: weight ``W[out_idx][:, in_idx]``, bias ``b[out_idx]``, ``out_channels``/``in_channels``;
  a depthwise conv keeps ``groups == in_channels == out_channels``;
- linear: the same with ``out_features``/``in_features`` (a flattened conv map keeps
  ``prod(spatial)`` features per kept channel);
- BatchNorm: ``weight``, ``bias``, ``running_mean``, ``running_var`` and ``num_features``
  (``num_batches_tracked`` is kept as is).

The pruned model computes exactly what the original computes with the pruned channels zeroed at
the output of every module in their group (up to float round-off).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from icprune.graph import NORM_TYPES
from icprune.planning import PruningPlan
from icprune.slicing import slice_channels


def set_channels(module: nn.Module, out_channels: int, in_channels: int) -> None:
    """Set the channel attributes of a conv, linear or BatchNorm module (not its tensors).

    A depthwise conv (``groups == in_channels == out_channels``) keeps that property: its
    ``groups`` becomes ``out_channels``.
    """
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        module.out_channels, module.in_channels = out_channels, in_channels
        if depthwise:
            module.groups = out_channels
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = out_channels, in_channels
    elif isinstance(module, NORM_TYPES):
        module.num_features = out_channels
    else:
        raise TypeError(f"set_channels: {type(module).__name__} has no channels to set")


def _replace(module: nn.Module, name: str, value: Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        module.register_buffer(
            name, value, persistent=name not in module._non_persistent_buffers_set
        )


def check_sizes(model: nn.Module, plan: PruningPlan, caller: str = "apply") -> None:
    """Check that ``model`` has the modules and channel counts ``plan`` was made for.

    Raises:
        ValueError: a module of ``plan.sizes`` is missing or has other (out, in) channel counts;
            the message starts with ``caller`` and names the module.
    """
    modules = dict(model.named_modules())
    for name, size in plan.sizes.items():
        module = modules.get(name)
        expected = _sizes(module) if module is not None else None
        if expected != tuple(size):
            found = "no such module" if module is None else f"{type(module).__name__}{expected}"
            raise ValueError(
                f"{caller}: the plan does not match this model at {name!r}: it expects (out, in) "
                f"channels {tuple(size)}, the model has {found}. Make the plan on this same model."
            )


def _sizes(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels, module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, NORM_TYPES):
        return module.num_features, module.num_features
    return None


def _prune_module(module: nn.Module, out_idx: Tensor | None, in_idx: Tensor | None) -> None:
    out_full, in_full = _sizes(module)
    if isinstance(module, NORM_TYPES):
        for attr in ("weight", "bias", "running_mean", "running_var"):
            value = getattr(module, attr)
            if value is not None and out_idx is not None:
                _replace(module, attr, slice_channels(value, out_idx.to(value.device)))
        set_channels(module, len(out_idx) if out_idx is not None else out_full, in_full)
        return
    depthwise = isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
    if depthwise:
        in_idx = None  # one input channel per group: follows out_idx through groups
    device = module.weight.device
    rows = out_idx.to(device) if out_idx is not None else torch.arange(out_full, device=device)
    cols = in_idx.to(device) if in_idx is not None else None
    _replace(module, "weight", slice_channels(module.weight, rows, cols))
    if module.bias is not None and out_idx is not None:
        _replace(module, "bias", slice_channels(module.bias, rows))
    out_n = len(rows)
    in_n = out_n if depthwise else (len(cols) if cols is not None else in_full)
    set_channels(module, out_n, in_n)


def apply(model: nn.Module, plan: PruningPlan, *, inplace: bool = False) -> nn.Module:
    """Build the pruned model a plan describes.

    Args:
        model: the network the plan was made for (from :func:`icprune.plan`).
        plan: which channels to keep.
        inplace: prune ``model`` itself; if False (default) a deep copy is pruned and ``model``
            is left bit-identical.

    Returns:
        the pruned model (``model`` itself when ``inplace=True``), on the same devices, with the
        same dtypes and ``requires_grad`` flags and the same train/eval mode.

    Raises:
        ValueError: the plan does not match the model (a module is missing or has other
            channel counts than when the plan was made).
    """
    check_sizes(model, plan)
    target = model if inplace else copy.deepcopy(model)
    modules = dict(target.named_modules())
    for name in plan.sizes:
        out_idx, in_idx = plan.indices(name, "out"), plan.indices(name, "in")
        with torch.no_grad():
            _prune_module(modules[name], out_idx, in_idx)
    return target
