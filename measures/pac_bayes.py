"""PAC-Bayesian measures (App. D: Eqs. 48, 49, 53, 56, 57, 61).

σ is the largest std such that the expected training accuracy of w + N(0, σ²I)
is 0.1 below the model's (Algorithm 2, measures/search.py); σ' the same with
per-weight std √(σ'² w_i² + ε²). σ is a standard deviation throughout.
"""

from __future__ import annotations

import math

import torch

from .context import Context
from .registry import measure
from .search import sigma_search


def sigma(ctx: Context) -> tuple[float, dict]:
    return ctx.memo("sigma", lambda: sigma_search(ctx, magnitude=False))


def sigma_mag(ctx: Context) -> tuple[float, dict]:
    return ctx.memo("sigma_mag", lambda: sigma_search(ctx, magnitude=True))


def mag_bound(ctx: Context, w0: torch.Tensor, scale_sq: float, extra: float) -> float:
    """¼ Σ_i log((ε² + (scale² + extra)‖w−w0‖²/ω) / (ε² + scale²(w_i−w0_i)²)) + log(m/δ) + 10."""
    eps2 = ctx.settings.eps ** 2
    diff = (ctx.net.w - w0).double()
    mean_sq = float(diff.pow(2).sum()) / ctx.net.omega
    ratio = (eps2 + (scale_sq + extra) * mean_sq) / (eps2 + scale_sq * diff.pow(2))
    return 0.25 * float(torch.log(ratio).sum()) + math.log(ctx.m / ctx.settings.delta) + 10


@measure(eq="48", needs=("final", "init", "data"))
def pacbayes_init(ctx: Context):
    """‖w−w0‖²/(4σ²) + log(m/σ) + 10 (Eq. 48)."""
    s, p = sigma(ctx)
    dist = float((ctx.net.w - ctx.w0).double().pow(2).sum())
    return dist / (4 * s ** 2) + math.log(ctx.m / s) + 10, dict(p, sigma=s)


@measure(eq="49", needs=("final", "data"))
def pacbayes_orig(ctx: Context):
    """‖w‖²/(4σ²) + log(m/σ) + 10 (Eq. 49)."""
    s, p = sigma(ctx)
    return (float(ctx.net.w.double().pow(2).sum()) / (4 * s ** 2) + math.log(ctx.m / s) + 10,
            dict(p, sigma=s))


@measure(eq="53", needs=("final", "data"))
def pacbayes_flatness(ctx: Context):
    """1/σ² (Eq. 53)."""
    s, p = sigma(ctx)
    return 1 / s ** 2, dict(p, sigma=s)


@measure(eq="56", needs=("final", "init", "data"))
def pacbayes_mag_init(ctx: Context):
    """¼ Σ log((ε² + (σ'²+1)‖w−w0‖²/ω) / (ε² + σ'²(w_i−w0_i)²)) + log(m/δ) + 10 (Eq. 56)."""
    s, p = sigma_mag(ctx)
    return mag_bound(ctx, ctx.w0, s ** 2, 1.0), dict(p, sigma_mag=s, delta=ctx.settings.delta)


@measure(eq="57", needs=("final", "data"))
def pacbayes_mag_orig(ctx: Context):
    """Eq. 56 with w0 = 0 (Eq. 57)."""
    s, p = sigma_mag(ctx)
    return (mag_bound(ctx, torch.zeros_like(ctx.net.w), s ** 2, 1.0),
            dict(p, sigma_mag=s, delta=ctx.settings.delta))


@measure(eq="61", needs=("final", "data"))
def pacbayes_mag_flatness(ctx: Context):
    """1/σ'² (Eq. 61)."""
    s, p = sigma_mag(ctx)
    return 1 / s ** 2, dict(p, sigma_mag=s)
