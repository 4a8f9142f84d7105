"""Save and load pruned models: weights plus the channel configuration that shapes them.

``save`` writes one ``torch.save`` file holding a dict of plain types and tensors:
``{"format": "icprune.pruned", "version": 1, "channels": {module: [out, in, groups]},
"state_dict": ...}``, where ``channels`` lists every conv, linear and BatchNorm module,
every LayerNorm over one axis and every per-channel parameter of a module without channels
(ConvNeXt's ``layer_scale``, by its qualified name, ``[C, C, 1]``), and
``"heads": {module: [num_heads, head_dim]}`` for every attention block
(:func:`icprune.structure.layers.is_attention`; files without it, from before, hold none).
``load`` builds a fresh model, replaces each attention block whose stored heads differ from its
own by an :class:`icprune.attention.PrunedMultiheadAttention` of the stored heads, gives the
other modules the stored channel counts (with empty tensors of the stored shapes) and loads the
state_dict strictly, reading the file with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from icprune.attention import PrunedMultiheadAttention, PrunedWindowAttention
from icprune.files import load_torch_file, save_atomically
from icprune.structure.layers import (
    SLICEABLE_TYPES,
    channel_structure,
    embed_dim,
    head_dim,
    is_attention,
    is_layernorm,
    is_window_attention,
    owned_parameter,
    parameter_axis,
    projection,
    set_channels,
    sizes,
    tensor_shapes,
)

FORMAT = "icprune.pruned"
VERSION = 1


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Save a (pruned) model's weights and channel configuration to ``path``.

    The file is written atomically (a temporary file in the same folder, then renamed over
    ``path``): an interrupted or failed save leaves any earlier file at ``path`` untouched.

    Args:
        model: any model, typically from :func:`icprune.apply` or :func:`icprune.prune`.
        path: file to write (``torch.save`` format).

    Raises:
        OSError: the file cannot be written (``path`` is left as it was).
    """
    modules = dict(model.named_modules())
    structure = channel_structure(model)
    channels = {
        name: list(structure[name][1:]) if name in structure else [*sizes(module), 1]
        for name, module in modules.items()
        if (name in structure and isinstance(module, SLICEABLE_TYPES)) or is_layernorm(module)
    }
    for name, tensor in model.named_parameters():  # per-channel parameters (layer_scale)
        if owned_parameter(model, name) is not None and _channels_of(tensor) is not None:
            channels[name] = [_channels_of(tensor)] * 2 + [1]
    save_atomically(
        {
            "format": FORMAT,
            "version": VERSION,
            "channels": channels,
            "heads": {
                name: [module.num_heads, head_dim(module)]
                for name, module in modules.items()
                if is_attention(module)
            },
            "state_dict": model.state_dict(),
        },
        path,
    )


