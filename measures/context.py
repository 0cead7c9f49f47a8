"""What a measure function gets: the folded network as a flat parameter vector,
the initial and epoch-1 weights, the training data, the trace, and a cache.

Everything a measure computes is on the folded network (App. C.1). `w` holds
every parameter (kernels and biases), ω = dim(w); the norm measures use the
kernels W_i of the d = 3·depth + 1 weight layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from .fold import Layer, fold, input_sizes


@dataclass
class Settings:
    """Search budgets and choices, stored with every value in `measures.params`."""
    seed: int = 0
    spectral: str = "fft"            # "fft" (Sedghi et al. 2018) or "exact" (power iteration)
    power_iterations: int = 200
    target_deviation: float = 0.1    # accuracy drop that defines σ, σ', α, α' (App. E: d)
    tolerance: float = 0.01          # |deviation − target| accepted by the bisection
    bisection_steps: int = 12        # M1
    draws: int = 8                   # M2: Monte Carlo draws per σ (Algorithm 2)
    restarts: int = 2                # M2 of Algorithm 3: ascent restarts per α
    ascent_steps: int = 10           # M4: gradient-ascent steps per restart
    ascent_batch: int = 256          # minibatch for each ascent step
    ascent_lr: float = 0.1           # η: each ascent step moves 0.1 of the radius (box: half-width)
    eps: float = 1e-3                # ε of the magnitude-aware perturbations
    delta: float = 0.01              # δ of the bounds
    batch: int = 2048                # evaluation batch


class FlatNet:
    """The folded NiN as a function of one flat parameter vector."""

    def __init__(self, layers: list[Layer]):
        self.meta = [(tuple(layer.weight.shape), layer.stride, layer.padding)
                     for layer in layers]
        self.w = torch.cat([torch.cat([layer.weight.reshape(-1), layer.bias])
                            for layer in layers]).detach()

    @property
    def omega(self) -> int:
        return self.w.numel()

    def split(self, w: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out, i = [], 0
        for shape, _, _ in self.meta:
            n = int(np.prod(shape))
            out.append((w[i:i + n].reshape(shape), w[i + n:i + n + shape[0]]))
            i += n + shape[0]
        return out

    def logits(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params = self.split(w)
        for (weight, bias), (_, stride, pad) in zip(params[:-1], self.meta[:-1], strict=True):
            x = F.relu(F.conv2d(x, weight, bias, stride, pad))
        (weight, bias), (_, stride, pad) = params[-1], self.meta[-1]
        return F.conv2d(x, weight, bias, stride, pad).mean(dim=(2, 3))


@dataclass
class Context:
    net: FlatNet
    layers: list[Layer]
    x: torch.Tensor                      # training inputs (m, C, n, n)
    y: torch.Tensor
    num_classes: int
    init_layers: list[Layer] | None = None
    epoch1_layers: list[Layer] | None = None
    trace: pl.DataFrame | None = None
    outcome: dict = field(default_factory=dict)
    settings: Settings = field(default_factory=Settings)
    cache: dict = field(default_factory=dict)

    @classmethod
    def from_models(cls, final, x, y, num_classes, *, init=None, epoch1=None, trace=None,
                    outcome=None, settings=None) -> Context:
        for m in (final, init, epoch1):
            if m is not None:
                m.eval()
        layers = fold(final)
        return cls(FlatNet(layers), layers, x, y, num_classes,
                   fold(init) if init is not None else None,
                   fold(epoch1) if epoch1 is not None else None,
                   trace, outcome or {}, settings or Settings())

    # ------------------------------------------------------------------ basics
    @property
    def m(self) -> int:
        return len(self.x)

    @property
    def d(self) -> int:
        return len(self.layers)

    @property
    def n(self) -> int:
        return int(self.x.shape[-1])

    @property
    def w0(self) -> torch.Tensor:
        if self.init_layers is None:
            raise ValueError("needs the initial weights")
        return FlatNet(self.init_layers).w.to(self.net.w.device)

    def sizes(self) -> list[int]:
        return input_sizes(self.layers, self.n)

    def memo(self, key: str, compute):
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    @torch.no_grad()
    def logits(self, w: torch.Tensor | None = None) -> torch.Tensor:
        w = self.net.w if w is None else w
        b = self.settings.batch
        return torch.cat([self.net.logits(w, self.x[i:i + b]) for i in range(0, self.m, b)])

    def accuracy(self, w: torch.Tensor | None = None) -> float:
        return (self.logits(w).argmax(1) == self.y).double().mean().item()

    def train_logits(self) -> torch.Tensor:
        return self.memo("logits", self.logits)

    def margin(self) -> float:
        """γ: the 10th percentile of f(X)[y] − max_{j≠y} f(X)[j] (signed)."""
        def compute():
            f = self.train_logits().double()
            true = f.gather(1, self.y[:, None]).squeeze(1)
            other = f.scatter(1, self.y[:, None], float("-inf")).max(dim=1).values
            return float(np.percentile((true - other).cpu().numpy(), 10))
        return self.memo("margin", compute)

    def generator(self, salt: int) -> torch.Generator:
        return torch.Generator(device=self.net.w.device).manual_seed(self.settings.seed * 1000
                                                                     + salt)
