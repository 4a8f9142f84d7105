"""Fine-tuning: recover a pruned model's accuracy with SGD, optionally distilled from a teacher.

The recipe is the one of the criteria comparison (``bench/quality``): SGD with Nesterov
momentum 0.9 and weight decay 5e-4, the learning rate decayed per step along a cosine from
``lr`` to 0 over all steps; cross-entropy loss. With a ``teacher`` (typically the unpruned
model) the loss adds knowledge distillation (Hinton et al. 2015):

    loss = (1 - w) * CE(s, y) + w * T^2 * KL(softmax(t / T) || softmax(s / T))

with student logits s, teacher logits t, temperature T and ``distill_weight`` w; the T^2 keeps
the gradient scale of the distillation term independent of T.

Under ``torchrun`` (an initialised process group of several processes) the model is trained
with ``DistributedDataParallel``: each process passes its shard of every global batch, and each
step equals one process's step on the whole global batch (see :func:`finetune`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icprune.batches import iter_batches, model_device, progress_bar
from icprune.evaluation import check_targets, labelled_batch
from icprune.modes import frozen
from icprune.recovery import distributed as ddp


def distillation_loss(
    logits: Tensor,
    targets: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    temperature: float = 4.0,
    distill_weight: float = 0.5,
) -> Tensor:
    """The fine-tuning loss of one batch (see the module docstring).

    Args:
        logits: student logits Tensor[N, K] float.
        targets: class indices Tensor[N] int64 in ``[0, K)``.
        teacher_logits: teacher logits Tensor[N, K], or None for plain cross-entropy.
        temperature: T > 0, softens both distributions of the distillation term.
        distill_weight: w in [0, 1], the weight of the distillation term.

    Returns:
        scalar Tensor (mean over the batch; the KL term is summed over classes, averaged over
        samples), in nats.
    """
    ce = F.cross_entropy(logits, targets)
    if teacher_logits is None or distill_weight == 0:
        return ce
    log_student = F.log_softmax(logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return (1 - distill_weight) * ce + distill_weight * temperature**2 * kl


def cosine_factor(step: int, total: int) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based) of ``total`` steps:
    ``(1 + cos(pi * step / total)) / 2``, 1 at the first step, reaching 0 at ``total`` and
    staying 0 after it."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _number(name: str, value: object, low: float, high: float, open_low: bool, open_high: bool):
    """``value`` as a float if it is a finite number in the interval, else a ValueError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and (
            value < high if open_high else value <= high
        )
    if not ok:
        left, right = "(" if open_low else "[", ")" if open_high else "]"
        raise ValueError(
            f"finetune: {name} must be a number in {left}{low:g}, {high:g}{right}, got {value!r}"
        )
    return float(value)


def _steps_per_epoch(train_data: Iterable, epochs: int) -> tuple[Iterable, int]:
    """``train_data`` made re-iterable where needed, and its number of batches per epoch."""
    if isinstance(train_data, Tensor):
        raise TypeError(
            "finetune: train_data is a Tensor; pass labelled batches, e.g. "
            "list(zip(x.split(64), y.split(64))) or a DataLoader over a TensorDataset(x, y)"
        )
    try:
        one_shot = iter(train_data) is train_data
    except TypeError:
        raise TypeError(
            f"finetune: train_data must be an iterable of (inputs, targets) batches (a "
            f"DataLoader or a list of tuples), got {type(train_data).__name__}"
        ) from None
    if one_shot:
        if epochs > 1:
            raise TypeError(
                f"finetune: train_data is a one-shot iterator ({type(train_data).__name__}) but "
                f"epochs={epochs} needs to read it {epochs} times; pass a re-iterable (a list "
                f"of batches or a DataLoader)"
            )
        train_data = list(train_data)
    try:
        return train_data, len(train_data)
    except TypeError:
        return train_data, sum(1 for _ in train_data)


