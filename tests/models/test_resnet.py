"""ImageNet ResNets: published parameter counts, torchvision key layout, shapes, fx tracing."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from icprune.models import resnet18, resnet34, resnet50, resnet101, resnet152
from icprune.models.resnet import BasicBlock, Bottleneck, ResNet

# Published by torchvision (weights metadata "num_params").
PUBLISHED_PARAMS = {
    resnet18: 11_689_512,
    resnet34: 21_797_672,
    resnet50: 25_557_032,
    resnet101: 44_549_160,
    resnet152: 60_192_808,
}

# A representative slice of torchvision's resnet50 state_dict: name -> shape.
RESNET50_KEYS = {
    "conv1.weight": (64, 3, 7, 7),
    "bn1.weight": (64,),
    "bn1.running_mean": (64,),
    "bn1.num_batches_tracked": (),
    "layer1.0.conv1.weight": (64, 64, 1, 1),
    "layer1.0.conv2.weight": (64, 64, 3, 3),
    "layer1.0.conv3.weight": (256, 64, 1, 1),
    "layer1.0.bn3.running_var": (256,),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer1.0.downsample.1.weight": (256,),
    "layer1.2.conv1.weight": (64, 256, 1, 1),
    "layer2.0.conv1.weight": (128, 256, 1, 1),
    "layer2.0.downsample.0.weight": (512, 256, 1, 1),
    "layer3.5.conv2.weight": (256, 256, 3, 3),
    "layer3.0.downsample.0.weight": (1024, 512, 1, 1),
    "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
    "layer4.2.conv3.weight": (2048, 512, 1, 1),
    "layer4.2.bn3.bias": (2048,),
    "fc.weight": (1000, 2048),
    "fc.bias": (1000,),
}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("factory", list(PUBLISHED_PARAMS), ids=lambda f: f.__name__)
def test_param_count_matches_published(factory):
    with torch.device("meta"):
        model = factory()
    assert _n_params(model) == PUBLISHED_PARAMS[factory]


def test_resnet50_state_dict_layout():
    with torch.device("meta"):
        sd = resnet50().state_dict()
    # 53 conv + 1 fc weight, fc bias, 53 BN x 5 entries = 320.
    assert len(sd) == 320
    for name, shape in RESNET50_KEYS.items():
        assert tuple(sd[name].shape) == shape, name
    assert "layer1.1.downsample.0.weight" not in sd
    assert not any(k.startswith("layer5") for k in sd)


def test_resnet18_state_dict_layout():
    with torch.device("meta"):
        sd = resnet18().state_dict()
    assert len(sd) == 122  # 20 conv + 20 BN x 5 + fc (2)
    assert tuple(sd["layer1.0.conv1.weight"].shape) == (64, 64, 3, 3)
    assert "layer1.0.downsample.0.weight" not in sd
    assert tuple(sd["layer2.0.downsample.0.weight"].shape) == (128, 64, 1, 1)
    assert tuple(sd["fc.weight"].shape) == (1000, 512)


def test_bottleneck_stride_on_3x3_conv():
    with torch.device("meta"):
        model = resnet50()
    block = model.layer2[0]
    assert block.conv1.stride == (1, 1)
    assert block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)


def test_forward_shape_and_num_classes():
    torch.manual_seed(0)
    model = resnet18(num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("factory", list(PUBLISHED_PARAMS), ids=lambda f: f.__name__)
def test_num_classes_honoured(factory):
    with torch.device("meta"):
        model = factory(num_classes=13)
    assert model.fc.out_features == 13


def test_relu_modules_are_inplace():
    with torch.device("meta"):
        model = resnet50()
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and all(m.inplace for m in relus)


def test_initialisation_scheme():
    torch.manual_seed(0)
    model = resnet18()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    # kaiming_normal_(fan_out, relu): std = sqrt(2 / (out_ch * k * k)).
    w = model.layer4[1].conv2.weight
    expected = (2.0 / (512 * 9)) ** 0.5
    assert abs(w.std().item() - expected) / expected < 0.02


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck], ids=lambda b: b.__name__)
def test_zero_init_residual(block):
    model = ResNet(block, [2, 1, 1, 1], num_classes=2, zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, block)]
    last_bns = [b.bn3 if block is Bottleneck else b.bn2 for b in blocks]
    assert len(last_bns) == 5
    assert all(torch.count_nonzero(bn.weight) == 0 for bn in last_bns)
    assert torch.equal(blocks[0].bn1.weight, torch.ones(64))
    default = ResNet(block, [1, 1, 1, 1], num_classes=2)
    assert torch.equal(default.layer1[0].bn2.weight, torch.ones(64))


@pytest.mark.parametrize("factory", list(PUBLISHED_PARAMS), ids=lambda f: f.__name__)
def test_fx_symbolic_trace(factory):
    with torch.device("meta"):
        model = factory()
    gm = fx.symbolic_trace(model)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    traced_convs = [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)
    ]
    assert len(traced_convs) == n_convs


def test_fx_trace_matches_eager():
    torch.manual_seed(0)
    model = resnet18(num_classes=5).eval()
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
