"""all_reduce_stats / calibrate(distributed=True): two gloo processes on loopback equal one.

The workers are this file run as a script (``python tests/test_distributed.py RANK PORT OUT``):
each calibrates its shard of the batches in several splits and saves what it got; the test
compares every statistics tensor and every score with single-process calibration, bit for bit.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

from icprune.calibrate import calibrate
from icprune.models import resnet20
from icprune.scoring import score
from icprune.stats.channel_stats import ChannelStats
from icprune.stats.distributed import all_reduce_stats
from tests.workers import run_ranks

WORLD = 2
#: Batch indices (of 4) per rank, per scenario: even, uneven, interleaved, one rank empty.
SPLITS = {
    "even": [[0, 1], [2, 3]],
    "uneven": [[0, 1, 2], [3]],
    "interleaved": [[3, 0], [1, 2]],
    "empty": [[0, 1, 2, 3], []],
}
TIMEOUT_S = 240


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = resnet20()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(n, 3, 16, 16, generator=gen) for n in (4, 3, 5, 2)]


def _state(stats: dict[str, ChannelStats]) -> dict[str, dict]:
    return {name: s.state_dict() for name, s in stats.items()}


def _worker(rank: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)  # the same GEMM/conv blocking as the reference in the test
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    model, batches = _model(), _batches()
    results = {}
    for scenario, split in SPLITS.items():
        shard = [batches[i] for i in split[rank]]
        results[scenario] = _state(calibrate(model, shard, distributed=True, progress=False))
    # Two-step recipe, range_mode="channel": calibrate locally, then reduce. Local Gram
    # matrices derived from a layer's input are each rounded once (not totals): off here.
    shard = [batches[i] for i in SPLITS["uneven"][rank]]
    local = calibrate(model, shard, range_mode="channel", gram_from_input=False, progress=False)
    results["channel"] = _state(all_reduce_stats(local))
    # Mismatched layers: every rank raises, naming the layer and the rank.
    layers = None if rank == 0 else ["conv1", "layer1.0.conv1"]
    mine = calibrate(model, batches[:1], layers=layers, progress=False)
    try:
        all_reduce_stats(mine)
        results["mismatch"] = None
    except ValueError as exc:
        results["mismatch"] = str(exc)
    torch.distributed.destroy_process_group()
    torch.save(results, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def gathered(tmp_path_factory) -> list[dict]:
    return run_ranks(__file__, WORLD, tmp_path_factory.mktemp("ranks"), TIMEOUT_S)


def _single_process(**kwargs) -> dict[str, ChannelStats]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return calibrate(_model(), _batches(), progress=False, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _assert_equal_to(states: dict[str, dict], reference: dict[str, ChannelStats]) -> None:
    assert list(states) == list(reference)
    model = _model()
    restored = {name: ChannelStats.from_state_dict(s) for name, s in states.items()}
    for name, layer in reference.items():
        expected = layer.state_dict()
        for key, value in states[name].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, expected[key]), (name, key)
            else:
                assert value == expected[key], (name, key)
    for independence in ("distance", "correlation"):
        ours = score(model, stats=restored, independence=independence)
        theirs = score(model, stats=reference, independence=independence)
        for name in ours:
            assert torch.equal(ours[name].score, theirs[name].score), name


@pytest.mark.parametrize("scenario", list(SPLITS))
def test_merged_statistics_and_scores_equal_one_process_exactly(gathered, scenario):
    reference = _single_process()
    for rank in range(WORLD):
        _assert_equal_to(gathered[rank][scenario], reference)


def test_all_reduce_stats_two_step_recipe_channel_range(gathered):
    reference = _single_process(range_mode="channel", gram_from_input=False)
    for rank in range(WORLD):
        _assert_equal_to(gathered[rank]["channel"], reference)


def test_mismatched_layers_raise_on_every_rank_naming_layer_and_rank(gathered):
    for rank in range(WORLD):
        message = gathered[rank]["mismatch"]
        assert message is not None
        assert "layer 'layer1.0.conv2'" in message and "rank 1" in message
        assert "same layers with the same settings on every rank" in message


def test_without_a_process_group_the_error_says_what_to_do():
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        all_reduce_stats({"a": ChannelStats(2)})
    with pytest.raises(RuntimeError, match="init_process_group"):
        calibrate(_model(), _batches(), distributed=True, progress=False)


def test_all_reduce_stats_refuses_what_is_not_channel_stats():
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        for bad in ({"a": 5}, [ChannelStats(2)]):
            with pytest.raises(TypeError, match="stats must be a dict layer name -> ChannelStats"):
                all_reduce_stats(bad)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
