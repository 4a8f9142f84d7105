"""What every layer type icprune prunes has as channels: the one module that knows.

Three kinds of modules carry channels icprune can cut:

- convolutions (``Conv1d/2d/3d``; every ``torch.nn`` conv, transposed ones included, for the
  counts recorded in a structure): ``out_channels``, ``in_channels`` and ``groups``. A conv
  with ``groups = g`` splits both its input and its output channels into g groups: each output
  channel reads ``in_channels / g`` input channels of its own group, so its weight is
  ``(out_channels, in_channels / g, *kernel)``. A *depthwise* conv is the grouped conv with
  ``groups == in_channels == out_channels > 1``: output channel c reads input channel c alone,
  so the two are pruned together. Any other grouped conv is pruned *within* its groups: every
  group keeps the same positions of its input and of its output channels, so ``groups`` stays
  (see :mod:`icprune.structure.dependency`);
- linear layers: ``out_features`` and ``in_features`` (one group);
- BatchNorms (``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and the lazy ones): ``num_features``,
  which are both their output and their input channels;
- LayerNorms over one axis (``nn.LayerNorm`` and its subclasses with a 1-D
  ``normalized_shape``): ``normalized_shape[0]`` channels on the last axis of their input, their
  ``weight`` and ``bias`` sliced like a BatchNorm's. They are not part of a plan's recorded
  structure (:func:`channel_structure`, which plans made before LayerNorms could be pruned
  compare), but :func:`sizes`, :func:`tensor_shapes` and :func:`set_channels` know them;
- attention blocks (:func:`is_attention`): ``nn.MultiheadAttention`` with packed projections,
  no ``bias_k``/``bias_v`` and no zero attention, torchvision's Swin ``ShiftedWindowAttention``
  and ``ShiftedWindowAttentionV2`` (recognised by class, torchvision is not imported), and
  icprune's :class:`~icprune.attention.PrunedMultiheadAttention` and
  :class:`~icprune.attention.PrunedWindowAttention`. Their ``num_heads`` heads are their
  channels, both output and input (:func:`sizes` ``(H, H)``), pruned as units: head i is
  ``head_dim`` rows of each of the query, key and value projections (:func:`projection`;
  :func:`icprune.attention.head_rows`), the same ``head_dim`` input columns of the output
  projection (:func:`output_projection`) and the head's own parameters (Swin's position bias
  column, V2's ``logit_scale`` entry and ``cpb_mlp`` output row). Their embedding dimension
  (:func:`embed_dim`, the residual stream) and :func:`head_dim` never change. Like LayerNorms
  they are not part of a plan's recorded structure;
- per-channel parameters used as values by a module without channels of its own (ConvNeXt's
  ``layer_scale``, ``(C, 1, 1)``): their one dimension of size > 1 (:func:`parameter_axis`,
  :func:`owned_parameter`).

*Prunable layers* - those whose output channels are scored and planned - are the
``Conv1d/2d/3d`` and ``Linear`` modules (:data:`PRUNABLE_TYPES`).
"""

from __future__ import annotations

from torch import nn

from icprune.attention import PrunedMultiheadAttention, PrunedWindowAttention

#: Layers whose output channels icprune scores and prunes.
PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
#: Every BatchNorm (1d/2d/3d, SyncBatchNorm, the lazy ones).
BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)
#: Every convolution (its channel attributes are ``out_channels``, ``in_channels``, ``groups``).
CONV_TYPES = (nn.modules.conv._ConvNd,)
#: The modules with channels: convolutions, linear layers and BatchNorms.
CHANNEL_TYPES = (*CONV_TYPES, nn.Linear, *BATCHNORM_TYPES)
#: The modules a plan can cut, whose tensors icprune slices: prunable layers and BatchNorms
#: (transposed convs, whose weights are laid out (in, out / groups, *kernel), are not among them).
SLICEABLE_TYPES = (*PRUNABLE_TYPES, *BATCHNORM_TYPES)
#: The tensors of a BatchNorm that hold one value per channel.
BATCHNORM_TENSORS = ("weight", "bias", "running_mean", "running_var")
#: The tensors of a LayerNorm that hold one value per channel.
LAYERNORM_TENSORS = ("weight", "bias")
#: Attention block classes fx must not trace into (with torchvision's Swin attention, which
#: :func:`is_attention` recognises by class).
ATTENTION_TYPES = (nn.MultiheadAttention, PrunedMultiheadAttention, PrunedWindowAttention)
#: torchvision's Swin attention classes (``torchvision.models.swin_transformer``).
_SWIN_ATTENTION = ("ShiftedWindowAttention", "ShiftedWindowAttentionV2")


