import pytest
import torch
from torch import nn

import icprune
from icprune.models import mobilenet_v2, resnet20
from icprune.stats.backends import HAVE_EXT
from icprune.stats.weights import weight_stats


def test_weight_statistics_read_each_filter_as_one_channel():
    torch.manual_seed(0)
    model = resnet20()
    stats = weight_stats(model, bins=32, range_mode="channel", backend="torch")
    assert "fc" not in stats
    conv = model.layer2[0].conv1
    s = stats["layer2.0.conv1"]
    w = conv.weight.detach().double().reshape(32, -1)
    assert s.count == 16 * 3 * 3 and s.read_at == "weights" and s.bins == 32
    torch.testing.assert_close(s.gram, w @ w.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.sums, w.sum(1), rtol=1e-12, atol=1e-12)
    assert s.range_mode == "channel"


def test_grouped_and_depthwise_convs_and_selected_layers():
    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=10)
    stats = weight_stats(model, layers=["features.1.conv.0.0", "features.2.conv.0.0"])
    assert list(stats) == ["features.1.conv.0.0", "features.2.conv.0.0"]
    depthwise = stats["features.1.conv.0.0"]
    assert depthwise.num_channels == 32 and depthwise.count == 9
    assert stats["features.2.conv.0.0"].count == 16


def test_model_is_not_modified():
    torch.manual_seed(0)
    model = resnet20()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight_stats(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_with_no_prunable_layer_is_refused():
    for model in (nn.Sequential(nn.ReLU()), nn.Sequential(nn.Conv2d(3, 4, 3))):  # output layer
        with pytest.raises(ValueError, match="Sequential has no prunable layer to score"):
            weight_stats(model)


def _wide_classifier() -> nn.Module:
    """Convs, then Linear layers whose rows are longer than their columns (VGG's classifier
    shape, small): 16 * 8 * 8 = 1024 inputs -> 96 -> 64 -> 10 classes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(1024, 96),
        nn.ReLU(),
        nn.Linear(96, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


@pytest.mark.skipif(not HAVE_EXT, reason="no icprune._C")
def test_default_backend_is_the_fast_one_on_cpu():
    model = _wide_classifier()
    default, cpp = weight_stats(model), weight_stats(model, backend="cpp")
    assert list(default) == ["0", "3", "6", "8"]
    for name in default:
        assert torch.equal(default[name].gram, cpp[name].gram), name
        assert torch.equal(default[name].counts, cpp[name].counts), name


@pytest.mark.parametrize("independence", ["distance", "correlation"])
def test_default_scores_equal_the_float64_reference_within_the_documented_tolerance(
    independence,
):
    """The float32 Gram of the fast backends is within 1e-5 of max|G| (docs/method.md); the
    histograms, hence the capacities, are identical; data-free scores stay within 1e-4 of each
    layer's largest score (measured 7.9e-6 on VGG-16-BN, bench/results/cpu-weight_stats.md)."""
    model = _wide_classifier()
    ref, new = weight_stats(model, backend="torch"), weight_stats(model)
    for name in ref:
        scale = float(ref[name].gram.abs().max())
        assert float((ref[name].gram - new[name].gram).abs().max()) <= 1e-5 * scale, name
        assert torch.equal(ref[name].counts, new[name].counts), name
        torch.testing.assert_close(new[name].sums, ref[name].sums, rtol=1e-12, atol=1e-12)
    s_ref = icprune.score(model, criterion="icii", backend="torch", independence=independence)
    s_new = icprune.score(model, criterion="icii", independence=independence)
    for name in s_ref:
        assert torch.equal(s_ref[name].capacity, s_new[name].capacity), name
        scale = float(s_ref[name].score.abs().max())
        torch.testing.assert_close(
            s_new[name].score, s_ref[name].score, rtol=0, atol=1e-4 * scale, msg=name
        )


def test_default_scores_are_deterministic():
    model = _wide_classifier()
    first = icprune.score(model, criterion="icii")
    second = icprune.score(model, criterion="icii")
    for name in first:
        assert torch.equal(first[name].score, second[name].score), name
        assert torch.equal(first[name].independence, second[name].independence), name
