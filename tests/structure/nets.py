"""Small handmade networks for the dependency kinds of issue 14 (imported by several tests).

Each mirrors one block of a torchvision family without needing torchvision: a squeeze-excitation
MBConv block (EfficientNet, MobileNetV3), a channels-last ConvNeXt block with a LayerNorm2d
downsample, a token MLP (ViT/Swin MLPs over ``[N, L, C]``) and a small ViT whose encoder
blocks call ``nn.MultiheadAttention`` as torchvision's do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SqueezeExcitation(nn.Module):
    """torchvision's: avgpool -> fc1 -> act -> fc2 -> gate; ``gate * x``."""

    def __init__(self, channels: int, hidden: int, gate: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.activation = nn.SiLU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.scale_activation = gate()

    def forward(self, x):
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(scale) * x


class SENet(nn.Module):
    """stem -> MBConv (expand, depthwise, SE, project) with a residual -> head -> classifier."""

    def __init__(self, gate: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 24, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(24)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False)
        self.dw_bn = nn.BatchNorm2d(24)
        self.se = SqueezeExcitation(24, 6, gate)
        self.project = nn.Conv2d(24, 8, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.silu(self.stem_bn(self.stem(x)))
        y = F.silu(self.dw_bn(self.dw(F.silu(self.expand_bn(self.expand(x))))))
        x = x + self.project_bn(self.project(self.se(y)))
        return self.fc(F.adaptive_avg_pool2d(F.silu(self.head(x)), 1).flatten(1))


class LayerNorm2d(nn.LayerNorm):
    """torchvision's: a LayerNorm over the channels of an ``[N, C, H, W]`` map, traced into
    (permute -> ``F.layer_norm`` with the module's weight and bias -> permute)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """depthwise 7x7 -> permute -> LayerNorm -> Linear(4C) -> GELU -> Linear(C) -> permute,
    scaled by the parameter ``layer_scale`` ``(C, 1, 1)`` and added to the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.layer_scale = nn.Parameter(torch.rand(channels, 1, 1) + 0.5)
        self.dw = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, 4 * channels)
        self.fc2 = nn.Linear(4 * channels, channels)

    def forward(self, x):
        y = torch.permute(self.dw(x), [0, 2, 3, 1])
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))
        return x + self.layer_scale * y.permute(0, 3, 1, 2)


