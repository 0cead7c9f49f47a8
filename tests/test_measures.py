"""Measures against independent references on tiny networks (SPEC §4)."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fgm.measures import list_measures
from fgm.measures.context import Context, Settings
from fgm.measures.network import Network
from fgm.measures.norms import path_norm_value
from fgm.measures.registry import REGISTRY, measure
from fgm.measures.search import project_box, sigma_search, worst_accuracy
from fgm.measures.spectral import spectral_norm_exact, spectral_norm_fft
from fgm.train.data import load_digits
from fgm.train.grid import Config
from fgm.train.loop import train_one
from fgm.train.nin import NiN

FAST = {"stop_cross_entropy": 0.01, "max_steps": 2000, "lr_drop_steps": [1500],
        "lr_drop_factor": 0.1, "estimate_batches": 10, "trace_every": 10}


@pytest.fixture(scope="module")
def trained():
    """A tiny NiN trained to the stop on 150 digits: (final, init, epoch1, x, y, outcome)."""
    d = load_digits()
    x, y = d.x_train[:150], d.y_train[:150]
    from fgm.train.data import Data
    data = Data("digits", x, y, d.x_test[:50], d.y_test[:50], 10, d.info)
    values = {"width": 8, "depth": 2, "dropout": 0.0, "batch_size": 32, "optimizer": "adam",
              "learning_rate": 3e-3, "weight_decay": 0.0}
    r = train_one(Config(values, {a: 0 for a in values}), data, FAST, 0, torch.device("cpu"))
    nets = {}
    for role, state in (("final", r.final_state), ("init", r.init_state),
                        ("epoch1", r.epoch1_state)):
        nets[role] = NiN(1, 10, 8, 2)
        nets[role].load_state_dict(state)
    return nets, x, y, r.outcome


def make_ctx(trained, **settings) -> Context:
    nets, x, y, outcome = trained
    return Context.from_models(nets["final"], x, y, 10, init=nets["init"], epoch1=nets["epoch1"],
                               outcome=outcome, settings=Settings(**settings))


def random_bn(model: NiN, seed=0) -> NiN:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))
    return model.eval()


# --------------------------------------------------------------------------- folding

@pytest.mark.parametrize("depth,size", [(1, 8), (2, 8), (3, 32)])
def test_folded_and_unfolded_networks_give_the_same_logits(depth, size):
    torch.manual_seed(depth)
    model = random_bn(NiN(3, 10, 12, depth, dropout=0.5), seed=depth)
    x = torch.randn(5, 3, size, size)
    with torch.no_grad():
        ref = model(x)
        net = Network.from_module(model, x)
        ours = net.logits(net.w, x)
    assert net.d == 3 * depth + 1 and net.folded
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def numpy_fold(state: dict, depth: int) -> list[np.ndarray]:
    """Folded kernels from the raw state dict, by hand."""
    out = []
    for b in range(depth):
        for j in range(3):
            conv, bn = f"features.{b * 10 + 3 * j}", f"features.{b * 10 + 3 * j + 1}"
            scale = state[f"{bn}.weight"].numpy() / np.sqrt(state[f"{bn}.running_var"].numpy()
                                                            + 1e-5)
            out.append(state[f"{conv}.weight"].numpy() * scale[:, None, None, None])
    out.append(state["classifier.weight"].numpy())
    return out


def test_norm_measures_against_numpy_on_the_state_dict():
    torch.manual_seed(0)
    final, init = random_bn(NiN(1, 10, 6, 2), 1), random_bn(NiN(1, 10, 6, 2), 2)
    x = torch.randn(20, 1, 8, 8)
    ctx = Context.from_models(final, x, torch.zeros(20, dtype=torch.long), 10, init=init)
    w_ref = numpy_fold(final.state_dict(), 2)
    w0_ref = numpy_fold(init.state_dict(), 2)
    fro_ref = [float((w.astype(np.float64) ** 2).sum()) for w in w_ref]
    dist_ref = sum(float(((a.astype(np.float64) - b) ** 2).sum())
                   for a, b in zip(w_ref, w0_ref, strict=True))
    params_ref = sum(w.shape[-1] ** 2 * w.shape[1] * (w.shape[0] + 1) for w in w_ref)
    d = len(w_ref)
    assert REGISTRY["param_norm"].fn(ctx) == pytest.approx(sum(fro_ref), rel=1e-5)
    assert REGISTRY["frobenius_distance"].fn(ctx) == pytest.approx(dist_ref, rel=1e-5)
    assert REGISTRY["num_params"].fn(ctx) == params_ref
    assert REGISTRY["prod_of_fro"].fn(ctx) == pytest.approx(np.prod(fro_ref), rel=1e-5)
    value, params = REGISTRY["sum_of_fro"].fn(ctx)
    assert value == pytest.approx(d * np.prod(fro_ref) ** (1 / d), rel=1e-5)
    assert params["d"] == d == 7


def test_distance_to_initialisation_is_zero_at_initialisation():
    model = random_bn(NiN(1, 10, 6, 2), 3)
    ctx = Context.from_models(model, torch.randn(10, 1, 8, 8), torch.zeros(10, dtype=torch.long),
                              10, init=model)
    assert REGISTRY["frobenius_distance"].fn(ctx) == 0.0
    assert REGISTRY["dist_spec_init"].fn(ctx)[0] == 0.0


# --------------------------------------------------------------------------- spectral

def circular_conv_matrix(kernel: np.ndarray, n: int) -> np.ndarray:
    """The matrix of y[o,i,j] = Σ K[o,c,a,b] x[c,(i+a) mod n,(j+b) mod n], built column by column."""
    c_out, c_in, k, _ = kernel.shape
    cols = []
    for c in range(c_in):
        for p in range(n):
            for q in range(n):
                x = np.zeros((c_in, n, n))
                x[c, p, q] = 1.0
                y = np.zeros((c_out, n, n))
                for a in range(k):
                    for b in range(k):
                        shifted = np.roll(np.roll(x, -a, axis=1), -b, axis=2)
                        y += np.einsum("oc,cij->oij", kernel[:, :, a, b], shifted)
                cols.append(y.ravel())
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("c_out,c_in,k,n", [(3, 2, 3, 5), (4, 4, 1, 4), (2, 3, 3, 7),
                                            # kernels larger than their input: 3x3 on
                                            # 1x1, 2x2 and 3x3 maps (deep nets' last blocks)
                                            (3, 2, 3, 1), (2, 3, 3, 2), (4, 2, 3, 3)])
def test_fft_spectral_norm_against_svd_of_the_explicit_convolution(c_out, c_in, k, n):
    kernel = np.random.default_rng(c_out + n).normal(size=(c_out, c_in, k, k))
    ref = np.linalg.svd(circular_conv_matrix(kernel, n), compute_uv=False)[0]
    assert spectral_norm_fft(torch.tensor(kernel), n) == pytest.approx(ref, rel=1e-9)


def strided_conv_matrix(kernel: torch.Tensor, stride: int, pad: int, n: int) -> np.ndarray:
    c_in = kernel.shape[1]
    eye = torch.eye(c_in * n * n, dtype=torch.float64).reshape(-1, c_in, n, n)
    return F.conv2d(eye, kernel.double(), None, stride, pad).reshape(len(eye), -1).T.numpy()


@pytest.mark.parametrize("stride,pad,k,n", [(2, 1, 3, 8), (1, 1, 3, 6), (1, 0, 1, 5),
                                            (2, 1, 3, 1)])
def test_power_iteration_against_svd_of_the_true_strided_padded_operator(stride, pad, k, n):
    kernel = torch.tensor(np.random.default_rng(k * n).normal(size=(4, 3, k, k)))
    ref = np.linalg.svd(strided_conv_matrix(kernel, stride, pad, n), compute_uv=False)[0]
    assert spectral_norm_exact(kernel, stride, pad, n, iterations=2000) == pytest.approx(
        ref, rel=1e-6)
    if stride == 1 and k == 1:   # no padding effects: FFT and exact agree
        assert spectral_norm_fft(kernel, n) == pytest.approx(ref, rel=1e-9)


def test_spectral_norm_is_not_the_reshaped_kernel_norm():
    kernel = torch.tensor(np.random.default_rng(0).normal(size=(4, 3, 3, 3)))
    reshaped = torch.linalg.matrix_norm(kernel.reshape(4, -1), ord=2).item()
    assert abs(spectral_norm_fft(kernel, 8) - reshaped) > 1e-3


# --------------------------------------------------------------------------- path norm, margin

@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_path_norm_against_enumeration_of_every_path(kind):
    rng = np.random.default_rng(4)
    w1, b1 = rng.normal(size=(5, 3)), rng.normal(size=5)      # hidden x input
    w2, b2 = rng.normal(size=(4, 5)), rng.normal(size=4)      # output x hidden
    if kind == "conv":     # 1x1 convolutions on a 1x1 input
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 1), torch.nn.ReLU(),
                                    torch.nn.Conv2d(5, 4, 1), torch.nn.Flatten())
    else:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 5),
                                    torch.nn.ReLU(), torch.nn.Linear(5, 4))
    first, second = (m for m in model if isinstance(m, torch.nn.Conv2d | torch.nn.Linear))
    model = model.double()
    with torch.no_grad():
        for m, w, b in ((first, w1, b1), (second, w2, b2)):
            m.weight.copy_(torch.tensor(w).reshape(m.weight.shape))
            m.bias.copy_(torch.tensor(b))
    net = Network.from_module(model, torch.zeros(1, 3, 1, 1, dtype=torch.float64))
    total = 0.0
    for o in range(4):
        total += b2[o] ** 2                                   # path: output bias
        for h in range(5):
            total += b1[h] ** 2 * w2[o, h] ** 2               # path: hidden bias -> output
            for i in range(3):
                total += w1[h, i] ** 2 * w2[o, h] ** 2        # path: input -> hidden -> output
    assert path_norm_value(net, net.w, (3, 1, 1)) == pytest.approx(total, rel=1e-12)


def test_path_norm_of_a_deep_net_with_small_batchnorm_variances_is_finite():
    """25 folded layers of width 96, every BatchNorm with running variance 1e-4: each
    layer multiplies the path norm by ~3000, past float32's 3.4e38. Against the product
    of the squared centre taps in numpy float64 (1x1 input: only they see it)."""
    torch.manual_seed(0)
    model = NiN(3, 10, 96, 8).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.fill_(1e-4)
    state = {k: v.double().numpy() for k, v in model.state_dict().items()}
    h = np.ones(3)
    for b in range(8):
        for j in range(3):
            conv, bn = f"features.{b * 10 + 3 * j}", f"features.{b * 10 + 3 * j + 1}"
            scale = state[f"{bn}.weight"] / np.sqrt(state[f"{bn}.running_var"] + 1e-5)
            kernel = state[f"{conv}.weight"]
            w = kernel[:, :, kernel.shape[2] // 2, kernel.shape[3] // 2] * scale[:, None]
            bias = (state[f"{conv}.bias"] - state[f"{bn}.running_mean"]) * scale \
                + state[f"{bn}.bias"]
            h = w ** 2 @ h + bias ** 2
    ref = float((state["classifier.weight"][:, :, 0, 0] ** 2 @ h
                 + state["classifier.bias"] ** 2).sum())
    assert 1e38 < ref < 1e300
    ctx = Context.from_models(model, torch.zeros(2, 3, 1, 1), torch.zeros(2, dtype=torch.long),
                              10)
    # folding itself is float32 (its rounding, ~1e-7 a layer, is all that differs)
    assert REGISTRY["path_norm"].fn(ctx)[0] == pytest.approx(ref, rel=1e-6)


def test_margin_is_the_signed_tenth_percentile(trained):
    ctx = make_ctx(trained)
    f = ctx.train_logits().double().numpy()
    y = ctx.y.numpy()
    margins = sorted(f[i, y[i]] - max(f[i, j] for j in range(10) if j != y[i])
                     for i in range(len(y)))
    pos = 0.1 * (len(margins) - 1)
    lo = math.floor(pos)
    ref = margins[lo] + (pos - lo) * (margins[lo + 1] - margins[lo])
    assert ctx.margin() == pytest.approx(ref, rel=1e-9)
    # signed: flip the labels and the margin must go negative, not stay positive
    bad = dataclasses.replace(ctx, y=(ctx.y + 1) % 10, cache={})
    assert bad.margin() < 0


# --------------------------------------------------------------------------- searches

def test_sigma_search_hits_its_target_and_noise_lowers_accuracy_monotonically(trained):
    ctx = make_ctx(trained)
    w, base = ctx.net.w, ctx.accuracy()
    gen = torch.Generator().manual_seed(0)
    devs = [base - np.mean([ctx.accuracy(w + s * torch.randn(w.shape, generator=gen))
                            for _ in range(16)]) for s in (0.01, 0.05, 0.2, 1.0)]
    assert all(b >= a - 0.02 for a, b in zip(devs, devs[1:], strict=False))
    assert devs[-1] > devs[0] + 0.3
    sigma, params = sigma_search(ctx, magnitude=False)
    assert params["converged"] and abs(params["reached_deviation"] - 0.1) <= 0.01 + 1e-12
    assert params["deviation_stderr"] <= 0.01 / 4 and params["draws_used"] <= params["draws"]


def test_alpha_search_is_ascent_worse_than_random_noise_of_the_same_radius(trained):
    ctx = make_ctx(trained)
    w = ctx.net.w
    gen = torch.Generator().manual_seed(1)
    alpha = 0.5 * float(w.norm()) / 10
    random = []
    for _ in range(10):
        u = torch.randn(w.shape, generator=gen)
        random.append(ctx.accuracy(w + alpha * u / u.norm()))
    worst = worst_accuracy(ctx, alpha, magnitude=False, gen=torch.Generator().manual_seed(2))
    assert worst < min(random) - 0.05


def test_magnitude_aware_box_never_flips_a_sign():
    w = torch.tensor([0.5, -0.2, 1e-3, -3.0, 0.0])
    for alpha in (0.1, 0.5, 0.99):
        half = alpha * w.abs() + 0.0          # ε → 0
        u = project_box(torch.tensor([-10.0, 10.0, -5.0, 7.0, 1.0]), half)
        nonzero = w != 0
        assert torch.all(torch.sign(w + u)[nonzero] == torch.sign(w)[nonzero])
        assert torch.all(u.abs() <= half + 1e-12)


# --------------------------------------------------------------------------- registry

def test_registry_covers_spec_section_4():
    names = {s.name for s in list_measures()}
    spec = {"vc_dim", "num_params", "cross_entropy", "inverse_margin", "neg_entropy",
            "spectral_init", "spectral_orig", "spectral_init_main", "spectral_orig_main",
            "prod_of_spec_over_margin", "prod_of_spec", "fro_over_spec",
            "sum_of_spec_over_margin", "sum_of_spec", "prod_of_fro_over_margin", "prod_of_fro",
            "sum_of_fro_over_margin", "sum_of_fro", "frobenius_distance", "dist_spec_init",
            "param_norm", "path_norm_over_margin", "path_norm", "fisher_rao", "pacbayes_init",
            "pacbayes_orig", "sharpness_init", "sharpness_orig", "pacbayes_flatness",
            "sharpness_flatness", "pacbayes_mag_init", "pacbayes_mag_orig",
            "pac_sharpness_mag_init", "pac_sharpness_mag_orig", "pacbayes_mag_flatness",
            "sharpness_mag_flatness", "steps_to_0.1_loss", "steps_0.1_to_0.01_loss",
            "grad_noise_epoch1", "grad_noise_final"}
    # and one beyond App. D's list that the paper's appendix tables report
    assert names == spec | {"input_grad_norm"}
    assert {s.name for s in list_measures("*spec*")} >= {"prod_of_spec", "dist_spec_init"}
    assert REGISTRY["path_norm"].eq == "44" and REGISTRY["path_norm"].family == "norms"


def test_a_duplicate_measure_name_is_an_error():
    with pytest.raises(ValueError, match="registered twice"):
        @measure(eq="0", name="path_norm")
        def anything(ctx):
            return 0.0


@pytest.mark.parametrize("name", sorted(s.name for s in list_measures()))
def test_every_registered_measure_is_finite_and_reproducible(trained, name):
    a = REGISTRY[name].fn(make_ctx(trained))
    b = REGISTRY[name].fn(make_ctx(trained))
    va, vb = (a[0] if isinstance(a, tuple) else a), (b[0] if isinstance(b, tuple) else b)
    assert math.isfinite(va) and va == vb
    if isinstance(a, tuple):
        json.dumps(a[1], default=str)   # params are storable


def test_cross_entropy_matches_training_and_fisher_rao_matches_a_loop(trained):
    ctx = make_ctx(trained)
    nets, x, y, outcome = trained
    assert REGISTRY["cross_entropy"].fn(ctx) == pytest.approx(outcome["train_loss"], rel=1e-4)
    total = 0.0
    for i in range(len(x)):                    # ⟨w, ∇ℓ_i⟩ one example at a time
        w = ctx.net.w.clone().requires_grad_(True)
        loss = F.cross_entropy(ctx.net.logits(w, x[i:i + 1]), y[i:i + 1])
        (g,) = torch.autograd.grad(loss, w)
        total += float(torch.dot(w.detach(), g)) ** 2
    ref = (ctx.d + 1) ** 2 / len(x) * total
    value, params = REGISTRY["fisher_rao"].fn(ctx)
    assert value == pytest.approx(ref, rel=1e-4) and params["d"] == ctx.d == 7


def test_grad_noise_matches_per_example_loop(trained):
    ctx = make_ctx(trained)
    grads = []
    for i in range(len(ctx.x)):
        w = ctx.net.w.clone().requires_grad_(True)
        loss = F.cross_entropy(ctx.net.logits(w, ctx.x[i:i + 1]), ctx.y[i:i + 1])
        grads.append(torch.autograd.grad(loss, w)[0].double().numpy())
    ref = np.stack(grads).var(axis=0).sum()
    assert REGISTRY["grad_noise_final"].fn(ctx) == pytest.approx(ref, rel=1e-6)




def test_input_grad_norm_matches_autograd_on_the_unfolded_network(trained):
    """The reference: the trained nn.Module itself (BatchNorm not folded), one example
    at a time, plain autograd; fgm's value comes from the folded net in batches of 64,
    so a batch boundary and the folding are both crossed."""
    nets, x, y, _ = trained
    model = nets["final"].eval()
    norms = []
    for i in range(len(x)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        loss = F.cross_entropy(model(xi), y[i:i + 1])
        (g,) = torch.autograd.grad(loss, xi)
        norms.append(float(g.double().pow(2).sum().sqrt()))
    ref = float(np.mean(norms))
    assert ref > 0
    ours = REGISTRY["input_grad_norm"].fn(make_ctx(trained, batch=64))
    assert ours == pytest.approx(ref, rel=1e-4)