def finetune(
    model: nn.Module,
    train_data: Iterable,
    epochs: int,
    *,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    distill_weight: float = 0.5,
    device: torch.device | str | None = None,
    progress: bool = True,
    inplace: bool = False,
    distributed: bool | None = None,
) -> nn.Module:
    """Train a (pruned) classifier for a few epochs, optionally distilling from a teacher.

    The whole model is in train mode while it learns (BatchNorm uses and updates batch
    statistics); every parameter with ``requires_grad`` is optimised, with weight decay on all
    of them. Batches are used in the order ``train_data`` yields them (shuffle in the
    DataLoader). The result is deterministic given ``torch.manual_seed`` (and deterministic
    kernels on GPU).

    Args:
        model: maps inputs Tensor ``[N, ...]`` to logits Tensor[N, K]. With ``inplace=False``
            (default) a deep copy is trained and ``model`` stays bit-identical.
        train_data: re-iterable of ``(inputs, targets)`` batches: inputs Tensor ``[N, ...]``,
            targets Tensor[N] integer class indices (a DataLoader, or a list of tuples). Its
            ``len()`` gives the steps per epoch of the cosine schedule; an iterable without
            ``len()`` is read once more to count its batches. A one-shot iterator (a generator)
            is read into a list and allowed only for ``epochs <= 1``.
        epochs: passes over ``train_data`` (int >= 0; 0 returns the model unchanged).
        lr: initial learning rate (> 0), decayed per step along a cosine to 0.
        momentum: SGD momentum in [0, 1); Nesterov momentum when > 0.
        weight_decay: L2 penalty (>= 0).
        teacher: a model with the same classes (e.g. the unpruned model) to distil from, or
            None. It runs in eval mode without gradients and is never modified (its flags are
            restored after every batch). Must be on the same device as ``model``.
        temperature: distillation temperature T > 0.
        distill_weight: weight w in [0, 1] of the distillation term (0: plain cross-entropy;
            ignored without a teacher).
        device: device to run on; batches are moved there. Default: the model's device. The
            models themselves are never moved.
        progress: show a tqdm bar per epoch with the running mean loss (only on a terminal;
            under DDP the global batch's loss).
        inplace: train ``model`` itself (True) instead of a copy.
        distributed: train with ``DistributedDataParallel`` over the default process group
            (any backend: gloo on CPU, NCCL on CUDA). None (default): when a process group of
            more than one process is initialised, as under ``torchrun``. Then every process
            calls ``finetune`` with the same model and arguments and its *shard* of every global
            batch: the same number of batches per epoch and, batch for batch, the same number
            of samples in every process (``DistributedSampler(..., drop_last=True)`` with a
            DataLoader ``drop_last=True``); both are checked, and a violation raises in every
            process. DDP averages the gradients, so each step is the step of one process on
            the global batch, within float round-off (the all-reduce sums in another order);
            the parameters start from process 0's. BatchNorm layers normalise with their
            process's shard statistics (as DDP does; convert the model to SyncBatchNorm first
            for global batch statistics on CUDA), and at the end the running statistics are
            averaged over the processes. Every process returns the same trained model. Any
            error in one process (a bad batch, a non-finite loss) stops all of them.

    Returns:
        the trained model (``model`` itself if ``inplace``, else the trained copy) in eval mode,
        a plain module (not the DDP wrapper).

    Raises:
        ValueError: bad numbers, an epoch with no batch, a model without trainable parameters,
            ``teacher is model`` with ``inplace=True``, ``device`` or the teacher's device not
            the model's, a model or teacher whose output is not logits [N, K] matching the
            other, a target that is not a class index in ``[0, K)`` (checked in every batch
            before its step, so the first batch is checked before any training), or a
            non-finite loss (the message names the epoch and step; with ``inplace=True`` the
            model keeps the last update before the bad batch).
        TypeError: ``model`` or ``teacher`` is not a Module; ``train_data`` is a Tensor, not
            iterable, a one-shot iterator with ``epochs > 1``, or yields unlabelled batches
            (see :func:`icprune.evaluation.labelled_batch`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"finetune: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"finetune: epochs must be an int >= 0, got {epochs!r}")
    lr = _number("lr", lr, 0.0, math.inf, open_low=True, open_high=True)
    momentum = _number("momentum", momentum, 0.0, 1.0, open_low=False, open_high=True)
    weight_decay = _number("weight_decay", weight_decay, 0.0, math.inf, False, True)
    temperature = _number("temperature", temperature, 0.0, math.inf, True, True)
    distill_weight = _number("distill_weight", distill_weight, 0.0, 1.0, False, False)
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"finetune: teacher must be an nn.Module or None, got {type(teacher)}")
    if teacher is model and inplace:
        raise ValueError(
            "finetune: teacher is the model being trained in place; pass a copy as teacher "
            "(copy.deepcopy(model)) or use inplace=False"
        )
    distributed = ddp.resolve(distributed)
    train_data, steps = _steps_per_epoch(train_data, epochs)
    student = model if inplace else copy.deepcopy(model)
    dev = model_device(student, device)
    if teacher is not None:
        model_device(teacher, dev)  # raises if the teacher lives elsewhere
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("finetune: the model has no parameter with requires_grad=True to train")
    if epochs == 0:
        return student.eval()
    if distributed:
        ddp.agree_on_steps(steps, dev)
    if steps == 0:
        raise ValueError("finetune: train_data yielded no batches; pass at least one batch")
    total = epochs * steps
    opt = torch.optim.SGD(
        params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_factor(step, total))
    student.train()
    forward, check = student, None
    if distributed:  # parameters broadcast from process 0 here; gradients averaged in backward
        forward, check = ddp.wrap(student, dev), ddp.StepCheck(dev)
    loss_of = _LossOf(student, forward, teacher, dev, temperature, distill_weight)
    for epoch in range(1, epochs + 1):
        bar = progress_bar(
            iter_batches(train_data, None), train_data, None, f"finetune {epoch}/{epochs}", progress
        )
        loss_sum = 0.0
        step = 0
        for step, batch in enumerate(bar, start=1):
            where = f"train_data batch {step} of epoch {epoch}"
            if check is None:
                loss, size = loss_of(batch, where)
                value = loss.item()
            else:  # every process learns whether every other one can take this step
                try:
                    loss, size = loss_of(batch, where)
                    value = loss.item()
                except Exception:
                    check(0, 0.0, True, where)
                    raise
                value = check(size, value, False, where)
            if not math.isfinite(value):
                raise ValueError(
                    f"finetune: the loss is {value} at {where} (lr {schedule.get_last_lr()[0]:.3g})"
                    f"; lower lr (given: {lr:g}) or check the data and the model for NaN/Inf"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            loss_sum += value
            bar.set_postfix(loss=f"{loss_sum / step:.4f}", refresh=False)
        bar.close()
        if step == 0:
            raise ValueError(
                f"finetune: train_data yielded no batches in epoch {epoch}; a re-iterable must "
                f"yield its batches every time it is iterated"
            )
    if distributed:
        ddp.average_batchnorm_buffers(student)
    return student.eval()


class _LossOf:
    """The loss of one batch, after every check of the batch (targets, logits): ``(loss,
    batch size)``. ``forward`` is the student itself or its DDP wrapper."""

    def __init__(self, student, forward, teacher, device, temperature, distill_weight) -> None:
        self.student, self.forward, self.teacher, self.device = student, forward, teacher, device
        self.temperature, self.distill_weight = temperature, distill_weight
        self.classes = None  # K, from the first batch, before any step

    def __call__(self, batch, where: str) -> tuple[Tensor, int]:
        inputs, targets = labelled_batch(batch, where)
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        if self.classes is None:
            self.classes = _classes(self.student, inputs, targets, where)
        check_targets(targets, self.classes, f"finetune: {where}")  # before BatchNorm sees it
        logits = self.forward(inputs)
        teacher_logits = None
        if self.teacher is not None and self.distill_weight > 0:
            with frozen(self.teacher):
                teacher_logits = self.teacher(inputs)
        _check_logits(logits, teacher_logits, targets, where, self.classes)
        loss = distillation_loss(
            logits,
            targets,
            teacher_logits,
            temperature=self.temperature,
            distill_weight=self.distill_weight,
        )
        return loss, len(targets)


def _classes(model: nn.Module, inputs: Tensor, targets: Tensor, where: str) -> int:
    """K, the number of classes ``model`` predicts, from one eval-mode forward of a batch
    without gradients (nothing of the model changes), with the batch's targets checked."""
    with frozen(model):
        logits = model(inputs)
    _check_logits(logits, None, targets, where)
    check_targets(targets, logits.shape[1], f"finetune: {where}")
    return logits.shape[1]


def _check_logits(
    logits: object, teacher_logits: object, targets: Tensor, where: str, classes: int | None = None
) -> None:
    """Raise unless ``logits`` (and ``teacher_logits``, if not None) are Tensor[N, K] (with
    ``K = classes`` when given)."""
    if (
        not isinstance(logits, Tensor)
        or logits.dim() != 2
        or logits.shape[0] != len(targets)
        or (classes is not None and logits.shape[1] != classes)
    ):
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"finetune: the model returned {shape} for {len(targets)} samples at {where}; it "
            f"must return logits Tensor[N, K]"
        )
    if teacher_logits is None:
        return
    if not isinstance(teacher_logits, Tensor) or teacher_logits.shape != logits.shape:
        shape = (
            tuple(teacher_logits.shape)
            if isinstance(teacher_logits, Tensor)
            else type(teacher_logits).__name__
        )
        raise ValueError(
            f"finetune: the teacher returned {shape} but the model "
            f"{tuple(logits.shape)} at {where}; both must classify into the same K classes"
        )
