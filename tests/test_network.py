"""The network protocol (measures/network.py) every measure uses: for fgm's NiN it
gives what the former NiN-only fold() / FlatNet / gradient_noise gave (kept here as
references, with the norm, spectral and path-norm arithmetic the measures had on
them); for ResNet, VGG and MLP shapes its logits are the eval-mode model's and every
measure is finite or fails with its reason; unfoldable BatchNorms are reported, and
unsupported parts refused by name."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgm.measures import list_measures
from fgm.measures.context import Context, Settings
from fgm.measures.network import Network, UnsupportedNetwork
from fgm.measures.norms import path_norm_value
from fgm.measures.runner import run_one
from fgm.train.nin import NiN

torch.set_num_threads(1)
REGISTRY = {spec.name: spec for spec in list_measures()}   # every family imported


# ------------------------------------------------------------------ the former NiN path

@dataclasses.dataclass
class Layer:
    weight: torch.Tensor   # (c_out, c_in, k, k)
    bias: torch.Tensor
    stride: int
    padding: int


def fold(model: NiN) -> list[Layer]:
    """The NiN's weight layers after folding, as measures/fold.py had them."""
    layers, mods = [], list(model.features)
    for i, m in enumerate(mods):
        if not isinstance(m, nn.Conv2d):
            continue
        bn = mods[i + 1]
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        w = m.weight.detach() * scale[:, None, None, None]
        b0 = m.bias.detach() if m.bias is not None else torch.zeros_like(bn.running_mean)
        b = (b0 - bn.running_mean) * scale + bn.bias.detach()
        layers.append(Layer(w.clone(), b.clone(), m.stride[0], m.padding[0]))
    c = model.classifier
    layers.append(Layer(c.weight.detach().clone(), c.bias.detach().clone(), 1, 0))
    return layers


def input_sizes(layers: list[Layer], size: int) -> list[int]:
    out = []
    for layer in layers:
        out.append(size)
        size = (size + 2 * layer.padding - layer.weight.shape[-1]) // layer.stride + 1
    return out


class FlatNet:
    """The folded NiN as a function of one flat vector, as measures/context.py had it."""

    def __init__(self, layers: list[Layer]):
        self.meta = [(tuple(layer.weight.shape), layer.stride, layer.padding)
                     for layer in layers]
        self.w = torch.cat([torch.cat([layer.weight.reshape(-1), layer.bias])
                            for layer in layers]).detach()

    @property
    def omega(self) -> int:
        return self.w.numel()

    def split(self, w):
        out, i = [], 0
        for shape, _, _ in self.meta:
            n = int(np.prod(shape))
            out.append((w[i:i + n].reshape(shape), w[i + n:i + n + shape[0]]))
            i += n + shape[0]
        return out

    def logits(self, w, x):
        params = self.split(w)
        for (weight, bias), (_, stride, pad) in zip(params[:-1], self.meta[:-1], strict=True):
            x = F.relu(F.conv2d(x, weight, bias, stride, pad))
        (weight, bias), (_, stride, pad) = params[-1], self.meta[-1]
        return F.conv2d(x, weight, bias, stride, pad).mean(dim=(2, 3))

    def logits_many(self, ws, x):
        """One grouped convolution per layer, group b network b."""
        count = ws.shape[0]
        x = x.expand(count, *x.shape) if x.dim() == 4 else x
        n = x.shape[1]
        h = x.transpose(0, 1).reshape(n, count * x.shape[2], *x.shape[3:])
        i = 0
        for j, (shape, stride, pad) in enumerate(self.meta):
            size = int(np.prod(shape))
            weight = ws[:, i:i + size].reshape(count * shape[0], *shape[1:])
            bias = ws[:, i + size:i + size + shape[0]].reshape(-1)
            i += size + shape[0]
            h = F.conv2d(h, weight, bias, stride, pad, groups=count)
            if j < len(self.meta) - 1:
                h = F.relu(h)
        return h.mean(dim=(2, 3)).reshape(n, count, -1).transpose(0, 1)


