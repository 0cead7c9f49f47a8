"""Measures of the optimisation itself (App. D: Eqs. 63–66)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from .context import Context, FlatNet
from .registry import measure


def _steps(ctx: Context, key: str, threshold: float) -> float:
    value = ctx.outcome.get(key)
    if value is not None:
        return float(value)
    if ctx.trace is not None and key == "steps_to_0.1":
        hit = ctx.trace.filter(ctx.trace["train_loss"] <= threshold)
        if hit.height:
            return float(hit["step"].min())
    raise ValueError(f"the training cross-entropy never reached {threshold} "
                     "within the step budget")


@measure(eq="63", needs=("trace",), name="steps_to_0.1_loss")
def steps_to_01(ctx: Context) -> float:
    """Optimiser steps from initialisation to cross-entropy 0.1 (Eq. 63)."""
    return _steps(ctx, "steps_to_0.1", 0.1)


@measure(eq="64", needs=("trace",), name="steps_0.1_to_0.01_loss")
def steps_01_to_001(ctx: Context) -> float:
    """Optimiser steps from cross-entropy 0.1 to 0.01 (Eq. 64)."""
    return _steps(ctx, "steps_0.1_to_0.01", 0.01)


def gradient_noise(net: FlatNet, x: torch.Tensor, y: torch.Tensor, chunk: int) -> float:
    """Σ over parameters of the variance over examples of ∇_w ℓ(f_w(x_i), y_i)."""
    def loss(w, xi, yi):
        return F.cross_entropy(net.logits(w, xi[None]), yi[None])
    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    total = torch.zeros_like(net.w, dtype=torch.float64)
    total_sq = torch.zeros_like(net.w, dtype=torch.float64)
    for i in range(0, len(x), chunk):
        g = per_example(net.w, x[i:i + chunk], y[i:i + chunk]).double()   # (b, ω)
        total += g.sum(0)
        total_sq += g.pow(2).sum(0)
    m = len(x)
    return float((total_sq / m - (total / m).pow(2)).sum())


def _chunk(net: FlatNet) -> int:
    return max(1, min(512, 20_000_000 // max(net.omega, 1)))   # ~160 MB of gradients


@measure(eq="65", needs=("epoch1", "data"))
def grad_noise_epoch1(ctx: Context) -> float:
    """Variance over training examples of ∇_w ℓ at the weights after epoch 1 (Eq. 65)."""
    if ctx.epoch1_layers is None:
        raise ValueError("needs the weights after epoch 1")
    net = FlatNet(ctx.epoch1_layers)
    return gradient_noise(net, ctx.x, ctx.y, _chunk(net))


@measure(eq="66", needs=("final", "data"))
def grad_noise_final(ctx: Context) -> float:
    """Variance over training examples of ∇_w ℓ at the final weights (Eq. 66)."""
    return gradient_noise(ctx.net, ctx.x, ctx.y, _chunk(ctx.net))
