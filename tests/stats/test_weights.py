import pytest
import torch
from torch import nn

from icprune.models import mobilenet_v2, resnet20
from icprune.stats.weights import weight_stats


def test_weight_statistics_read_each_filter_as_one_channel():
    torch.manual_seed(0)
    model = resnet20()
    stats = weight_stats(model, bins=32, range_mode="channel")
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