def gradient_noise(net: FlatNet, x, y, chunk: int) -> float:
    """measures/optimization.py's former arithmetic: per-example gradients layer by
    layer, ‖G_i‖² by Gram matrices where they are smaller, float64 sums."""
    params = net.split(net.w)
    sum_sq = torch.zeros((), dtype=torch.float64)
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
            unfolded = F.unfold(inputs[j].detach(), shape[-1], padding=pad,
                                stride=stride).double()
            delta = deltas[j].flatten(2).double()
            o, ck, positions = delta.shape[1], unfolded.shape[1], delta.shape[2]
            if positions * (o + ck) < o * ck:
                sum_sq += torch.einsum("bpq,bpq->", delta.transpose(1, 2) @ delta,
                                       unfolded.transpose(1, 2) @ unfolded)
            else:
                sum_sq += (delta @ unfolded.transpose(1, 2)).pow(2).sum()
            g_b = delta.sum(2)
            sum_sq += g_b.pow(2).sum()
            grad_sum[j][0].view(-1).add_(torch.einsum("bop,bkp->ok", delta, unfolded)
                                         .reshape(-1))
            grad_sum[j][1].add_(g_b.sum(0))
    m = len(x)
    mean_sq = sum(float(gw.pow(2).sum() + gb.pow(2).sum()) for gw, gb in grad_sum) / m ** 2
    return float(sum_sq) / m - mean_sq


