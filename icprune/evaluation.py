"""Evaluation: top-1 accuracy over labelled batches, and latency measured side by side.

Both leave the models' train/eval flags, parameters and buffers as they found them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack

import torch
from torch import Tensor, nn

from icprune.batches import iter_batches, model_device
from icprune.modes import frozen


def labelled_batch(batch: object, where: str) -> tuple[Tensor, Tensor]:
    """The ``(inputs, targets)`` of one labelled batch.

    Args:
        batch: a tuple or list whose first two elements are the model input Tensor ``[N, ...]``
            and the class indices Tensor[N] (any integer dtype); further elements are ignored.
        where: where the batch came from, for error messages (e.g. ``"train_data batch 3"``).

    Returns:
        ``(inputs, targets)`` as given (not moved, not cast).

    Raises:
        TypeError: an unlabelled batch (a bare Tensor), targets that are not integer class
            indices of shape [N], or a single sample (a Dataset passed instead of a DataLoader).
        ValueError: inputs and targets of different lengths.
    """
    if isinstance(batch, Tensor) or not isinstance(batch, (tuple, list)) or len(batch) < 2:
        kind = "a bare Tensor" if isinstance(batch, Tensor) else type(batch).__name__
        raise TypeError(
            f"{where} is {kind}; labelled batches are (inputs, targets) tuples of Tensors, e.g. "
            f"list(zip(x.split(64), y.split(64))) or a DataLoader over a TensorDataset(x, y)"
        )
    inputs, targets = batch[0], batch[1]
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(
            f"{where}: inputs and targets must be Tensors, got {type(inputs).__name__} and "
            f"{type(targets).__name__}"
        )
    if targets.dim() != 1 or targets.is_floating_point() or targets.is_complex():
        hint = (
            " (a single sample: pass a DataLoader over the Dataset, not the Dataset itself)"
            if targets.dim() == 0
            else ""
        )
        raise TypeError(
            f"{where}: targets must be a Tensor[N] of integer class indices, got "
            f"{targets.dtype} of shape {tuple(targets.shape)}{hint}"
        )
    if inputs.dim() == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{where}: {tuple(inputs.shape)} inputs but {targets.shape[0]} targets; the first "
            f"dimension of the inputs must be the batch size N"
        )
    return inputs, targets


def check_targets(targets: Tensor, classes: int, where: str) -> None:
    """Raise unless every target is a class index in ``[0, classes)``.

    Args:
        targets: Tensor[N] of integer class indices (see :func:`labelled_batch`).
        classes: K, the number of logits the model returns per sample.
        where: the batch, for the message (e.g. ``"accuracy: data batch 3"``).

    Raises:
        ValueError: a target below 0 or at least K (the message names the batch, the first bad
            value and its position).
    """
    if targets.numel() == 0:
        return
    bad = (targets < 0) | (targets >= classes)
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"{where}: target {int(targets[first])} (sample {first}) is not a class index of the "
            f"model, whose output has {classes} classes: targets must lie in [0, {classes}). "
            f"Check that the labels belong to this model's classes (e.g. 0-based, not 1-based)"
        )


def accuracy(
    model: nn.Module, data: Iterable, *, device: torch.device | str | None = None
) -> float:
    """Top-1 accuracy of a classifier over labelled batches.

    Args:
        model: maps a Tensor ``[N, ...]`` to logits Tensor[N, K] (any float dtype). It runs in
            eval mode without gradients; its train/eval flags are restored afterwards and its
            parameters and buffers are not touched.
        data: iterable of ``(inputs, targets)`` batches: inputs Tensor ``[N, ...]``, targets
            Tensor[N] integer class indices in ``[0, K)`` (a DataLoader or a list of tuples).
        device: device to run on; batches are moved there. Default: the model's device. The
            model itself is never moved.

    Returns:
        the fraction of samples whose highest logit is the target class, in [0, 1] (a float).

    Raises:
        ValueError: ``data`` yields no sample, the model's output is not [N, K], or a target
            is not a class index in ``[0, K)`` (checked in every batch; the message names the
            batch and the value - never a silent 0 %).
        TypeError: ``data`` is not iterable or yields unlabelled batches (see
            :func:`labelled_batch`).
    """
    dev = model_device(model, device)
    correct = total = 0
    with frozen(model):
        for step, batch in enumerate(iter_batches(data, None)):
            inputs, targets = labelled_batch(batch, f"data batch {step}")
            logits = model(inputs.to(dev))
            if (
                not isinstance(logits, Tensor)
                or logits.dim() != 2
                or logits.shape[:1] != targets.shape
            ):
                shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits)
                raise ValueError(
                    f"accuracy: the model returned {shape} for {targets.shape[0]} samples in "
                    f"data batch {step}; it must return logits Tensor[N, K]"
                )
            check_targets(targets, logits.shape[1], f"accuracy: data batch {step}")
            correct += int((logits.argmax(1) == targets.to(dev)).sum())
            total += targets.shape[0]
    if total == 0:
        raise ValueError("accuracy: data yielded no samples; pass at least one labelled batch")
    return correct / total


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def latency(
    models: Mapping[str, nn.Module],
    example_inputs: Tensor | Sequence[Tensor],
    *,
    rounds: int = 15,
    warmup: int = 2,
) -> dict[str, float]:
    """Median forward time of several models on the same input, measured side by side.

    Method: every model runs ``warmup`` untimed forwards; then ``rounds`` rounds follow, each
    timing one forward of every model, round-robin, the order rotating by one model per round
    (so no model always runs first or after the same neighbour). All runs are in eval mode
    under ``torch.inference_mode()``; with CUDA inputs the device is synchronised before and
    after every timed forward. Timing the models interleaved in one run makes their ratios
    robust to a machine whose speed drifts (other processes, clocks); compare ratios, not
    absolute values across runs.

    Args:
        models: ``name -> model``; each is called as ``model(*example_inputs)`` (or
            ``model(example_inputs)`` for one Tensor). Train/eval flags are restored afterwards;
            parameters and buffers are not touched.
        example_inputs: Tensor or tuple of Tensors, on the models' device, e.g.
            ``torch.randn(8, 3, 224, 224)``.
        rounds: timed forwards per model (int >= 1); the median is reported.
        warmup: untimed forwards per model first (int >= 0).

    Returns:
        ``name -> median seconds per forward`` (float > 0), in the order of ``models``.

    Raises:
        ValueError: no models, or bad ``rounds``/``warmup``.
        TypeError: a value of ``models`` is not an ``nn.Module``, or the inputs are not Tensors.
        Exception: whatever a model's own forward raises on ``example_inputs`` (e.g. a wrong
            input shape), unchanged; the models' flags are restored.
    """
    if not isinstance(models, Mapping) or not models:
        raise ValueError("latency: models must be a non-empty mapping name -> nn.Module")
    for name, model in models.items():
        if not isinstance(model, nn.Module):
            raise TypeError(f"latency: models[{name!r}] is a {type(model).__name__}, not a Module")
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise TypeError("latency: example_inputs must be a Tensor or a tuple of Tensors")
    rounds = _check_int("rounds", rounds, 1)
    warmup = _check_int("warmup", warmup, 0)
    cuda = any(x.is_cuda for x in inputs)

    def forward(model: nn.Module) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(*inputs)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    with ExitStack() as stack:
        for model in models.values():
            stack.enter_context(frozen(model))
        stack.enter_context(torch.inference_mode())
        for model in models.values():
            for _ in range(warmup):
                forward(model)
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(forward(models[name]))
    return {name: statistics.median(values) for name, values in times.items()}
