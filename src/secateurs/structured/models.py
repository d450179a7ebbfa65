"""Small reference networks for structured pruning: one per dependency pattern.

Each exercises a coupling that compaction must get right: an MLP (Linear -> Linear), a
CNN with BatchNorm and a flatten into a Linear, a ResNet-style network (residual additions
with a strided 1x1 shortcut), a MobileNet-style network (depthwise convolutions) and a
transformer encoder block whose attention has separate q/k/v/out projections, so whole
heads can be removed. :class:`SelfAttention` is also the attention to use in models whose
heads are to be compacted: ``nn.MultiheadAttention`` ties its inner width to its embedding
width, so its heads cannot be removed on their own.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLP", "ConvBN", "MobileNetLike", "ResNetLike", "SelfAttention", "TransformerBlock",
           "TransformerClassifier"]


class MLP(nn.Sequential):
    """``Linear -> ReLU`` layers of the given widths, then a Linear classifier."""

    def __init__(self, inputs: int = 64, hidden: tuple[int, ...] = (256, 256), classes: int = 10
                 ) -> None:
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(inputs, width), nn.ReLU()]
            inputs = width
        super().__init__(*layers, nn.Linear(inputs, classes))


def _conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1, kernel: int = 3
             ) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]


class ConvBN(nn.Module):
    """Two ``conv -> BatchNorm -> ReLU`` stages with pooling, flattened into a Linear head.

    Args:
        width: Channels of the first stage (the second has twice as many).
        size: Input height and width (a multiple of 4).
    """

    def __init__(self, width: int = 16, classes: int = 10, in_channels: int = 1, size: int = 8
                 ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(in_channels, width), nn.ReLU(), nn.MaxPool2d(2),
            *_conv_bn(width, 2 * width), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * (size // 4) ** 2, 64),
                                  nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv-BN, plus a 1x1 conv-BN shortcut when the shape
    changes (He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, stride), nn.ReLU(), *_conv_bn(cout, cout))
        self.shortcut = (nn.Sequential(*_conv_bn(cin, cout, stride, kernel=1))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNetLike(nn.Module):
    """A stem, then stages of basic blocks; every stage after the first halves the
    resolution with a strided block and a 1x1 shortcut.

    Args:
        widths: Channels of each stage.
        blocks: Basic blocks per stage.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), blocks: int = 2,
                 classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, widths[0]), nn.ReLU())
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, width in enumerate(widths):
            for b in range(blocks):
                stages.append(BasicBlock(cin, width, 2 if i > 0 and b == 0 else 1))
                cin = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, 1x1 projection (Sandler et al.
    2018), with a residual addition when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            *_conv_bn(cin, hidden, kernel=1), nn.ReLU6(),
            *_conv_bn(hidden, hidden, stride, groups=hidden), nn.ReLU6(),
            *_conv_bn(hidden, cout, kernel=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetLike(nn.Module):
    """A stem and inverted-residual blocks with depthwise convolutions."""

    def __init__(self, width: int = 16, classes: int = 10, in_channels: int = 3,
                 expand: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, width, 2), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(width, width, 1, expand),
            InvertedResidual(width, 2 * width, 2, expand),
            InvertedResidual(2 * width, 2 * width, 1, expand),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q, k, v and output projections.

    ``softmax(q k^T / sqrt(d_head)) v`` per head (Vaswani et al. 2017). The inner width is
    ``num_heads * head_dim`` and may differ from ``dim``, so removing a head removes its
    rows of ``q``, ``k``, ``v`` and its columns of ``out``; ``num_heads`` is the attribute
    compaction updates.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim if head_dim is not None else dim // num_heads
        inner = self.num_heads * self.head_dim
        self.q = nn.Linear(dim, inner)
        self.k = nn.Linear(dim, inner)
        self.v = nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        weights = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(-1)
        b, t, _ = x.shape
        return self.out((weights @ v).transpose(1, 2).reshape(b, t, -1))


class TransformerBlock(nn.Module):
    """Pre-norm encoder block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int = 64, num_heads: int = 4, hidden: int = 256) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class TransformerClassifier(nn.Module):
    """Token features -> Linear embedding -> encoder blocks -> LayerNorm -> mean -> Linear."""

    def __init__(self, features: int = 16, dim: int = 64, num_heads: int = 4, hidden: int = 256,
                 depth: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, num_heads, hidden)
                                      for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))