def chunk_of(net: FlatNet) -> int:
    widest = max(int(np.prod(shape)) for shape, _, _ in net.meta)
    return max(1, min(512, 20_000_000 // widest))


def fft_norm(weight: torch.Tensor, n: int) -> float:
    """measures/spectral.py's former FFT norm of a square kernel on n×n inputs."""
    kernel, k = weight.double(), weight.shape[-1]
    if k > n:
        folded = kernel.new_zeros((*kernel.shape[:2], n, n))
        for a in range(k):
            for b in range(k):
                folded[:, :, a % n, b % n] += kernel[:, :, a, b]
        kernel = folded
    blocks = torch.fft.fft2(kernel, s=(n, n)).permute(2, 3, 0, 1)
    return float(torch.linalg.matrix_norm(blocks, ord=2).max())


def flat_path_norm(flat: FlatNet, shape) -> float:
    with torch.no_grad():
        ones = torch.ones((1, *shape), dtype=torch.float64)
        return float(flat.logits(flat.w.double().pow(2), ones).sum())


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (what training leaves)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
            m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
            if m.affine:
                m.weight.data.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.data.copy_(0.6 * torch.rand(c, generator=gen) - 0.3)
    return model


def data(n=16, shape=(1, 8, 8), classes=10, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=gen), torch.randint(0, classes, (n,), generator=gen)


def autograd_noise(net: Network, x, y, w=None) -> float:
    """(1/m) Σ ‖g_i‖² − ‖ḡ‖² from one autograd backward per example (float64 sums)."""
    grads = []
    for i in range(len(x)):
        wi = (net.w if w is None else w).clone().requires_grad_(True)
        loss = F.cross_entropy(net.logits(wi, x[i:i + 1]), y[i:i + 1], reduction="sum")
        grads.append(torch.autograd.grad(loss, wi)[0].double())
    g = torch.stack(grads)
    return float(g.pow(2).sum(1).mean() - g.mean(0).pow(2).sum())


# --------------------------------------------------------------------------- NiN

@pytest.fixture(scope="module")
def nin():
    torch.manual_seed(0)
    model = randomise_bn(NiN(1, 10, 16, 2)).eval()
    x, y = data(24)
    return model, x, y


def test_nin_layers_are_folds(nin):
    model, x, _ = nin
    net, layers = Network.from_module(model, x), fold(model)
    assert len(net.layers) == len(layers) == net.d == 7
    assert net.unfolded == [] and net.folded and net.additions == []
    for mine, theirs in zip(net.layers, layers, strict=True):
        assert mine.kind == "conv" and not mine.shortcut and mine.had_bias
        assert (mine.weight - theirs.weight).abs().max() <= 1e-6
        assert (mine.bias - theirs.bias).abs().max() <= 1e-6
        assert mine.stride == (theirs.stride,) * 2 and mine.padding == (theirs.padding,) * 2
        assert mine.dilation == (1, 1) and mine.groups == 1
    assert [s[0] for s in net.input_sizes()] == input_sizes(layers, 8)
    assert all(s[0] == s[1] for s in net.input_sizes())
    assert [layer.bn for layer in net.layers][:3] == ["features.1", "features.4", "features.7"]


def test_nin_function_is_flatnets(nin):
    model, x, y = nin
    net, flat = Network.from_module(model, x), FlatNet(fold(model))
    assert torch.equal(net.w, flat.w) and net.omega == flat.omega
    for (a, b), (c, d) in zip(net.split(net.w), flat.split(flat.w), strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
    gen = torch.Generator().manual_seed(2)
    ws = net.w + 0.05 * torch.randn(5, net.omega, generator=gen)
    own = x[torch.randint(0, len(x), (5, 7), generator=gen)]
    with torch.no_grad():
        assert torch.allclose(net.logits(net.w, x), flat.logits(flat.w, x), atol=1e-5)
        assert torch.allclose(net.logits(net.w, x), model(x), atol=1e-5)
        # the same arithmetic: one grouped convolution per layer, shared inputs too
        assert torch.equal(net.logits(net.w, x), flat.logits(flat.w, x))
        assert torch.equal(net.logits_many(ws, x), flat.logits_many(ws, x))
        assert torch.equal(net.logits_many(ws, own), flat.logits_many(ws, own))
    # path norm: squared weights, float64 all-ones input
    assert path_norm_value(net, net.w, (1, 8, 8)) == pytest.approx(
        flat_path_norm(flat, (1, 8, 8)), rel=1e-12)
    # gradients through logits_many (the α searches' batched ascent)
    u = torch.zeros(3, net.omega, requires_grad=True)
    for f in (net.logits_many, flat.logits_many):
        loss = f(net.w + u, x).logsumexp(-1).sum()
        (g,) = torch.autograd.grad(loss, u)
        if f == net.logits_many:
            mine = g
    assert torch.allclose(mine, g, atol=1e-5)


def test_nin_gradient_noise(nin):
    model, x, y = nin
    net, flat = Network.from_module(model, x), FlatNet(fold(model))
    old = gradient_noise(flat, x, y, 5)
    assert net.gradient_noise(x, y, 5) == pytest.approx(autograd_noise(net, x, y), rel=1e-6)
    assert net.gradient_noise(x, y, 5) == pytest.approx(old, rel=1e-6)
    assert net.gradient_noise(x, y, 7, method="func") == pytest.approx(old, rel=1e-6)


def test_nin_weights_of_another_instance(nin):
    model, x, _ = nin
    other = randomise_bn(NiN(1, 10, 16, 2), seed=5).eval()
    net = Network.from_module(model, x)
    assert torch.equal(net.weights_of(other), FlatNet(fold(other)).w)


def test_model_is_left_as_it_was():
    model = NiN(1, 10, 8, 1).train()
    Network.from_module(model, data(2)[0])
    assert model.training


def test_nin_measures_equal_the_former_nin_path():
    """Context.from_models on a NiN: the norm, spectral, path-norm and gradient-noise
    measures equal those computed on fold() / FlatNet as the measures did before."""
    torch.manual_seed(8)
    final, init, epoch1 = (randomise_bn(NiN(1, 10, 12, 2), seed=s).eval() for s in (11, 12, 13))
    x, y = data(40)
    ctx = Context.from_models(final, x, y, 10, init=init, epoch1=epoch1,
                              settings=Settings.preset("fast"))
    layers, layers0 = fold(final), fold(init)
    flat, flat1 = FlatNet(layers), FlatNet(fold(epoch1))
    assert torch.equal(ctx.net.w, flat.w) and torch.equal(ctx.w0, FlatNet(layers0).w)
    assert torch.equal(ctx.w_epoch1, flat1.w)
    sizes = input_sizes(layers, 8)
    assert ctx.sizes() == [(n, n) for n in sizes] and ctx.n == 8 and ctx.d == 7
    fro = [float(layer.weight.double().pow(2).sum()) for layer in layers]
    dist = [float((a.weight.double() - b.weight.double()).pow(2).sum())
            for a, b in zip(layers, layers0, strict=True)]
    spec = [fft_norm(layer.weight, n) ** 2 for layer, n in zip(layers, sizes, strict=True)]
    spec_dist = [fft_norm(a.weight - b.weight, n) ** 2
                 for a, b, n in zip(layers, layers0, sizes, strict=True)]
    d = len(layers)
    ref = {
        "param_norm": sum(fro), "prod_of_fro": math.prod(fro),
        "sum_of_fro": d * math.prod(fro) ** (1 / d), "frobenius_distance": sum(dist),
        "num_params": sum(layer.weight.shape[-1] ** 2 * layer.weight.shape[1]
                          * (layer.weight.shape[0] + 1) for layer in layers),
        "prod_of_spec": math.prod(spec), "sum_of_spec": d * math.prod(spec) ** (1 / d),
        "fro_over_spec": sum(f / s for f, s in zip(fro, spec, strict=True)),
        "dist_spec_init": sum(spec_dist),
        "path_norm": flat_path_norm(flat, (1, 8, 8)),
        "grad_noise_final": gradient_noise(flat, ctx.x, y, chunk_of(flat)),
        "grad_noise_epoch1": gradient_noise(flat1, ctx.x, y, chunk_of(flat1)),
    }
    for name, value in ref.items():
        out = REGISTRY[name].fn(ctx)
        got = out[0] if isinstance(out, tuple) else out
        assert got == pytest.approx(value, rel=1e-9), name


# --------------------------------------------------------------------------- ResNet

class Basic(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True))
        self.block1 = Basic(8, 8, 1)
        self.block2 = Basic(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(3)
    model = randomise_bn(ResNet()).eval()
    x, y = data(16, (3, 8, 8))
    return model, Network.from_module(model, x), x, y


def test_resnet_logits(resnet):
    model, net, x, _ = resnet
    with torch.no_grad():
        assert torch.allclose(net.logits(net.w, x), model(x), atol=1e-5)
        ws = net.w + 0.01 * torch.randn(3, net.omega)
        many = net.logits_many(ws, x)
        for b in range(3):
            assert torch.allclose(many[b], net.logits(ws[b], x), atol=1e-5)
    assert net.folded


def test_resnet_layers(resnet):
    _, net, _, _ = resnet
    names = [layer.name for layer in net.layers]
    assert names == ["stem.0", "block1.conv1", "block1.conv2", "block2.conv1",
                     "block2.conv2", "block2.shortcut.0", "fc"]
    assert [layer.name for layer in net.layers if layer.shortcut] == ["block2.shortcut.0"]
    assert net.input_sizes() == [(8, 8)] * 4 + [(4, 4), (8, 8), None]
    assert net.layers[-1].kind == "linear" and net.layers[-1].input_shape == (16,)
    assert net.layers[5].stride == (2, 2) and net.layers[5].kernel == (1, 1)
    assert all(layer.bn is not None for layer in net.layers[:-1])
    shortcut = [a.shortcut for a in net.additions]
    assert shortcut == [[], ["block2.shortcut.0"]]
    assert net.additions[0].branches == (["block1.conv1", "block1.conv2"], [])


def test_resnet_gradient_noise(resnet):
    _, net, x, y = resnet
    ref = autograd_noise(net, x, y)
    assert net.gradient_noise(x, y, 6) == pytest.approx(ref, rel=1e-6)
    assert net.gradient_noise(x, y, 6, method="func") == pytest.approx(ref, rel=1e-6)


# --------------------------------------------------------------------------- VGG, MLP

class VGG(nn.Module):
    def __init__(self, bn: bool):
        super().__init__()
        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not bn),
                    *([nn.BatchNorm2d(c_out)] if bn else []), nn.ReLU()]
        self.features = nn.Sequential(*block(3, 8), *block(8, 8), nn.MaxPool2d(2),
                                      *block(8, 16), nn.AvgPool2d(2))
        self.head = nn.Sequential(nn.Linear(16 * 2 * 2, 32),
                                  *([nn.BatchNorm1d(32)] if bn else []), nn.ReLU(),
                                  nn.Dropout(0.5), nn.Linear(32, 10))

    def forward(self, x):
        x = self.features(x)
        return self.head(x.view(x.size(0), -1))


@pytest.mark.parametrize("bn", [True, False])
def test_vgg_logits(bn):
    torch.manual_seed(4)
    model = randomise_bn(VGG(bn)).eval()
    x, y = data(12, (3, 8, 8))
    net = Network.from_module(model, x)
    assert [layer.kind for layer in net.layers] == ["conv"] * 3 + ["linear"] * 2
    assert net.input_sizes() == [(8, 8), (8, 8), (4, 4), None, None]
    assert net.folded and (net.layers[3].bn == "head.1") == bn
    assert [layer.had_bias for layer in net.layers] == [True] * 5
    with torch.no_grad():
        assert torch.allclose(net.logits(net.w, x), model(x), atol=1e-5)
    assert net.gradient_noise(x, y, 5) == pytest.approx(autograd_noise(net, x, y), rel=1e-6)


def test_mlp_logits():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x, y = data(10)
    net = Network.from_module(model, x)
    assert [layer.name for layer in net.layers] == ["1", "3"]
    assert net.omega == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert torch.allclose(net.logits(net.w, x), model(x), atol=1e-5)
        ws = net.w + 0.1 * torch.randn(4, net.omega)
        assert torch.allclose(net.logits_many(ws, x)[2], net.logits(ws[2], x), atol=1e-5)
    assert net.gradient_noise(x, y, 3) == pytest.approx(autograd_noise(net, x, y), rel=1e-6)


# --------------------------------------------------------------------------- refusals

class PreAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_out = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv0(x)
        x = self.conv1(F.relu(self.bn1(x))) + x          # BN → ReLU → Conv
        x = F.relu(self.bn_out(x))                        # BN after the addition
        return self.fc(x.mean(dim=(2, 3)))


def test_preactivation_bn_is_reported_unfolded():
    torch.manual_seed(6)
    model = randomise_bn(PreAct()).eval()
    x, _ = data(6, (3, 8, 8))
    net = Network.from_module(model, x)
    reasons = dict(net.unfolded)
    assert set(reasons) == {"bn1", "bn_out"}
    assert "also used by" in reasons["bn1"]            # conv0's output feeds the addition
    assert "add" in reasons["bn_out"]
    assert not net.folded and all(layer.bn is None for layer in net.layers)
    with pytest.raises(ValueError, match="bn1"):
        net.require_folded("sum_of_spec")
    with torch.no_grad():
        assert torch.allclose(net.logits(net.w, x), model(x), atol=1e-5)
    # BN γ, β stay out of w
    assert net.omega == sum(layer.weight.numel() + layer.bias.numel() for layer in net.layers)


class WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.fc(x))


