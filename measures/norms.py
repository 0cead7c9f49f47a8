"""Norm- and size-based measures (App. D: Eqs. 19, 20, 36–40, 42–44)."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from .context import Context
from .network import ELEMENTWISE_FUNCTIONS, Network, NotDefined
from .registry import measure


def fro_sq(ctx: Context) -> list[float]:
    """‖W_i‖_F² of each folded kernel."""
    ctx.require_folded("the Frobenius norm")
    return ctx.memo("fro_sq", lambda: [float(layer.weight.double().pow(2).sum())
                                       for layer in ctx.layers])


def init_kernels(ctx: Context) -> list[torch.Tensor]:
    """W_i^0: each layer's folded initial kernel (a view of ctx.w0)."""
    return [weight for weight, _ in ctx.net.split(ctx.w0)]


def dist_sq(ctx: Context) -> list[float]:
    """‖W_i − W_i^0‖_F² of each folded kernel."""
    ctx.require_folded("the distance to initialisation")
    return ctx.memo("dist_sq", lambda: [
        float((a.weight.double() - b.double()).pow(2).sum())
        for a, b in zip(ctx.layers, init_kernels(ctx), strict=True)])


def prod_pow(values: list[float], d: int, divide: float = 1.0) -> float:
    """d · (Π values / divide)^{1/d}, in log space so deep nets do not overflow."""
    return d * math.exp((sum(math.log(v) for v in values) - math.log(divide)) / d)


def counted_params(ctx: Context) -> float:
    """Σ k_i² c_{i−1} (c_i + 1) over the folded layers (Eq. 20): k_i² the kernel's
    taps (kh·kw; 1 for a Linear), c_{i−1} the inputs each output sees (a grouped
    convolution's c_in/groups), c_i the outputs."""
    return float(sum(layer.kernel[0] * layer.kernel[1] * layer.weight.shape[1]
                     * (layer.weight.shape[0] + 1) for layer in ctx.layers))


@measure(eq="19")
def vc_dim(ctx: Context):
    """(4000·κ·√(d·log2(6dn)³·Σ k_i² c_{i−1}(c_i+1)) + √log(1/δ))² (Eq. 19)."""
    d, n = ctx.d, ctx.n
    inner = 4000 * ctx.num_classes * math.sqrt(d * math.log2(6 * d * n) ** 3
                                               * counted_params(ctx))
    return (inner + math.sqrt(math.log(1 / ctx.settings.delta))) ** 2, ctx.layer_params()


@measure(eq="20")
def num_params(ctx: Context) -> float:
    """Σ k_i² c_{i−1} (c_i + 1) (Eq. 20)."""
    return counted_params(ctx)


@measure(eq="42")
def param_norm(ctx: Context) -> float:
    """Σ ‖W_i‖_F² (Eq. 42)."""
    return sum(fro_sq(ctx))


@measure(eq="40", needs=("final", "init"))
def frobenius_distance(ctx: Context) -> float:
    """Σ ‖W_i − W_i^0‖_F² (Eq. 40)."""
    return sum(dist_sq(ctx))


@measure(eq="37")
def prod_of_fro(ctx: Context) -> float:
    """Π ‖W_i‖_F² (Eq. 37)."""
    return math.exp(sum(math.log(v) for v in fro_sq(ctx)))


@measure(eq="36", needs=("final", "data"))
def prod_of_fro_over_margin(ctx: Context) -> float:
    """Π ‖W_i‖_F² / γ² (Eq. 36)."""
    return prod_of_fro(ctx) / ctx.margin() ** 2


@measure(eq="39")
def sum_of_fro(ctx: Context):
    """d · (Π ‖W_i‖_F²)^{1/d} (Eq. 39)."""
    return prod_pow(fro_sq(ctx), ctx.d), ctx.layer_params()


@measure(eq="38", needs=("final", "data"))
def sum_of_fro_over_margin(ctx: Context):
    """d · (Π ‖W_i‖_F² / γ²)^{1/d} (Eq. 38)."""
    return prod_pow(fro_sq(ctx), ctx.d, ctx.margin() ** 2), ctx.layer_params()


# What the forward of squared weights on an all-ones input may pass through for it to
# be the sum over paths: activations that leave a non-negative input as it is (every
# value there is ≥ 0), and linear steps (additions, average pooling, means,
# reshapes, concatenation, products with numbers: each a path's factor, as the
# network's own forward has it).
PATH_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.CELU, nn.Identity)
PATH_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.elu, F.celu}
MAX_POOLS = (nn.MaxPool2d, nn.AdaptiveMaxPool2d)
MAX_POOL_FUNCTIONS = {F.max_pool2d, F.adaptive_max_pool2d}
NOT_PATHS = {operator.sub, torch.sub}


