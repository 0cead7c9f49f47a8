"""Keras Sequential models of the PGDL competition as PyTorch modules, without
TensorFlow: the layer list of a config.json built as torch layers, and the
weights of Keras's HDF5 `save_weights` files read with h5py into them.

What is converted, and how (each exactly; tests/pgdl checks every converted
model's logits against Keras's own):
- Conv2D: kernel HWIO -> OIHW; padding "valid", or "same" as Keras pads it
  (asymmetrically, the extra row and column at the bottom and right, where the
  total is odd: a ZeroPad2d before the convolution); strides, dilation, use_bias,
  activation.
- Dense: kernel transposed; after a Flatten its input rows permuted from Keras's
  H, W, C order to PyTorch's C, H, W.
- BatchNormalization (channels last): gamma, beta, moving mean and variance,
  Keras's epsilon (default 1e-3); center and scale.
- MaxPooling2D, AveragePooling2D ("valid" or "same"; an average over the window's
  inputs only, as Keras takes it), GlobalAveragePooling2D, Flatten, Dropout,
  Activation (relu, linear, tanh, sigmoid, elu).
Anything else (another layer, a softmax output, channels_first, an argument that
changes the forward) is refused with the layer's index and what it is.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fgm.warehouse import FgmError

ACTIVATIONS = {None: None, "linear": None, "relu": nn.ReLU, "tanh": nn.Tanh,
               "sigmoid": nn.Sigmoid, "elu": nn.ELU}
# arguments that change nothing in the forward of a trained model in eval mode
INERT = {"name", "trainable", "kernel_initializer", "bias_initializer",
         "kernel_regularizer", "bias_regularizer", "activity_regularizer",
         "kernel_constraint", "bias_constraint", "input_shape", "batch_input_shape",
         "beta_initializer", "gamma_initializer", "moving_mean_initializer",
         "moving_variance_initializer", "beta_regularizer", "gamma_regularizer",
         "beta_constraint", "gamma_constraint", "seed", "noise_shape", "momentum",
         "renorm", "renorm_clipping", "renorm_momentum", "fused", "virtual_batch_size",
         "adjustment", "synchronized"}
REQUIRED = {"Conv2D": ("filters", "kernel_size"), "Dense": ("units",)}
KNOWN = {
    "Conv2D": {"filters", "kernel_size", "strides", "padding", "activation", "use_bias",
               "dilation_rate", "data_format", "groups"},
    "Dense": {"units", "activation", "use_bias"},
    "Dropout": {"rate"},
    "BatchNormalization": {"axis", "epsilon", "center", "scale"},
    "MaxPooling2D": {"pool_size", "strides", "padding", "data_format"},
    "AveragePooling2D": {"pool_size", "strides", "padding", "data_format"},
    "GlobalAveragePooling2D": {"data_format", "keepdims"},
    "Flatten": {"data_format"},
    "Activation": {"activation"},
}


def _int(v, what: str, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int | float) or not float(v).is_integer() \
            or v < low:
        raise ValueError(f"{what} = {v!r}: expected a whole number >= {low}")
    return int(v)


def _pair(v, what: str) -> tuple[int, int]:
    if isinstance(v, list | tuple):
        if len(v) != 2:
            raise ValueError(f"{what} = {v!r}: expected two numbers")
        return _int(v[0], what), _int(v[1], what)
    n = _int(v, what)
    return n, n


def _same(n: int, k: int, s: int, d: int = 1) -> tuple[int, int, int]:
    """Keras's "same": (output size, padding before, padding after) on one side."""
    out = math.ceil(n / s)
    total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
    return out, total // 2, total - total // 2


def _valid(n: int, k: int, s: int, d: int = 1) -> int:
    out = (n - (k - 1) * d - 1) // s + 1
    if out < 1:
        raise ValueError(f"a window of {k} does not fit an input of {n}")
    return out