class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.attn(x, x, x)[0].mean(1))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


@pytest.mark.parametrize("model, shape, pattern", [
    (WithLayerNorm(), (4, 8), r"'norm' \(LayerNorm\)"),
    (WithAttention(), (4, 5, 8), r"'attn' \(MultiheadAttention\)"),
    (Branchy(), (4, 8), "cannot trace Branchy"),
])
def test_unsupported_parts_are_named(model, shape, pattern):
    with pytest.raises(UnsupportedNetwork, match=pattern):
        Network.from_module(model, torch.randn(shape))


class OddConvs(nn.Module):
    """Convolutions FlatNet never saw: 'same' reflect padding, groups, dilation,
    non-square kernels and strides, on a non-square input."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding="same", padding_mode="reflect"), nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, groups=4, dilation=2, padding=2, bias=False),
            nn.BatchNorm2d(8), nn.ReLU6(),
            nn.Conv2d(8, 12, (3, 1), stride=(2, 1), padding="valid"), nn.GELU(),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(12, 5))

    def forward(self, x):
        return self.body(x)


def test_odd_convolutions():
    torch.manual_seed(7)
    model = randomise_bn(OddConvs()).eval()
    x, y = data(10, (3, 8, 6), classes=5)
    net = Network.from_module(model, x)
    assert net.input_sizes() == [(8, 6), (8, 6), (8, 6), None]
    assert net.layers[1].groups == 4 and net.layers[1].dilation == (2, 2)
    assert net.layers[0].padding == "same" and net.layers[0].padding_mode == "reflect"
    with torch.no_grad():
        assert torch.allclose(net.logits(net.w, x), model(x), atol=1e-5)
    ref = autograd_noise(net, x, y)
    assert net.gradient_noise(x, y, 4) == pytest.approx(ref, rel=1e-6)
    assert net.gradient_noise(x, y, 4, method="func") == pytest.approx(ref, rel=1e-6)


def test_forward_mode_and_float64_inside_transforms(nin):
    """Fisher–Rao's jvp through logits (as measures/output.py does), and a first
    float64 call made inside a torch.func transform, where the float64 copy of the
    module's constants is made."""
    from torch.func import jvp
    model, x, y = nin
    net, flat = Network.from_module(model, x), FlatNet(fold(model))

    def directional(n, w, xs):
        return jvp(lambda v: F.cross_entropy(n.logits(v, xs), y, reduction="none"),
                   (w,), (w,))[1]
    assert torch.allclose(directional(net, net.w, x), directional(flat, flat.w, x), atol=1e-5)
    mine = directional(Network.from_module(model, x), net.w.double(), x.double())
    assert mine.dtype == torch.float64
    assert torch.allclose(mine, directional(flat, flat.w.double(), x.double()), atol=1e-10)