def path_norm_problem(net: Network) -> str | None:
    """Why the forward of squared weights on an all-ones input is not the path norm
    of `net` (None: it is): an unfolded BatchNorm (its constants are not squared), a
    max-pooling over more than one input (which path it takes depends on the input),
    an activation that changes a non-negative input (ReLU6, GELU, tanh, ...)."""
    if net.unfolded:
        return "not folded: " + "; ".join(f"{name}: {why}" for name, why in net.unfolded)
    modules = dict(net.module.named_modules())
    several = ("takes the largest of several inputs: which path goes through it depends "
               "on the input")
    for node in net.module.graph.nodes:
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, MAX_POOLS):
                if not _single_input_windows(node, getattr(m, "kernel_size", None)):
                    return f"max-pooling {node.target!r} ({type(m).__name__}) {several}"
            elif isinstance(m, (nn.Conv2d, nn.Linear, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                                nn.Flatten, nn.ZeroPad2d, *PATH_ACTIVATIONS)):
                continue
            else:
                return (f"{node.target!r} ({type(m).__name__}) changes non-negative inputs: "
                        f"the forward of squared weights is not a sum over paths through it")
        elif node.op == "call_function":
            if node.target in MAX_POOL_FUNCTIONS:
                kernel = (node.args[1] if len(node.args) > 1 else node.kwargs.get(
                    "kernel_size")) if node.target is F.max_pool2d else None
                if not _single_input_windows(node, kernel):
                    return f"max-pooling ({node.name}) {several}"
            if node.target in NOT_PATHS:
                return f"a subtraction ({node.name}) is not a sum over paths"
            if node.target in ELEMENTWISE_FUNCTIONS and node.target not in PATH_FUNCTIONS:
                return (f"{getattr(node.target, '__name__', node.target)} ({node.name}) "
                        f"changes non-negative inputs: the forward of squared weights is "
                        f"not a sum over paths through it")
        elif node.op == "call_method" and node.target in ("sigmoid", "tanh", "sub"):
            return (f".{node.target}() ({node.name}): the forward of squared weights is not "
                    f"a sum over paths through it")
    return None


def _single_input_windows(node, kernel) -> bool:
    """A max-pooling whose every window holds one input (a kernel of 1, or an
    adaptive pooling to the input's own size): a selection, not a maximum."""
    if kernel is not None:
        return math.prod(kernel) == 1 if isinstance(kernel, tuple | list) else kernel == 1
    ins = node.all_input_nodes
    shape_in = ins[0].meta.get("tensor_meta") if ins else None
    shape_out = node.meta.get("tensor_meta")
    return (shape_in is not None and shape_out is not None
            and tuple(shape_in.shape) == tuple(shape_out.shape))


def path_norm_value(net: Network, w: torch.Tensor, shape: tuple[int, ...]) -> float:
    """Σ_j f_{w²}(1)[j]: every parameter squared, an all-ones input forwarded, in
    float64 (a product over many layers of squared folded weights overflows float32).
    The network's own forward: an addition sums its branches' paths, a shortcut's
    among them. ValueError where that is not the path norm (path_norm_problem)."""
    problem = path_norm_problem(net)
    if problem is not None:
        raise NotDefined(f"the path norm is not defined for this network: {problem}")
    with torch.no_grad():
        ones = torch.ones((1, *shape), dtype=torch.float64, device=w.device)
        return float(net.logits(w.double().pow(2), ones).sum())


PATH_PARAMS = {"path_norm_via": "forward_of_squared_weights_on_ones"}


@measure(eq="44")
def path_norm(ctx: Context):
    """Σ_j f_{w²}(1)[j] (Eq. 44)."""
    value = ctx.memo("path_norm", lambda: path_norm_value(ctx.net, ctx.net.w,
                                                          tuple(ctx.x.shape[1:])))
    return value, dict(PATH_PARAMS)


@measure(eq="43", needs=("final", "data"))
def path_norm_over_margin(ctx: Context):
    """Σ_j f_{w²}(1)[j] / γ² (Eq. 43)."""
    return path_norm(ctx)[0] / ctx.margin() ** 2, dict(PATH_PARAMS)
