"""Batched measures (issue #12): the σ/σ' draws evaluated by grouped forwards give
the values one forward per draw gives, and the cheaper gradient-noise arithmetic
matches per-example gradients. References here are plain per-network loops."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_model import make_ctx, train_tiny

import fgm.measures.search as search
from fgm.measures.optimization import gradient_noise
from fgm.measures.search import noise_draws, perturbed_accuracies, sigma_search


@pytest.fixture(scope="module")
def model():
    return train_tiny(400)


def test_grouped_forward_gives_each_networks_logits(model):
    ctx = make_ctx(model)
    gen = torch.Generator().manual_seed(5)
    ws = ctx.net.w + 0.05 * torch.randn(5, ctx.net.omega, generator=gen)
    own = ctx.x[torch.randint(0, ctx.m, (5, 7), generator=gen)]
    with torch.no_grad():
        mine = ctx.net.logits_many(ws, own)
        shared = ctx.net.logits_many(ws, ctx.x[:9])
        for b in range(5):
            assert torch.allclose(mine[b], ctx.net.logits(ws[b], own[b]), atol=1e-5)
            assert torch.allclose(shared[b], ctx.net.logits(ws[b], ctx.x[:9]), atol=1e-5)


@pytest.mark.parametrize("budget", [None, 1, 3])   # memory: the default, 1 and 3 draws at once
def test_batched_draw_accuracies_equal_one_forward_per_draw(model, monkeypatch, budget):
    ctx = make_ctx(model, draw_examples=64)
    if budget is not None:
        monkeypatch.setattr(search, "draws_at_once", lambda ctx, examples: budget)
    z, examples = noise_draws(ctx, 1, 0, 10)
    u = 0.08 * z                       # a scale where accuracies spread (not all 1)
    per_draw = perturbed_accuracies(ctx, u, examples, batched=False)
    batched = perturbed_accuracies(ctx, u, examples, batched=True)
    assert len(set(per_draw)) > 1
    assert np.allclose(batched, per_draw, atol=1e-6, rtol=0)
    # on the whole training set (draw_examples 0), evaluated in batches of 150
    ctx = make_ctx(model, draw_examples=0, batch=150)
    ref = [(ctx.net.logits(ctx.net.w + row, ctx.x).argmax(1) == ctx.y).double().mean().item()
           for row in u]
    assert np.allclose(perturbed_accuracies(ctx, u, None, batched=True), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("magnitude", [False, True])
def test_batched_sigma_search_returns_the_unbatched_value_and_params(model, magnitude):
    budget = {"seed": 2, "draws": 256, "stderr_ratio": 0.5}   # the fast budget's draws
    a = sigma_search(make_ctx(model, **budget), magnitude, batched=True)
    b = sigma_search(make_ctx(model, **budget), magnitude, batched=False)
    assert a[0] == pytest.approx(b[0], rel=1e-6, abs=0)
    assert a[1]["forward_passes"] == b[1]["forward_passes"]
    assert a[1]["reached_deviation"] == pytest.approx(b[1]["reached_deviation"], abs=1e-6)


def test_gradient_noise_matches_autograd_per_example_gradients_at_random_weights(model):
    """Both of gradient_noise's ways (Gram matrices, explicit per-example gradients)
    against a loop of autograd calls, far from a minimum (a large mean gradient: the
    difference of two close sums)."""
    ctx = make_ctx(model)
    net = ctx.net
    w = net.w + 0.3 * torch.randn(net.omega, generator=torch.Generator().manual_seed(1))
    x, y = ctx.x[:60], ctx.y[:60]
    grads = []
    for i in range(len(x)):
        wi = w.clone().requires_grad_(True)
        loss = F.cross_entropy(net.logits(wi, x[i:i + 1]), y[i:i + 1])
        grads.append(torch.autograd.grad(loss, wi)[0].double().numpy())
    ref = np.stack(grads).var(axis=0).sum()
    saved, net.w = net.w, w
    try:
        assert gradient_noise(net, x, y, chunk=25) == pytest.approx(ref, rel=1e-6)
    finally:
        net.w = saved
