"""BatchNorm recalibration: re-estimate every BatchNorm's running statistics from data.

After channels are pruned (or masked), the activations that reach each BatchNorm change, and the
running mean and variance stored in the model no longer describe them. Re-estimating them from a
few batches of training data, without touching any weight, recovers most of the accuracy that
the stale statistics cost. This is the measurement protocol of docs/quality.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from icprune.batches import batch_input, iter_batches, model_device, progress_bar
from icprune.structure.layers import is_batchnorm

#: Below this many samples :func:`recalibrate_bn` warns that its estimate may hurt: on
#: EfficientNet-Lite0, 256 crops of nine photos made even the unpruned model agree with itself
#: on only 29 % of held-out photos, while on the digits nets 512 (and even 64) images helped
#: (docs/quality.md). How many are enough depends on the model and how varied the data is.
MIN_SAMPLES = 512


class LittleDataWarning(UserWarning):
    """BatchNorm statistics re-estimated from fewer than :data:`MIN_SAMPLES` samples."""


def recalibrate_bn(
    model: nn.Module,
    data: Iterable,
    *,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> nn.Module:
    """Reset and re-estimate the running statistics of every BatchNorm of ``model``, in place.

    The model is modified **in place by design** (that is the purpose of this function): the
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` buffers of every BatchNorm
    that tracks running statistics are reset and re-estimated as the cumulative average (equal
    weight per batch, PyTorch's ``momentum=None``) of the batch statistics over ``data``. Copy
    the model first (``copy.deepcopy``) to keep the original. Nothing else changes: weights,
    biases, other buffers, every module's ``training`` flag and every BatchNorm's ``momentum``
    are as before when the function returns. If it raises (bad data, a batch the model
    cannot take, NaN/Inf statistics, an interrupt), the running statistics are restored to their
    values before the call, so a failure loses nothing.

    During the passes only the BatchNorms are in train mode; every other module (dropout, ...)
    is in eval mode, and autograd is off.

    Args:
        model: the network; BatchNorm1d/2d/3d and SyncBatchNorm modules are recalibrated.
        data: iterable of batches, each a Tensor ``[N, ...]`` model input or a tuple/list whose
            first element is the input (e.g. a DataLoader yielding ``(images, labels)``). Every
            batch needs N >= 2 where a BatchNorm sees one value per channel (BatchNorm1d on
            ``[N, C]``), as in training.
        max_batches: use at most this many batches (None: all of ``data``).
        device: device to run on; batches are moved there. Default: the model's device. The
            model itself is never moved.
        progress: show a tqdm progress bar (only on a terminal).

    Returns:
        ``model`` itself, recalibrated.

    Warns:
        LittleDataWarning: fewer than :data:`MIN_SAMPLES` samples were seen (the estimate is
            made all the same).

    Raises:
        ValueError: the model has no BatchNorm with running statistics, ``data`` yields no
            batch, or the re-estimated statistics are not finite (NaN/Inf in the data or model).
        TypeError: ``data`` not iterable, a single Tensor, or yielding something other than
            Tensors/tuples.
        Exception: any error of the model's forward on a batch propagates unchanged (with the
            statistics restored).
    """
    batchnorms = [
        (name, m) for name, m in model.named_modules() if is_batchnorm(m) and m.track_running_stats
    ]
    if not batchnorms:
        raise ValueError(
            f"{type(model).__name__} has no BatchNorm with running statistics "
            f"(track_running_stats=True); there is nothing to recalibrate"
        )
    dev = model_device(model, device)
    batches = iter_batches(data, max_batches)
    flags = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for _, m in batchnorms]
    # What a failure restores: the running statistics as they were.
    saved = [
        (m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for _, m in batchnorms
    ]
    seen = samples = 0
    done = False
    try:
        model.eval()
        for _, bn in batchnorms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average over the batches
            bn.train()
        bar = progress_bar(batches, data, max_batches, "recalibrate_bn", progress)
        with torch.no_grad():
            for batch in bar:
                x = batch_input(batch)
                model(x.to(dev))
                seen += 1
                samples += len(x)
        if seen == 0:
            raise ValueError(
                "data yielded no batches; pass at least one batch of model inputs (the running "
                "statistics were restored)"
            )
        for name, bn in batchnorms:
            stats = torch.cat([bn.running_mean, bn.running_var])
            if not bool(torch.isfinite(stats).all()):
                raise ValueError(
                    f"recalibrate_bn: the re-estimated statistics of '{name}' are not finite; "
                    f"check the data and the model for NaN/Inf (the running statistics were "
                    f"restored)"
                )
        done = True
        if samples < MIN_SAMPLES:
            warnings.warn(
                f"recalibrate_bn: re-estimating BatchNorm statistics from {samples} samples "
                f"(fewer than {MIN_SAMPLES}); with little or unrepresentative data this can "
                f"hurt more than it helps (docs/quality.md: 256 crops of 9 photos left "
                f"EfficientNet-Lite0 agreeing with itself on 29 % of held-out photos). Pass "
                f"more data, or skip it (the CLI's --no-bn-recalibration); repair "
                f"(icprune.apply(..., stats=...)) already corrects the means",
                LittleDataWarning,
                stacklevel=2,
            )
    finally:
        for module, was_training in flags:
            module.training = was_training
        for bn, momentum in momenta:
            bn.momentum = momentum
        if not done:  # an error or an interrupt: give the model its statistics back
            for bn, mean, var, tracked in saved:
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(tracked)
    return model
