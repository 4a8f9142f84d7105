"""ImageNet ResNets (v1.5) with torchvision-compatible state_dict layout.

The module names, parameter shapes and initialisation match ``torchvision.models.resnet*``,
so a torchvision checkpoint loads with ``model.load_state_dict(...)``. In the bottleneck
block the stride sits on the 3x3 convolution ("ResNet v1.5").
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
]


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus an identity (or projected) shortcut.

    Args:
        inplanes: input channels C_in.
        planes: output channels C_out (``expansion`` is 1).
        stride: stride of the first conv; spatial size is divided by it.
        downsample: optional shortcut projection mapping [N, C_in, H, W] to
            [N, C_out, H/stride, W/stride].

    Shapes: x: Tensor[N, C_in, H, W] -> Tensor[N, C_out, H/stride, W/stride].
    """

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, C_in, H, W] -> Tensor[N, C_out, H/stride, W/stride]."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided) and 1x1 expand conv-BN layers plus a shortcut.

    Args:
        inplanes: input channels C_in.
        planes: bottleneck width; output channels are ``planes * 4``.
        stride: stride of the 3x3 conv (v1.5 placement).
        downsample: optional shortcut projection to [N, planes*4, H/stride, W/stride].

    Shapes: x: Tensor[N, C_in, H, W] -> Tensor[N, 4*planes, H/stride, W/stride].
    """

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, C_in, H, W] -> Tensor[N, 4*planes, H/stride, W/stride]."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


def make_stage(
    block: type[BasicBlock] | type[Bottleneck], inplanes: int, planes: int, blocks: int, stride: int
) -> nn.Sequential:
    """One ResNet stage: ``blocks`` residual blocks, the first with stride ``stride`` and a
    ``downsample`` (1x1 conv + BN, keys ``downsample.0/1``) where the shape changes.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        inplanes: input channels of the stage.
        planes: width of the blocks; the stage outputs ``planes * block.expansion`` channels.
        blocks: number of blocks (>= 1).
        stride: stride of the first block (1 or 2).

    Returns:
        nn.Sequential of the blocks: Tensor[N, inplanes, H, W] ->
        Tensor[N, planes * expansion, H / stride, W / stride].
    """
    out_ch = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out_ch:
        downsample = nn.Sequential(_conv1x1(inplanes, out_ch, stride), nn.BatchNorm2d(out_ch))
    stage = [block(inplanes, planes, stride, downsample)]
    stage += [block(out_ch, planes) for _ in range(1, blocks)]
    return nn.Sequential(*stage)


def init_weights(model: nn.Module, zero_init_residual: bool = False) -> None:
    """torchvision's ResNet initialisation, in place: Kaiming-normal (fan_out) convs, BN weight 1
    and bias 0, linear layers left at PyTorch's default; with ``zero_init_residual`` the last BN
    of every block starts at weight 0, so each residual branch starts as the identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, BasicBlock):
                nn.init.constant_(m.bn2.weight, 0)


class ResNet(nn.Module):
    """ImageNet ResNet: 7x7/2 stem, 3x3/2 max-pool, four stages, global pool, linear head.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: number of blocks in each of the four stages.
        num_classes: size of the output logits.
        zero_init_residual: if True, the last BN of every block starts with weight 0, so
            each residual branch is initially the identity.

    Shapes: x: Tensor[N, 3, H, W] float images -> Tensor[N, num_classes] logits.
    H and W should be at least 32 (the network downsamples by 32).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        e = block.expansion
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = make_stage(block, 64, 64, layers[0], stride=1)
        self.layer2 = make_stage(block, 64 * e, 128, layers[1], stride=2)
        self.layer3 = make_stage(block, 128 * e, 256, layers[2], stride=2)
        self.layer4 = make_stage(block, 256 * e, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * e, num_classes)
        init_weights(self, zero_init_residual)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, 3, H, W] float images -> Tensor[N, num_classes] logits."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x).flatten(1)
        return self.fc(x)


def resnet18(num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    """ResNet-18 (11,689,512 params at 1000 classes). Input Tensor[N, 3, H, W]."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, zero_init_residual)


def resnet34(num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    """ResNet-34 (21,797,672 params at 1000 classes). Input Tensor[N, 3, H, W]."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, zero_init_residual)


def resnet50(num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    """ResNet-50 v1.5 (25,557,032 params at 1000 classes). Input Tensor[N, 3, H, W]."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, zero_init_residual)


def resnet101(num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    """ResNet-101 v1.5 (44,549,160 params at 1000 classes). Input Tensor[N, 3, H, W]."""
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes, zero_init_residual)


def resnet152(num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    """ResNet-152 v1.5 (60,192,808 params at 1000 classes). Input Tensor[N, 3, H, W]."""
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes, zero_init_residual)
