"""graph: prunable layers (classifier excluded via torch.fx) and read points per layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icprune.models import cifar_vgg16_bn, mobilenet_v2, resnet18, resnet20, resnet56
from icprune.structure.graph import prunable_layers, read_points

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@pytest.fixture(scope="module")
def r18() -> nn.Module:
    torch.manual_seed(0)
    return resnet18()


@pytest.fixture(scope="module")
def mnv2() -> nn.Module:
    torch.manual_seed(0)
    return mobilenet_v2()


def _all_prunable(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, PRUNABLE)]


def _bn_of(conv: str) -> str:
    """Name of the BatchNorm following a conv in the zoo ResNets."""
    if conv.endswith("downsample.0"):
        return conv[: -len("0")] + "1"
    return conv.replace("conv", "bn")


# ------------------------------------------------------------------------- prunable_layers


def test_resnet18_prunable_layers(r18):
    layers = prunable_layers(r18)
    convs = [n for n, m in r18.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20
    assert list(layers) == convs  # every conv, named_modules order, fc left out
    assert "fc" not in layers
    for name in ("conv1", "layer1.0.conv1", "layer2.0.downsample.0", "layer4.1.conv2"):
        assert name in layers
    modules = dict(r18.named_modules())
    assert all(layers[n] is modules[n] for n in layers)


def test_mobilenet_v2_prunable_layers_include_depthwise(mnv2):
    layers = prunable_layers(mnv2)
    assert "classifier.1" not in layers
    assert list(layers) == [n for n in _all_prunable(mnv2) if n != "classifier.1"]
    assert len(layers) == 52  # stem + 2 (t=1 block) + 16 * 3 + last 1x1
    depthwise = [
        n for n, m in layers.items() if m.groups > 1 and m.groups == m.in_channels == m.out_channels
    ]
    assert len(depthwise) == 17
    assert "features.1.conv.0.0" in depthwise
    assert "features.2.conv.1.0" in depthwise


@pytest.mark.parametrize(
    ("factory", "count", "excluded"),
    [
        (resnet20, 21, "fc"),
        (resnet56, 57, "fc"),
        (cifar_vgg16_bn, 15, "classifier.6"),  # 13 convs + 2 hidden linears
    ],
)
def test_zoo_counts(factory, count, excluded):
    torch.manual_seed(0)
    model = factory()
    layers = prunable_layers(model)
    assert len(layers) == count
    assert list(layers) == [n for n in _all_prunable(model) if n != excluded]


class _LogSoftmaxNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.hidden = nn.Linear(4, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x))).mean((2, 3))
        x = F.dropout(torch.relu(self.hidden(x)), 0.1, self.training)
        return F.log_softmax(self.fc(x), dim=1)


class _FullyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.score = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return F.interpolate(self.score(x), scale_factor=2.0)


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head_a = nn.Linear(4, 2)
        self.head_b = nn.Linear(4, 3)

    def forward(self, x):
        x = self.conv(x).mean((2, 3))
        return self.head_a(x), {"b": self.head_b(x)}


def test_log_softmax_output_still_excludes_fc():
    layers = prunable_layers(_LogSoftmaxNet())
    assert list(layers) == ["conv", "hidden"]


def test_fully_convolutional_excludes_last_conv():
    assert list(prunable_layers(_FullyConv())) == ["conv1", "conv2"]


def test_every_output_head_excluded():
    assert list(prunable_layers(_TwoHeads())) == ["conv"]


# ------------------------------------------------------------------ explicit layer selection


def test_explicit_layers_order_and_dedup(r18):
    modules = dict(r18.named_modules())
    names = ["layer2.0.downsample.0", "conv1", "layer1.0.conv2", "conv1", "layer1.0.conv2"]
    layers = prunable_layers(r18, layers=names)
    assert list(layers) == ["conv1", "layer1.0.conv2", "layer2.0.downsample.0"]
    assert all(layers[n] is modules[n] for n in layers)


def test_explicit_layers_accepts_any_iterable_and_the_classifier(r18):
    layers = prunable_layers(r18, layers=(n for n in ["fc", "layer4.1.conv2"]))
    assert list(layers) == ["layer4.1.conv2", "fc"]


def test_explicit_unknown_name_value_error(r18):
    with pytest.raises(ValueError, match="no_such_layer") as info:
        prunable_layers(r18, layers=["conv1", "no_such_layer"])
    message = str(info.value)
    assert "conv1" in message and "layer1.0.conv1" in message  # lists prunable layers


def test_explicit_batchnorm_type_error(r18):
    with pytest.raises(TypeError, match=r"layer1\.0\.bn1"):
        prunable_layers(r18, layers=["conv1", "layer1.0.bn1"])


def test_explicit_bare_string_type_error(r18):
    with pytest.raises(TypeError):
        prunable_layers(r18, layers="conv1")


@pytest.mark.parametrize("empty", [[], (), iter([])])
def test_explicit_empty_value_error(r18, empty):
    with pytest.raises(ValueError):
        prunable_layers(r18, layers=empty)


# ------------------------------------------------------------------------ untraceable models


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:  # data-dependent control flow: fx cannot trace this
            y = F.relu(y)
        return self.fc(y.mean((2, 3)))


def _check_trace_error(exc: BaseException) -> None:
    message = str(exc)
    assert "torch.fx" in message
    assert "leaf" in message
    assert "layers=" in message and "read_at='output'" in message


def test_untraceable_default_layers_value_error():
    with pytest.raises(ValueError) as info:
        prunable_layers(_Untraceable())
    _check_trace_error(info.value)


@pytest.mark.parametrize("read_at", ["bn", "activation"])
def test_untraceable_read_points_needing_trace_value_error(read_at):
    model = _Untraceable()
    layers = prunable_layers(model, layers=["conv"])
    with pytest.raises(ValueError) as info:
        read_points(model, layers, read_at)
    _check_trace_error(info.value)


def test_untraceable_explicit_layers_and_output_read_point_work():
    model = _Untraceable()
    layers = prunable_layers(model, layers=["fc", "conv"])
    assert list(layers) == ["conv", "fc"]
    points = read_points(model, layers, "output")
    assert list(points) == ["conv", "fc"]
    for name, point in points.items():
        assert (point.layer, point.module, point.read_at, point.activation) == (
            name,
            name,
            "output",
            None,
        )


# ------------------------------------------------------------------------------ read points


def test_resnet18_activation_read_points(r18):
    layers = prunable_layers(r18)
    points = read_points(r18, layers, "activation")
    assert list(points) == list(layers)
    p = points["conv1"]
    assert (p.layer, p.module, p.read_at) == ("conv1", "bn1", "activation")
    p = points["layer1.0.conv1"]
    assert (p.module, p.read_at) == ("layer1.0.bn1", "activation")
    p = points["layer1.0.conv2"]  # bn2 feeds the residual add: no activation of its own
    assert (p.module, p.read_at, p.activation) == ("layer1.0.bn2", "bn", None)
    p = points["layer2.0.downsample.0"]
    assert (p.module, p.read_at, p.activation) == ("layer2.0.downsample.1", "bn", None)
    for name, point in points.items():
        assert point.layer == name
        assert point.module == _bn_of(name)
        if name == "conv1" or name.endswith(".conv1"):
            assert point.read_at == "activation" and callable(point.activation)
        else:
            assert point.read_at == "bn" and point.activation is None


def test_resnet18_activation_function_is_relu_out_of_place(r18):
    points = read_points(r18, prunable_layers(r18, layers=["conv1"]), "activation")
    torch.manual_seed(0)
    t = torch.randn(2, 64, 5, 5)
    before = t.clone()
    out = points["conv1"].activation(t)
    assert torch.equal(t, before)
    assert torch.equal(out, torch.relu(before))


def test_resnet18_bn_read_points(r18):
    layers = prunable_layers(r18)
    points = read_points(r18, layers, "bn")
    assert list(points) == list(layers)
    for name, point in points.items():
        assert (point.layer, point.module, point.read_at, point.activation) == (
            name,
            _bn_of(name),
            "bn",
            None,
        )


def test_resnet18_output_read_points(r18):
    layers = prunable_layers(r18)
    points = read_points(r18, layers, "output")
    assert list(points) == list(layers)
    for name, point in points.items():
        assert (point.layer, point.module, point.read_at, point.activation) == (
            name,
            name,
            "output",
            None,
        )


def test_mobilenet_v2_read_points(mnv2):
    points = read_points(mnv2, prunable_layers(mnv2), "activation")
    p = points["features.0.0"]  # Conv -> BN -> ReLU6
    assert (p.module, p.read_at) == ("features.0.1", "activation")
    t = torch.linspace(-3, 9, 32 * 4).reshape(1, 32, 2, 2)  # below 0 and above 6
    before = t.clone()
    assert torch.equal(p.activation(t), F.relu6(before))
    assert torch.equal(t, before)
    p = points["features.1.conv.1"]  # linear bottleneck projection: BN, no activation
    assert (p.module, p.read_at, p.activation) == ("features.1.conv.2", "bn", None)


class _ConvAct(nn.Module):
    """conv (no BN) followed directly by an activation, then a classifier."""

    def __init__(self, act) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act_module = nn.ReLU(inplace=True)
        self.act = act
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.act(self, self.conv(x))
        return self.fc(y.mean((2, 3)))


ACTIVATIONS = {
    "F.relu": (lambda self, y: F.relu(y), torch.relu),
    "F.relu_inplace": (lambda self, y: F.relu(y, inplace=True), torch.relu),
    "torch.relu_": (lambda self, y: torch.relu_(y), torch.relu),
    "method_relu": (lambda self, y: y.relu(), torch.relu),
    "method_relu_": (lambda self, y: y.relu_(), torch.relu),
    "leaky_relu_0.2": (lambda self, y: F.leaky_relu(y, 0.2), lambda t: F.leaky_relu(t, 0.2)),
    "leaky_relu_kw": (
        lambda self, y: F.leaky_relu(y, negative_slope=0.3, inplace=True),
        lambda t: F.leaky_relu(t, 0.3),
    ),
    "nn.ReLU_inplace": (lambda self, y: self.act_module(y), torch.relu),
}


@pytest.mark.parametrize("kind", list(ACTIVATIONS))
def test_activation_without_bn_read_on_conv_out_of_place(kind):
    act, reference = ACTIVATIONS[kind]
    model = _ConvAct(act)
    layers = prunable_layers(model)
    assert list(layers) == ["conv"]
    point = read_points(model, layers, "activation")["conv"]
    assert (point.layer, point.module, point.read_at) == ("conv", "conv", "activation")
    torch.manual_seed(0)
    t = torch.randn(2, 4, 3, 3)
    before = t.clone()
    out = point.activation(t)
    assert torch.equal(t, before), "the activation modified its input"
    assert torch.equal(out, reference(before))
    assert not torch.equal(out, before)  # it really is an activation
    # without a BatchNorm, "bn" falls back to the conv's own output
    point = read_points(model, layers, "bn")["conv"]
    assert (point.module, point.read_at, point.activation) == ("conv", "output", None)


class _SharedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = F.relu(self.bn(self.conv_a(x))) + F.relu(self.bn(self.conv_b(x)))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("read_at", ["bn", "activation"])
def test_shared_bn_falls_back_to_output(read_at):
    model = _SharedBN()
    points = read_points(model, prunable_layers(model), read_at)
    assert list(points) == ["conv_a", "conv_b"]
    for name, point in points.items():
        assert (point.module, point.read_at, point.activation) == (name, "output", None)


class _TwoConsumers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        z = F.relu(self.bn(y)) + y  # conv output feeds the BN and the add
        w = self.bn2(self.conv2(z))
        w = torch.relu(w) + w  # BN output feeds the activation and the add
        return self.fc(w.mean((2, 3)))


@pytest.mark.parametrize("read_at", ["bn", "activation"])
def test_multiple_consumers(read_at):
    model = _TwoConsumers()
    points = read_points(model, prunable_layers(model), read_at)
    p = points["conv"]
    assert (p.module, p.read_at, p.activation) == ("conv", "output", None)
    p = points["conv2"]  # BN is sole consumer, but its output has two: stop at "bn"
    assert (p.module, p.read_at, p.activation) == ("bn2", "bn", None)


class _ConvCalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = F.relu(self.bn_a(self.conv(x)))
        y = F.relu(self.bn_b(self.conv(y)))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("read_at", ["bn", "activation"])
def test_layer_called_twice_reads_its_output(read_at):
    model = _ConvCalledTwice()
    point = read_points(model, prunable_layers(model), read_at)["conv"]
    assert (point.module, point.read_at, point.activation) == ("conv", "output", None)


@pytest.mark.parametrize("bad", ["input", "relu", "", None, "Output"])
def test_invalid_read_at(r18, bad):
    with pytest.raises(ValueError):
        read_points(r18, prunable_layers(r18, layers=["conv1"]), bad)


# ------------------------------------------------------------------- user subclasses, norms


class _Head(nn.Linear):
    pass


class _MyConv(nn.Conv2d):
    pass


class _SubclassNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _MyConv(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = _Head(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_user_subclasses_of_conv_and_linear_are_layers_not_traced_into():
    model = _SubclassNet()
    assert list(prunable_layers(model)) == ["conv"]
    point = read_points(model, prunable_layers(model), "activation")["conv"]
    assert (point.module, point.read_at) == ("bn", "activation")


@pytest.mark.parametrize("norm", [nn.SyncBatchNorm, nn.BatchNorm2d])
def test_every_batchnorm_kind_is_a_read_point(norm):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), norm(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 2))
    point = read_points(model, prunable_layers(model), "bn")["0"]
    assert (point.module, point.read_at) == ("1", "bn")


def test_a_layer_registered_under_two_names_is_selectable_by_either():
    model = nn.Sequential()
    model.a = nn.Conv2d(3, 4, 1)
    model.b = model.a
    assert list(prunable_layers(model, layers=["b"])) == ["b"]
    assert prunable_layers(model, layers=["a", "b"]) == {"a": model.a, "b": model.a}


def test_layers_never_called_as_modules_are_not_prunable_layers():
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            y = self.fc(x)
            return self.head(self.attn(y, y, y, need_weights=False)[0])

    # attn.out_proj is a Linear whose weight F.multi_head_attention_forward reads directly
    assert list(prunable_layers(Attention())) == ["fc"]
