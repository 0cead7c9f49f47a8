"""Measures on the network's outputs over the training set (App. D: Eqs. 21–23, 45)."""

from __future__ import annotations

import torch.nn.functional as F
from torch.func import jvp

from .context import Context
from .registry import measure


@measure(eq="21", needs=("final", "data"))
def cross_entropy(ctx: Context) -> float:
    """Mean training cross-entropy (Eq. 21)."""
    return float(F.cross_entropy(ctx.train_logits().double(), ctx.y))


@measure(eq="22", needs=("final", "data"))
def inverse_margin(ctx: Context):
    """1/γ², γ the 10th percentile of the signed margin (Eq. 22)."""
    gamma = ctx.margin()
    return 1.0 / gamma ** 2, {"margin": gamma, "percentile": 10}


@measure(eq="23", needs=("final", "data"))
def neg_entropy(ctx: Context) -> float:
    """(1/m) Σ_i Σ_j p_i[j] log p_i[j] (Eq. 23)."""
    logp = F.log_softmax(ctx.train_logits().double(), dim=1)
    return float((logp.exp() * logp).sum(dim=1).mean())


@measure(eq="45", needs=("final", "data"))
def fisher_rao(ctx: Context):
    """((d+1)²/m) Σ_i ⟨w, ∇_w ℓ(f_w(X_i), y_i)⟩² (Eq. 45).

    ⟨w, ∇_w ℓ_i⟩ is the derivative of ℓ_i along w: one forward-mode pass (jvp)
    gives it for every example of a batch at once."""
    ctx.require_folded("the Fisher–Rao norm")
    w = ctx.net.w
    total, b = 0.0, ctx.graph_batch()
    for i in range(0, ctx.m, b):
        xb, yb = ctx.x[i:i + b], ctx.y[i:i + b]
        def losses(v, xb=xb, yb=yb):
            return F.cross_entropy(ctx.net.logits(v, xb), yb, reduction="none")
        _, directional = jvp(losses, (w,), (w,))
        total += float(directional.double().pow(2).sum())
    return (ctx.d + 1) ** 2 / ctx.m * total, ctx.layer_params()
