"""VGG-16-BN: published parameter counts, torchvision/chenyaofo key layouts, shapes, fx."""

from __future__ import annotations

import torch
from torch import fx, nn

from icprune.models import cifar_vgg16_bn, vgg16_bn

VGG16_BN_PARAMS = 138_365_992  # torchvision weights metadata
# torchvision classifier: 25088*4096+4096 + 4096*4096+4096 + 4096*1000+1000.
VGG16_BN_HEAD = 123_642_856
# chenyaofo head: 2 x (512*512+512) + 512*10+10.
CIFAR_HEAD = 530_442

VGG16_BN_KEYS = {
    "features.0.weight": (64, 3, 3, 3),
    "features.0.bias": (64,),
    "features.1.weight": (64,),
    "features.1.running_mean": (64,),
    "features.1.num_batches_tracked": (),
    "features.3.weight": (64, 64, 3, 3),
    "features.7.weight": (128, 64, 3, 3),
    "features.14.weight": (256, 128, 3, 3),
    "features.24.weight": (512, 256, 3, 3),
    "features.40.weight": (512, 512, 3, 3),
    "features.41.running_var": (512,),
    "classifier.0.weight": (4096, 25088),
    "classifier.3.weight": (4096, 4096),
    "classifier.6.weight": (1000, 4096),
    "classifier.6.bias": (1000,),
}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_vgg16_bn_param_count():
    with torch.device("meta"):
        assert _n_params(vgg16_bn()) == VGG16_BN_PARAMS


def test_vgg16_bn_state_dict_layout():
    with torch.device("meta"):
        sd = vgg16_bn().state_dict()
    # 13 conv x (w, b) + 13 BN x 5 + 3 linear x (w, b) = 97.
    assert len(sd) == 97
    for name, shape in VGG16_BN_KEYS.items():
        assert tuple(sd[name].shape) == shape, name
    assert "features.43.weight" not in sd


def test_cifar_vgg16_bn_param_count_and_layout():
    with torch.device("meta"):
        model = cifar_vgg16_bn()
    expected = VGG16_BN_PARAMS - VGG16_BN_HEAD + CIFAR_HEAD
    assert expected == 15_253_578
    assert _n_params(model) == expected
    sd = model.state_dict()
    assert len(sd) == 97
    assert tuple(sd["classifier.0.weight"].shape) == (512, 512)
    assert tuple(sd["classifier.3.weight"].shape) == (512, 512)
    assert tuple(sd["classifier.6.weight"].shape) == (10, 512)
    assert tuple(sd["features.40.weight"].shape) == (512, 512, 3, 3)


def test_num_classes_honoured():
    with torch.device("meta"):
        assert vgg16_bn(num_classes=3).classifier[6].out_features == 3
        assert cifar_vgg16_bn(num_classes=100).classifier[6].out_features == 100


def test_vgg16_bn_meta_forward_shape():
    with torch.device("meta"):
        out = vgg16_bn(num_classes=11)(torch.empty(2, 3, 224, 224))
    assert out.shape == (2, 11)


def test_cifar_vgg16_bn_forward():
    torch.manual_seed(0)
    model = cifar_vgg16_bn(num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_initialisation_scheme():
    torch.manual_seed(0)
    model = cifar_vgg16_bn()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert torch.count_nonzero(m.bias) == 0
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
    w = model.classifier[0].weight
    assert abs(w.std().item() - 0.01) < 5e-4


def test_fx_symbolic_trace():
    for factory in (vgg16_bn, cifar_vgg16_bn):
        with torch.device("meta"):
            model = factory()
        gm = fx.symbolic_trace(model)
        targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        assert {"features.0", "features.40", "classifier.6"} <= targets


def test_fx_trace_matches_eager():
    torch.manual_seed(0)
    model = cifar_vgg16_bn().eval()
    gm = fx.symbolic_trace(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
