"""CIFAR ResNets (He et al. 2016, section 4.2) with option-B (1x1 conv) shortcuts.

The key layout (``conv1``, ``bn1``, ``layer1..3``, ``fc``; blocks with ``conv1/bn1/conv2/bn2``
and ``downsample.0/1``) matches the chenyaofo/pytorch-cifar-models checkpoints.
"""

from __future__ import annotations

from torch import Tensor, nn

from .resnet import BasicBlock

__all__ = ["CifarResNet", "resnet20", "resnet56", "resnet110"]


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: 3x3 stem, stages of 16/32/64 channels, linear head.

    Args:
        blocks_per_stage: n, the number of ``BasicBlock`` in each of the three stages.
        num_classes: size of the output logits.

    Shapes: x: Tensor[N, 3, 32, 32] float images -> Tensor[N, num_classes] logits.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(16, blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(32, blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(64, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        stage = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        stage += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, 3, H, W] float images -> Tensor[N, num_classes] logits."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def resnet20(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-20, n=3 (272,474 params at 10 classes). Input Tensor[N, 3, 32, 32]."""
    return CifarResNet(3, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-56, n=9 (855,770 params at 10 classes). Input Tensor[N, 3, 32, 32]."""
    return CifarResNet(9, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-110, n=18 (1,730,714 params at 10 classes). Input Tensor[N, 3, 32, 32]."""
    return CifarResNet(18, num_classes)
