"""structure.layers: the one definition of every layer type's channels, grouped convs included."""

import pytest
import torch
from torch import nn

from icprune.structure import layers


@pytest.mark.parametrize(
    ("module", "out", "inp", "groups", "depthwise"),
    [
        (nn.Conv2d(8, 16, 3), 16, 8, 1, False),
        (nn.Conv2d(16, 32, 3, groups=4), 32, 16, 4, False),  # ResNeXt/RegNet-style grouped
        (nn.Conv2d(16, 16, 3, groups=4), 16, 16, 4, False),  # grouped, in == out
        (nn.Conv2d(16, 16, 3, groups=16), 16, 16, 16, True),  # depthwise
        (nn.Conv2d(16, 32, 3, groups=16), 32, 16, 16, False),  # depthwise multiplier 2
        (nn.Conv1d(1, 1, 3), 1, 1, 1, False),  # groups == in == out, but 1: a plain conv
        (nn.Conv3d(4, 4, 1, groups=4), 4, 4, 4, True),
        (nn.Linear(10, 3), 3, 10, 1, False),
        (nn.BatchNorm2d(7), 7, 7, 1, False),
        (nn.SyncBatchNorm(5), 5, 5, 1, False),
    ],
)
def test_channels_groups_and_depthwise(module, out, inp, groups, depthwise):
    assert layers.out_channels(module) == out
    assert layers.in_channels(module) == inp
    assert layers.groups(module) == groups
    assert layers.is_depthwise(module) is depthwise
    assert layers.sizes(module) == (out, inp)
    assert layers.structure_entry(module) == (type(module).__name__, out, inp, groups)


def test_a_grouped_conv_reads_in_channels_over_groups_inputs_per_group():
    conv = nn.Conv2d(16, 32, (3, 5), groups=4)
    shapes = layers.tensor_shapes(conv, 32, 16, 4)
    assert (
        shapes
        == {"weight": tuple(conv.weight.shape), "bias": (32,)}
        == {
            "weight": (32, 4, 3, 5),
            "bias": (32,),
        }
    )
    assert layers.tensor_shapes(nn.Linear(6, 2), 2, 6, 1) == {"weight": (2, 6), "bias": (2,)}
    assert layers.tensor_shapes(nn.BatchNorm1d(3), 3, 3, 1) == dict.fromkeys(
        layers.BATCHNORM_TENSORS, (3,)
    )
    with pytest.raises(ValueError, match="groups must divide both"):
        layers.tensor_shapes(conv, 30, 16, 4)
    with pytest.raises(TypeError, match="ConvTranspose2d"):  # weights laid out (in, out/g, k)
        layers.tensor_shapes(nn.ConvTranspose2d(4, 8, 3), 8, 4, 1)


def test_set_channels_keeps_depthwise_depthwise_and_grouped_groups():
    depthwise = nn.Conv2d(16, 16, 3, groups=16)
    layers.set_channels(depthwise, 10, 10)
    assert (depthwise.out_channels, depthwise.in_channels, depthwise.groups) == (10, 10, 10)
    assert layers.is_depthwise(depthwise)
    grouped = nn.Conv2d(16, 32, 3, groups=4)
    layers.set_channels(grouped, 24, 8)
    assert (grouped.out_channels, grouped.in_channels, grouped.groups) == (24, 8, 4)
    layers.set_channels(grouped, 6, 6, 6)
    assert (grouped.out_channels, grouped.in_channels, grouped.groups) == (6, 6, 6)
    with pytest.raises(ValueError, match="groups must divide"):
        layers.set_channels(grouped, 7, 6)
    assert (grouped.out_channels, grouped.in_channels, grouped.groups) == (6, 6, 6)  # unchanged
    linear, bn = nn.Linear(4, 5), nn.BatchNorm2d(9)
    layers.set_channels(linear, 2, 3)
    layers.set_channels(bn, 4, 4)
    assert (linear.out_features, linear.in_features, bn.num_features) == (2, 3, 4)


def test_modules_without_channels_are_refused_by_name():
    for what in (layers.out_channels, layers.in_channels, layers.groups):
        with pytest.raises(TypeError, match="ReLU is not a conv, linear or BatchNorm"):
            what(nn.ReLU())
    with pytest.raises(TypeError, match="set_channels: LayerNorm"):
        layers.set_channels(nn.LayerNorm((3, 4)), 2, 2)  # over two axes: not a channel norm
    assert layers.sizes(nn.ReLU()) is None
    assert layers.structure_entry(nn.ReLU()) is None
    assert not layers.is_depthwise(nn.Linear(3, 3))


def test_layernorm_over_one_axis_has_channels_but_no_structure_entry():
    norm, flat = nn.LayerNorm(6), nn.LayerNorm(6, bias=False)
    assert layers.is_layernorm(norm) and not layers.is_layernorm(nn.LayerNorm((2, 3)))
    assert layers.sizes(norm) == (6, 6) and layers.structure_entry(norm) is None
    assert layers.tensor_shapes(norm, 4, 4, 1) == {"weight": (4,), "bias": (4,)}
    layers.set_channels(flat, 4, 4)
    assert flat.normalized_shape == (4,)
    assert layers.channel_structure(nn.Sequential(nn.Linear(3, 6), norm)) == {
        "0": ("Linear", 6, 3, 1)
    }


def test_channel_structure_lists_every_module_with_channels_in_order():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8),
        nn.ConvTranspose2d(8, 4, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    assert layers.channel_structure(model) == {
        "0": ("Conv2d", 8, 3, 1),
        "1": ("BatchNorm2d", 8, 8, 1),
        "3": ("Conv2d", 8, 8, 8),
        "4": ("ConvTranspose2d", 4, 8, 1),
        "7": ("Linear", 2, 4, 1),
    }
    model(torch.zeros(1, 3, 6, 6))  # the model is what the table says