def load(
    path: str | os.PathLike,
    model_fn: Callable[[], nn.Module],
    *,
    map_location: str | torch.device | None = "cpu",
) -> nn.Module:
    """Rebuild a model saved by :func:`save`.

    The file is read with ``torch.load(weights_only=True)`` (no pickled code runs) and every
    value is checked before the model is built: the format and version, a ``channels`` table
    of ``[out, in, groups]`` ints >= 1 per module, a ``state_dict`` of tensors, and that each
    module's stored tensors have the shapes its stored channel counts imply.

    Args:
        path: file written by :func:`save`.
        model_fn: builds the unpruned architecture, e.g. ``icprune.models.resnet50``.
        map_location: passed to ``torch.load`` (default ``"cpu"``).

    Returns:
        ``model_fn()`` reshaped to the stored channel counts, with the stored parameters and
        buffers (bit-identical), in the mode ``model_fn`` returns it in.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        ValueError: the file cannot be read (empty, truncated, damaged, or holding Python
            objects other than tensors and plain values), is not an icprune pruned model, lacks
            a key, holds channel counts that disagree with its tensors, or does not fit the
            architecture (a module missing, of another type, or a state_dict key mismatch). The
            message names the file and the key or module.
        TypeError: ``model_fn`` is not callable or does not return an ``nn.Module``.
    """
    if not callable(model_fn) or isinstance(model_fn, nn.Module):
        raise TypeError(
            f"load: model_fn must build the unpruned model (a factory such as "
            f"icprune.models.resnet50, not a model), got {type(model_fn).__name__}"
        )
    name = os.fspath(path)
    data = load_torch_file(name, "pruned model file", map_location=map_location)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"load: {name!r} is not a model saved by icprune.save")
    if data.get("version") != VERSION:
        version = data.get("version")
        raise ValueError(
            f"load: {name!r} has format version {version!r}, this icprune reads {VERSION}"
        )
    missing = [key for key in ("channels", "state_dict") if key not in data]
    if missing:
        raise ValueError(f"load: {name!r} lacks the key(s) {missing} (damaged file)")
    state, channels = data["state_dict"], data["channels"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"load: {name!r}: 'state_dict' must map names to tensors")
    if not isinstance(channels, dict) or not all(
        isinstance(row, list) and len(row) == 3 and all(_is_count(v) for v in row)
        for row in channels.values()
    ):
        raise ValueError(
            f"load: {name!r}: 'channels' must map module names to [out, in, groups] ints >= 1"
        )
    heads = data.get("heads", {})
    if not isinstance(heads, dict) or not all(
        isinstance(row, list) and len(row) == 2 and all(_is_count(v) for v in row)
        for row in heads.values()
    ):
        raise ValueError(
            f"load: {name!r}: 'heads' must map attention modules to [num_heads, head_dim] ints >= 1"
        )
    model = model_fn()
    if not isinstance(model, nn.Module):
        raise TypeError(f"load: model_fn() returned a {type(model).__name__}, not an nn.Module")
    for module_name, (count, dim) in heads.items():
        _load_heads(name, model, module_name, count, dim, state)
    modules = dict(model.named_modules())
    for module_name, (out_ch, in_ch, groups) in channels.items():
        module = modules.get(module_name)
        if module is None and is_attention(modules.get(module_name.rpartition(".")[0])):
            continue  # files from before heads were pruned listed in_proj_bias; "heads" shapes it
        if module is None and owned_parameter(model, module_name) is not None:
            _load_parameter(name, model, module_name, out_ch, state)
            continue
        if not (isinstance(module, SLICEABLE_TYPES) or is_layernorm(module)):
            raise ValueError(
                f"load: the saved model has a conv/linear/norm module {module_name!r} that "
                f"model_fn() lacks (found {type(module).__name__}); pass the same architecture"
            )
        prefix = f"{module_name}." if module_name else ""
        _check_shapes(name, module_name, module, (out_ch, in_ch, groups), state, prefix)
        for attr, tensor in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            stored = state.get(prefix + attr)
            if tensor is None or stored is None:
                continue
            empty = torch.empty(stored.shape, dtype=tensor.dtype, device=tensor.device)
            if isinstance(tensor, nn.Parameter):
                setattr(module, attr, nn.Parameter(empty, requires_grad=tensor.requires_grad))
            else:
                setattr(module, attr, empty)
        set_channels(module, out_ch, in_ch, groups)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"load: the saved weights do not fit model_fn()'s model: {exc}") from exc
    return model


