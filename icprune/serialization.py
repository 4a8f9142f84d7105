"""Save and load pruned models: weights plus the channel configuration that shapes them.

``save`` writes one ``torch.save`` file holding a dict of plain types and tensors:
``{"format": "icprune.pruned", "version": 1, "channels": {module: [out, in, groups]},
"state_dict": ...}``, where ``channels`` lists every conv, linear and BatchNorm module.
``load`` builds a fresh model, gives those modules the stored channel counts (with empty
tensors of the stored shapes) and loads the state_dict strictly, reading the file with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from icprune.applying import set_channels
from icprune.graph import NORM_TYPES, PRUNABLE_TYPES

FORMAT = "icprune.pruned"
VERSION = 1


def _channels(module: nn.Module) -> list[int]:
    if isinstance(module, nn.modules.conv._ConvNd):
        return [module.out_channels, module.in_channels, module.groups]
    if isinstance(module, nn.Linear):
        return [module.out_features, module.in_features, 1]
    return [module.num_features, module.num_features, 1]


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Save a (pruned) model's weights and channel configuration to ``path``.

    Args:
        model: any model, typically from :func:`icprune.apply` or :func:`icprune.prune`.
        path: file to write (``torch.save`` format).
    """
    channels = {
        name: _channels(m)
        for name, m in model.named_modules()
        if isinstance(m, (*PRUNABLE_TYPES, *NORM_TYPES))
    }
    torch.save(
        {
            "format": FORMAT,
            "version": VERSION,
            "channels": channels,
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

    Args:
        path: file written by :func:`save`.
        model_fn: builds the unpruned architecture, e.g. ``icprune.models.resnet50``.
        map_location: passed to ``torch.load`` (default ``"cpu"``).

    Returns:
        ``model_fn()`` reshaped to the stored channel counts, with the stored parameters and
        buffers (bit-identical), in the mode ``model_fn`` returns it in.

    Raises:
        ValueError: the file is not an icprune pruned model, or it does not fit the architecture
            (a module missing, of another type, or a state_dict key mismatch).
    """
    data = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"load: {os.fspath(path)!r} is not a model saved by icprune.save")
    if data.get("version") != VERSION:
        raise ValueError(f"load: format version {data.get('version')!r} is not supported")
    model = model_fn()
    modules = dict(model.named_modules())
    state = data["state_dict"]
    for name, (out_ch, in_ch, groups) in data["channels"].items():
        module = modules.get(name)
        if not isinstance(module, (*PRUNABLE_TYPES, *NORM_TYPES)):
            raise ValueError(
                f"load: the saved model has a conv/linear/norm module {name!r} that model_fn() "
                f"lacks (found {type(module).__name__}); pass the same architecture"
            )
        prefix = f"{name}." if name else ""
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
        set_channels(module, out_ch, in_ch)
        if isinstance(module, nn.modules.conv._ConvNd):
            module.groups = groups
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"load: the saved weights do not fit model_fn()'s model: {exc}") from exc
    return model
