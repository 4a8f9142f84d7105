"""What :func:`icprune.finetune` needs to train one model in several processes (torchrun).

Under ``torchrun`` every process holds the same model and its shard of every *global* batch;
``torch.nn.parallel.DistributedDataParallel`` averages the gradients, so each step is the step
of one process on the whole global batch when every shard has the same size. The helpers here
keep the processes in lockstep: they agree on the number of steps before training starts,
every step they agree that every process's batch was usable (the same size, a finite loss, no
error), so that a failure in one process stops all of them with a clear message instead of
leaving the others waiting in a collective, and at the end they make the BatchNorm running
statistics the same everywhere.

Every collective runs on the model's device (CPU tensors for gloo, CUDA tensors for NCCL).
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from icprune.structure.layers import is_batchnorm


def process_group_size() -> int:
    """The number of processes of the default process group, 1 when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def resolve(distributed: bool | None) -> bool:
    """Whether to train with DistributedDataParallel: ``distributed`` as given, or for None
    whether a process group of more than one process is initialised.

    Raises:
        ValueError: ``distributed=True`` without an initialised process group.
    """
    if distributed is None:
        return process_group_size() > 1
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "finetune: distributed=True needs an initialised process group "
            "(torch.distributed.init_process_group, e.g. under torchrun); pass distributed=None "
            "to decide from the environment"
        )
    return bool(distributed)


def wrap(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """``model`` in DistributedDataParallel (parameters broadcast from process 0 now, gradients
    averaged in every backward), buffers not synchronised in the forward passes: BatchNorm keeps
    each process's running statistics until :func:`average_batchnorm_buffers`. torch 2.13
    renamed ``broadcast_buffers`` to ``forward_sync_buffers``; the one this torch has is used."""
    ids = [device] if device.type == "cuda" else None
    names = inspect.signature(DistributedDataParallel.__init__).parameters
    option = "forward_sync_buffers" if "forward_sync_buffers" in names else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=ids, **{option: False})


def agree_on_steps(steps: int, device: torch.device) -> None:
    """Raise the same ValueError in every process unless all have ``steps`` batches per epoch
    (a process with fewer would stop while the others wait for it)."""
    world = dist.get_world_size()
    mine = torch.tensor([steps], dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    counts = [int(t.item()) for t in every]
    if len(set(counts)) > 1:
        raise ValueError(
            f"finetune: the processes have different numbers of batches per epoch "
            f"({', '.join(f'rank {r}: {c}' for r, c in enumerate(counts))}); every process "
            f"needs its shard of every global batch (e.g. DistributedSampler with "
            f"drop_last=True, or drop the last incomplete round of batches)"
        )


class StepCheck:
    """One all-reduce per step: did every process get a batch of the same size, a finite loss
    and no error? Also gives the mean loss over the global batch."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.world = dist.get_world_size()

    def __call__(self, size: int, loss: float, failed: bool, where: str) -> float:
        """The global batch's mean loss, after checking every process's step.

        Args:
            size: this process's batch size N (0 when it failed before knowing it).
            loss: this process's mean loss of the batch (anything when ``failed``).
            failed: this process raised while preparing the step; the caller re-raises that
                error after this call (the others raise the "another process failed" error).
            where: the batch, for messages (``"train_data batch 3 of epoch 1"``).

        Raises:
            ValueError: in every process where *another* process failed, the shards have
                different sizes, or some loss is not finite (the message names the batch).
        """
        finite = not failed and loss == loss and abs(loss) != float("inf")
        row = [float(failed), float(not finite and not failed), size, size * size]
        row.append(loss if finite else 0.0)
        total = torch.tensor(row, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        bad_ranks, bad_losses, n, n2, loss_sum = (float(v) for v in total.cpu())
        if failed:
            return 0.0  # the caller re-raises its own error
        if bad_ranks:
            raise ValueError(
                f"finetune: {int(bad_ranks)} other process(es) failed at {where} (their error "
                f"says why); every process stops"
            )
        if bad_losses:
            raise ValueError(
                f"finetune: the loss is not finite at {where} in {int(bad_losses)} of "
                f"{self.world} processes; lower lr or check the data and the model for NaN/Inf"
            )
        if self.world * n2 != n * n:  # sum of squares = square of sum / world iff equal sizes
            raise ValueError(
                f"finetune: the processes' shards of {where} differ in size (this process: "
                f"{size} samples, {int(n)} in all); DistributedDataParallel averages the "
                f"gradients, which equals the global batch's only for equal shards: use equal "
                f"batch sizes in every process (drop_last=True)"
            )
        return loss_sum / self.world


def average_batchnorm_buffers(model: nn.Module) -> None:
    """Replace every BatchNorm's running mean and variance by their average over the
    processes, so that every process returns the same model (each saw only its shard)."""
    world = dist.get_world_size()
    for module in model.modules():
        if is_batchnorm(module) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                if buffer is not None:
                    dist.all_reduce(buffer)
                    buffer.div_(world)
