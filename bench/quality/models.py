"""The two architectures of the comparison, and which of their channels are pruned."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from icprune.graph import read_points
from icprune.models.cifar_resnet import CifarResNet
from icprune.models.vgg import VGG, make_vgg_features

ARCHS = ("resnet20", "vgg")
VGG_CFG: list[int | str] = [16, 16, "M", 32, 32, "M", 64, 64, "M"]


def build(arch: str) -> nn.Module:
    """A freshly initialised model (seed the global RNG first for a reproducible init).

    Args:
        arch: ``"resnet20"`` or ``"vgg"``.

    Returns:
        Model mapping Tensor[N, 1, 16, 16] -> Tensor[N, 10] logits.
    """
    if arch == "resnet20":
        return CifarResNet(blocks_per_stage=3, num_classes=10, in_channels=1)
    if arch == "vgg":
        head = nn.Sequential(nn.Linear(int(VGG_CFG[-2]), 10))
        return VGG(make_vgg_features(VGG_CFG, in_channels=1), head, nn.AdaptiveAvgPool2d((1, 1)))
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


@dataclass(frozen=True)
class Prunable:
    """One pruned layer: its output channels are masked at ``bn``, and ``consumer`` is the only
    layer that reads them (its input channels shrink with them).

    Attributes:
        layer: qualified name of the conv whose output channels are pruned.
        bn: qualified name of the BatchNorm directly after it (where the mask is applied).
        consumer: qualified name of the conv/linear layer that consumes those channels.
    """

    layer: str
    bn: str
    consumer: str


def pruned_layers(model: nn.Module) -> list[Prunable]:
    """The layers pruned in the comparison, in forward order.

    ResNet (:class:`CifarResNet`): the first conv of every block (its channels feed only the
    block's second conv; the residual stream is left alone). VGG: every conv of ``features``
    (each feeds the next conv, the last one the linear head).
    """
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if isinstance(model, CifarResNet):
        layers = [n for n in convs if n.endswith(".conv1")]
        consumers = [n[: -len("conv1")] + "conv2" for n in layers]
    elif isinstance(model, VGG):
        layers = convs
        linear = next(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
        consumers = [*convs[1:], linear]
    else:
        raise TypeError(f"no pruning layout for {type(model).__name__}")
    modules = dict(model.named_modules())
    points = read_points(model, {n: modules[n] for n in layers}, "bn")
    if any(points[n].read_at != "bn" for n in layers):
        raise ValueError("every pruned layer must be followed by its own BatchNorm")
    return [Prunable(n, points[n].module, c) for n, c in zip(layers, consumers, strict=True)]


def example_input(batch: int = 1) -> torch.Tensor:
    """Tensor[batch, 1, 16, 16] zeros, for shape-only passes."""
    return torch.zeros(batch, 1, 16, 16)
