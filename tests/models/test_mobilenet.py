"""MobileNetV2: published parameter count, torchvision key layout, shapes, fx tracing."""

from __future__ import annotations

import torch
from torch import fx, nn

from icprune.models import mobilenet_v2
from icprune.models.mobilenet import InvertedResidual

MOBILENET_V2_PARAMS = 3_504_872  # torchvision weights metadata

# A representative slice of torchvision's mobilenet_v2 state_dict: name -> shape.
MOBILENET_V2_KEYS = {
    "features.0.0.weight": (32, 3, 3, 3),
    "features.0.1.weight": (32,),
    "features.0.1.num_batches_tracked": (),
    # expand_ratio 1: [dw ConvBNReLU6, project conv, BN]
    "features.1.conv.0.0.weight": (32, 1, 3, 3),
    "features.1.conv.0.1.running_mean": (32,),
    "features.1.conv.1.weight": (16, 32, 1, 1),
    "features.1.conv.2.weight": (16,),
    # expand_ratio 6: [expand ConvBNReLU6, dw ConvBNReLU6, project conv, BN]
    "features.2.conv.0.0.weight": (96, 16, 1, 1),
    "features.2.conv.1.0.weight": (96, 1, 3, 3),
    "features.2.conv.2.weight": (24, 96, 1, 1),
    "features.2.conv.3.running_var": (24,),
    "features.17.conv.0.0.weight": (960, 160, 1, 1),
    "features.17.conv.2.weight": (320, 960, 1, 1),
    "features.18.0.weight": (1280, 320, 1, 1),
    "features.18.1.bias": (1280,),
    "classifier.1.weight": (1000, 1280),
    "classifier.1.bias": (1000,),
}


def test_param_count_matches_published():
    with torch.device("meta"):
        model = mobilenet_v2()
    assert sum(p.numel() for p in model.parameters()) == MOBILENET_V2_PARAMS


def test_state_dict_layout():
    with torch.device("meta"):
        sd = mobilenet_v2().state_dict()
    # features.0: 1 + 5; features.1: (1 + 5) + 1 + 5; features.2..17: 16 x (6 + 6 + 1 + 5);
    # features.18: 6; classifier.1: 2  ->  6 + 12 + 288 + 6 + 2 = 314.
    assert len(sd) == 314
    for name, shape in MOBILENET_V2_KEYS.items():
        assert tuple(sd[name].shape) == shape, name
    assert "features.1.conv.3.weight" not in sd
    assert "features.19.0.weight" not in sd


def test_block_structure():
    with torch.device("meta"):
        model = mobilenet_v2()
    blocks = [m for m in model.features if isinstance(m, InvertedResidual)]
    assert len(blocks) == 17
    residual = [i for i, m in enumerate(model.features) if getattr(m, "use_res_connect", False)]
    assert residual == [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]
    assert isinstance(model.classifier[0], nn.Dropout) and model.classifier[0].p == 0.2
    relu6 = [m for m in model.modules() if isinstance(m, nn.ReLU6)]
    assert len(relu6) == 35 and all(m.inplace for m in relu6)


def test_forward_shape_and_num_classes():
    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=9).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 9)
    assert torch.isfinite(out).all()


def test_initialisation_scheme():
    torch.manual_seed(0)
    model = mobilenet_v2()
    fc = model.classifier[1]
    assert torch.count_nonzero(fc.bias) == 0
    assert abs(fc.weight.std().item() - 0.01) < 5e-4
    bn = model.features[18][1]
    assert torch.equal(bn.weight, torch.ones(1280)) and torch.count_nonzero(bn.bias) == 0


def test_fx_symbolic_trace_matches_eager():
    torch.manual_seed(0)
    model = mobilenet_v2(num_classes=4).eval()
    gm = fx.symbolic_trace(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 10  # one per residual block
