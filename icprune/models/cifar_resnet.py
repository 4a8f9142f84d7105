"""CIFAR ResNets (He et al. 2016, section 4.2) with option-B (1x1 conv) shortcuts.

The key layout (``conv1``, ``bn1``, ``layer1..3``, ``fc``; blocks with ``conv1/bn1/conv2/bn2``
and ``downsample.0/1``) matches the chenyaofo/pytorch-cifar-models checkpoints.
"""

from __future__ import annotations

from torch import Tensor, nn

from .resnet import BasicBlock, init_weights, make_stage

__all__ = ["CifarResNet", "resnet20", "resnet56", "resnet110"]


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: 3x3 stem, stages of 16/32/64 channels, linear head.

    Args:
        blocks_per_stage: n, the number of ``BasicBlock`` in each of the three stages.
        num_classes: size of the output logits.
        in_channels: channels of the input images (3 for CIFAR, 1 for greyscale digits).

    Shapes: x: Tensor[N, in_channels, H, W] float images -> Tensor[N, num_classes] logits.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        n = blocks_per_stage
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_stage(BasicBlock, 16, 16, n, stride=1)
        self.layer2 = make_stage(BasicBlock, 16, 32, n, stride=2)
        self.layer3 = make_stage(BasicBlock, 32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, in_channels, H, W] float images -> Tensor[N, num_classes] logits."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-20, n=3 (272,474 params at 10 classes). Input [N, in_channels, 32, 32]."""
    return CifarResNet(3, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-56, n=9 (855,770 params at 10 classes). Input [N, in_channels, 32, 32]."""
    return CifarResNet(9, num_classes, in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-110, n=18 (1,730,714 params at 10 classes). Input [N, in_channels, 32, 32]."""
    return CifarResNet(18, num_classes, in_channels)