# ------------------------------------------------------------- every measure, any network

def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


ARCHITECTURES = {"resnet": (ResNet, (3, 8, 8)), "vgg_bn": (lambda: VGG(True), (3, 8, 8)),
                 "vgg": (lambda: VGG(False), (3, 8, 8)), "mlp": (mlp, (1, 8, 8)),
                 "preact": (PreAct, (3, 8, 8))}
# what needs no weights as the network's parameters: computed with a BatchNorm unfolded
WITHOUT_FOLDING = {"vc_dim", "num_params", "cross_entropy", "inverse_margin", "neg_entropy",
                   "input_grad_norm", "steps_to_0.1_loss", "steps_0.1_to_0.01_loss"}


def expected_failures(arch: str) -> dict[str, str]:
    if arch == "preact":     # bn1 and bn_out cannot be folded
        return {s.name: "bn1" for s in list_measures() if s.name not in WITHOUT_FOLDING}
    if arch.startswith("vgg"):
        return {"path_norm": "max-pooling", "path_norm_over_margin": "max-pooling"}
    return {}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_measure_is_finite_or_fails_with_its_reason(arch):
    """Each registered measure through measures.runner.run_one on a small network of
    each shape, its labels its own predictions (so the searches have an accuracy of 1
    to lower): a finite value, or status failed with the reason expected. The choices
    docs/measures.md makes for a network that is not a chain are in the params."""
    make, shape = ARCHITECTURES[arch]
    torch.manual_seed(9)
    final, init, epoch1 = (randomise_bn(make(), seed=s).eval() for s in (1, 2, 3))
    x = data(256, shape)[0]
    with torch.no_grad():    # the 64 inputs it is surest of: ε-noise leaves them be
        top = final(x).topk(2, dim=1)
    keep = (top.values[:, 0] - top.values[:, 1]).argsort(descending=True)[:64]
    x, y = x[keep], top.indices[keep, 0]
    ctx = Context.from_models(final, x, y, 10, init=init, epoch1=epoch1,
                              outcome={"steps_to_0.1": 10, "steps_0.1_to_0.01": 20},
                              settings=Settings.preset("fast"))
    failed, params = {}, {}
    for spec in list_measures():
        value, status, error, params[spec.name] = run_one(spec, ctx)
        if status == "ok":
            assert math.isfinite(value), spec.name
        else:
            failed[spec.name] = error
    expected = expected_failures(arch)
    assert set(failed) == set(expected), failed
    for name, pattern in expected.items():
        assert pattern in failed[name], (name, failed[name])
    if arch == "resnet":    # the choices for a network that is not a chain, recorded
        shortcut = {"d": 7, "d_counts": "every_conv_and_linear", "shortcut_layers": 1}
        for name in ("vc_dim", "sum_of_fro", "fisher_rao", "sum_of_spec", "spectral_init"):
            assert params[name].items() >= shortcut.items(), name
        assert params["prod_of_spec"]["spectral_product"] == "every_conv_and_linear"
        assert params["path_norm"] == {"path_norm_via": "forward_of_squared_weights_on_ones"}