def is_conv(module: nn.Module) -> bool:
    """True for any convolution module."""
    return isinstance(module, CONV_TYPES)


def is_batchnorm(module: nn.Module) -> bool:
    """True for any BatchNorm module."""
    return isinstance(module, BATCHNORM_TYPES)


def is_layernorm(module: nn.Module) -> bool:
    """True for a LayerNorm (``nn.LayerNorm`` or a subclass) over one axis (a 1-D
    ``normalized_shape``): the LayerNorms whose channels icprune can cut."""
    return isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1


def is_window_attention(module: object) -> bool:
    """True for Swin's window attention: torchvision's ``ShiftedWindowAttention(V2)`` (by class
    and module name) or icprune's :class:`~icprune.attention.PrunedWindowAttention`."""
    if isinstance(module, PrunedWindowAttention):
        return True
    kind = type(module)
    return kind.__name__ in _SWIN_ATTENTION and kind.__module__.startswith(
        "torchvision.models.swin_transformer"
    )


def is_attention(module: object) -> bool:
    """True for an attention block whose heads icprune can prune: Swin's window attention
    (:func:`is_window_attention`), icprune's
    :class:`~icprune.attention.PrunedMultiheadAttention`, or an ``nn.MultiheadAttention`` (or
    subclass) with packed projections (``kdim == vdim == embed_dim``), no ``bias_k``/``bias_v``
    and ``add_zero_attn=False``."""
    if isinstance(module, PrunedMultiheadAttention) or is_window_attention(module):
        return True
    return (
        isinstance(module, nn.MultiheadAttention)
        and module._qkv_same_embed_dim
        and module.bias_k is None
        and module.bias_v is None
        and not module.add_zero_attn
    )


def heads(module: nn.Module) -> int:
    """Heads (``num_heads``) of an attention block (:func:`is_attention`).

    Raises:
        TypeError: any other module.
    """
    if not is_attention(module):
        raise TypeError(
            f"heads: {type(module).__name__} is not an attention block icprune knows "
            f"(nn.MultiheadAttention with packed projections, or PrunedMultiheadAttention)"
        )
    return module.num_heads


def head_dim(module: nn.Module) -> int:
    """Features per head d of an attention block (``nn.MultiheadAttention``'s ``head_dim``,
    torchvision Swin's ``C // num_heads``)."""
    count = heads(module)
    if is_window_attention(module):
        return module.qkv.out_features // (3 * count)
    return module.head_dim


def embed_dim(module: nn.Module) -> int:
    """The channels E an attention block reads and writes (its residual stream)."""
    heads(module)  # raises for any other module
    if is_window_attention(module):
        return module.qkv.in_features
    return module.embed_dim


def projection(module: nn.Module) -> tuple[nn.Module, str, str]:
    """Where an attention block's packed q, k, v projection is: ``(owner, weight attribute,
    bias attribute)`` - ``(module, "in_proj_weight", "in_proj_bias")`` for multi-head attention,
    ``(module.qkv, "weight", "bias")`` for window attention. Its rows are q, k, v blocks of
    ``heads * head_dim`` (:func:`icprune.attention.head_rows`)."""
    if is_window_attention(module):
        return module.qkv, "weight", "bias"
    heads(module)
    return module, "in_proj_weight", "in_proj_bias"


def output_projection(module: nn.Module) -> str:
    """The attribute of an attention block's output projection (a linear layer reading
    ``head_dim`` features per head): ``"out_proj"``, or ``"proj"`` for window attention."""
    heads(module)
    return "proj" if is_window_attention(module) else "out_proj"


