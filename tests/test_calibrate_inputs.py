"""calibrate_inputs: the statistics of what every consumer layer reads (read_at="input")."""

import pytest
import torch
from torch import nn

from icprune import models
from icprune.calibrate import InputStats, calibrate_inputs, input_layers
from icprune.structure import dependency_groups


def chain(c_mid=6, k=1, relu=False):
    """conv(3->c_mid) - BN - [ReLU] - conv(c_mid->4, k x k, zero padding) - pool - linear."""
    layers = [nn.Conv2d(3, c_mid, 1, bias=False), nn.BatchNorm2d(c_mid)]
    if relu:
        layers.append(nn.ReLU())
    layers += [nn.Conv2d(c_mid, 4, k, padding=k // 2, bias=True), nn.AdaptiveAvgPool2d(1),
               nn.Flatten(1), nn.Linear(4, 2)]  # fmt: skip
    return nn.Sequential(*layers).eval()


def test_the_statistics_are_those_of_the_consumer_input():
    torch.manual_seed(0)
    model = chain(relu=True)
    x = torch.randn(8, 3, 5, 5)
    got = calibrate_inputs(model, [x[:5], x[5:]], backend="torch", progress=False)
    assert isinstance(got, InputStats)
    assert list(got) == ["3", "6"]  # the consumers of conv 0's group and of conv 3's group
    seen = torch.relu(model[1](model[0](x))).double().permute(1, 0, 2, 3).reshape(6, -1)
    torch.testing.assert_close(got["3"].gram, seen @ seen.T)
    assert got["3"].read_at == "input" and got["3"].count == 8 * 25
    assert got.spatial == {"3": (5, 5), "6": ()}


def test_consumers_of_one_tensor_share_one_statistics_object():
    torch.manual_seed(0)
    model = models.resnet20().eval()
    stats = calibrate_inputs(model, [torch.randn(2, 3, 32, 32)], progress=False)
    # the first block of stage 2 reads the stage-1 output in conv1 and in its downsample conv
    owner = input_layers(model, dependency_groups(model, torch.zeros(1, 3, 32, 32)))
    shared = [name for name, first in owner.items() if first != name]
    assert shared, "resnet20 has downsample convs that read what a block's conv1 reads"
    for name in shared:
        assert stats[name] is stats[owner[name]]
    assert len({id(s) for s in stats.values()}) == len(set(owner.values()))


def test_a_flattened_consumer_is_left_out():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.ReLU(),
        nn.Flatten(1), nn.Linear(5 * 6 * 6, 3),
    ).eval()  # fmt: skip
    stats = calibrate_inputs(model, [torch.randn(2, 1, 8, 8)], progress=False)
    assert list(stats) == ["3"]  # "6" reads conv 3's channels flattened: 36 features each


def test_no_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="no batches"):
        calibrate_inputs(chain(), [], progress=False)
