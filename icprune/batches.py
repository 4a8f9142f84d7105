"""Batches of calibration, training and evaluation data, as every pipeline step reads them.

One place for what calibration, BatchNorm re-estimation, fine-tuning and evaluation all do with
user data: check it is an iterable of batches (:func:`iter_batches`), show a progress bar while
it is read (:func:`progress_bar`), find the model's input in a batch (:func:`batch_input`) and the
device to run on (:func:`model_device`). Nothing here moves or modifies a model or a batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

import torch
from torch import nn
from tqdm.auto import tqdm


def model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """The device to run ``model`` on: ``device`` if given (checked against the model's
    parameters), else the device of the model's parameters, else CPU.

    Raises:
        ValueError: ``device`` differs from the device holding the model's parameters (icprune
            never moves a model; the message says how to).
    """
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
    """The model input of one batch: the batch itself if it is a Tensor[N, ...], else the first
    element of an ``(input, target, ...)`` tuple or list (returned as given, not moved).

    Raises:
        TypeError: the batch (or its first element) is not a Tensor.
    """
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"data must yield Tensors or (input, target) tuples of Tensors; got a batch of type "
            f"{type(batch).__name__}"
        )
    return batch


def iter_batches(data: Iterable, max_batches: int | None) -> Iterator:
    """An iterator over the first ``max_batches`` batches of ``data`` (all of them for None).

    Args:
        data: an iterable of batches (a DataLoader, a list of Tensors or of tuples).
        max_batches: a positive int, or None.

    Raises:
        ValueError: ``max_batches`` is not a positive int or None.
        TypeError: ``data`` is a single Tensor (iterating it would yield single samples) or not
            iterable.
    """
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    if isinstance(data, torch.Tensor):
        raise TypeError(
            f"data is one Tensor of shape {tuple(data.shape)}; pass an iterable of batches, e.g. "
            f"[x] for one batch or list(x.split(64)) (iterating a Tensor would yield single "
            f"samples)"
        )
    try:
        iterator = iter(data)
    except TypeError:
        raise TypeError(
            f"data must be an iterable of batches (e.g. a DataLoader or a list of Tensors), got "
            f"{type(data).__name__}"
        ) from None
    return islice(iterator, max_batches)


def batch_count(data: Iterable, max_batches: int | None) -> int | None:
    """How many batches :func:`iter_batches` will yield: ``len(data)`` capped at
    ``max_batches``, or ``max_batches`` (possibly None: unknown) when ``data`` has no length."""
    try:
        total = len(data)
    except TypeError:
        return max_batches
    return total if max_batches is None else min(total, max_batches)


def progress_bar(
    batches: Iterator,
    data: Iterable,
    max_batches: int | None,
    desc: str,
    show: bool,
    initial: int = 0,
):
    """``batches`` wrapped in a tqdm bar named ``desc`` (only on a terminal, and only if
    ``show``), with the number of batches (:func:`batch_count`) when ``data`` has a length,
    starting at ``initial`` (batches already done before ``batches``)."""
    return tqdm(
        batches,
        total=batch_count(data, max_batches),
        initial=initial,
        desc=desc,
        unit="batch",
        disable=None if show else True,
    )