def has_channels(module: nn.Module) -> bool:
    """True for a conv, linear or BatchNorm module (the modules whose channels this module
    knows)."""
    return isinstance(module, CHANNEL_TYPES)


def _check(module: nn.Module, what: str) -> None:
    if not has_channels(module):
        raise TypeError(
            f"{what}: {type(module).__name__} is not a conv, linear or BatchNorm module, the "
            f"layers whose channels icprune knows"
        )


def out_channels(module: nn.Module) -> int:
    """Output channels C of a conv (``out_channels``), linear layer (``out_features``) or
    BatchNorm (``num_features``).

    Raises:
        TypeError: any other module.
    """
    _check(module, "out_channels")
    if is_conv(module):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.num_features


def in_channels(module: nn.Module) -> int:
    """Input channels of a conv (``in_channels``, all groups together), linear layer
    (``in_features``) or BatchNorm (``num_features``).

    Raises:
        TypeError: any other module.
    """
    _check(module, "in_channels")
    if is_conv(module):
        return module.in_channels
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.num_features


def groups(module: nn.Module) -> int:
    """Channel groups of a conv (``groups``); 1 for linear layers and BatchNorms.

    Raises:
        TypeError: any other module.
    """
    _check(module, "groups")
    return module.groups if is_conv(module) else 1


