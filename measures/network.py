"""The one network protocol every measure uses: any nn.Module built from
Conv2d, Linear, BatchNorm, elementwise activations, pooling, dropout, flatten /
view / reshape / mean and residual additions, as the folded network (App. C.1)
and a function of one flat weight vector.

    net = Network.from_module(model, example_input)
    net.layers          # WeightLayer per Conv2d / Linear, forward order, BN folded in
    net.w, net.omega    # flat weights: each layer's weight.reshape(-1), then its bias
    net.logits(w, x)    # the folded network's output with weights w
    net.logits_many(ws, x)          # B weight vectors at once: (B, n, classes)
    net.gradient_noise(x, y)        # (1/m) Σ ‖g_i‖² − ‖ḡ‖², per-example gradients

How: torch.fx traces the model in eval mode; each BatchNorm whose input is a
Conv2d / Linear output used by nothing else is merged into that layer

    W' = W · γ/√(var + ε)        b' = (b − mean) · γ/√(var + ε) + β

(a missing bias counted as 0), with the arithmetic of fgm's former NiN-only fold(),
so that a NiN's folded weights are bit for bit what they were (tests/test_network.py
keeps that fold as its reference). A BatchNorm that cannot
be merged (pre-activation, after an addition, after a layer whose output is used
elsewhere) stays, in eval mode, its γ and β constants outside w, and is listed in
`unfolded` with the reason. Every weight layer gets a bias in w (zeros where it
had none and no BatchNorm was merged into it: `had_bias` False), as the NiN's
former FlatNet did.
Anything else raises UnsupportedNetwork naming the node and its type.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call, grad, vmap


class UnsupportedNetwork(ValueError):
    """The model has a part the protocol cannot represent (named in the message)."""


class NotDefined(ValueError):
    """A measure the paper does not define for this network (a max-pooling for the
    path norm, a BatchNorm that cannot be folded): a property of the architecture,
    stored as 'not_applicable' with this reason, not as a failure."""


# ------------------------------------------------------------------ what is allowed

WEIGHT_MODULES = (nn.Conv2d, nn.Linear)
BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
                       nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh,
                       nn.Hardswish, nn.Hardsigmoid, nn.Identity)
POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
DROPOUT_MODULES = (nn.modules.dropout._DropoutNd,)
SHAPE_MODULES = (nn.Flatten, nn.ZeroPad2d)   # ZeroPad2d: Keras's uneven "same" padding

ADDITIONS = {operator.add, operator.iadd, torch.add}
SCALAR_OPS = {operator.mul, operator.imul, operator.truediv, operator.itruediv,
              operator.sub, operator.isub, torch.mul}
ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu,
                         F.gelu, F.silu, F.mish, torch.tanh, torch.sigmoid, F.softplus,
                         F.hardtanh, F.hardswish, F.hardsigmoid, torch.nn.functional.tanh,
                         torch.nn.functional.sigmoid}
SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.mean, torch.cat, torch.squeeze,
                   F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                   F.adaptive_max_pool2d}
DROPOUT_FUNCTIONS = {F.dropout, F.dropout2d, F.alpha_dropout, F.feature_alpha_dropout}
METHODS = {"view", "reshape", "flatten", "mean", "size", "contiguous", "squeeze",
           "add", "add_", "relu", "relu_", "sigmoid", "tanh", "mul", "mul_", "div",
           "div_", "dim"}
INPLACE = {operator.iadd: operator.add, operator.imul: operator.mul,
           operator.itruediv: operator.truediv, operator.isub: operator.sub}
INPLACE_METHODS = {"add_": "add", "relu_": "relu", "mul_": "mul", "div_": "div"}


@dataclass
class WeightLayer:
    """One Conv2d / Linear of the folded network: facts, no decisions."""
    name: str                        # the module's qualified name in the model
    kind: str                        # "conv" or "linear"
    weight: torch.Tensor             # folded: (c_out, c_in/groups, kh, kw) or (out, in)
    bias: torch.Tensor               # folded; zeros where there was none
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"
    input_shape: tuple[int, ...] = ()        # one example's input to the layer (no batch)
    output_shape: tuple[int, ...] = ()
    input_size: tuple[int, int] | None = None  # (H, W) of a conv's input; None: linear
    shortcut: bool = False           # on the branch of a residual addition with fewer
                                     # weight layers (a projection shortcut)
    bn: str | None = None            # the BatchNorm merged into it
    had_bias: bool = True            # a bias of its own or from a merged BatchNorm
    pad: tuple[int, int, int, int] | None = None   # a ZeroPad2d (left, right, top, bottom)
                                     # right before the conv, read as its own padding:
                                     # input_size is then the unpadded input's

    @property
    def kernel(self) -> tuple[int, int]:
        return tuple(self.weight.shape[2:]) if self.kind == "conv" else (1, 1)


@dataclass
class Addition:
    """A residual addition: the weight layers on each of its two branches (back to
    the nearest node both depend on), and those of the shorter one (the shortcut)."""
    node: str
    branches: tuple[list[str], list[str]]
    shortcut: list[str] = field(default_factory=list)


def _fold_bn(weight, bias, bn):
    """The former fold()'s arithmetic (the same operations, so the same bits)."""
    gamma = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_var)
    beta = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
    scale = gamma / torch.sqrt(bn.running_var + bn.eps)
    w = weight.detach() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    b0 = bias.detach() if bias is not None else torch.zeros_like(bn.running_mean)
    b = (b0 - bn.running_mean) * scale + beta
    return w.clone(), b.clone()


