"""Batched measures (issue #12): the σ/σ' draws evaluated by grouped forwards give
the values one forward per draw gives, and the cheaper gradient-noise arithmetic
matches per-example gradients. References here are plain per-network loops."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_model import make_ctx, train_tiny

import fgm.measures.search as search
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


def _ascent_outcome(ctx, magnitude, batched, alpha, stop_below, restarts, warm_from):
    """One Ascent.worst_accuracy call and everything it leaves behind."""
    ascent = search.Ascent(ctx, magnitude, ctx.generator(7), batched=batched)
    if warm_from is not None:    # a worst perturbation from an earlier radius
        ascent.worst_accuracy(warm_from, restarts=1)
    worst = ascent.worst_accuracy(alpha, stop_below=stop_below, restarts=restarts)
    after = torch.rand(3, generator=ascent.gen)      # the generator's state, as drawn next
    return worst, ascent.best, ascent.gradients, ascent.passes, after


@pytest.mark.parametrize("magnitude,alpha", [(False, 1.5), (True, 0.04)])
@pytest.mark.parametrize("ascent_batch,batch,rows", [
    (0, 2048, None),    # the full set in one piece, every restart in one forward
    (0, 150, 3),        # the full set in pieces of 150 // rows, groups of 3 restarts
    (64, 2048, None),   # minibatches of 64
    (64, 2048, 1)])     # ... one restart at a time
def test_restarts_side_by_side_equal_restarts_one_after_another(model, monkeypatch, magnitude,
                                                                alpha, ascent_batch, batch,
                                                                rows):
    """Every way a call can end: no witness, restart 0 finds one at once, a later
    restart finds one (the side-by-side run drops the rest), with and without a
    warm start. Same worst accuracy, kept perturbation, counts and generator."""
    if rows is not None:   # as if the memory budget held this many restarts
        monkeypatch.setattr(search.Ascent, "rows_at_once", lambda self: rows)
    ctx = make_ctx(model, ascent_steps=6, ascent_batch=ascent_batch, batch=batch)
    base = ctx.accuracy()
    ref = _ascent_outcome(ctx, magnitude, False, alpha, -1.0, 4, None)
    assert ref[0] < base - 0.02                      # the ascent does lower the accuracy
    stops = [-1.0, 2.0, ref[0] + 1e-9, (ref[0] + base) / 2]
    witnessed_late = 0
    for stop_below in stops:
        for warm_from in (None, alpha / 2):
            one = _ascent_outcome(ctx, magnitude, False, alpha, stop_below, 4, warm_from)
            side = _ascent_outcome(ctx, magnitude, True, alpha, stop_below, 4, warm_from)
            assert side[0] == pytest.approx(one[0], abs=1e-6)
            # the box's steps follow sign(gradient): a coordinate whose gradient is 0 up
            # to rounding may step the other way, so a few coordinates may differ
            # (and the set cut into other pieces adds its gradients in another order)
            tol = 1e-5 if batch >= ctx.m else 3e-4
            off = ~torch.isclose(side[1], one[1], atol=tol, rtol=1e-4)
            assert off.sum() <= (one[1].numel() // 1000 if magnitude else 0)
            assert side[2:4] == one[2:4]
            assert torch.equal(side[4], one[4])
            steps_per_restart = 6 + (ascent_batch == 0)   # iterates checked, and the last
            witnessed_late += one[2] > steps_per_restart  # a restart after the first ran
    assert witnessed_late > 0


def test_restarts_that_run_out_of_memory_side_by_side_run_one_after_another(model,
                                                                           monkeypatch):
    ctx = make_ctx(model, ascent_steps=4)
    ref = _ascent_outcome(ctx, False, False, 1.5, -1.0, 3, None)
    def out_of_memory(self, *args):
        # as at a first step's forward: the restarts' random starts drawn, then it fails
        torch.rand(3, ctx.net.omega, generator=self.gen)
        raise torch.OutOfMemoryError("CUDA out of memory (as on a device)")

    monkeypatch.setattr(search.Ascent, "_worst_side_by_side", out_of_memory)
    got = _ascent_outcome(ctx, False, True, 1.5, -1.0, 3, None)
    assert got[0] == ref[0] and torch.equal(got[1], ref[1]) and got[2:4] == ref[2:4]
    assert torch.equal(got[4], ref[4])


def test_a_full_batch_ascent_step_goes_through_the_set_in_batches(model):
    """--set ascent_batch=0 on a large set: the gradient is added up over evaluation
    batches (memory of one batch), equal to the gradient of the whole set at once."""
    gen = torch.Generator().manual_seed(3)
    whole = make_ctx(model, ascent_batch=0, batch=100_000)
    u = 0.05 * torch.randn(whole.net.omega, generator=gen)
    rows = 0.05 * torch.randn(3, whole.net.omega, generator=gen)
    x = u.clone().requires_grad_(True)
    loss = F.cross_entropy(whole.net.logits(whole.net.w + x, whole.x), whole.y)
    (ref,) = torch.autograd.grad(loss, x)
    ref_acc = whole.accuracy(whole.net.w + u)
    for batch in (100_000, 37):
        ctx = make_ctx(model, ascent_batch=0, batch=batch)
        ascent = search.Ascent(ctx, False, ctx.generator(3))
        g, acc = ascent._gradient(u)
        assert torch.allclose(g(), ref, rtol=1e-4, atol=1e-7) and acc == [ref_acc]
        gs, accs = ascent._gradient(rows)          # a stack: each row its own
        gs = gs()
        for r in range(3):
            one, one_acc = ascent._gradient(rows[r])
            assert torch.allclose(gs[r], one(), rtol=1e-4, atol=1e-7)
            assert accs[r] == pytest.approx(one_acc[0], abs=1e-12)


@pytest.mark.parametrize("magnitude", [False, True])
def test_batched_alpha_search_returns_the_unbatched_value_and_params(model, magnitude):
    budget = {"seed": 1, "restarts": 2, "confirm_restarts": 3, "ascent_steps": 5}
    a = search.alpha_search(make_ctx(model, **budget), magnitude, batched=True)
    b = search.alpha_search(make_ctx(model, **budget), magnitude, batched=False)
    assert a[0] == pytest.approx(b[0], rel=1e-6, abs=0)
    assert a[1] == pytest.approx(b[1], abs=1e-6)


def test_gradient_noise_matches_autograd_per_example_gradients_at_random_weights(model):
    """Both of gradient_noise's ways (Gram matrices, explicit per-example gradients)
    against a loop of autograd calls, far from a minimum (a large mean gradient: the
    difference of two close sums)."""
    ctx = make_ctx(model)
    net = ctx.net
    w = net.w + 0.3 * torch.randn(net.omega, generator=torch.Generator().manual_seed(1))
    assert net.gradient_chunk() == 512          # the measures' chunk; 25 here crosses chunks
    x, y = ctx.x[:60], ctx.y[:60]
    grads = []
    for i in range(len(x)):
        wi = w.clone().requires_grad_(True)
        loss = F.cross_entropy(net.logits(wi, x[i:i + 1]), y[i:i + 1])
        grads.append(torch.autograd.grad(loss, wi)[0].double().numpy())
    ref = np.stack(grads).var(axis=0).sum()
    assert net.gradient_noise(x, y, 25, w=w) == pytest.approx(ref, rel=1e-6)
    assert net.gradient_noise(x, y, 7, w=w, method="func") == pytest.approx(ref, rel=1e-6)