def is_depthwise(module: nn.Module) -> bool:
    """True for a depthwise conv, ``groups == in_channels == out_channels > 1``: output channel c
    reads input channel c alone (any other module: False)."""
    return (
        is_conv(module)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def sizes(module: nn.Module) -> tuple[int, int] | None:
    """``(out, in)`` channels of a conv, linear or BatchNorm module (see :func:`out_channels`,
    :func:`in_channels`), ``(C, C)`` of a LayerNorm over one axis of C channels, ``(H, H)`` of
    an attention block of H heads, or None for any other module."""
    if is_attention(module):
        return module.num_heads, module.num_heads
    if is_layernorm(module):
        return module.normalized_shape[0], module.normalized_shape[0]
    if not has_channels(module):
        return None
    return out_channels(module), in_channels(module)


def structure_entry(module: nn.Module) -> tuple[str, int, int, int] | None:
    """``(type name, out, in, groups)`` of a conv, linear or BatchNorm module, or None for any
    other module: what a plan records to recognise the model it was made for."""
    if not has_channels(module):
        return None
    return (type(module).__name__, out_channels(module), in_channels(module), groups(module))


def channel_structure(model: nn.Module) -> dict[str, tuple[str, int, int, int]]:
    """The channel structure of every conv, linear and BatchNorm module of ``model``.

    Returns:
        dict qualified name -> ``(type name, out, in, groups)`` (:func:`structure_entry`), in
        ``named_modules()`` order. A plan records it to recognise the model it was made for
        (:func:`icprune.apply` refuses any other).
    """
    structure = {}
    for name, module in model.named_modules():
        entry = structure_entry(module)
        if entry is not None:
            structure[name] = entry
    return structure


def tensor_shapes(
    module: nn.Module, out: int, inp: int, group_count: int
) -> dict[str, tuple[int, ...]]:
    """The shapes of a module's channel tensors at ``out`` output and ``inp`` input channels in
    ``group_count`` groups: a BatchNorm's four per-channel tensors ``(out,)``; a linear layer's
    weight ``(out, inp)`` and bias ``(out,)``; a conv's weight ``(out, inp / groups, *kernel)``
    (its kernel as the module has it) and bias ``(out,)``; a LayerNorm's weight and bias
    ``(out,)``; an attention block's ``in_proj_weight`` ``(3 * out * head_dim, embed_dim)`` and
    ``in_proj_bias`` ``(3 * out * head_dim,)`` at ``out`` heads (window attention: ``qkv``'s
    weight and bias, ``proj``'s weight, the position bias table or V2's ``logit_scale`` and
    last ``cpb_mlp`` weight, keyed by their names inside the module).

    Raises:
        TypeError: a module that is neither a prunable layer, a BatchNorm, a LayerNorm over
            one axis nor an attention block (:data:`SLICEABLE_TYPES`, :func:`is_layernorm`,
            :func:`is_attention`).
        ValueError: a conv whose ``group_count`` does not divide ``out`` and ``inp``.
    """
    if is_layernorm(module):
        return {name: (out,) for name in LAYERNORM_TENSORS}
    if is_attention(module):
        rows, width = 3 * out * head_dim(module), embed_dim(module)
        owner, weight, bias = projection(module)
        prefix = "qkv." if is_window_attention(module) else ""
        shapes = {prefix + weight: (rows, width)}
        if getattr(owner, bias) is not None:
            shapes[prefix + bias] = (rows,)
        if not is_window_attention(module):
            return shapes
        shapes["proj.weight"] = (width, out * head_dim(module))
        if hasattr(module, "logit_scale"):  # V2
            hidden = module.cpb_mlp[2].in_features
            shapes |= {"logit_scale": (out, 1, 1), "cpb_mlp.2.weight": (out, hidden)}
        else:
            table = module.relative_position_bias_table.shape[0]
            shapes["relative_position_bias_table"] = (table, out)
        return shapes
    if not isinstance(module, SLICEABLE_TYPES):
        raise TypeError(
            f"tensor_shapes: {type(module).__name__} is neither a Conv1d/2d/3d, a Linear nor a "
            f"BatchNorm module"
        )
    if is_batchnorm(module):
        return {name: (out,) for name in BATCHNORM_TENSORS}
    if isinstance(module, nn.Linear):
        return {"weight": (out, inp), "bias": (out,)}
    if inp % group_count or out % group_count:
        raise ValueError(
            f"{type(module).__name__} with (out={out}, in={inp}, groups={group_count}): groups "
            f"must divide both channel counts"
        )
    return {"weight": (out, inp // group_count, *module.weight.shape[2:]), "bias": (out,)}


def set_channels(module: nn.Module, out: int, inp: int, group_count: int | None = None) -> None:
    """Set the channel attributes of a conv, linear, BatchNorm or LayerNorm module (not its
    tensors).

    Args:
        module: the module, changed in place.
        out: its new output channels (a BatchNorm's ``num_features``, a LayerNorm's
            ``normalized_shape``).
        inp: its new input channels (ignored for a BatchNorm or LayerNorm, whose input is its
            output).
        group_count: a conv's new ``groups``; None keeps a depthwise conv depthwise (``groups``
            becomes ``out``) and any other conv's groups as they are.

    Raises:
        TypeError: a module without channels.
        ValueError: a conv whose groups would not divide both channel counts (nothing is
            changed).
    """
    if is_layernorm(module):
        module.normalized_shape = (out,)
        return
    _check(module, "set_channels")
    if is_conv(module):
        if group_count is None:
            group_count = out if is_depthwise(module) else module.groups
        if out % group_count or inp % group_count:
            raise ValueError(
                f"set_channels: {type(module).__name__} with (out={out}, in={inp}, "
                f"groups={group_count}): groups must divide both channel counts"
            )
        module.out_channels, module.in_channels, module.groups = out, inp, group_count
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = out, inp
    else:
        module.num_features = out


def parameter_axis(tensor: object) -> int | None:
    """The channel axis of a per-channel parameter used as a value (ConvNeXt's ``layer_scale``
    of shape ``(C, 1, 1)``, a ``(1, 1, C)`` scale): its one dimension of size > 1, or None when
    it has none or several (or is not a floating-point ``nn.Parameter``)."""
    if not isinstance(tensor, nn.Parameter) or not tensor.is_floating_point():
        return None
    wide = [axis for axis, size in enumerate(tensor.shape) if size > 1]
    return wide[0] if len(wide) == 1 else None


def owned_parameter(model: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    """``(owner module, attribute)`` of the parameter qualified ``name`` when it is a parameter
    of a module without channels of its own (not a conv, linear or norm's weight or bias, nor
    an attention block's projection), else None."""
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        return None
    if attr not in owner._parameters or has_channels(owner) or is_layernorm(owner):
        return None
    if is_attention(owner):
        return None
    return owner, attr
