"""Spectral measures (App. D: Eqs. 25–28, 31–35, 41).

‖W_i‖_2 is the operator norm of the i-th convolution, not of its reshaped
kernel. Two ways, chosen per run (Settings.spectral):
- "fft" (default, the paper's): Sedghi et al. (2018). A stride-1 convolution
  with circular padding on n×n inputs is block-diagonalised by the 2-D DFT;
  its singular values are those of the c_out×c_in matrices K̂(u, v), the
  kernel's DFT zero-padded to n×n, at each frequency (u, v). A kernel larger
  than its input (3×3 on 2×2 or 1×1 maps in deep nets) is first folded onto
  the n×n grid, its taps wrapped modulo n, as the circular convolution does.
- "exact": power iteration on the true strided, zero-padded convolution,
  with the adjoint taken through autograd.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .context import Context
from .network import WeightLayer, _explicit
from .norms import dist_sq, fro_sq, init_kernels, prod_pow
from .registry import measure


def _size(n: int | tuple[int, int]) -> tuple[int, int]:
    return (n, n) if isinstance(n, int) else (int(n[0]), int(n[1]))


def fold_taps(weight: torch.Tensor, n: int | tuple[int, int]) -> torch.Tensor:
    """The kernel as a circular convolution on h×w inputs sees it: a kernel larger
    than its input wraps around, tap (a, b) acting at offset (a mod h, b mod w); taps
    that land on one offset add up. (c_out, c_in, min(kh, h), min(kw, w))."""
    h, w = _size(n)
    kh, kw = weight.shape[-2:]
    if kh <= h and kw <= w:
        return weight
    folded = weight.new_zeros((*weight.shape[:2], min(kh, h), min(kw, w)))
    for a in range(kh):
        for b in range(kw):
            folded[:, :, a % h, b % w] += weight[:, :, a, b]
    return folded


def dilate(weight: torch.Tensor, dilation: tuple[int, int]) -> torch.Tensor:
    """A dilated kernel as the plain kernel it is: its taps dilation apart, zeros
    between them."""
    dh, dw = dilation
    if (dh, dw) == (1, 1):
        return weight
    kh, kw = weight.shape[-2:]
    out = weight.new_zeros((*weight.shape[:2], dh * (kh - 1) + 1, dw * (kw - 1) + 1))
    out[:, :, ::dh, ::dw] = weight
    return out


def spectral_norm_fft(weight: torch.Tensor, n: int | tuple[int, int],
                      dilation: tuple[int, int] = (1, 1), groups: int = 1) -> float:
    """Largest singular value of the circular stride-1 convolution on n×n (or h×w)
    inputs. A grouped convolution is block diagonal over its groups: the largest of
    the groups' norms."""
    h, w = _size(n)
    kernel = fold_taps(dilate(weight.double(), dilation), (h, w))
    transfer = torch.fft.fft2(kernel, s=(h, w))                      # (c_out, c_in, h, w)
    blocks = transfer.permute(2, 3, 0, 1)                            # (h, w, c_out, c_in)
    if groups > 1:                                                   # (h, w, g, o/g, c_in/g)
        blocks = blocks.reshape(h, w, groups, blocks.shape[2] // groups, blocks.shape[3])
    return float(torch.linalg.matrix_norm(blocks, ord=2).max())


def spectral_norm_exact(weight: torch.Tensor, stride, padding, n: int | tuple[int, int],
                        iterations: int = 200, seed: int = 0,
                        dilation: tuple[int, int] = (1, 1), groups: int = 1,
                        padding_mode: str = "zeros",
                        pad: tuple[int, int, int, int] | None = None) -> float:
    """Largest singular value of x ↦ conv2d(x, W, stride, padding, dilation, groups)
    on n×n (or h×w) inputs, with the layer's padding mode; `pad`: zeros (left,
    right, top, bottom) put around x first (a ZeroPad2d before the conv)."""
    gen = torch.Generator(device=weight.device).manual_seed(seed)
    w = weight.double()
    h, wd = _size(n)
    kernel = tuple(w.shape[-2:])
    if pad is not None:
        def conv(v):
            return F.conv2d(F.pad(v, list(pad)), w, None, stride, padding, dilation, groups)
    elif isinstance(padding, str) or padding_mode != "zeros":
        pads = []
        for pad in reversed(_explicit(padding if isinstance(padding, str) else _size(padding),
                                      kernel, _size(dilation))):
            pads += pad
        mode = "constant" if padding_mode == "zeros" else padding_mode

        def conv(v):
            return F.conv2d(F.pad(v, pads, mode=mode), w, None, stride, 0, dilation, groups)
    elif dilation in (1, (1, 1)) and groups == 1:
        def conv(v):   # (the arithmetic before dilation and groups were known)
            return F.conv2d(v, w, None, stride, padding)
    else:
        def conv(v):
            return F.conv2d(v, w, None, stride, padding, dilation, groups)
    v = torch.randn((1, w.shape[1] * groups, h, wd), generator=gen, dtype=torch.float64,
                    device=w.device)
    v /= v.norm()
    sigma = 0.0
    for _ in range(iterations):
        v.requires_grad_(True)
        u = conv(v)
        (grad,) = torch.autograd.grad(u, v, grad_outputs=u.detach())   # Aᵀ A v
        v = grad.detach()
        norm = v.norm()
        if norm == 0:
            return 0.0
        v /= norm
        new = math.sqrt(float(norm))
        if abs(new - sigma) <= 1e-10 * max(new, 1e-30):
            return new
        sigma = new
    return sigma


def layer_spectral_norm(ctx: Context, layer: WeightLayer,
                        n: tuple[int, int] | None) -> float:
    """‖W‖₂ of one layer as an operator on its input: a Linear's largest singular
    value; a convolution's at its input size n (Settings.spectral: the FFT method,
    or power iteration on the strided, padded operator)."""
    if layer.kind == "linear":
        return float(torch.linalg.matrix_norm(layer.weight.double(), ord=2))
    if ctx.settings.spectral == "exact":
        return spectral_norm_exact(layer.weight, layer.stride, layer.padding, n,
                                   ctx.settings.power_iterations, ctx.settings.seed,
                                   layer.dilation, layer.groups, layer.padding_mode,
                                   layer.pad)
    return spectral_norm_fft(layer.weight, n, layer.dilation, layer.groups)


def spec_sq(ctx: Context) -> list[float]:
    """‖W_i‖_2² of each folded layer at its own input size."""
    ctx.require_folded("the spectral norm")
    return ctx.memo("spec_sq", lambda: [layer_spectral_norm(ctx, layer, n) ** 2
                                        for layer, n in zip(ctx.layers, ctx.sizes(),
                                                            strict=True)])


def _log_prod(values: list[float]) -> float:
    return sum(math.log(v) for v in values)


def _params(ctx: Context) -> dict:
    """The method, and how the products read a network that is not a chain: over
    every weight layer, shortcut projections included (docs/measures.md)."""
    p = {"spectral": ctx.settings.spectral}
    if ctx.settings.spectral == "exact":
        p["power_iterations"] = ctx.settings.power_iterations
        p["seed"] = ctx.settings.seed      # of the power iteration's start
    return {**p, "spectral_product": "every_conv_and_linear", **ctx.layer_params()}


@measure(eq="32")
def prod_of_spec(ctx: Context):
    """Π ‖W_i‖_2² (Eq. 32)."""
    return math.exp(_log_prod(spec_sq(ctx))), _params(ctx)


@measure(eq="31", needs=("final", "data"))
def prod_of_spec_over_margin(ctx: Context):
    """Π ‖W_i‖_2² / γ² (Eq. 31)."""
    return math.exp(_log_prod(spec_sq(ctx))) / ctx.margin() ** 2, _params(ctx)


@measure(eq="35")
def sum_of_spec(ctx: Context):
    """d · (Π ‖W_i‖_2²)^{1/d} (Eq. 35)."""
    return prod_pow(spec_sq(ctx), ctx.d), _params(ctx)


@measure(eq="34", needs=("final", "data"))
def sum_of_spec_over_margin(ctx: Context):
    """d · (Π ‖W_i‖_2² / γ²)^{1/d} (Eq. 34)."""
    return prod_pow(spec_sq(ctx), ctx.d, ctx.margin() ** 2), _params(ctx)


@measure(eq="33")
def fro_over_spec(ctx: Context):
    """Σ ‖W_i‖_F² / ‖W_i‖_2² (Eq. 33)."""
    return sum(f / s for f, s in zip(fro_sq(ctx), spec_sq(ctx), strict=True)), _params(ctx)


def _main_term(ctx: Context, numerators: list[float]) -> float:
    """Π ‖W_i‖_2² · Σ numerator_i / ‖W_i‖_2²."""
    spec = spec_sq(ctx)
    return math.exp(_log_prod(spec)) * sum(a / s for a, s in zip(numerators, spec, strict=True))


@measure(eq="28", needs=("final", "data"))
def spectral_orig_main(ctx: Context):
    """Π ‖W_i‖_2² · Σ ‖W_i‖_F²/‖W_i‖_2² / γ² (Eq. 28)."""
    return _main_term(ctx, fro_sq(ctx)) / ctx.margin() ** 2, _params(ctx)


@measure(eq="27", needs=("final", "init", "data"))
def spectral_init_main(ctx: Context):
    """Π ‖W_i‖_2² · Σ ‖W_i − W_i^0‖_F²/‖W_i‖_2² / γ² (Eq. 27)."""
    return _main_term(ctx, dist_sq(ctx)) / ctx.margin() ** 2, _params(ctx)


def _bound(ctx: Context, numerators: list[float]) -> float:
    """((84B Σ k_i √c_i + √ln(4n²d))² · main + ln(m/δ)) / γ² (Eqs. 25, 26)."""
    b = float(ctx.x.flatten(1).norm(dim=1).max())
    # k_i: √(kh·kw), the side of a square kernel (k_i² its taps, as in Eq. 20); 1: a Linear
    k_c = sum(math.sqrt(layer.kernel[0] * layer.kernel[1]) * math.sqrt(layer.weight.shape[0])
              for layer in ctx.layers)
    front = (84 * b * k_c + math.sqrt(math.log(4 * ctx.n ** 2 * ctx.d))) ** 2
    return ((front * _main_term(ctx, numerators) + math.log(ctx.m / ctx.settings.delta))
            / ctx.margin() ** 2)


@measure(eq="26", needs=("final", "data"))
def spectral_orig(ctx: Context):
    """Eq. 25 with W_i^0 = 0 (Eq. 26)."""
    return _bound(ctx, fro_sq(ctx)), _params(ctx)


@measure(eq="25", needs=("final", "init", "data"))
def spectral_init(ctx: Context):
    """((84B Σ k_i √c_i + √ln(4n²d))² Π‖W_i‖_2² Σ ‖W_i−W_i^0‖_F²/‖W_i‖_2² + ln(m/δ)) / γ²
    (Eq. 25)."""
    return _bound(ctx, dist_sq(ctx)), _params(ctx)


@measure(eq="41", needs=("final", "init"))
def dist_spec_init(ctx: Context):
    """Σ ‖W_i − W_i^0‖_2² (Eq. 41)."""
    ctx.require_folded("the spectral distance to initialisation")
    total = 0.0
    for a, b, n in zip(ctx.layers, init_kernels(ctx), ctx.sizes(), strict=True):
        diff = dataclasses.replace(a, weight=a.weight - b)
        total += layer_spectral_norm(ctx, diff, n) ** 2
    return total, _params(ctx)
