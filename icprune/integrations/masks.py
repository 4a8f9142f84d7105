"""A pruning plan as ``torch.nn.utils.prune`` masks: soft pruning, and making it permanent.

:func:`apply_masks` keeps every shape and zeroes the channels a :class:`icprune.PruningPlan`
prunes, with ``torch.nn.utils.prune.custom_from_mask`` (each masked parameter ``p`` becomes
``p_orig * p_mask``; the state_dict holds ``p_orig`` and the buffer ``p_mask``):

- conv and linear layers: the weight rows of pruned output channels (dim 0) and the bias entries
  of those channels; the weight columns of pruned input channels (dim 1; a flattened conv map
  fed to a linear layer masks all ``prod(spatial)`` features of a pruned channel). A depthwise
  conv's single input channel per group follows its output channel;
- BatchNorm: weight and bias of the pruned channels (affine BatchNorms only; running statistics
  are buffers and stay);
- attention block: the q, k and v rows of the pruned heads in ``in_proj_weight`` and
  ``in_proj_bias`` (Swin: ``qkv``'s weight and bias; :func:`icprune.attention.head_rows`), and
  their output projection's input columns (as any consumer's). A masked head's value rows are 0,
  so its output is exactly 0 whatever weights its (zero) queries and keys give it; its
  per-head parameters (Swin's position bias) are left as they are. The attention modules read
  their projections' weights without calling them, so the masks of Swin's ``qkv`` and of every
  output projection are applied once, here, and not recomputed before each forward: after
  training their ``weight_orig`` they are stale (the head's values stay masked in
  ``nn.MultiheadAttention``, whose own ``in_proj_weight`` mask is recomputed).

With weight *and* bias zero, a pruned channel is exactly 0 after its conv and after an affine
BatchNorm (``0 * x_hat + 0``), so it stays 0 through activations and residual adds, and the
layers that consume it have zero weights for it. The masked model therefore computes what
:func:`icprune.apply` computes for the same plan: its kept channels carry the pruned model's
values and its logits equal the pruned model's (up to float round-off of the shorter sums).
Parameters with nothing to prune are left as they are.

:func:`remove_masks` calls ``torch.nn.utils.prune.remove`` on every masked parameter: the zeros
become part of plain parameters again (same shapes; :func:`icprune.apply` can then make the
model physically smaller).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from icprune.applying import check_model
from icprune.attention import head_rows
from icprune.planning import PruningPlan
from icprune.structure.layers import (
    groups,
    head_dim,
    is_attention,
    is_batchnorm,
    is_depthwise,
    is_layernorm,
    owned_parameter,
    parameter_axis,
    projection,
)


def _keep(size: int, kept: Tensor | None) -> Tensor | None:
    """Bool Tensor[size]: True at kept channels; None when nothing along the axis is pruned."""
    if kept is None or len(kept) == size:
        return None
    mask = torch.zeros(size, dtype=torch.bool)
    mask[kept] = True
    return mask


def _mask(module: nn.Module, name: str, rows: Tensor | None, cols: Tensor | None) -> None:
    """Mask parameter ``name`` of ``module``: zero the rows (dim 0) and columns (dim 1) whose
    entry in ``rows`` / ``cols`` (bool) is False."""
    param = getattr(module, name)
    if param is None or (rows is None and cols is None):
        return
    mask = torch.ones_like(param)
    if rows is not None:
        mask[~rows.to(param.device)] = 0
    if cols is not None:
        mask[:, ~cols.to(param.device)] = 0
    prune.custom_from_mask(module, name, mask)


def _pruning_hooks(module: nn.Module) -> list[prune.BasePruningMethod]:
    """The ``torch.nn.utils.prune`` forward pre-hooks of one module (one per masked tensor)."""
    hooks = module._forward_pre_hooks.values()
    return [hook for hook in hooks if isinstance(hook, prune.BasePruningMethod)]


def _copy(model: nn.Module) -> nn.Module:
    """Deep copy of a model that may hold pruning masks.

    A masked parameter ``p`` is a non-leaf tensor attribute (``p_orig * p_mask``), which
    ``copy.deepcopy`` refuses; it is copied as a detached tensor, then recomputed from the copy's
    own ``p_orig`` and ``p_mask``, exactly as the pruning hook does before every forward.
    """
    memo = {}
    for module in model.modules():
        for hook in _pruning_hooks(module):
            masked = getattr(module, hook._tensor_name)
            memo[id(masked)] = masked.detach()
    target = copy.deepcopy(model, memo)
    for module in target.modules():
        for hook in _pruning_hooks(module):
            setattr(module, hook._tensor_name, hook.apply_mask(module))
    return target


def apply_masks(model: nn.Module, plan: PruningPlan, *, inplace: bool = False) -> nn.Module:
    """Zero the channels a plan prunes with ``torch.nn.utils.prune`` masks (soft pruning).

    Args:
        model: the network the plan was made for (from :func:`icprune.plan`).
        plan: which channels to keep.
        inplace: mask ``model`` itself; if False (default) a deep copy is masked and ``model`` is
            left bit-identical.

    Returns:
        the masked model (``model`` itself when ``inplace=True``), with every shape unchanged:
        masked parameters ``p`` are ``p_orig * p_mask`` (masks of the parameter's dtype and
        device, 0 at pruned channels, 1 elsewhere).

    Raises:
        TypeError: ``plan`` is no :class:`icprune.PruningPlan`.
        ValueError: the plan was made for another model, or the model changed since (see
            :func:`icprune.applying.check_model`).
    """
    check_model(model, plan, caller="apply_masks")
    target = model if inplace else _copy(model)
    modules = dict(target.named_modules())
    parameters = {d.module for g in plan.groups for d in g.dependencies if d.kind == "parameter"}
    for name, (out_size, in_size) in plan.sizes.items():
        rows = _keep(out_size, plan.indices(name, "out"))
        if name in parameters:  # a per-channel parameter: masked along its channel axis
            owner, attr = owned_parameter(target, name)
            if rows is not None:
                axis = parameter_axis(getattr(owner, attr))
                mask = torch.ones_like(getattr(owner, attr))
                mask.index_fill_(axis, (~rows).nonzero().flatten().to(mask.device), 0)
                prune.custom_from_mask(owner, attr, mask)
            continue
        module = modules[name]
        if is_attention(module):
            if rows is not None:
                owner, weight, bias = projection(module)
                kept = head_rows(out_size, head_dim(module), rows.nonzero().flatten())
                keep = _keep(getattr(owner, weight).shape[0], kept)
                _mask(owner, weight, keep, None)
                _mask(owner, bias, keep, None)
            continue
        if is_batchnorm(module) or is_layernorm(module):
            _mask(module, "weight", rows, None)
            _mask(module, "bias", rows, None)
            continue
        cols = _keep(in_size, plan.indices(name, "in"))
        if is_depthwise(module):
            cols = None  # its one input channel per group follows its output channel
        elif cols is not None and groups(module) > 1:
            cols = cols[: in_size // groups(module)]  # every group keeps the same positions
        _mask(module, "weight", rows, cols)
        _mask(module, "bias", rows, None)
    return target


def remove_masks(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Make ``torch.nn.utils.prune`` masks permanent (``prune.remove`` on every masked parameter).

    Args:
        model: a model with pruning masks (from :func:`apply_masks` or any
            ``torch.nn.utils.prune`` method); modules without masks are left as they are.
        inplace: change ``model`` itself; if False (default) a deep copy is changed and
            ``model`` is left bit-identical.

    Returns:
        the model with plain parameters (``p = p_orig * p_mask``, zeros where masked) and no
        ``*_orig`` parameters, ``*_mask`` buffers or pruning hooks; same shapes.
    """
    target = model if inplace else _copy(model)
    for module in target.modules():
        for hook in _pruning_hooks(module):
            prune.remove(module, hook._tensor_name)
    return target
