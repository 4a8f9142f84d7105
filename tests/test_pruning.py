"""pruning: score -> plan -> apply in one call."""

from __future__ import annotations

import pytest
import torch

import icprune
from icprune.models import resnet20


def test_prune_data_free_and_from_data():
    torch.manual_seed(0)
    model = resnet20().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 32, 32)
    result = icprune.prune(model, example_inputs=x, flops_reduction=0.4)
    assert isinstance(result, icprune.PruneResult)
    assert set(result.scores) == set(icprune.score(model, source="weights"))
    assert abs(result.plan.flops_reduction - 0.4) <= 0.01
    assert icprune.count(result.model, x)[0] == result.plan.macs[1]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    batches = (torch.randn(4, 3, 32, 32) for _ in range(3))  # one-shot iterator
    from_data = icprune.prune(model, batches, ratio=0.2, progress=False)
    stats = icprune.calibrate(model, [torch.randn(4, 3, 32, 32)], progress=False)
    assert set(from_data.scores) == set(stats)
    assert from_data.plan.settings["example_inputs"] == [[1, 3, 32, 32]]


def test_prune_needs_inputs_without_data():
    with pytest.raises(ValueError, match="example_inputs"):
        icprune.prune(resnet20(), ratio=0.2)
    with pytest.raises(ValueError, match="no batches"):
        icprune.prune(resnet20(), [], ratio=0.2)


def test_prune_with_data_repairs_from_the_statistics_it_scored_from():
    torch.manual_seed(0)
    model = resnet20().eval()
    data = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    repaired = icprune.prune(model, data, flops_reduction=0.5, progress=False)
    plain = icprune.prune(model, data, flops_reduction=0.5, repair=False, progress=False)
    assert torch.equal(repaired.plan.kept[0], plain.plan.kept[0])  # same greedy plan
    stats = icprune.calibrate(model, data, read_at="input", progress=False)
    by_hand = icprune.apply(model, plain.plan, stats=stats)
    x = data[0]
    with torch.no_grad():
        torch.testing.assert_close(repaired.model(x), by_hand(x))
        want = model(x)
        assert (repaired.model(x) - want).pow(2).mean() < (plain.model(x) - want).pow(2).mean()
    with pytest.raises(ValueError, match="repair=True needs calibration data"):
        icprune.prune(model, example_inputs=x[:1], flops_reduction=0.5, repair=True)
