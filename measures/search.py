"""The perturbation searches of Appendix E: σ by Monte Carlo (Algorithm 2) and
α by gradient ASCENT with projection (Algorithm 3), both by bisection.

Each finds the largest scale whose perturbation lowers the training accuracy
by `target_deviation` (0.1) from the model's own, within `tolerance`. Every
budget used is returned with the value, to be stored in `measures.params`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .context import Context


def _bisect(ctx: Context, deviation: Callable[[float], float], upper: float) -> tuple[float, dict]:
    s = ctx.settings
    hi, expansions = upper, 0
    dev_hi = deviation(hi)
    while dev_hi < s.target_deviation and expansions < 30:   # make sure hi is past the target
        hi *= 2.0
        expansions += 1
        dev_hi = deviation(hi)
    if dev_hi < s.target_deviation:
        raise ValueError(f"the training accuracy never dropped by {s.target_deviation} "
                         f"(reached {dev_hi:.3f} at scale {hi:g}); is the model trained?")
    lo, mid, dev, steps = 0.0, hi, dev_hi, 0
    for steps in range(1, s.bisection_steps + 1):  # noqa: B007 - steps is reported
        mid = (lo + hi) / 2
        dev = deviation(mid)
        if abs(dev - s.target_deviation) <= s.tolerance:
            break
        if dev > s.target_deviation:
            hi = mid
        else:
            lo = mid
    return mid, {"target_deviation": s.target_deviation, "tolerance": s.tolerance,
                 "bisection_steps": s.bisection_steps, "bisection_steps_used": steps,
                 "upper_bound": upper * 2 ** expansions, "reached_deviation": dev,
                 "seed": s.seed}


def sigma_search(ctx: Context, magnitude: bool) -> tuple[float, dict]:
    """Algorithm 2. Noise N(0, σ²) on every weight, or with magnitude=True the
    per-weight std √(σ'² w_i² + ε²). Expected accuracy over `draws` samples."""
    s = ctx.settings
    w = ctx.net.w
    base = ctx.accuracy()
    gen = ctx.generator(2 if magnitude else 1)
    passes = 0

    def deviation(sigma: float) -> float:
        nonlocal passes
        std = torch.sqrt(sigma ** 2 * w ** 2 + s.eps ** 2) if magnitude else sigma
        accs = [ctx.accuracy(w + std * torch.randn(w.shape, generator=gen, device=w.device,
                                                   dtype=w.dtype)) for _ in range(s.draws)]
        passes += s.draws
        return base - sum(accs) / len(accs)

    sigma, params = _bisect(ctx, deviation, upper=1.0)
    return sigma, dict(params, draws=s.draws, forward_passes=passes, model_accuracy=base,
                       magnitude_aware=magnitude, eps=s.eps if magnitude else None)


def project_ball(u: torch.Tensor, radius: float) -> torch.Tensor:
    norm = u.norm()
    return u * (radius / norm) if norm > radius else u


def project_box(u: torch.Tensor, half_width: torch.Tensor) -> torch.Tensor:
    return torch.maximum(torch.minimum(u, half_width), -half_width)


def worst_accuracy(ctx: Context, alpha: float, magnitude: bool, gen: torch.Generator) -> float:
    """The lowest training accuracy gradient ascent finds inside the set of radius α:
    the ℓ2 ball ‖u‖ ≤ α, or with magnitude=True the box |u_i| ≤ α|w_i| + ε."""
    s = ctx.settings
    w = ctx.net.w
    half = alpha * w.abs() + s.eps if magnitude else None
    worst = float("inf")
    for _ in range(s.restarts):
        # start off the flat minimum with uniform noise inside the set (App. E)
        r = torch.rand(w.shape, generator=gen, device=w.device, dtype=w.dtype) * 2 - 1
        u = r * half if magnitude else r * alpha / w.numel() ** 0.5
        for _ in range(s.ascent_steps):
            idx = torch.randint(0, ctx.m, (min(s.ascent_batch, ctx.m),), generator=gen,
                                device=w.device)
            u = u.detach().requires_grad_(True)
            loss = F.cross_entropy(ctx.net.logits(w + u, ctx.x[idx]), ctx.y[idx])
            (g,) = torch.autograd.grad(loss, u)
            with torch.no_grad():   # ASCENT: move up the loss, then back into the set
                if magnitude:
                    u = project_box(u + s.ascent_lr * half * g.sign(), half)
                else:
                    step = s.ascent_lr * alpha * g / g.norm().clamp_min(1e-30)
                    u = project_ball(u + step, alpha)
        worst = min(worst, ctx.accuracy(w + u.detach()))
    return worst


def alpha_search(ctx: Context, magnitude: bool) -> tuple[float, dict]:
    """Algorithm 3, with gradient ascent on the cross-entropy as the surrogate."""
    s = ctx.settings
    base = ctx.accuracy()
    gen = ctx.generator(4 if magnitude else 3)
    evaluations = 0

    def deviation(alpha: float) -> float:
        nonlocal evaluations
        evaluations += 1
        return base - worst_accuracy(ctx, alpha, magnitude, gen)

    alpha, params = _bisect(ctx, deviation, upper=1.0 if magnitude else 5.0)
    return alpha, dict(params, restarts=s.restarts, ascent_steps=s.ascent_steps,
                       ascent_batch=s.ascent_batch, ascent_lr=s.ascent_lr,
                       evaluations=evaluations, model_accuracy=base, magnitude_aware=magnitude,
                       eps=s.eps if magnitude else None)