class ConvNeXtNet(nn.Module):
    """stem -> LayerNorm2d -> 2 blocks -> LayerNorm2d -> 2x2 downsample -> block -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.stem_norm = LayerNorm2d(8)
        self.block1 = ConvNeXtBlock(8)
        self.block2 = ConvNeXtBlock(8)
        self.down_norm = LayerNorm2d(8)
        self.down = nn.Conv2d(8, 12, 2, stride=2)
        self.block3 = ConvNeXtBlock(12)
        self.norm = nn.LayerNorm(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.block2(self.block1(self.stem_norm(self.stem(x))))
        x = self.block3(self.down(self.down_norm(x)))
        return self.fc(self.norm(x.mean((2, 3))))


class TokenMLP(nn.Module):
    """Tokens ``[N, L, C]``: fc1 -> GELU -> fc2 over the tokens, ``flatten(0, 1)`` -> fc3 ->
    ReLU over ``[N*L, C]``, reshaped back to ``[N, L, C]``, mean over the tokens -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 8)
        self.fc3 = nn.Linear(8, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        n, length = x.shape[0], x.shape[1]
        y = self.fc2(F.gelu(self.fc1(x))).flatten(0, 1)
        y = torch.relu(self.fc3(y)).reshape(n, length, -1)
        return self.head(y.mean(1))


class ChannelsLastMisuse(nn.Module):
    """A linear layer's tokens ``[N, L, C]`` read by a Conv1d as ``[N, channels=L, length=C]``,
    and a max-pool over a channels-last map: neither may be pruned through."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.conv = nn.Conv1d(5, 4, 1)
        self.fc2 = nn.Linear(6, 6)
        self.head = nn.Linear(4 * 8 + 5 * 2, 3)

    def forward(self, x):  # x: [N, 5, 6]
        a = self.conv(self.fc(x)).flatten(1)
        b = F.max_pool1d(self.fc2(x), 3).flatten(1)  # pools the last axis, the channels
        return self.head(torch.cat([a, b], 1))


class ResNeXtNet(nn.Module):
    """stem -> two ResNeXt bottlenecks (1x1, grouped 3x3 with 4 groups, 1x1; the second with a
    squeeze-excitation on the grouped conv's output, as RegNetY) -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        for i, se in ((1, False), (2, True)):
            setattr(self, f"conv{i}a", nn.Conv2d(16, 24, 1, bias=False))
            setattr(self, f"bn{i}a", nn.BatchNorm2d(24))
            setattr(self, f"conv{i}b", nn.Conv2d(24, 32, 3, padding=1, groups=4, bias=False))
            setattr(self, f"bn{i}b", nn.BatchNorm2d(32))
            setattr(self, f"se{i}", SqueezeExcitation(32, 4) if se else nn.Identity())
            setattr(self, f"conv{i}c", nn.Conv2d(32, 16, 1, bias=False))
            setattr(self, f"bn{i}c", nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        for i in (1, 2):
            y = torch.relu(getattr(self, f"bn{i}a")(getattr(self, f"conv{i}a")(x)))
            y = torch.relu(getattr(self, f"bn{i}b")(getattr(self, f"conv{i}b")(y)))
            y = getattr(self, f"bn{i}c")(getattr(self, f"conv{i}c")(getattr(self, f"se{i}")(y)))
            x = torch.relu(x + y)
        return self.fc(x.mean((2, 3)))


class EncoderBlock(nn.Module):
    """torchvision's ViT encoder block: LayerNorm -> ``nn.MultiheadAttention(x, x, x,
    need_weights=False)`` -> residual -> LayerNorm -> MLP (fc1 -> GELU -> fc2) -> residual."""

    def __init__(self, dim: int, heads: int, hidden: int, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.ln_2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        y = self.ln_1(x)
        if not self.batch_first:
            y = y.transpose(0, 1)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        if not self.batch_first:
            y = y.transpose(0, 1)
        x = x + y
        return x + self.fc2(F.gelu(self.fc1(self.ln_2(x))))


class ViTNet(nn.Module):
    """A small ViT: 4x4 patches of a ``[N, 3, 16, 16]`` image -> 16 tokens of 24 features,
    a class token and a position embedding -> two encoder blocks of 4 heads of 6 features (the
    second with ``batch_first=False``) -> LayerNorm -> the class token -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, 24, 4, stride=4)
        self.class_token = nn.Parameter(torch.randn(1, 1, 24) * 0.1)
        self.pos_embedding = nn.Parameter(torch.randn(1, 17, 24) * 0.1)
        self.block1 = EncoderBlock(24, 4, 32)
        self.block2 = EncoderBlock(24, 4, 32, batch_first=False)
        self.ln = nn.LayerNorm(24)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = self.conv_proj(x)
        x = x.reshape(x.shape[0], 24, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.block2(self.block1(x + self.pos_embedding))
        return self.head(self.ln(x)[:, 0])


class SwinBlock(nn.Module):
    """torchvision's Swin block over a channels-last map ``[N, H, W, C]``: LayerNorm -> window
    attention -> residual -> LayerNorm -> MLP -> residual. The attention is icprune's
    ``PrunedWindowAttention`` with all its heads (torchvision's ``ShiftedWindowAttention``
    computes the same; this venv has no torchvision)."""

    def __init__(self, dim: int, heads: int, shift: int, cosine: bool) -> None:
        from icprune.attention import PrunedWindowAttention

        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PrunedWindowAttention(
            dim, [4, 4], [shift, shift], heads, dim // heads, cosine=cosine
        )
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class SwinNet(nn.Module):
    """4x4 patches of a ``[N, 3, 24, 24]`` image -> a ``6 x 6`` channels-last map of 16
    channels (padded to two 4x4 windows a side) -> a block with windows, then a shifted block
    with V2's cosine attention, 4 heads of 4 features each -> mean -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.norm = nn.LayerNorm(16)
        self.block1 = SwinBlock(16, 4, 0, cosine=False)
        self.block2 = SwinBlock(16, 4, 2, cosine=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.norm(self.patch(x).permute(0, 2, 3, 1))
        return self.head(self.block2(self.block1(x)).mean((1, 2)))