class KerasSequential(nn.Module):
    """A PGDL config.json's layers as torch layers (`layers`, run in order), with
    where each Keras layer's weights go (`keras_state_dict`)."""

    def __init__(self, config: list, input_shape: list):
        super().__init__()
        if not isinstance(config, list) or not config:
            raise FgmError("model_config: expected a non-empty list of layers")
        if not (isinstance(input_shape, list) and len(input_shape) == 3):
            raise FgmError(f"input_shape {input_shape!r}: expected [H, W, C]")
        h, w, c = (_int(v, "input_shape") for v in input_shape)
        self.input_shape = (h, w, c)
        shape: tuple[int, ...] = (c, h, w)
        layers: list[nn.Module] = []
        self.plan: list[dict] = []     # per Keras layer: its type and the torch indices
        flat_from: tuple[int, int, int] | None = None   # (C, H, W) a Flatten flattened
        for i, spec in enumerate(config):
            where = f"layer {i}"
            try:
                if not isinstance(spec, dict) or not isinstance(spec.get("layer_name"), str):
                    raise ValueError("expected a dict with layer_name")
                kind = spec["layer_name"]
                if kind not in KNOWN:
                    raise ValueError(f"{kind}: a layer type the converter does not handle "
                                     f"(it handles {', '.join(KNOWN)})")
                where = f"layer {i} ({kind})"
                args = {k: v for k, v in spec.items() if k != "layer_name"}
                if args.pop("dtype", None) not in (None, "float32"):
                    raise ValueError(f"dtype {spec.get('dtype')!r}: only float32 (another "
                                     "dtype changes Keras's arithmetic)")
                unknown = sorted(set(args) - KNOWN[kind] - INERT)
                if unknown:
                    raise ValueError(f"argument{'s' * (len(unknown) > 1)} "
                                     f"{', '.join(unknown)} not handled")
                for required in REQUIRED.get(kind, ()):
                    if required not in args:
                        raise ValueError(f"no {required}")
                if isinstance(args.get("padding"), str):
                    args["padding"] = args["padding"].lower()
                if args.get("data_format") not in (None, "channels_last"):
                    raise ValueError(f"data_format {args['data_format']!r}: only "
                                     "channels_last")
                start = len(layers)
                entry = {"kind": kind, "modules": []}
                shape, flat_from = self._layer(kind, args, shape, layers, entry, flat_from)
                entry.setdefault("modules", list(range(start, len(layers))))
                self.plan.append(entry)
            except (ValueError, TypeError) as exc:
                raise FgmError(f"{where}: {exc}") from None
        if len(shape) != 1:
            raise FgmError(f"the model's output has shape {shape}, not (classes,): "
                           "it does not end in a Dense or a global pooling")
        self.layers = nn.Sequential(*layers)
        self.classes = shape[0]

    def _layer(self, kind, a, shape, layers, entry, flat_from):
        if kind == "Conv2D":
            if len(shape) != 3:
                raise ValueError("a Conv2D after the features were flattened")
            c, h, w = shape
            filters = _int(a["filters"], "filters")
            kh, kw = _pair(a["kernel_size"], "kernel_size")
            sh, sw = _pair(a.get("strides", 1), "strides")
            dh, dw = _pair(a.get("dilation_rate", 1), "dilation_rate")
            if _int(a.get("groups", 1), "groups") != 1:
                raise ValueError("groups other than 1")
            if (sh > 1 or sw > 1) and (dh > 1 or dw > 1):
                raise ValueError("strides and dilation together (Keras refuses them too)")
            padding = a.get("padding", "valid")
            if padding == "same":
                oh, top, bottom = _same(h, kh, sh, dh)
                ow, left, right = _same(w, kw, sw, dw)
                if (top, left) == (bottom, right):
                    pad = (top, left)
                else:
                    layers.append(nn.ZeroPad2d((left, right, top, bottom)))
                    pad = (0, 0)
            elif padding == "valid":
                oh, ow, pad = _valid(h, kh, sh, dh), _valid(w, kw, sw, dw), (0, 0)
            else:
                raise ValueError(f"padding {padding!r}: expected 'valid' or 'same'")
            conv = nn.Conv2d(c, filters, (kh, kw), (sh, sw), pad, (dh, dw),
                             bias=bool(a.get("use_bias", True)))
            entry["weights"] = len(layers)
            layers.append(conv)
            self._activation(a.get("activation"), layers)
            return (filters, oh, ow), None
        if kind == "Dense":
            units = _int(a["units"], "units")
            features = math.prod(shape)
            if len(shape) != 1:
                raise ValueError(f"a Dense on features of shape {shape}: flatten first")
            entry["weights"] = len(layers)
            entry["flat_from"] = flat_from
            layers.append(nn.Linear(features, units, bias=bool(a.get("use_bias", True))))
            self._activation(a.get("activation"), layers)
            return (units,), None
        if kind == "BatchNormalization":
            axis = a.get("axis", -1)
            axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
            if axis not in (-1, len(shape)):
                raise ValueError(f"axis {axis!r}: only the channels (last) axis")
            if len(shape) == 1 and flat_from is not None:
                raise ValueError("a BatchNormalization between Flatten and Dense")
            eps = a.get("epsilon", 1e-3)
            if isinstance(eps, bool) or not isinstance(eps, int | float) \
                    or not math.isfinite(eps) or eps <= 0:
                raise ValueError(f"epsilon {eps!r}: expected a positive number")
            eps = float(eps)
            bn = (nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d)(shape[0], eps=eps)
            entry["weights"] = len(layers)
            entry["center"], entry["scale"] = bool(a.get("center", True)), bool(
                a.get("scale", True))
            layers.append(bn)
            return shape, flat_from
        if kind in ("MaxPooling2D", "AveragePooling2D"):
            if len(shape) != 3:
                raise ValueError("a pooling after the features were flattened")
            c, h, w = shape
            kh, kw = _pair(a.get("pool_size", 2), "pool_size")
            strides = a.get("strides")
            sh, sw = _pair(strides, "strides") if strides is not None else (kh, kw)
            padding = a.get("padding", "valid")
            maximum = kind == "MaxPooling2D"
            if padding == "valid":
                oh, ow, pad, ceil = _valid(h, kh, sh), _valid(w, kw, sw), (0, 0), False
            elif padding == "same":
                oh, top, bottom = _same(h, kh, sh)
                ow, left, right = _same(w, kw, sw)
                if (top, left) == (bottom, right):
                    pad, ceil = (top, left), False
                elif top == 0 and left == 0 and math.ceil((h - kh) / sh) + 1 == oh \
                        and math.ceil((w - kw) / sw) + 1 == ow:
                    pad, ceil = (0, 0), True    # the padding at the end only: ceil mode
                else:
                    raise ValueError(f"padding 'same' with a window of {kh}x{kw}, strides "
                                     f"{sh}x{sw} on {h}x{w}: padding on both sides unequally")
                if pad[0] * 2 > kh or pad[1] * 2 > kw:
                    raise ValueError("padding wider than half the window")
            else:
                raise ValueError(f"padding {padding!r}: expected 'valid' or 'same'")
            layers.append(nn.MaxPool2d((kh, kw), (sh, sw), pad, ceil_mode=ceil) if maximum
                          else nn.AvgPool2d((kh, kw), (sh, sw), pad, ceil_mode=ceil,
                                            count_include_pad=False))
            return (c, oh, ow), None
        if kind == "GlobalAveragePooling2D":
            if len(shape) != 3:
                raise ValueError("a global pooling after the features were flattened")
            if a.get("keepdims"):
                raise ValueError("keepdims")
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            return (shape[0],), None
        if kind == "Flatten":
            if len(shape) == 3:
                layers.append(nn.Flatten())
                return (math.prod(shape),), shape
            return shape, flat_from
        if kind == "Dropout":
            rate = a.get("rate", 0.0)
            if not isinstance(rate, int | float) or not 0 <= rate < 1:
                raise ValueError(f"rate {rate!r}")
            layers.append(nn.Dropout(float(rate)))
            return shape, flat_from
        if kind == "Activation":
            self._activation(a.get("activation"), layers)
            return shape, flat_from
        raise ValueError(kind)

    @staticmethod
    def _activation(name, layers: list) -> None:
        if name == "softmax":
            raise ValueError("a softmax: fgm's measures need the logits (a model that "
                             "ends in softmax gives probabilities)")
        if name not in ACTIVATIONS:
            raise ValueError(f"activation {name!r}: expected one of "
                             f"{', '.join(str(k) for k in ACTIVATIONS if k)}")
        if ACTIVATIONS[name] is not None:
            layers.append(ACTIVATIONS[name]())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    # ------------------------------------------------------------------ weights
    def keras_state_dict(self, path: Path) -> dict[str, torch.Tensor]:
        """The state dict of Keras's HDF5 weights file `path` for this model (the
        file's layers matched to the config's in order). FgmError names the layer
        whose weights are missing or misshapen."""
        try:
            import h5py
        except ImportError:
            raise FgmError("reading Keras weights needs h5py (pip install 'fgm[pgdl]')"
                           ) from None
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise FgmError(f"{path}: not a readable HDF5 file ({exc})") from None
        with f:
            group = f["model_weights"] if "model_weights" in f else f
            names = [n.decode() if isinstance(n, bytes) else str(n)
                     for n in group.attrs.get("layer_names", [])]
            if len(names) != len(self.plan):
                raise FgmError(f"{path}: {len(names)} layers, but the config has "
                               f"{len(self.plan)}")
            state: dict[str, torch.Tensor] = {}
            for i, (name, entry) in enumerate(zip(names, self.plan, strict=True)):
                weights = {}
                try:
                    g = group[name]
                    listed = g.attrs.get("weight_names", [])
                    if isinstance(listed, str | bytes):
                        raise TypeError("weight_names is not a list")
                    for w in listed:
                        w = w.decode() if isinstance(w, bytes) else str(w)
                        weights[w.rsplit("/", 1)[-1].split(":")[0]] = np.asarray(g[w])
                except (KeyError, TypeError, ValueError, OSError) as exc:
                    raise FgmError(f"{path}: layer {i} ({entry['kind']}, {name!r}): not in "
                                   f"Keras's save_weights layout ({exc})") from None
                try:
                    state.update(self._convert(entry, weights, f"layers.{entry.get('weights')}"))
                except ValueError as exc:
                    raise FgmError(f"{path}: layer {i} ({entry['kind']}, {name!r}): {exc}"
                                   ) from None
        return state

    def _convert(self, entry: dict, weights: dict, prefix: str) -> dict:
        kind = entry["kind"]
        if "weights" not in entry:
            if weights:
                raise ValueError(f"weights {', '.join(weights)} for a layer that has none")
            return {}
        module = self.layers[entry["weights"]]
        out = {}

        def take(key: str) -> np.ndarray:
            if key not in weights:
                raise ValueError(f"no {key} (the file has {', '.join(weights) or 'none'})")
            v = weights.pop(key)
            if not np.issubdtype(v.dtype, np.floating) or not np.isfinite(v).all():
                raise ValueError(f"{key}: not finite floats")
            return v
        if kind == "Conv2D":
            out["weight"] = take("kernel").transpose(3, 2, 0, 1)
            if module.bias is not None:
                out["bias"] = take("bias")
        elif kind == "Dense":
            kernel = take("kernel")
            flat = entry.get("flat_from")
            if flat is not None:      # rows in Keras's (H, W, C) order -> torch's (C, H, W)
                c, h, w = flat
                order = np.arange(c * h * w).reshape(h, w, c).transpose(2, 0, 1).reshape(-1)
                kernel = kernel[order]
            out["weight"] = kernel.T
            if module.bias is not None:
                out["bias"] = take("bias")
        elif kind == "BatchNormalization":
            n = module.num_features
            out["weight"] = take("gamma") if entry["scale"] else np.ones(n, np.float32)
            out["bias"] = take("beta") if entry["center"] else np.zeros(n, np.float32)
            out["running_mean"] = take("moving_mean")
            out["running_var"] = take("moving_variance")
            out["num_batches_tracked"] = np.asarray(0, np.int64)
        if weights:
            raise ValueError(f"weights the converter does not know: {', '.join(weights)}")
        own = module.state_dict()
        state = {}
        for key, value in out.items():
            tensor = torch.from_numpy(np.array(value, copy=True).reshape(np.shape(value)))
            if tuple(tensor.shape) != tuple(own[key].shape):
                raise ValueError(f"{key}: shape {tuple(value.shape)} where the config "
                                 f"gives {tuple(own[key].shape)}")
            state[f"{prefix}.{key}"] = tensor.to(own[key].dtype)
        return state
