"""VGG-16 with batch norm: the ImageNet model (torchvision layout) and a CIFAR variant.

``vgg16_bn`` matches ``torchvision.models.vgg16_bn`` key for key. ``cifar_vgg16_bn`` shares
the same ``features`` and uses the 512-512-classes head of the chenyaofo/pytorch-cifar-models
checkpoints.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["VGG", "cifar_vgg16_bn", "make_vgg_features", "vgg16_bn"]

# Configuration "D" of Simonyan & Zisserman: conv widths, "M" = 2x2 max-pool.
_CFG_D: list[int | str] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
]  # fmt: skip


def make_vgg_features(
    cfg: list[int | str], batch_norm: bool = True, in_channels: int = 3
) -> nn.Sequential:
    """Build the convolutional trunk: 3x3 conv (+BN) + ReLU per width, max-pool per "M".

    Args:
        cfg: list of output channel counts and "M" markers.
        batch_norm: insert ``BatchNorm2d`` after each conv.
        in_channels: channels C_in of the input images (3 for RGB).

    Returns:
        Sequential mapping Tensor[N, C_in, H, W] -> Tensor[N, C_last, H/2^k, W/2^k], k = #"M".
    """
    layers: list[nn.Module] = []
    in_ch = in_channels
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_ch = int(item)
        layers.append(nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU(inplace=True))
        in_ch = out_ch
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG network: ``features`` -> ``avgpool`` -> flatten -> ``classifier``.

    Args:
        features: convolutional trunk (see ``make_vgg_features``).
        classifier: head taking the flattened pooled features.
        avgpool: pooling applied before flattening (identity for CIFAR).

    Shapes: x: Tensor[N, 3, H, W] float images -> Tensor[N, num_classes] logits.
    """

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential, avgpool: nn.Module):
        super().__init__()
        self.features = features
        self.avgpool = avgpool
        self.classifier = classifier
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        """x: Tensor[N, 3, H, W] float images -> Tensor[N, num_classes] logits."""
        x = self.avgpool(self.features(x)).flatten(1)
        return self.classifier(x)


def _head(in_features: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(p=dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(p=dropout),
        nn.Linear(hidden, num_classes),
    )


def vgg16_bn(num_classes: int = 1000, dropout: float = 0.5) -> VGG:
    """ImageNet VGG-16 with BN (138,365,992 params at 1000 classes).

    Input Tensor[N, 3, H, W] (224x224 nominal; any size >= 32 works thanks to the adaptive
    7x7 average pool) -> Tensor[N, num_classes] logits.
    """
    return VGG(
        make_vgg_features(_CFG_D, batch_norm=True),
        _head(512 * 7 * 7, 4096, num_classes, dropout),
        nn.AdaptiveAvgPool2d((7, 7)),
    )


def cifar_vgg16_bn(num_classes: int = 10, dropout: float = 0.5) -> VGG:
    """CIFAR VGG-16 with BN: Tensor[N, 3, 32, 32] -> Tensor[N, num_classes] logits.

    Five max-pools leave a [N, 512, 1, 1] map that is flattened straight into a
    Linear(512, 512) / Linear(512, 512) / Linear(512, num_classes) head (no avgpool).
    """
    return VGG(
        make_vgg_features(_CFG_D, batch_norm=True),
        _head(512, 512, num_classes, dropout),
        nn.Identity(),
    )
