"""Where a command runs: its device, and its place among ``torchrun`` processes.

``torchrun --nproc_per_node N -m icprune prune ...`` starts N processes (``WORLD_SIZE`` and
``LOCAL_RANK`` in the environment). Each takes every N-th calibration batch, on its own GPU
(``cuda:LOCAL_RANK``, NCCL) or on the CPU (gloo); their statistics are combined exactly
(:func:`icprune.all_reduce_stats`), so the scores and the plan equal a single process's. Process
0 then does the rest (planning, re-estimation, measuring, writing); the others stop, except with
``--finetune-epochs``: then every process plans, prunes and re-estimates the BatchNorm statistics
alike, and fine-tunes with DistributedDataParallel (:func:`icprune.finetune`), each on every N-th
batch, so a step's global batch is N batches (``--batch-size`` per process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from icprune.cli.exit_codes import CommandError, ExitCode


@dataclass(frozen=True)
class Launch:
    """This process's place in the run.

    Attributes:
        rank: index of this process (0 when not launched by torchrun).
        world_size: number of processes (1 when not launched by torchrun).
        device: where the model and its data live.
    """

    rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        """Whether several processes share the calibration."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait until every process gets here (a no-op for one process)."""
        if self.distributed:
            dist.barrier()


def _device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise CommandError(
            f"--device {requested!r}: expected auto, cpu, cuda or cuda:N", ExitCode.USAGE
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise CommandError(
            f"--device {requested!r}: expected auto, cpu, cuda or cuda:N", ExitCode.USAGE
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(
            f"--device {requested!r}: no CUDA device is available; use --device cpu",
            ExitCode.USAGE,
        )
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise CommandError(
                f"--device {requested!r}: this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}",
                ExitCode.USAGE,
            )
    return device


def start(requested: str = "auto") -> Launch:
    """This process's :class:`Launch`, joining the ``torchrun`` process group if there is one.

    Args:
        requested: ``--device``: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``,
            ``"cuda"`` or ``"cuda:N"``. Under torchrun, CUDA means ``cuda:LOCAL_RANK``.

    Raises:
        CommandError (USAGE): an unknown or unavailable device.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = _device(requested)
    if world_size == 1:
        return Launch(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Launch(dist.get_rank(), world_size, device)


def stop() -> None:
    """Leave the ``torchrun`` process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