def _describe(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)} (node {node.name!r})"
    if node.op == "call_method":
        return f"method .{node.target}() (node {node.name!r})"
    return f"{node.op} {node.target!r} (node {node.name!r})"


def _is_shape_value(arg) -> bool:
    """A node giving sizes (x.size(0), x.shape, x.shape[1]), not a tensor."""
    return isinstance(arg, fx.Node) and (
        (arg.op == "call_method" and arg.target in ("size", "dim"))
        or (arg.op == "call_function" and arg.target is getattr and arg.args[1] == "shape")
        or (arg.op == "call_function" and arg.target is operator.getitem
            and _is_shape_value(arg.args[0])))


def _check(gm: fx.GraphModule, modules: dict) -> None:
    """UnsupportedNetwork for the first node outside the allowed set."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedNetwork(f"the model takes {len(placeholders)} inputs; one tensor "
                                 f"expected")
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        what = _describe(node, modules)
        if node.op == "call_module":
            m = modules[node.target]
            calls[node.target] = calls.get(node.target, 0) + 1
            if calls[node.target] > 1 and isinstance(m, WEIGHT_MODULES + BN_MODULES):
                raise UnsupportedNetwork(f"{what} is called more than once (shared weights)")
            if isinstance(m, BN_MODULES):
                if m.running_mean is None or m.running_var is None:
                    raise UnsupportedNetwork(f"{what} keeps no running statistics: in "
                                             f"eval mode it normalises by the batch's")
                continue
            if isinstance(m, nn.Conv2d | nn.Linear):
                if type(m) not in (nn.Conv2d, nn.Linear):
                    raise UnsupportedNetwork(f"{what}: a subclass of {type(m).__mro__[1].__name__}")
                continue
            if isinstance(m, nn.ZeroPad2d) and min(m.padding) < 0:
                raise UnsupportedNetwork(f"{what} crops (a negative padding)")
            if isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)) and m.return_indices:
                raise UnsupportedNetwork(f"{what} returns indices")
            if isinstance(m, ELEMENTWISE_MODULES + POOL_MODULES + DROPOUT_MODULES
                          + SHAPE_MODULES):
                continue
            raise UnsupportedNetwork(f"{what} is not supported")
        elif node.op == "call_function":
            t = node.target
            if t in ADDITIONS or t in ELEMENTWISE_FUNCTIONS or t in DROPOUT_FUNCTIONS:
                continue
            if t in SHAPE_FUNCTIONS:
                if t in (F.max_pool2d, F.adaptive_max_pool2d) and node.kwargs.get(
                        "return_indices"):
                    raise UnsupportedNetwork(f"{what} returns indices")
                continue
            if t in SCALAR_OPS:
                tensors = [a for a in node.args if isinstance(a, fx.Node)
                           and not _is_shape_value(a)]
                if len(tensors) > 1:
                    raise UnsupportedNetwork(f"{what}: a product of two tensors (gating, "
                                             f"attention) is not supported; only by numbers")
                continue
            if t is getattr and node.args[1] == "shape" or (
                    t is operator.getitem and _is_shape_value(node.args[0])):
                continue
            raise UnsupportedNetwork(f"{what} is not supported")
        elif node.op == "call_method":
            if node.target not in METHODS:
                raise UnsupportedNetwork(f"{what} is not supported")
            if node.target in ("mul", "mul_", "div", "div_") and any(
                    isinstance(a, fx.Node) and not _is_shape_value(a) for a in node.args[1:]):
                raise UnsupportedNetwork(f"{what}: a product of two tensors is not supported")
        elif node.op == "get_attr":
            value = gm.get_parameter(node.target) if _has(gm.get_parameter, node.target) \
                else None
            if value is not None:
                raise UnsupportedNetwork(f"{what}: a parameter used outside a Conv2d / Linear")
        elif node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                raise UnsupportedNetwork("the model returns a "
                                         f"{type(out).__name__}; one tensor expected")


def _has(getter, name) -> bool:
    try:
        getter(name)
        return True
    except AttributeError:
        return False


@dataclass(frozen=True)
class TensorShape:
    """node.meta["tensor_meta"]: the shape of a node's output (a tensor's only)."""
    shape: tuple[int, ...]


class _ShapeRecorder(fx.Interpreter):
    """torch.fx's ShapeProp, shapes only: ShapeProp imports torch's symbolic-shape
    machinery (sympy; a quarter of a second, once per process) and prints a
    traceback on any error."""

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = TensorShape(tuple(result.shape))
        return result


def _propagate(gm: fx.GraphModule, example: torch.Tensor) -> None:
    _ShapeRecorder(gm).run(example)


def _tensor_shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


# ------------------------------------------------------------------ the network

class Network:
    """The folded network as a function of one flat weight vector (see the module's
    docstring). Build with Network.from_module."""

    def __init__(self, module: fx.GraphModule, layers: list[WeightLayer],
                 unfolded: list[tuple[str, str]], additions: list[Addition],
                 example_shape: tuple[int, ...]):
        self.module = module
        self.layers = layers
        self.unfolded = unfolded
        self.additions = additions
        self.example_shape = example_shape          # one example's shape (C, H, W)
        self.w = torch.cat([torch.cat([layer.weight.reshape(-1), layer.bias])
                            for layer in layers]).detach()
        self._modules: dict = {}
        self._functions: dict = {}
        self._floats: dict = {}
        # each layer's (start, kernel size, bias size, kernel shape) in w
        self._slices, i = [], 0
        for layer in layers:
            n, o = layer.weight.numel(), layer.weight.shape[0]
            self._slices.append((i, n, o, tuple(layer.weight.shape)))
            i += n + o

    # ---------------------------------------------------------------- building
    @classmethod
    def from_module(cls, model: nn.Module, example_input: torch.Tensor) -> Network:
        """Trace `model` (a copy, in eval mode; the model itself is left as it is) with
        torch.fx, fold its BatchNorms, and take the layers' input sizes from one forward
        of `example_input` (a batch, (n, C, H, W) or (n, features))."""
        src = copy.deepcopy(model).eval()
        try:
            gm = fx.symbolic_trace(src)
        except Exception as e:   # control flow on tensors, unsupported Python
            raise UnsupportedNetwork(f"torch.fx cannot trace {type(model).__name__}: "
                                     f"{type(e).__name__}: {e}") from e
        modules = dict(gm.named_modules())
        _check(gm, modules)
        param = next(src.parameters(), None)
        dtype = param.dtype if param is not None else example_input.dtype
        device = param.device if param is not None else example_input.device
        example = example_input.to(dtype=dtype, device=device)
        with torch.no_grad():   # an input the model does not take fails here, with the
            src(example)        # model's own error
        with torch.no_grad():
            _propagate(gm, example)
        graph = gm.graph

        # BatchNorm folding: which BN merges into which layer
        merged: dict[str, str] = {}          # layer name -> BN name
        unfolded: list[tuple[str, str]] = []
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(modules[node.target], BN_MODULES):
                continue
            bn, src_node = modules[node.target], node.args[0]
            reason = None
            if not (isinstance(src_node, fx.Node) and src_node.op == "call_module"
                    and isinstance(modules[src_node.target], WEIGHT_MODULES)):
                reason = f"its input is {_describe(src_node, modules)}, not a Conv2d / Linear"
            elif len(src_node.users) != 1:
                others = [u.name for u in src_node.users if u is not node]
                reason = (f"the output of {src_node.target!r} is also used by "
                          f"{', '.join(others)}")
            elif isinstance(bn, nn.BatchNorm1d) and len(_tensor_shape(node) or ()) != 2:
                reason = "BatchNorm1d on a 3-d input: its channels are not the layer's outputs"
            elif isinstance(modules[src_node.target], nn.Conv2d) != isinstance(
                    bn, nn.BatchNorm2d):
                reason = f"{type(bn).__name__} after {type(modules[src_node.target]).__name__}"
            if reason is not None:
                unfolded.append((node.target, reason))
                continue
            merged[src_node.target] = node.target
            node.replace_all_uses_with(src_node)
            graph.erase_node(node)

        # the folded graph: in-place ops as out-of-place ones (torch.func), no dropout
        root: dict[str, object] = {}
        for node in list(graph.nodes):
            if node.op == "call_module":
                m = modules[node.target]
                if isinstance(m, DROPOUT_MODULES):
                    node.replace_all_uses_with(node.args[0])
                    graph.erase_node(node)
                    continue
                if not isinstance(m, WEIGHT_MODULES):
                    m = copy.deepcopy(m)
                    if getattr(m, "inplace", False):
                        m.inplace = False
                root[node.target] = m
            elif node.op == "call_function":
                if node.target in DROPOUT_FUNCTIONS:
                    node.replace_all_uses_with(node.args[0])
                    graph.erase_node(node)
                    continue
                if node.target in INPLACE:
                    node.target = INPLACE[node.target]
                if node.kwargs.get("inplace"):
                    node.kwargs = {**node.kwargs, "inplace": False}
            elif node.op == "call_method" and node.target in INPLACE_METHODS:
                node.target = INPLACE_METHODS[node.target]
            elif node.op == "get_attr":
                root[node.target] = gm.get_buffer(node.target) \
                    if _has(gm.get_buffer, node.target) else getattr(gm, node.target)

        # the weight layers, folded, in forward order
        layers: list[WeightLayer] = []
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(modules[node.target], WEIGHT_MODULES):
                continue
            m, name = modules[node.target], node.target
            bn = merged.get(name)
            if bn is not None:
                weight, bias = _fold_bn(m.weight, m.bias, modules[bn])
            else:
                weight = m.weight.detach().clone()
                bias = (m.bias.detach().clone() if m.bias is not None
                        else torch.zeros(weight.shape[0], dtype=weight.dtype,
                                         device=weight.device))
            new = copy.deepcopy(m)
            new.weight = nn.Parameter(weight)
            new.bias = nn.Parameter(bias)
            root[name] = new
            in_shape = _tensor_shape(node.args[0])[1:]
            out_shape = _tensor_shape(node)[1:]
            conv = isinstance(m, nn.Conv2d)
            source, pad = node.args[0], None
            if conv and isinstance(source, fx.Node) and source.op == "call_module" \
                    and isinstance(modules.get(source.target), nn.ZeroPad2d) \
                    and len(source.users) == 1 and tuple(m.padding) == (0, 0) \
                    and m.padding_mode == "zeros":
                # the padding of this convolution, written before it (Keras's uneven
                # "same"): its operator is on the unpadded input, as a conv's own padding
                pad = tuple(int(p) for p in modules[source.target].padding)
                in_shape = _tensor_shape(source.args[0])[1:]
            layers.append(WeightLayer(
                name, "conv" if conv else "linear", weight, bias,
                tuple(m.stride) if conv else (1, 1),
                (m.padding if isinstance(m.padding, str) else tuple(m.padding))
                if conv else (0, 0),
                tuple(m.dilation) if conv else (1, 1), m.groups if conv else 1,
                m.padding_mode if conv else "zeros", in_shape, out_shape,
                tuple(in_shape[-2:]) if conv else None, False, bn,
                m.bias is not None or bn is not None, pad))
        if not layers:
            raise UnsupportedNetwork(f"{type(model).__name__} has no Conv2d / Linear layer")

        graph.lint()
        folded = fx.GraphModule(root, graph, class_name=f"Folded{type(model).__name__}")
        folded.eval()
        with torch.no_grad():
            _propagate(folded, example)
        additions = _additions(folded, {layer.name for layer in layers})
        short = {name for a in additions for name in a.shortcut}
        for layer in layers:
            layer.shortcut = layer.name in short
        return cls(folded, layers, unfolded, additions, tuple(example.shape[1:]))

    def weights_of(self, model: nn.Module) -> torch.Tensor:
        """The flat folded weights of another instance of the same architecture (the
        initial or epoch-1 weights): the same layout as w, without tracing again."""
        mods = dict(model.named_modules())
        parts = []
        for layer in self.layers:
            m = mods[layer.name]
            if tuple(m.weight.shape) != tuple(layer.weight.shape):
                raise ValueError(f"{layer.name}: weight {tuple(m.weight.shape)}, expected "
                                 f"{tuple(layer.weight.shape)}")
            if layer.bn is not None:
                weight, bias = _fold_bn(m.weight, m.bias, mods[layer.bn])
            else:
                weight = m.weight.detach()
                bias = m.bias.detach() if m.bias is not None else torch.zeros_like(layer.bias)
            parts += [weight.reshape(-1), bias]
        return torch.cat(parts).detach().to(self.w.device)

    # ---------------------------------------------------------------- facts
    @property
    def omega(self) -> int:
        return self.w.numel()

    @property
    def d(self) -> int:
        return len(self.layers)

    @property
    def folded(self) -> bool:
        """Every BatchNorm merged into a layer (the network is its weight layers,
        activations, pooling and additions only)."""
        return not self.unfolded

    def require_folded(self, what: str = "this measure") -> None:
        if self.unfolded:
            raise NotDefined(f"{what} needs every BatchNorm folded; not folded: " + "; ".join(
                f"{name}: {reason}" for name, reason in self.unfolded))

    def input_sizes(self) -> list[tuple[int, int] | None]:
        """Each layer's input (H, W) on the example input (None for a Linear)."""
        return [layer.input_size for layer in self.layers]

    def to(self, device) -> Network:
        """The network with w and its layers on `device`."""
        out = copy.copy(self)
        out.w = self.w.to(device)
        out.layers = [copy.copy(layer) for layer in self.layers]
        for layer in out.layers:
            layer.weight, layer.bias = layer.weight.to(device), layer.bias.to(device)
        out._modules, out._functions, out._floats = {}, {}, dict(self._floats)
        return out

    # ---------------------------------------------------------------- the function
    def split(self, w: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weight, bias) of each layer as views of w (the last dimension of w; any
        leading ones kept)."""
        if w.dim() == 1:
            return [(w[i:i + n].view(shape), w[i + n:i + n + o])
                    for i, n, o, shape in self._slices]
        lead = w.shape[:-1]
        return [(w[..., i:i + n].reshape(*lead, *shape), w[..., i + n:i + n + o])
                for i, n, o, shape in self._slices]

    def params(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for layer, (weight, bias) in zip(self.layers, self.split(w), strict=True):
            out[f"{layer.name}.weight"] = weight
            out[f"{layer.name}.bias"] = bias
        return out

    def _module_for(self, w: torch.Tensor) -> fx.GraphModule:
        """The folded module with its constants (unfolded BatchNorms) in w's dtype and
        on w's device: the module itself where they already are, else a converted copy
        (made by replacing tensors, not by `.data =`, so that it can be made inside a
        torch.func transform: jvp, grad, vmap)."""
        key = (w.dtype, w.device)
        if not self._modules:
            p = next(self.module.parameters())
            self._modules[(p.dtype, p.device)] = self.module
        if key not in self._modules:
            module = copy.deepcopy(self.module)
            for sub in module.modules():
                for name, p in list(sub._parameters.items()):
                    if p is not None:
                        sub._parameters[name] = nn.Parameter(
                            p.detach().to(device=w.device, dtype=w.dtype), requires_grad=False)
                for name, b in list(sub._buffers.items()):
                    if b is not None:
                        sub._buffers[name] = b.to(device=w.device, dtype=w.dtype
                                                  if b.is_floating_point() else b.dtype)
            self._modules[key] = module
        return self._modules[key]

    def _function_for(self, w: torch.Tensor) -> fx.GraphModule:
        """The folded network as a function of (x, W_1, b_1, W_2, b_2, ...): each
        Conv2d / Linear a call of F.conv2d / F.linear on the given weights (what the
        module's own forward calls, with the same arguments), constants in w's dtype
        and on w's device. No parameters swapped in and out per call, as
        functional_call does: the searches' many small forwards cost what the
        convolutions cost."""
        return self._function(w, many=False)

    def _function(self, w: torch.Tensor, many: bool) -> fx.GraphModule:
        key = (w.dtype, w.device, many)
        if key not in self._functions:
            self._functions[key] = _functional(self._module_for(w), self.layers,
                                               grouped_conv if many else F.conv2d)
        return self._functions[key]

    def logits(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The folded network's output on x (n, ...) with the weights w (ω,)."""
        return self._function_for(w)(x, *[t for pair in self.split(w) for t in pair])

    def logits_many(self, ws: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The outputs of B networks at once, (B, n, classes): ws (B, ω), x (B, n, ...)
        each network's own inputs or (n, ...) shared by all. torch.func.vmap over
        the network's function, each convolution with B weight sets one grouped
        convolution (group b: network b), its bias added by the convolution itself
        (_GroupedConv; vmap's own rule adds it afterwards, rounded otherwise), shared
        inputs expanded to every network first: the arithmetic of the NiN's former
        FlatNet, to the bit."""
        fn = self._function(ws, many=True)
        if x.dim() == len(self.example_shape) + 1:
            x = x.expand(len(ws), *x.shape)

        def one(w, xb):
            return fn(xb, *[t for pair in self.split(w) for t in pair])
        return vmap(one)(ws, x)

    # ---------------------------------------------------------------- gradients
    def per_example_gradients(self, x: torch.Tensor, y: torch.Tensor,
                              w: torch.Tensor | None = None, chunk: int | None = None):
        """Yields (k, ω) blocks of ∇_w ℓ(f_w(x_i), y_i), k ≤ chunk examples at a time
        (torch.func: vmap over examples of grad of one example's cross-entropy)."""
        w = self.w if w is None else w
        fn = self._function_for(w)
        chunk = chunk or self.gradient_chunk("func")

        def loss(v, xi, yi):
            out = fn(xi.unsqueeze(0), *[t for pair in self.split(v) for t in pair])
            return F.cross_entropy(out, yi.unsqueeze(0), reduction="sum")
        per_example = vmap(grad(loss), in_dims=(None, 0, 0))
        for i in range(0, len(x), chunk):
            yield per_example(w, x[i:i + chunk], y[i:i + chunk])

    def gradient_noise(self, x: torch.Tensor, y: torch.Tensor, chunk: int | None = None,
                       w: torch.Tensor | None = None, method: str = "layers") -> float:
        """Σ over parameters of the variance over examples of ∇_w ℓ(f_w(x_i), y_i)
        = (1/m) Σ_i ‖g_i‖² − ‖ḡ‖², the sums in float64.

        method "layers" (default): the arithmetic the NiN's gradient noise had, for any
        network of Conv2d / Linear layers: one forward and backward per chunk gives
        each layer's input U_i and output gradient δ_i for every example (examples do
        not interact in eval mode), the layer's weight gradient for example i is
        G_i = δ_i U_iᵀ per group (U_i unfolded for a conv), ‖G_i‖² taken as
        ⟨δ_iᵀδ_i, U_iᵀU_i⟩ where those P × P Gram matrices are smaller; the bias
        gradient, δ_i summed over positions. "func": torch.func's vmap(grad) per
        example (per_example_gradients), simpler and much slower on a CPU."""
        w = self.w if w is None else w
        chunk = chunk or self.gradient_chunk(method)
        sum_sq = torch.zeros((), dtype=torch.float64, device=w.device)
        total = torch.zeros(w.shape, dtype=torch.float64, device=w.device)
        if method == "func":
            for g in self.per_example_gradients(x, y, w, chunk):
                g = g.double()
                sum_sq += g.pow(2).sum()
                total += g.sum(0)
        elif method == "layers":
            for i in range(0, len(x), chunk):
                sum_sq += self._layer_gradients(w, x[i:i + chunk], y[i:i + chunk], total)
        else:
            raise ValueError(f"method {method!r}: expected 'layers' or 'func'")
        m = len(x)
        return float(sum_sq) / m - float(total.pow(2).sum()) / m ** 2

    def _layer_gradients(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                         total: torch.Tensor) -> torch.Tensor:
        """Σ_i ‖g_i‖² over the examples of (x, y); Σ_i g_i added into total (float64)."""
        module = self._module_for(w)
        subs = dict(module.named_modules())
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}

        def keep(name):
            def hook(_, args, out):
                inputs[name], outputs[name] = args[0], out
            return hook
        handles = [subs[layer.name].register_forward_hook(keep(layer.name))
                   for layer in self.layers]
        try:
            out = functional_call(module, self.params(w.detach()),
                                  (x.detach().requires_grad_(True),))
        finally:
            for h in handles:
                h.remove()
        loss = F.cross_entropy(out, y, reduction="sum")
        deltas = torch.autograd.grad(loss, [outputs[layer.name] for layer in self.layers])
        sum_sq = torch.zeros((), dtype=torch.float64, device=w.device)
        i = 0
        for layer, delta in zip(self.layers, deltas, strict=True):
            u = _unfolded(layer, inputs[layer.name].detach()).double()   # (b, g, ck, P)
            g = layer.groups
            delta = (delta.movedim(-1, 1) if layer.kind == "linear" else delta)
            delta = delta.reshape(len(delta), g, delta.shape[1] // g, -1).double()  # (b,g,o,P)
            o, ck, positions = delta.shape[2], u.shape[2], delta.shape[3]
            if positions * (o + ck) < o * ck:      # Gram matrices: (b, g, P, P) each
                sum_sq += torch.einsum("bgpq,bgpq->", delta.transpose(2, 3) @ delta,
                                       u.transpose(2, 3) @ u)
            else:                                  # the per-example gradients
                sum_sq += (delta @ u.transpose(2, 3)).pow(2).sum()
            g_b = delta.sum(3).reshape(len(delta), -1)                      # (b, c_out)
            sum_sq += g_b.pow(2).sum()
            n = layer.weight.numel()
            total[i:i + n] += torch.einsum("bgop,bgkp->gok", delta, u).reshape(-1)
            total[i + n:i + n + g_b.shape[1]] += g_b.sum(0)
            i += n + g_b.shape[1]
        return sum_sq

    def gradient_chunk(self, method: str = "layers") -> int:
        """Examples per chunk, 1 to 512. "layers": one layer's per-example gradients
        about 160 MB (the chunk the NiN's gradient noise always had); "func": every
        parameter's per-example gradient and autograd graph within 160 MB."""
        if method == "layers":
            widest = max(layer.weight.numel() for layer in self.layers)
            return max(1, min(512, 20_000_000 // widest))
        per = 4 * (2 * self.omega + 3 * self.activation_floats(total=True))
        return max(1, min(512, 160 * 2 ** 20 // per))

    def activation_floats(self, shape: tuple[int, ...] | None = None,
                          total: bool = False) -> int:
        """The largest node output of one example of `shape` (default: the example
        input's), in floats; total: all nodes' outputs together."""
        shape = tuple(shape or self.example_shape)
        if shape not in self._floats:
            gm = copy.deepcopy(self.module)
            with torch.no_grad():
                _propagate(gm, torch.zeros((1, *shape), dtype=self.w.dtype,
                                                    device=self.w.device))
            sizes = [int(torch.Size(s).numel()) for s in
                     (_tensor_shape(n) for n in gm.graph.nodes if n.op != "placeholder")
                     if s is not None]
            self._floats[shape] = (max(sizes), sum(sizes))
        most, added = self._floats[shape]
        return added if total else most


class _GroupedConv(torch.autograd.Function):
    """F.conv2d with a batching rule of its own: under vmap, B convolutions as one
    convolution of B groups with the bias added inside it (as the NiN's former
    FlatNet.logits_many ran them), where vmap's rule adds a batched bias after the
    convolution, one more rounding. Its gradient is the convolution's own
    (aten.convolution_backward, as autograd's)."""

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, groups, bias is not None)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conv
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                has_bias and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_out, x, weight, [weight.shape[0]] if has_bias else None, list(stride),
            list(padding), list(dilation), False, [0, 0], groups, mask)
        return gx, gw, gb, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, stride, padding, dilation, groups):
        count = info.batch_size

        def batched(t, dim, at):   # the batch dimension at `at`, B copies if it had none
            if t is None:
                return None
            return t.movedim(dim, at) if dim is not None else t.unsqueeze(at).expand(
                *t.shape[:at], count, *t.shape[at:])
        x = batched(x, in_dims[0], 1)                       # (n, B, C, H, W)
        weight = batched(weight, in_dims[1], 0)             # (B, O, C/g, kh, kw)
        bias = batched(bias, in_dims[2], 0)                 # (B, O)
        n = x.shape[0]
        out = _GroupedConv.apply(x.reshape(n, -1, *x.shape[3:]),
                                 weight.reshape(-1, *weight.shape[2:]),
                                 None if bias is None else bias.reshape(-1),
                                 stride, padding, dilation, groups * count)
        return out.reshape(n, count, -1, *out.shape[2:]), 1


def grouped_conv(x, weight, bias, stride, padding, dilation, groups):
    """F.conv2d, with _GroupedConv's batching rule under vmap."""
    return _GroupedConv.apply(x, weight, bias, stride, padding, dilation, groups)


def _functional(module: fx.GraphModule, layers: list[WeightLayer],
                conv=F.conv2d) -> fx.GraphModule:
    """The folded module's graph with each weight layer's call replaced by the
    functional call its forward makes, on weights given as inputs after x:
    (x, W_1, b_1, ..., W_d, b_d). conv: F.conv2d, or grouped_conv (logits_many)
    where the padding is numbers (convolution_backward takes no "same")."""
    index = {layer.name: i for i, layer in enumerate(layers)}
    subs = dict(module.named_modules())
    graph, env, params = fx.Graph(), {}, []
    for node in module.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
            params = [(graph.placeholder(f"weight_{i}"), graph.placeholder(f"bias_{i}"))
                      for i in range(len(layers))]
        elif node.op == "call_module" and node.target in index:
            m = subs[node.target]
            weight, bias = params[index[node.target]]
            h = env[node.args[0] if node.args else node.kwargs["input"]]
            if isinstance(m, nn.Linear):
                env[node] = graph.call_function(F.linear, (h, weight, bias))
            elif m.padding_mode != "zeros":     # as nn.Conv2d._conv_forward does
                padded = graph.call_function(F.pad, (h, m._reversed_padding_repeated_twice),
                                             {"mode": m.padding_mode})
                env[node] = graph.call_function(conv, (padded, weight, bias, m.stride,
                                                       (0, 0), m.dilation, m.groups))
            else:
                env[node] = graph.call_function(
                    F.conv2d if isinstance(m.padding, str) else conv,
                    (h, weight, bias, m.stride, m.padding, m.dilation, m.groups))
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.lint()
    return fx.GraphModule(module, graph, class_name=module.__class__.__name__ + "Function")


def _unfolded(layer: WeightLayer, h: torch.Tensor) -> torch.Tensor:
    """A layer's input as the columns its weight multiplies, per group: (b, groups,
    c_in/groups · kh · kw, P) for a conv (P output positions), (b, 1, in, P) for a
    Linear (P: the positions of any dimensions between batch and features)."""
    if layer.kind == "linear":
        return h.reshape(len(h), -1, h.shape[-1]).transpose(1, 2).unsqueeze(1)
    kh, kw = layer.kernel
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        pads = []
        for pad in reversed(_explicit(layer.padding, layer.kernel, layer.dilation)):
            pads += pad
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        h, padding = F.pad(h, pads, mode=mode), 0
    else:
        padding = layer.padding
    u = F.unfold(h, (kh, kw), dilation=layer.dilation, padding=padding, stride=layer.stride)
    return u.reshape(len(u), layer.groups, -1, u.shape[-1])


def _explicit(padding, kernel, dilation) -> list[list[int]]:
    """[before, after] per spatial dimension for a conv's padding ("same" puts the odd
    one after, as torch does)."""
    if padding == "valid":
        return [[0, 0] for _ in kernel]
    if padding == "same":
        out = []
        for k, d in zip(kernel, dilation, strict=True):
            t = d * (k - 1)
            out.append([t // 2, t - t // 2])
        return out
    return [[p, p] for p in padding]


def _additions(gm: fx.GraphModule, layer_names: set[str]) -> list[Addition]:
    """Each addition of two computed tensors, with the weight layers on each branch."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    ancestors: dict[fx.Node, set] = {}
    for node in gm.graph.nodes:
        anc: set = set()
        for a in node.all_input_nodes:
            anc |= ancestors[a] | {a}
        ancestors[node] = anc
    out = []
    for node in gm.graph.nodes:
        is_add = (node.op == "call_function" and node.target in (operator.add, torch.add)) \
            or (node.op == "call_method" and node.target == "add")
        args = [a for a in node.args[:2] if isinstance(a, fx.Node)
                and _tensor_shape(a) is not None]
        if not is_add or len(args) != 2:
            continue
        a, b = (ancestors[n] | {n} for n in args)
        common = a & b
        branches = tuple([n.target for n in sorted(side - common, key=order.get)
                          if n.op == "call_module" and n.target in layer_names]
                         for side in (a, b))
        counts = [len(x) for x in branches]
        shortcut = [] if counts[0] == counts[1] else list(branches[counts.index(min(counts))])
        out.append(Addition(node.name, branches, shortcut))
    return out
