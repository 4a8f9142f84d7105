"""finetune under DistributedDataParallel: two gloo processes on loopback equal one process.

The workers are this file run as a script (``python tests/recovery/test_finetune_distributed.py
RANK PORT OUT``), as under torchrun: each joins a 2-process gloo group and fine-tunes with its
half of every global batch (``finetune`` detects the process group by itself). The test then
compares with one process fine-tuning on the same global batches:

- a net without BatchNorm: the reference is plain ``finetune`` on the whole global batches;
- a net with BatchNorm (and a teacher): DDP normalises each process's half with that half's
  statistics, so the reference is ``finetune`` of a wrapper that runs each global batch as its
  two halves through the net and concatenates the logits (the mean loss over the 8 samples is
  the mean of the halves' mean losses, which is what the averaged gradients are).

Parameters must agree within float round-off (the all-reduce sums gradients in another order
than autograd does). Failure cases check that an error in one process (a non-finite loss, a bad
target, unequal shards, unequal numbers of batches) raises in both, instead of a hang.
"""

from __future__ import annotations

import copy
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

from icprune.recovery.finetune import finetune
from tests.workers import run_ranks

WORLD = 2
TIMEOUT_S = 300
OPTIONS = {"lr": 0.05, "progress": False}


def _plain_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 10),
    )


def _bn_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def _teacher() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)).eval()


def _global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """3 global batches of 8 labelled 8x8 images (10 classes)."""
    gen = torch.Generator().manual_seed(3)
    return [
        (torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen))
        for _ in range(3)
    ]


def _shard(batches, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This process's half of every global batch (samples 4*rank ... 4*rank + 3)."""
    half = slice(4 * rank, 4 * rank + 4)
    return [(x[half], y[half]) for x, y in batches]


def _failure(run) -> str | None:
    try:
        run()
    except ValueError as exc:
        return str(exc)
    return None


def _worker(rank: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)  # the same conv/GEMM blocking as the reference in the test
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=90),
    )
    batches = _global_batches()
    mine = _shard(batches, rank)
    results = {
        "plain": finetune(_plain_net(), mine, 2, **OPTIONS).state_dict(),
        "bn": finetune(_bn_net(), mine, 2, teacher=_teacher(), **OPTIONS).state_dict(),
    }
    nan = copy.deepcopy(mine)
    if rank == 1:
        nan[1][0][0, 0, 0, 0] = float("nan")
    results["nan"] = _failure(lambda: finetune(_plain_net(), nan, 1, **OPTIONS))
    target = copy.deepcopy(mine)
    if rank == 0:
        target[2][1][0] = 10  # not a class of 10
    results["target"] = _failure(lambda: finetune(_plain_net(), target, 1, **OPTIONS))
    uneven = copy.deepcopy(mine)
    if rank == 1:
        uneven[0] = (uneven[0][0][:3], uneven[0][1][:3])
    results["uneven"] = _failure(lambda: finetune(_plain_net(), uneven, 1, **OPTIONS))
    fewer = mine[:2] if rank == 1 else mine
    results["steps"] = _failure(lambda: finetune(_plain_net(), fewer, 1, **OPTIONS))
    torch.distributed.destroy_process_group()
    torch.save(results, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def gathered(tmp_path_factory) -> list[dict]:
    return run_ranks(__file__, WORLD, tmp_path_factory.mktemp("ranks"), TIMEOUT_S)


class _GhostBatches(nn.Module):
    """Runs each batch as its two halves through ``net`` (train-mode BatchNorm then normalises
    each half by its own statistics, as each DDP process does) and concatenates the logits."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net(half) for half in x.chunk(2)])


def _one_process(run):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run()
    finally:
        torch.set_num_threads(threads)


def _assert_parameters_close(got: dict, want: dict) -> None:
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_two_processes_equal_one_process_on_the_global_batches(gathered):
    want = _one_process(lambda: finetune(_plain_net(), _global_batches(), 2, **OPTIONS))
    for rank in range(WORLD):
        _assert_parameters_close(gathered[rank]["plain"], want.state_dict())
    assert not torch.equal(want[0].weight, _plain_net()[0].weight)  # it did train


def test_with_batchnorm_and_a_teacher_equal_one_process_on_half_batches(gathered):
    def reference():
        return finetune(
            _GhostBatches(_bn_net()), _global_batches(), 2, teacher=_teacher(), **OPTIONS
        )

    want = _one_process(reference).net
    params = {name: p.detach() for name, p in want.named_parameters()}
    for rank in range(WORLD):
        _assert_parameters_close(gathered[rank]["bn"], params)
    for name, value in gathered[0]["bn"].items():  # every process returns the same model
        assert torch.equal(value, gathered[1]["bn"][name]), name


def test_a_non_finite_loss_in_one_process_raises_in_both(gathered):
    for rank in range(WORLD):
        message = gathered[rank]["nan"]
        assert message is not None and "loss is not finite" in message
        assert "train_data batch 2 of epoch 1" in message and "1 of 2 processes" in message


def test_a_bad_batch_in_one_process_raises_its_error_there_and_stops_the_other(gathered):
    assert "train_data batch 3 of epoch 1" in gathered[0]["target"]
    assert "10" in gathered[0]["target"]
    assert "other process(es) failed at train_data batch 3 of epoch 1" in gathered[1]["target"]


def test_unequal_shards_and_unequal_batch_counts_raise_in_both(gathered):
    for rank in range(WORLD):
        assert "differ in size" in gathered[rank]["uneven"]
        assert "train_data batch 1 of epoch 1" in gathered[rank]["uneven"]
        assert "rank 0: 3, rank 1: 2" in gathered[rank]["steps"]


def test_distributed_true_without_a_process_group_says_what_to_do():
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="distributed=True needs an initialised process group"):
        finetune(_plain_net(), _global_batches(), 1, distributed=True, progress=False)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