def test_resnet_grad_noise_measure_equals_an_autograd_loop(resnet):
    model, _, x, y = resnet
    ctx = Context.from_models(model, x, y, 10)
    assert ctx.net.additions and any(layer.shortcut for layer in ctx.layers)
    value = REGISTRY["grad_noise_final"].fn(ctx)
    assert value == pytest.approx(autograd_noise(ctx.net, ctx.x, y), rel=1e-6)


def test_path_norm_of_a_residual_network_sums_both_branches():
    """With a skip connection the forward of squared weights adds the paths through
    the block and those around it: against the two chains' path norms, each on its own."""
    torch.manual_seed(10)

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            return self.out(F.relu(self.b(F.relu(self.a(x)))) + x)

    model = Skip().double().eval()
    net = Network.from_module(model, torch.zeros(2, 4, dtype=torch.float64))
    through = nn.Sequential(model.a, nn.ReLU(), model.b, nn.ReLU(), model.out)
    around = nn.Sequential(nn.Linear(4, 3)).double()
    with torch.no_grad():
        around[0].weight.copy_(model.out.weight)
        around[0].bias.zero_()   # the output bias's paths are counted once, in `through`
    total = 0.0
    for m in (through, around):
        chain = Network.from_module(m, torch.zeros(2, 4, dtype=torch.float64))
        total += path_norm_value(chain, chain.w, (4,))
    assert path_norm_value(net, net.w, (4,)) == pytest.approx(total, rel=1e-12)


