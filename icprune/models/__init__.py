"""Model zoo: ImageNet models with torchvision key layouts and CIFAR models.

ImageNet factories default to ``num_classes=1000``; CIFAR factories to ``num_classes=10``.
"""

from .cifar_resnet import CifarResNet, resnet20, resnet56, resnet110
from .mobilenet import MobileNetV2, mobilenet_v2
from .resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from .vgg import VGG, cifar_vgg16_bn, vgg16_bn

__all__ = [
    "VGG",
    "CifarResNet",
    "MobileNetV2",
    "ResNet",
    "cifar_vgg16_bn",
    "mobilenet_v2",
    "resnet18",
    "resnet20",
    "resnet34",
    "resnet50",
    "resnet56",
    "resnet101",
    "resnet110",
    "resnet152",
    "vgg16_bn",
]
