import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import icprune
from bench.quality import allocation, mask, models
from bench.quality.run import main


@pytest.fixture(scope="module", params=models.ARCHS)
def setup(request):
    torch.manual_seed(0)
    model = models.build(request.param).eval()
    pruned = models.pruned_layers(model)
    return model, pruned, allocation.costs(model, pruned, models.example_input(2))


def test_pruned_layers_follow_the_documented_layout():
    resnet, vgg = models.build("resnet20"), models.build("vgg")
    layers = models.pruned_layers(resnet)
    assert [p.layer for p in layers][:2] == ["layer1.0.conv1", "layer1.1.conv1"]
    assert len(layers) == 9 and layers[0].bn == "layer1.0.bn1"
    assert layers[0].consumer == "layer1.0.conv2"
    layers = models.pruned_layers(vgg)
    assert len(layers) == 6 and layers[-1].consumer == "classifier.0"
    assert [p.consumer for p in layers[:-1]] == [p.layer for p in layers[1:]]


def test_mac_accounting_matches_icprune_count(setup):
    model, _, costs = setup
    assert costs.total == icprune.count(model, models.example_input())[0]
    assert allocation.reduction(costs, {}) == 0.0


@settings(max_examples=20, deadline=None)
@given(target=st.floats(0.05, 0.9))
def test_allocations_reach_the_target(setup, target):
    _, pruned, costs = setup
    counts = allocation.same_counts(costs, target)
    assert allocation.reduction(costs, counts) >= target
    ratios = {round(1 - k / costs.channels[name], 1) for name, k in counts.items()}
    assert max(ratios) - min(ratios) <= 0.15  # one ratio, up to rounding of small layers
    gen = torch.Generator().manual_seed(0)
    scores = {p.layer: torch.rand(costs.channels[p.layer], generator=gen) for p in pruned}
    keep = allocation.own_allocation(costs, scores, target)
    kept = {name: int(k.sum()) for name, k in keep.items()}
    assert allocation.reduction(costs, kept) >= target
    assert min(kept.values()) >= 1


def test_own_allocation_removes_the_lowest_normalised_scores_first(setup):
    _, pruned, costs = setup
    scores = {p.layer: torch.arange(costs.channels[p.layer], dtype=torch.float64) for p in pruned}
    scores[pruned[0].layer] = -scores[pruned[0].layer]  # reversed order in the first layer
    keep = allocation.own_allocation(costs, scores, 0.3)
    first = keep[pruned[0].layer]
    assert first[-1].item() is False or first.all()  # its highest index goes first
    for p in pruned[1:]:
        k = keep[p.layer]
        assert torch.equal(k, k.sort(descending=False).values)  # a prefix of False, then True


def test_impossible_targets_are_refused(setup):
    _, pruned, costs = setup
    with pytest.raises(ValueError, match="target"):
        allocation.same_counts(costs, 1.0)
    with pytest.raises(ValueError, match="out of reach"):
        allocation.same_counts(costs, 0.999)
    scores = {p.layer: torch.ones(costs.channels[p.layer]) for p in pruned}
    with pytest.raises(ValueError, match="out of reach"):
        allocation.own_allocation(costs, scores, 0.999)


def test_keep_top_breaks_ties_by_channel_index():
    keep = allocation.keep_top(torch.tensor([1.0, 3.0, 1.0, 1.0]), 2)
    assert keep.tolist() == [True, True, False, False]


def test_masking_equals_zeroing_the_pruned_channels(setup):
    model, pruned, costs = setup
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keep = {p.layer: torch.arange(costs.channels[p.layer]) % 3 != 0 for p in pruned}
    masked = mask.masked(model, pruned, keep)
    zeroed = mask.masked(model, pruned, {})  # a plain copy
    modules = dict(zeroed.named_modules())
    with torch.no_grad():
        for p in pruned:  # a BN with weight and bias 0 outputs exactly 0 in eval mode
            modules[p.bn].weight[~keep[p.layer]] = 0
            modules[p.bn].bias[~keep[p.layer]] = 0
        torch.testing.assert_close(masked.eval()(x), zeroed.eval()(x))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_quick_mode_runs_end_to_end(tmp_path):
    threads = torch.get_num_threads()
    results = main(["--quick", "--out", str(tmp_path), "--no-progress"])
    assert torch.get_num_threads() == threads
    text = (tmp_path / "quality.md").read_text()
    assert "## 1. Same per-layer channel counts" in text and "| L1 norm |" in text
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    assert (tmp_path / "cpu-quality.md").exists()
    assert results.best in ("ICII feat", "ICII wts")
    assert {r.stage for r in results.rows} == {"recalibrated", "fine-tuned"}
    assert all(r.reduction >= 0.5 for r in results.rows)
