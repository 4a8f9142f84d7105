"""CIFAR ResNets: exact parameter counts, chenyaofo key layout, shapes, fx tracing."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from icprune.models import resnet20, resnet56, resnet110
from icprune.models.cifar_resnet import CifarResNet


def expected_params(n: int, num_classes: int = 10) -> int:
    """Closed-form parameter count of ResNet-(6n+2) with option-B shortcuts."""
    stem = 3 * 16 * 9 + 2 * 16
    stage1 = n * (2 * 16 * 16 * 9 + 2 * 2 * 16)
    # First block of stages 2/3: conv c/2->c, conv c->c, two BN, 1x1 projection + BN.
    stage2 = (16 * 32 * 9 + 32 * 32 * 9 + 4 * 32 + 16 * 32 + 2 * 32) + (n - 1) * (
        2 * 32 * 32 * 9 + 4 * 32
    )
    stage3 = (32 * 64 * 9 + 64 * 64 * 9 + 4 * 64 + 32 * 64 + 2 * 64) + (n - 1) * (
        2 * 64 * 64 * 9 + 4 * 64
    )
    head = 64 * num_classes + num_classes
    return stem + stage1 + stage2 + stage3 + head


@pytest.mark.parametrize(
    "factory,n,count",
    [(resnet20, 3, 272_474), (resnet56, 9, 855_770), (resnet110, 18, 1_730_714)],
    ids=["resnet20", "resnet56", "resnet110"],
)
def test_param_counts(factory, n, count):
    assert expected_params(n) == count
    with torch.device("meta"):
        model = factory()
    assert sum(p.numel() for p in model.parameters()) == count
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 6 * n + 1 + 2


@pytest.mark.parametrize("n", [1, 2, 5])
def test_param_formula_general_depth(n):
    with torch.device("meta"):
        model = CifarResNet(n, num_classes=100)
    assert sum(p.numel() for p in model.parameters()) == expected_params(n, 100)


def test_state_dict_layout_resnet56():
    with torch.device("meta"):
        sd = resnet56().state_dict()
    # 55 3x3 conv + 2 projections = 57 convs, 57 BN x 5, fc (2): 57 + 285 + 2 = 344.
    assert len(sd) == 344
    expected = {
        "conv1.weight": (16, 3, 3, 3),
        "bn1.running_mean": (16,),
        "layer1.0.conv1.weight": (16, 16, 3, 3),
        "layer1.8.bn2.num_batches_tracked": (),
        "layer2.0.conv1.weight": (32, 16, 3, 3),
        "layer2.0.downsample.0.weight": (32, 16, 1, 1),
        "layer2.0.downsample.1.running_var": (32,),
        "layer3.0.downsample.0.weight": (64, 32, 1, 1),
        "layer3.8.conv2.weight": (64, 64, 3, 3),
        "fc.weight": (10, 64),
        "fc.bias": (10,),
    }
    for name, shape in expected.items():
        assert tuple(sd[name].shape) == shape, name
    assert not any(k.startswith("layer1.0.downsample") for k in sd)
    assert not any(k.startswith("layer4") for k in sd)


@pytest.mark.parametrize("factory", [resnet20, resnet56, resnet110], ids=lambda f: f.__name__)
def test_forward_shape_num_classes_and_fx(factory):
    torch.manual_seed(0)
    model = factory(num_classes=100).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(gm(x), out)
    assert out.shape == (2, 100)
    assert torch.isfinite(out).all()


def test_default_num_classes_and_inplace_relu():
    model = resnet20()
    assert model.fc.out_features == 10
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 9 and all(m.inplace for m in relus)
    assert model.layer2[0].downsample[0].stride == (2, 2)
    assert model.layer2[0].downsample[0].bias is None