def _load_heads(path: str, model: nn.Module, name: str, count: int, dim: int, state: dict) -> None:
    """Give the attention block ``name`` of ``model`` ``count`` heads of ``dim`` features:
    left as it is when it has them, else replaced by a
    :class:`~icprune.attention.PrunedMultiheadAttention` (window attention:
    :class:`~icprune.attention.PrunedWindowAttention`) of that many heads, once the stored
    tensors are checked to have its shapes (their values are loaded from ``state`` after)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not name or module is None or not is_attention(module) or head_dim(module) != dim:
        found = "no such module" if module is None or not name else type(module).__name__
        if name and module is not None and is_attention(module):
            found += f" with head_dim {head_dim(module)}"
        raise ValueError(
            f"load: {path!r}: the saved model has an attention block {name!r} of {count} heads "
            f"of {dim} features, model_fn()'s model has {found}; pass the same architecture"
        )
    window = is_window_attention(module)
    kind = PrunedWindowAttention if window else PrunedMultiheadAttention
    if count == module.num_heads and not isinstance(module, kind):
        return
    for key, shape in tensor_shapes(module, count, count, 1).items():
        stored = state.get(f"{name}.{key}")
        if stored is None or tuple(stored.shape) != shape:
            found = None if stored is None else tuple(stored.shape)
            raise ValueError(
                f"load: {path!r}: '{name}.{key}' is stored as {found}, but {count} heads of {dim} "
                f"features over embed_dim {embed_dim(module)} make it {shape}; the file is "
                f"damaged or does not fit model_fn()'s model"
            )
    owner, weight, bias = projection(module)
    like = getattr(owner, weight)
    has_bias = getattr(owner, bias) is not None
    if window:
        new = PrunedWindowAttention(
            embed_dim(module), module.window_size, module.shift_size, count, dim,
            qkv_bias=has_bias, proj_bias=module.proj.bias is not None,
            attention_dropout=module.attention_dropout, dropout=module.dropout,
            cosine=hasattr(module, "logit_scale"),
        )  # fmt: skip
    else:
        new = PrunedMultiheadAttention(
            embed_dim(module), count, dim, dropout=module.dropout, bias=has_bias,
            batch_first=module.batch_first,
        )  # fmt: skip
    new = new.to(device=like.device, dtype=like.dtype)
    flags = {key: p.requires_grad for key, p in module.named_parameters()}
    for key, parameter in new.named_parameters():
        parameter.requires_grad_(flags.get(key, True))
    new.train(module.training)
    model.set_submodule(name, new, strict=True)


def _channels_of(tensor: torch.Tensor) -> int | None:
    """Channels of a per-channel parameter: the size of its one axis > 1 (1 if it has none),
    or None if it has several."""
    wide = [size for size in tensor.shape if size > 1]
    return None if len(wide) > 1 or tensor.dim() == 0 else (wide[0] if wide else 1)


def _load_parameter(path: str, model: nn.Module, name: str, channels: int, state: dict) -> None:
    """Give the per-channel parameter ``name`` of ``model`` the stored channel count: an empty
    tensor of the stored shape, which must be the model's with its channel axis resized."""
    owner, attr = owned_parameter(model, name)
    tensor = getattr(owner, attr)
    axis = parameter_axis(tensor)
    stored = state.get(name)
    expected = list(tensor.shape)
    if axis is not None:
        expected[axis] = channels
    if stored is None or axis is None or list(stored.shape) != expected:
        found = None if stored is None else tuple(stored.shape)
        raise ValueError(
            f"load: {path!r}: the per-channel parameter {name!r} is stored as {found} for "
            f"{channels} channels, but model_fn()'s is {tuple(tensor.shape)}; the file is damaged "
            f"or does not fit model_fn()'s model"
        )
    empty = torch.empty(stored.shape, dtype=tensor.dtype, device=tensor.device)
    setattr(owner, attr, nn.Parameter(empty, requires_grad=tensor.requires_grad))


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_shapes(
    path: str, name: str, module: nn.Module, sizes: tuple[int, int, int], state: dict, prefix: str
) -> None:
    """Raise unless the stored tensors of one module have the shapes its stored channel counts
    (out, in, groups) imply."""
    out_ch, in_ch, groups = sizes
    try:
        expected = tensor_shapes(module, out_ch, in_ch, groups)
    except ValueError as exc:
        raise ValueError(
            f"load: {path!r}: channels of {name!r}: {exc}; the file is damaged"
        ) from None
    for attr, shape in expected.items():
        stored = state.get(prefix + attr)
        if stored is not None and tuple(stored.shape) != shape:
            raise ValueError(
                f"load: {path!r}: '{prefix + attr}' has shape {tuple(stored.shape)}, but the "
                f"stored channels of {name!r} (out={out_ch}, in={in_ch}, groups={groups}) make "
                f"it {shape}; the file is damaged or does not fit model_fn()'s model"
            )
