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


def _attention_outputs(attention: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Reference: every head's attention output, ``[N * L, H * d]``, written out."""
    n, length, _ = x.shape
    heads, d = attention.num_heads, attention.head_dim
    q, k, v = (x @ attention.in_proj_weight.T + attention.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(n, length, heads, d).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-2, -1) / d**0.5, dim=-1)
    return (weights @ v).transpose(1, 2).reshape(n * length, heads * d)


def test_attention_output_projections_read_every_heads_output():
    from tests.structure.nets import ViTNet

    torch.manual_seed(0)
    model = ViTNet().eval()
    data = [torch.randn(3, 3, 16, 16) for _ in range(2)]
    groups = dependency_groups(model, data[0][:1])
    owner = input_layers(model, groups)
    assert owner["block1.self_attention.out_proj"] == "block1.self_attention.out_proj"
    stats = calibrate_inputs(model, data, progress=False)
    inputs = []  # what block1's out_proj reads: its attention's input is ln_1's output
    hook = model.block1.ln_1.register_forward_hook(lambda m, a, out: inputs.append(out))
    with torch.no_grad():
        for batch in data:
            model(batch)
    hook.remove()
    with torch.no_grad():
        want = torch.cat([_attention_outputs(model.block1.self_attention, x) for x in inputs])
    got = stats["block1.self_attention.out_proj"]
    assert got.num_channels == 24 and got.count == len(want)
    mean = (got.sums + got.sums_lo).double() / got.count
    second = (got.gram + got.gram_lo).double() / got.count
    torch.testing.assert_close(mean, want.double().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        second, want.double().T @ want.double() / len(want), rtol=1e-5, atol=1e-6
    )
    assert stats["block2.self_attention.out_proj"].num_channels == 24  # batch_first=False too
