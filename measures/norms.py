"""Norm- and size-based measures (App. D: Eqs. 19, 20, 36–40, 42–44)."""

from __future__ import annotations

import math

import torch

from .context import Context, FlatNet
from .registry import measure


def fro_sq(ctx: Context) -> list[float]:
    """‖W_i‖_F² of each folded kernel."""
    return ctx.memo("fro_sq", lambda: [float(layer.weight.double().pow(2).sum())
                                       for layer in ctx.layers])


def dist_sq(ctx: Context) -> list[float]:
    """‖W_i − W_i^0‖_F² of each folded kernel."""
    return ctx.memo("dist_sq", lambda: [
        float((a.weight.double() - b.weight.double().to(a.weight.device)).pow(2).sum())
        for a, b in zip(ctx.layers, ctx.init_layers, strict=True)])


def prod_pow(values: list[float], d: int, divide: float = 1.0) -> float:
    """d · (Π values / divide)^{1/d}, in log space so deep nets do not overflow."""
    return d * math.exp((sum(math.log(v) for v in values) - math.log(divide)) / d)


def counted_params(ctx: Context) -> float:
    """Σ k_i² c_{i−1} (c_i + 1) over the folded layers (Eq. 20)."""
    return float(sum(layer.weight.shape[-1] ** 2 * layer.weight.shape[1]
                     * (layer.weight.shape[0] + 1) for layer in ctx.layers))


@measure(eq="19")
def vc_dim(ctx: Context) -> float:
    """(4000·κ·√(d·log2(6dn)³·Σ k_i² c_{i−1}(c_i+1)) + √log(1/δ))² (Eq. 19)."""
    d, n = ctx.d, ctx.n
    inner = 4000 * ctx.num_classes * math.sqrt(d * math.log2(6 * d * n) ** 3
                                               * counted_params(ctx))
    return (inner + math.sqrt(math.log(1 / ctx.settings.delta))) ** 2


@measure(eq="20")
def num_params(ctx: Context) -> float:
    """Σ k_i² c_{i−1} (c_i + 1) (Eq. 20)."""
    return counted_params(ctx)


@measure(eq="42")
def param_norm(ctx: Context) -> float:
    """Σ ‖W_i‖_F² (Eq. 42)."""
    return sum(fro_sq(ctx))


@measure(eq="40", needs=("final", "init"))
def frobenius_distance(ctx: Context) -> float:
    """Σ ‖W_i − W_i^0‖_F² (Eq. 40)."""
    return sum(dist_sq(ctx))


@measure(eq="37")
def prod_of_fro(ctx: Context) -> float:
    """Π ‖W_i‖_F² (Eq. 37)."""
    return math.exp(sum(math.log(v) for v in fro_sq(ctx)))


@measure(eq="36", needs=("final", "data"))
def prod_of_fro_over_margin(ctx: Context) -> float:
    """Π ‖W_i‖_F² / γ² (Eq. 36)."""
    return prod_of_fro(ctx) / ctx.margin() ** 2


@measure(eq="39")
def sum_of_fro(ctx: Context) -> float:
    """d · (Π ‖W_i‖_F²)^{1/d} (Eq. 39)."""
    return prod_pow(fro_sq(ctx), ctx.d)


@measure(eq="38", needs=("final", "data"))
def sum_of_fro_over_margin(ctx: Context) -> float:
    """d · (Π ‖W_i‖_F² / γ²)^{1/d} (Eq. 38)."""
    return prod_pow(fro_sq(ctx), ctx.d, ctx.margin() ** 2)


def path_norm_value(net: FlatNet, w: torch.Tensor, shape: tuple[int, ...]) -> float:
    """Σ_j f_{w²}(1)[j]: every parameter squared, an all-ones input forwarded, in
    float64 (a product over many layers of squared folded weights overflows float32)."""
    with torch.no_grad():
        ones = torch.ones((1, *shape), dtype=torch.float64, device=w.device)
        return float(net.logits(w.double().pow(2), ones).sum())


@measure(eq="44")
def path_norm(ctx: Context) -> float:
    """Σ_j f_{w²}(1)[j] (Eq. 44)."""
    return path_norm_value(ctx.net, ctx.net.w, tuple(ctx.x.shape[1:]))


@measure(eq="43", needs=("final", "data"))
def path_norm_over_margin(ctx: Context) -> float:
    """Σ_j f_{w²}(1)[j] / γ² (Eq. 43)."""
    return path_norm(ctx) / ctx.margin() ** 2
