"""Network-in-Network (App. C.3, SPEC §3).

A block: 3x3 convolution, stride 2, then two 1x1 convolutions, each followed
by BatchNorm and ReLU; dropout at the end of the block. After the blocks: a
1x1 convolution to the classes, then global average pooling. No activation on
the logits (a ReLU there would stop logits from going negative).
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int) -> list[nn.Module]:
    # The convolution keeps its bias: BatchNorm folding (measures/) writes into it.
    return [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class NiN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int, depth: int,
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(depth):
            layers += conv_bn_relu(c, width, 3, 2)
            layers += conv_bn_relu(width, width, 1, 1)
            layers += conv_bn_relu(width, width, 1, 1)
            layers.append(nn.Dropout(dropout))
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(c, num_classes, 1)
        self.width, self.depth, self.dropout = width, depth, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        x = self.classifier(self.features(x))                  # (B, classes, h, w)
        return x.mean(dim=(2, 3))                              # global average pool


def parameter_count(in_channels: int, num_classes: int, width: int, depth: int) -> int:
    """Trainable parameters, counted from the architecture (convs with bias, BN γ/β)."""
    total, c = 0, in_channels
    for _ in range(depth):
        total += 9 * c * width + width + 2 * width            # 3x3 conv + bias, BN
        total += 2 * (width * width + width + 2 * width)      # two 1x1 convs + bias, BN
        c = width
    return total + c * num_classes + num_classes
