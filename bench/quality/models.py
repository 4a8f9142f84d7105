"""The networks of the comparison: four architecture kinds, two networks of each kind.

Every network maps Tensor[N, 1, 16, 16] (the upsampled digits) to Tensor[N, 10] logits and is
built from Conv2d + BatchNorm2d + activation units, so that every pruned channel has a
BatchNorm and icprune's dependency groups cover all of them. Each kind has a *selection* net
(used, with the selection seeds, to choose defaults) and a *confirmation* net of the same kind
but another depth, width or block design (used, with other seeds, only to report);
selection / confirmation:

- plain: ``vgg`` (VGG-style 16-16-M-32-32-M-64-64) / ``vgg-b`` (24-M-48-48-M-96);
- residual: ``resnet`` (BasicBlocks 2-2-2, widths 16/32/64) / ``resnet-b`` (Bottlenecks
  1-1-1, widths 16/32/64, expansion 4);
- inverted residual: ``mobilenet`` (expansion 4, widths 16/24/32) / ``mobilenet-b`` (expansion
  6, widths 24/40);
- concat: ``densenet`` (dense blocks 3-3, growth 12) / ``densenet-b`` (blocks 2-2-2, growth 8).

The models are defined here, not taken from ``icprune.models``, so that the benchmark does not
move when the package's modules do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: Architecture kind of every net.
KINDS: dict[str, str] = {
    "vgg": "plain",
    "vgg-b": "plain",
    "resnet": "residual",
    "resnet-b": "residual",
    "mobilenet": "inverted residual",
    "mobilenet-b": "inverted residual",
    "densenet": "concat",
    "densenet-b": "concat",
}
SELECTION_NETS = ("vgg", "resnet", "mobilenet", "densenet")
CONFIRMATION_NETS = ("vgg-b", "resnet-b", "mobilenet-b", "densenet-b")
ARCHS = SELECTION_NETS + CONFIRMATION_NETS


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
            act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:  # fmt: skip
    """Conv2d (no bias, 'same' padding) + BatchNorm2d + activation (None: no activation)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class Head(nn.Sequential):
    """Global average pool, flatten, linear classifier."""

    def __init__(self, cin: int, classes: int = 10) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


def vgg(cfg: list[int | str]) -> nn.Sequential:
    """A VGG-style net: ``conv_bn`` for every int of ``cfg``, 2x2 max pool for ``"M"``."""
    layers: list[nn.Module] = []
    cin = 1
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers.append(conv_bn(cin, int(item)))
            cin = int(item)
    return nn.Sequential(*layers, Head(cin))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus identity or 1x1 conv-BN shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, 1, act=None)
        self.shortcut = (
            conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.relu(self.conv2(self.conv1(x)) + skip)


class Bottleneck(nn.Module):
    """1x1 reduce - 3x3 - 1x1 expand (each conv-BN, ReLU but the last), shortcut, ReLU."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, mid, 1)
        self.conv2 = conv_bn(mid, mid, 3, stride)
        self.conv3 = conv_bn(mid, cout, 1, act=None)
        self.shortcut = (
            conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + skip)


def resnet(blocks: int, widths: tuple[int, ...], bottleneck: bool = False) -> nn.Sequential:
    """A CIFAR-style ResNet: 3x3 stem, one stage per width (stride 2 after the first), each of
    ``blocks`` BasicBlocks (or Bottlenecks with expansion 4), head."""
    stem = widths[0] if not bottleneck else 4 * widths[0]
    layers: list[nn.Module] = [conv_bn(1, stem)]
    cin = stem
    for i, w in enumerate(widths):
        for b in range(blocks):
            stride = 2 if i > 0 and b == 0 else 1
            if bottleneck:
                layers.append(Bottleneck(cin, w, 4 * w, stride))
                cin = 4 * w
            else:
                layers.append(BasicBlock(cin, w, stride))
                cin = w
    return nn.Sequential(*layers, Head(cin))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand-BN-ReLU6, depthwise 3x3-BN-ReLU6, 1x1 project-BN,
    identity shortcut when the shape allows."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = conv_bn(cin, mid, 1, act=nn.ReLU6)
        self.depthwise = conv_bn(mid, mid, 3, stride, groups=mid, act=nn.ReLU6)
        self.project = conv_bn(mid, cout, 1, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.residual else out


def mobilenet(stem: int, stages: list[tuple[int, int, int]], expand: int, last: int):
    """A small MobileNetV2: 3x3 stem-BN-ReLU6, ``(width, blocks, stride)`` stages of inverted
    residuals, 1x1 conv to ``last`` channels-BN-ReLU6, head."""
    layers: list[nn.Module] = [conv_bn(1, stem, act=nn.ReLU6)]
    cin = stem
    for width, blocks, stride in stages:
        for b in range(blocks):
            layers.append(InvertedResidual(cin, width, stride if b == 0 else 1, expand))
            cin = width
    layers += [conv_bn(cin, last, 1, act=nn.ReLU6), Head(last)]
    return nn.Sequential(*layers)


class DenseLayer(nn.Module):
    """conv3x3-BN-ReLU producing ``growth`` channels, concatenated after its input."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.conv = conv_bn(cin, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(x)], 1)


def densenet(stem: int, blocks: tuple[int, ...], growth: int) -> nn.Sequential:
    """A small post-activation DenseNet: 3x3 stem, dense blocks of ``blocks[i]`` layers, each
    followed (but the last) by a 1x1 conv-BN-ReLU transition halving the channels and a 2x2
    average pool; head."""
    layers: list[nn.Module] = [conv_bn(1, stem)]
    cin = stem
    for i, n in enumerate(blocks):
        for _ in range(n):
            layers.append(DenseLayer(cin, growth))
            cin += growth
        if i < len(blocks) - 1:
            layers += [conv_bn(cin, cin // 2, 1), nn.AvgPool2d(2)]
            cin //= 2
    return nn.Sequential(*layers, Head(cin))


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "vgg": lambda: vgg([16, 16, "M", 32, 32, "M", 64, 64]),
    "vgg-b": lambda: vgg([24, "M", 48, 48, "M", 96]),
    "resnet": lambda: resnet(2, (16, 32, 64)),
    "resnet-b": lambda: resnet(1, (16, 32, 64), bottleneck=True),
    "mobilenet": lambda: mobilenet(16, [(16, 1, 1), (24, 2, 2), (32, 2, 2)], 4, 128),
    "mobilenet-b": lambda: mobilenet(16, [(24, 2, 2), (40, 2, 2)], 6, 160),
    "densenet": lambda: densenet(24, (3, 3), 12),
    "densenet-b": lambda: densenet(16, (2, 2, 2), 8),
}


def build(arch: str) -> nn.Module:
    """A freshly initialised network (seed the global RNG first for a reproducible init).

    Args:
        arch: a name of :data:`ARCHS`.

    Returns:
        Model mapping Tensor[N, 1, 16, 16] -> Tensor[N, 10] logits.
    """
    if arch not in BUILDERS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return BUILDERS[arch]()


def example_input(batch: int = 1) -> torch.Tensor:
    """Tensor[batch, 1, 16, 16] zeros, for shape-only passes (MAC counts, dependency groups)."""
    return torch.zeros(batch, 1, 16, 16)
