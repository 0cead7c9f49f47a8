"""BatchNorm folding (App. C.1): every measure sees the network with each
BatchNorm merged into the convolution before it.

    W' = W · γ/√(var + ε)        b' = (b − mean) · γ/√(var + ε) + β

The folded network is a list of (conv weight, bias, stride, padding) layers
with ReLU between them; in eval mode it gives the same logits as the original.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Layer:
    weight: torch.Tensor   # (c_out, c_in, k, k)
    bias: torch.Tensor     # (c_out,)
    stride: int
    padding: int


def fold(model: nn.Module) -> list[Layer]:
    """The NiN's weight layers after folding: d = 3·depth + 1 convolutions."""
    layers: list[Layer] = []
    mods = list(model.features)
    for i, m in enumerate(mods):
        if not isinstance(m, nn.Conv2d):
            continue
        bn = mods[i + 1]
        assert isinstance(bn, nn.BatchNorm2d), "NiN: every convolution is followed by BN"
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        w = m.weight.detach() * scale[:, None, None, None]
        b0 = m.bias.detach() if m.bias is not None else torch.zeros_like(bn.running_mean)
        b = (b0 - bn.running_mean) * scale + bn.bias.detach()
        layers.append(Layer(w.clone(), b.clone(), m.stride[0], m.padding[0]))
    c = model.classifier
    layers.append(Layer(c.weight.detach().clone(), c.bias.detach().clone(), 1, 0))
    return layers


def forward(layers: list[Layer], x: torch.Tensor) -> torch.Tensor:
    """Logits of the folded network (eval mode: dropout is the identity)."""
    for layer in layers[:-1]:
        x = F.relu(F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding))
    last = layers[-1]
    return F.conv2d(x, last.weight, last.bias, last.stride, last.padding).mean(dim=(2, 3))


def input_sizes(layers: list[Layer], size: int) -> list[int]:
    """Spatial size of each layer's input, for an n x n image."""
    out = []
    for layer in layers:
        out.append(size)
        k = layer.weight.shape[-1]
        size = (size + 2 * layer.padding - k) // layer.stride + 1
    return out