def operator_norm(apply, shape) -> float:
    """The largest singular value of a linear map on inputs of `shape`, by SVD of its
    matrix (built column by column, float64)."""
    size = math.prod(shape)
    eye = torch.eye(size, dtype=torch.float64).reshape(size, *shape)
    with torch.no_grad():
        matrix = apply(eye).reshape(size, -1)
    return float(torch.linalg.matrix_norm(matrix, ord=2))


def test_spectral_norms_of_grouped_dilated_non_square_convolutions():
    """FFT: the circular convolution's norm with dilation, groups and an h×w input;
    exact: the layer's own operator (stride, padding mode, dilation, groups); a
    Linear: its largest singular value."""
    from fgm.measures.spectral import spectral_norm_exact, spectral_norm_fft
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(8, 2, 3, 2, generator=gen, dtype=torch.float64)   # groups 4
    h, w, dilation = 5, 6, (2, 1)
    span = (dilation[0] * 2 + 1, dilation[1] * 1 + 1)

    def circular(x):
        pads = [0, span[1] - 1, 0, span[0] - 1]
        return F.conv2d(F.pad(x, pads, mode="circular"), weight, None, 1, 0, dilation, 4)
    assert spectral_norm_fft(weight, (h, w), dilation, 4) == pytest.approx(
        operator_norm(circular, (8, h, w)), rel=1e-9)
    conv = nn.Conv2d(8, 8, (3, 2), stride=(2, 1), padding=(2, 1), dilation=dilation,
                     groups=4, padding_mode="reflect", bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(weight)
    assert spectral_norm_exact(weight, (2, 1), (2, 1), (h, w), 3000, 0, dilation, 4,
                               "reflect") == pytest.approx(operator_norm(conv, (8, h, w)),
                                                           rel=1e-6)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    ctx = Context.from_models(model, torch.randn(4, 3, 2, 2), torch.zeros(4, dtype=torch.long), 5)
    assert ctx.sizes() == [None] and ctx.n == 2
    value, _ = REGISTRY["prod_of_spec"].fn(ctx)
    ref = operator_norm(lambda v: F.linear(v, model[1].weight.double()), (12,))
    assert value == pytest.approx(ref ** 2, rel=1e-6)


def test_zero_padding_before_a_conv_is_that_convs_padding():
    """Keras's uneven "same" padding arrives as a ZeroPad2d before the convolution
    (ingest/keras.py). Written that way, a conv with padding 1 must give the same value
    of every measure as the conv that pads itself, the spectral norms too (on the
    unpadded input), by both methods."""
    import fgm
    from fgm.measures.spectral import spec_sq
    torch.manual_seed(0)
    own = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 5, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(5, 3))
    padded = nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(3, 4, 3, 1, 0), nn.BatchNorm2d(4),
                           nn.ReLU(), nn.ZeroPad2d(1), nn.Conv2d(4, 5, 3, 2, 0), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    own[1].running_mean.uniform_(-0.3, 0.3)
    own[1].running_var.uniform_(0.5, 2)
    for i, j in ((0, 1), (1, 2), (3, 5), (7, 9)):
        padded[j].load_state_dict(own[i].state_dict())
    own.eval(), padded.eval()
    x, y = torch.randn(60, 3, 8, 8), torch.randint(0, 3, (60,))
    a = fgm.measure_details(own, (x, y), budget="fast")
    b = fgm.measure_details(padded, (x, y), budget="fast")
    for name in a:
        assert a[name].status == b[name].status, name
        if a[name].value is not None:
            assert math.isclose(a[name].value, b[name].value, rel_tol=1e-9), name
    assert a["path_norm"].status == "ok" and a["spectral_orig"].status == "ok"
    exact = [spec_sq(Context.from_models(m, x, y, 3, settings=Settings(spectral="exact")))
             for m in (own, padded)]
    assert exact[0] == pytest.approx(exact[1], rel=1e-9)
    # uneven: the power iteration on the padded operator, computed here
    uneven = nn.Sequential(nn.ZeroPad2d((0, 1, 1, 1)), nn.Conv2d(3, 4, 3, 2, 0), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    net = Context.from_models(uneven, torch.randn(4, 3, 9, 12), y[:4], 3).net
    assert net.layers[0].pad == (0, 1, 1, 1) and net.layers[0].input_size == (9, 12)
    w = uneven[1].weight.detach().double()
    v = torch.randn(1, 3, 9, 12, dtype=torch.float64)
    for _ in range(500):
        v = v.requires_grad_(True)
        u = F.conv2d(F.pad(v, [0, 1, 1, 1]), w, None, 2)
        (v,) = torch.autograd.grad(u, v, u.detach())
        v = v / v.norm()
    sigma = float(F.conv2d(F.pad(v, [0, 1, 1, 1]), w, None, 2).norm())
    ctx = Context.from_models(uneven, torch.randn(4, 3, 9, 12), y[:4], 3,
                              settings=Settings(spectral="exact"))
    assert spec_sq(ctx)[0] == pytest.approx(sigma ** 2, rel=1e-6)
