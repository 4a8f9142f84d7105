"""Calibration: stream a model's feature maps into per-layer :class:`ChannelStats`.

Forward hooks read each prunable layer's feature map at its read point (see
:mod:`icprune.graph`) and add it to that layer's statistics; no feature map is kept. The model
runs in eval mode without gradients, and its mode, parameters and buffers are left exactly as
they were.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

import torch
from torch import nn
from tqdm.auto import tqdm

from icprune.graph import ReadPoint, out_channels, prunable_layers, read_points
from icprune.modes import frozen
from icprune.stats import ChannelStats


def model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """The device to run ``model`` on: ``device`` if given (checked against the model's
    parameters), else the device of the model's parameters, else CPU."""
    params = list(model.parameters())
    held = params[0].device if params else None
    if device is None:
        return held if held is not None else torch.device("cpu")
    device = torch.device(device)
    differs = held is not None and held.type != device.type
    if held is not None and held.index is not None and device.index is not None:
        differs = differs or held.index != device.index
    if differs:
        raise ValueError(
            f"device={str(device)!r} but the model's parameters are on {held}; move the model "
            f"first (model.to({str(device)!r})) - icprune does not move your model"
        )
    return device


def batch_input(batch: object) -> torch.Tensor:
    """The model input of one batch: the batch itself if it is a Tensor, else the first element
    of an ``(input, target, ...)`` tuple or list."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"data must yield Tensors or (input, target) tuples of Tensors; got a batch of type "
            f"{type(batch).__name__}"
        )
    return batch


def _batches(data: Iterable, max_batches: int | None) -> Iterator:
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    try:
        iterator = iter(data)
    except TypeError:
        raise TypeError(
            f"data must be an iterable of batches (e.g. a DataLoader or a list of Tensors), got "
            f"{type(data).__name__}"
        ) from None
    return islice(iterator, max_batches)


def _total(data: Iterable, max_batches: int | None) -> int | None:
    try:
        total = len(data)
    except TypeError:
        return max_batches
    return total if max_batches is None else min(total, max_batches)


def _progress(batches: Iterator, data: Iterable, max_batches: int | None, desc: str, show: bool):
    """``batches`` wrapped in a tqdm bar named ``desc`` (only on a terminal, and only if
    ``show``), with the number of batches when ``data`` has a length."""
    total = _total(data, max_batches)
    return tqdm(batches, total=total, desc=desc, unit="batch", disable=None if show else True)


def _hook(point: ReadPoint, stats: ChannelStats):
    def hook(_module, _inputs, output):
        feature = output if point.activation is None else point.activation(output)
        stats.update(feature.detach())

    return hook


def calibrate(
    model: nn.Module,
    data: Iterable,
    *,
    layers: Iterable[str] | None = None,
    bins: int = 64,
    range_mode: str = "layer",
    read_at: str = "bn",
    nan_policy: str = "raise",
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    backend: str = "auto",
) -> dict[str, ChannelStats]:
    """Collect the channel statistics of every prunable layer over calibration data.

    Args:
        model: the network; not modified (mode, parameters and buffers are restored bit for bit).
        data: iterable of batches, each a Tensor ``[N, ...]`` model input or a tuple/list whose
            first element is the input (e.g. a DataLoader yielding ``(images, labels)``).
        layers: qualified module names to calibrate; None = every Conv/Linear layer except the
            output layers (see :func:`icprune.graph.prunable_layers`).
        bins: histogram bins per channel (see :class:`ChannelStats`).
        range_mode: ``"layer"`` or ``"channel"`` histogram range (see :class:`ChannelStats`).
        read_at: where a layer's feature map is read: ``"output"`` (the conv/linear output),
            ``"bn"`` (the BatchNorm that directly follows it) or ``"activation"`` (after the
            activation that follows that); the point actually used per layer, which can be an
            earlier one where the requested one does not exist, is stored in ``stats.read_at``.
            ``"output"`` needs no fx trace.
        nan_policy: ``"raise"`` or ``"zero"`` for NaN/Inf in a feature map (see
            :class:`ChannelStats`).
        max_batches: stop after this many batches (None: the whole of ``data``).
        device: device to run on; batches are moved there. Default: the model's device. The model
            itself is never moved.
        progress: show a tqdm progress bar (only on a terminal).
        backend: who computes each batch's statistics (see :class:`ChannelStats`): ``"auto"``
            (Triton on CUDA, the C++ extension on the CPU, else torch), ``"triton"``, ``"cpp"``
            or ``"torch"``. On CUDA no layer synchronises with the host per batch; non-finite
            values found on the device are reported once, at the end.

    Returns:
        dict qualified layer name -> :class:`ChannelStats` over all samples of all batches
        (``count = sum(N * H * W)``), in ``named_modules()`` order.

    Raises:
        ValueError: unknown layer names, untraceable model (see :func:`icprune.graph.trace`),
            ``data`` yielding no batch, non-finite feature maps (``nan_policy="raise"``).
        TypeError: ``data`` not iterable or yielding something other than Tensors/tuples.
    """
    selected = prunable_layers(model, layers)
    if not selected:
        raise ValueError(f"{type(model).__name__} has no prunable (Conv/Linear) layer to calibrate")
    points = read_points(model, selected, read_at)
    dev = model_device(model, device)
    stats = {
        name: ChannelStats(
            out_channels(module),
            bins=bins,
            range_mode=range_mode,
            nan_policy=nan_policy,
            name=name,
            read_at=points[name].read_at,
            device=dev,
            backend=backend,
        )
        for name, module in selected.items()
    }
    modules = dict(model.named_modules())
    batches = _batches(data, max_batches)
    seen = 0
    handles = []
    try:
        with frozen(model):
            for point in points.values():
                hook = _hook(point, stats[point.layer])
                handles.append(modules[point.module].register_forward_hook(hook))
            bar = _progress(batches, data, max_batches, "calibrate", progress)
            for batch in bar:
                model(batch_input(batch).to(dev))
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise ValueError("data yielded no batches; pass at least one batch of model inputs")
    for layer in stats.values():
        layer.sync()  # one host synchronisation per layer, after all batches
    return stats
