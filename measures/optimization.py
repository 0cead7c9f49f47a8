"""Measures of the optimisation itself (App. D: Eqs. 63–66)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

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
    """Σ over parameters of the variance over examples of ∇_w ℓ(f_w(x_i), y_i)
    = (1/m) Σ_i ‖g_i‖² − ‖ḡ‖².

    Per-example gradients come layer by layer, without a loop over examples:
    one backward pass gives each layer's output gradient δ_i (o × P positions)
    for every example, and a convolution's weight gradient for example i is
    G_i = δ_i U_iᵀ, U_i its unfolded input (c·k² × P); its bias gradient, δ_i
    summed over positions. ‖G_i‖² = ⟨δ_iᵀδ_i, U_iᵀU_i⟩ (two P × P Gram
    matrices) where P² (o + c·k²) < o·c·k·P, as in the deep layers of a strided
    net: G_i itself is never formed there. All of it in float64 (the difference
    of two sums that can be close)."""
    params = net.split(net.w)
    sum_sq = torch.zeros((), dtype=torch.float64, device=net.w.device)
    grad_sum = [(torch.zeros_like(w, dtype=torch.float64), torch.zeros_like(b, dtype=torch.float64))
                for w, b in params]
    for i in range(0, len(x), chunk):
        inputs, outputs = [], []
        h = x[i:i + chunk]
        for j, ((w, b), (_, stride, pad)) in enumerate(zip(params, net.meta, strict=True)):
            inputs.append(h)
            z = F.conv2d(h, w, b, stride, pad)
            if j == 0:
                z = z.detach().requires_grad_(True)
            outputs.append(z)
            h = F.relu(z) if j < len(params) - 1 else z
        loss = F.cross_entropy(h.mean(dim=(2, 3)), y[i:i + chunk], reduction="sum")
        deltas = torch.autograd.grad(loss, outputs)
        for j, (shape, stride, pad) in enumerate(net.meta):
            k = shape[-1]
            unfolded = F.unfold(inputs[j].detach(), k, padding=pad, stride=stride).double()
            delta = deltas[j].flatten(2).double()                        # (b, o, P)
            o, ck, positions = delta.shape[1], unfolded.shape[1], delta.shape[2]
            if positions * (o + ck) < o * ck:      # Gram matrices: (b, P, P) each
                sum_sq += torch.einsum("bpq,bpq->", delta.transpose(1, 2) @ delta,
                                       unfolded.transpose(1, 2) @ unfolded)
            else:                                  # the per-example gradients: (b, o, c·k²)
                sum_sq += (delta @ unfolded.transpose(1, 2)).pow(2).sum()
            g_b = delta.sum(2)                                           # (b, o)
            sum_sq += g_b.pow(2).sum()
            grad_sum[j][0].view(-1).add_(torch.einsum("bop,bkp->ok", delta, unfolded)
                                         .reshape(-1))
            grad_sum[j][1].add_(g_b.sum(0))
    m = len(x)
    mean_sq = sum(float(gw.pow(2).sum() + gb.pow(2).sum()) for gw, gb in grad_sum) / m ** 2
    return float(sum_sq) / m - mean_sq


def _chunk(net: FlatNet) -> int:
    widest = max(int(np.prod(shape)) for shape, _, _ in net.meta)
    return max(1, min(512, 20_000_000 // widest))   # per-example gradients of one layer: ~160 MB


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
    w, total = ctx.net.w, 0.0
    for i in range(0, ctx.m, ctx.settings.batch):
        x = ctx.x[i:i + ctx.settings.batch].clone().requires_grad_(True)
        # the examples do not interact, so the gradient of the summed loss with
        # respect to example j is the gradient of example j's own loss
        loss = F.cross_entropy(ctx.net.logits(w, x), ctx.y[i:i + ctx.settings.batch],
                               reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
        total += float(g.double().flatten(1).norm(dim=1).sum())
    return total / ctx.m
