"""Sharpness measures (App. D: Eqs. 51, 52, 54, 59, 60, 62).

α is the largest radius such that the worst training accuracy that gradient
ASCENT finds inside the ℓ2 ball ‖u‖ ≤ α around w is 0.1 below the model's
(Algorithm 3, measures/search.py); α' the same inside the box |u_i| ≤ α'|w_i| (App. E; eq. 58's
|u_i| ≤ α'|w_i| + ε with --set alpha_mag_box=eps). ε stays in the bounds (eqs. 59, 60).
"""

from __future__ import annotations

import math

import torch

from .context import Context
from .pac_bayes import mag_bound
from .registry import measure
from .search import alpha_search


def alpha(ctx: Context) -> tuple[float, dict]:
    return ctx.memo("alpha", lambda: alpha_search(ctx, magnitude=False))


def alpha_mag(ctx: Context) -> tuple[float, dict]:
    return ctx.memo("alpha_mag", lambda: alpha_search(ctx, magnitude=True))


def _sharpness(ctx: Context, sq_norm: float, a: float) -> float:
    return sq_norm * math.log(2 * ctx.net.omega) / (4 * a ** 2) + math.log(ctx.m / a) + 10


@measure(eq="51", needs=("final", "init", "data"))
def sharpness_init(ctx: Context):
    """‖w−w0‖² log(2ω)/(4α²) + log(m/α) + 10 (Eq. 51; α in the log term, SPEC §4)."""
    a, p = alpha(ctx)
    return _sharpness(ctx, float((ctx.net.w - ctx.w0).double().pow(2).sum()), a), dict(p, alpha=a)


@measure(eq="52", needs=("final", "data"))
def sharpness_orig(ctx: Context):
    """‖w‖² log(2ω)/(4α²) + log(m/α) + 10 (Eq. 52)."""
    a, p = alpha(ctx)
    return _sharpness(ctx, float(ctx.net.w.double().pow(2).sum()), a), dict(p, alpha=a)


@measure(eq="54", needs=("final", "data"))
def sharpness_flatness(ctx: Context):
    """1/α² (Eq. 54)."""
    a, p = alpha(ctx)
    return 1 / a ** 2, dict(p, alpha=a)


def _pac_sharpness(ctx: Context, w0: torch.Tensor, a: float) -> float:
    extra = 4 * math.log(2 * ctx.net.omega / ctx.settings.delta)
    return mag_bound(ctx, w0, a ** 2, extra)


@measure(eq="59", needs=("final", "init", "data"))
def pac_sharpness_mag_init(ctx: Context):
    """¼ Σ log((ε² + (α'² + 4 log(2ω/δ))‖w−w0‖²/ω) / (ε² + α'²(w_i−w0_i)²)) + log(m/δ) + 10
    (Eq. 59)."""
    a, p = alpha_mag(ctx)
    return _pac_sharpness(ctx, ctx.w0, a), dict(p, alpha_mag=a, delta=ctx.settings.delta)


@measure(eq="60", needs=("final", "data"))
def pac_sharpness_mag_orig(ctx: Context):
    """Eq. 59 with w0 = 0 (Eq. 60)."""
    a, p = alpha_mag(ctx)
    return (_pac_sharpness(ctx, torch.zeros_like(ctx.net.w), a),
            dict(p, alpha_mag=a, delta=ctx.settings.delta))


@measure(eq="62", needs=("final", "data"))
def sharpness_mag_flatness(ctx: Context):
    """1/α'² (Eq. 62)."""
    a, p = alpha_mag(ctx)
    return 1 / a ** 2, dict(p, alpha_mag=a)
