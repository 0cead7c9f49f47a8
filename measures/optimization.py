"""Measures of the optimisation itself (App. D: Eqs. 63–66)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .context import Context
from .registry import measure


def _first_step(ctx: Context, threshold: float) -> float | None:
    hit = ctx.trace.filter(ctx.trace["train_loss"] <= threshold)
    return float(hit["step"].min()) if hit.height else None


def _steps(ctx: Context, key: str, threshold: float) -> float:
    """From the run's outcome (fgm's own models: counted on the minibatch losses as
    they trained), else from the trace (a model fgm did not train: the first step
    whose traced loss is at or below the threshold)."""
    value = ctx.outcome.get(key)
    if value is not None:
        return float(value)
    if ctx.trace is not None and key == "steps_to_0.1":
        first = _first_step(ctx, threshold)
        if first is not None:
            return first
    if ctx.trace is not None and key == "steps_0.1_to_0.01" and key not in ctx.outcome:
        start, end = _first_step(ctx, 0.1), _first_step(ctx, 0.01)
        if start is not None and end is not None:
            return end - start
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


def gradient_noise(ctx: Context, w: torch.Tensor) -> float:
    """Σ over parameters of the variance over examples of ∇_w ℓ(f_w(x_i), y_i)
    = (1/m) Σ_i ‖g_i‖² − ‖ḡ‖² at the weights w (Network.gradient_noise: per-example
    gradients layer by layer, from one backward pass per chunk, in float64)."""
    ctx.require_folded("the gradient noise")
    # a chunk's per-example gradients (gradient_chunk) and its autograd graph
    # (graph_batch) both within budget
    chunk = min(ctx.net.gradient_chunk(), ctx.graph_batch())
    return ctx.net.gradient_noise(ctx.x, ctx.y, chunk, w=w)


@measure(eq="65", needs=("epoch1", "data"))
def grad_noise_epoch1(ctx: Context) -> float:
    """Variance over training examples of ∇_w ℓ at the weights after epoch 1 (Eq. 65)."""
    return gradient_noise(ctx, ctx.w_epoch1)


@measure(eq="66", needs=("final", "data"))
def grad_noise_final(ctx: Context) -> float:
    """Variance over training examples of ∇_w ℓ at the final weights (Eq. 66)."""
    return gradient_noise(ctx, ctx.net.w)


@measure(eq="", needs=("final", "data"))
def input_grad_norm(ctx: Context) -> float:
    """Mean over training examples of ‖∇_x ℓ(f_w(x), y)‖₂, the loss's input gradient.

    The paper reports "input grad norm" in its appendix Tables 6, 7, 9 and 10 but gives it no
    equation and no definition (App. D lists 40 measures without it), and SPEC §4 does
    not define it either. Read here, beside the gradient-noise measures (Eqs. 65, 66,
    also cross-entropy gradients at the final weights): the Euclidean norm of the
    gradient of the cross-entropy with respect to the input image (all channels and
    pixels), averaged over the training set, at the final weights of the folded net.
    """
    w, total, b = ctx.net.w, 0.0, ctx.graph_batch()
    for i in range(0, ctx.m, b):
        x = ctx.x[i:i + b].clone().requires_grad_(True)
        # the examples do not interact, so the gradient of the summed loss with
        # respect to example j is the gradient of example j's own loss
        loss = F.cross_entropy(ctx.net.logits(w, x), ctx.y[i:i + b], reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
        total += float(g.double().flatten(1).norm(dim=1).sum())
    return total / ctx.m
