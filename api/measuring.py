"""`fgm.measure`: the paper's measures of a model held in memory, without a warehouse
or a run bundle (as PGDL's `complexity(model, dataset)` and RGM's
`get_all_measures(model, init_model, dataloader)`).

    values = fgm.measure(model, (x_train, y_train), init=init_state)
    details = fgm.measure_details(model, train_set, measures="pacbayes_*")

Every measure sees the network in eval mode with each BatchNorm folded into the
convolution before it (App. C.1), on the training set it is given."""

from __future__ import annotations

import copy
import difflib
import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl
import torch
from torch import nn

from fgm.ingest.zoo import NotAClassifier, classifier_classes
from fgm.measures.context import BUDGETS, Context, Settings
from fgm.measures.network import UnsupportedNetwork
from fgm.measures.registry import list_measures as _registry
from fgm.measures.runner import run_one
from fgm.warehouse.errors import FgmError


class UnsupportedModel(FgmError):
    """A network the measures cannot read: names the layer or the class."""


@dataclass(frozen=True)
class MeasureDetail:
    """One measure of one model: its value (None when it has none), status ("ok",
    "failed", or "not_applicable" when an input it needs was not given), why it has
    no value, and the settings and search results behind it."""
    value: float | None
    status: str
    reason: str | None
    params: dict[str, Any]


def list_measures(pattern: str = "*") -> pl.DataFrame:
    """The registry: name, the paper's equation, family, what each measure needs
    (final, init, epoch1 weights, the training data, the trace) and its definition,
    for the measures whose name matches a glob pattern (or a comma list of them)."""
    if not isinstance(pattern, str):
        raise FgmError(f"pattern {pattern!r}: expected a glob such as '*' or 'pacbayes_*'")
    specs = _registry(pattern)
    if not specs and not any(c in pattern for c in "*?["):
        _names(pattern)    # a plain name that is not a measure: say which was meant
    return pl.DataFrame({"measure": [s.name for s in specs], "equation": [s.eq for s in specs],
                         "family": [s.family for s in specs],
                         "needs": [list(s.needs) for s in specs],
                         "description": [s.description for s in specs]},
                        schema={"measure": pl.String, "equation": pl.String,
                                "family": pl.String, "needs": pl.List(pl.String),
                                "description": pl.String})


def _names(measures: str | Sequence[str]) -> list[str]:
    every = [s.name for s in _registry("*")]
    if not isinstance(measures, str) and not (isinstance(measures, Sequence)
                                              and not isinstance(measures, bytes)):
        raise FgmError(f"measures {measures!r}: expected a glob such as '*', a comma list "
                       "or a list of names")
    patterns = ([p.strip() for p in measures.split(",") if p.strip()]
                if isinstance(measures, str) else list(measures))
    if not patterns:
        raise FgmError("measures: no measure named; give a glob such as '*' or a list")
    chosen = []
    for p in patterns:
        if not isinstance(p, str):
            raise FgmError(f"measures: {p!r} is not a measure name")
        hits = [n for n in every if fnmatch.fnmatchcase(n, p)]
        if not hits:
            close = difflib.get_close_matches(p, every, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise FgmError(f"unknown measure {p!r}.{hint} fgm.list_measures() lists them.")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise UnsupportedModel(f"model: expected a torch nn.Module, got {type(model).__name__}")
    if not any(True for _ in model.parameters()):
        raise UnsupportedModel(f"model: a {type(model).__name__} without parameters")
    return model


def _data(train: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a pair of tensors or a torch Dataset of (image, label) items."""
    if isinstance(train, tuple | list) and len(train) == 2 \
            and all(isinstance(t, torch.Tensor) for t in train):
        x, y = train
    elif isinstance(train, torch.utils.data.Dataset):
        try:
            n = len(train)  # type: ignore[arg-type]
        except TypeError:
            raise FgmError("train: a Dataset without a length; give (x, y) tensors") from None
        if n == 0:
            raise FgmError("train: the Dataset is empty")
        try:
            items = [train[i] for i in range(n)]
            x = torch.stack([torch.as_tensor(item[0]) for item in items])
            y = torch.stack([torch.as_tensor(item[1]).reshape(()) for item in items])
        except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as exc:
            raise FgmError(f"train: the Dataset's items must be (image tensor, integer "
                           f"label) pairs of one shape ({exc})") from None
    else:
        raise FgmError(f"train: expected an (x, y) pair of tensors or a torch Dataset, got "
                       f"{type(train).__name__}")
    if x.dim() != 4:
        raise FgmError(f"train: images must be (N, C, H, W), got shape {tuple(x.shape)}")
    if y.dim() != 1 or len(y) != len(x):
        raise FgmError(f"train: labels must be (N,) with N = {len(x)} images, got shape "
                       f"{tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        if y.dtype == torch.bool or not torch.equal(y, y.round()):
            raise FgmError(f"train: labels must be whole class numbers, got {y.dtype}")
    if len(x) == 0:
        raise FgmError("train: no examples")
    return x, y.long()


def _init(model: nn.Module, init: object) -> nn.Module | None:
    if init is None:
        return None
    if isinstance(init, nn.Module):
        state = init.state_dict()
    elif isinstance(init, Mapping):
        state = dict(init)
    else:
        raise FgmError(f"init: expected the initial weights as a module or a state dict, "
                       f"got {type(init).__name__}")
    net = copy.deepcopy(model)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise FgmError(f"init: these weights do not fit the model: "
                       f"{' '.join(str(exc).split())[:400]}") from None
    return net


def measure_details(model: nn.Module, train: object, *, init: nn.Module | Mapping | None = None,
                    measures: str | Sequence[str] = "*", budget: str = "fast",
                    device: str | torch.device = "cpu", seed: int = 0
                    ) -> dict[str, MeasureDetail]:
    """Each measure's value, status, reason and parameters (see `measure`)."""
    net = _check_model(model)
    names = _names(measures)
    x, y = _data(train)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 10 ** 9:
        raise FgmError(f"seed {seed!r}: expected a whole number from 0 (the searches' seed)")
    if not isinstance(budget, str) or budget not in BUDGETS:
        close = difflib.get_close_matches(str(budget), list(BUDGETS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise FgmError(f"unknown budget {budget!r}.{hint} Budgets: {', '.join(BUDGETS)}")
    try:
        settings = Settings.preset(budget, seed=seed)
        dev = torch.device(device)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise FgmError(f"device {device!r} / budget {budget!r}: {exc}") from None
    initial = _init(net, init)
    dtype = next(net.parameters()).dtype     # images as the model's weights are
    try:
        final = copy.deepcopy(net).to(dev)   # the caller's model is left as it was
        if initial is not None:
            initial = initial.to(dev)
        x, y = x.to(device=dev, dtype=dtype), y.to(dev)
    except (RuntimeError, AssertionError) as exc:
        raise FgmError(f"device {device!r}: {' '.join(str(exc).split())[:200]}") from None
    try:
        classes = classifier_classes(final, x, [y], "train")
    except NotAClassifier as exc:
        raise UnsupportedModel(f"model: {exc.detail}") from None
    try:
        ctx = Context.from_models(final, x, y, classes, init=initial, settings=settings)
    except UnsupportedNetwork as exc:
        raise UnsupportedModel(f"model: {exc}") from None
    given = {"final", "data"} | ({"init"} if initial is not None else set())
    why = {"init": "the initial weights were not given (init=...)",
           "epoch1": "the weights after epoch 1 are not known to fgm.measure",
           "trace": "the training trace is not known to fgm.measure"}
    specs = {s.name: s for s in _registry("*")}
    out: dict[str, MeasureDetail] = {}
    for name in names:
        spec = specs[name]
        lacking = [n for n in spec.needs if n not in given]
        if lacking:
            out[name] = MeasureDetail(None, "not_applicable",
                                      "; ".join(why[n] for n in lacking), {})
            continue
        value, status, error, params = run_one(spec, ctx)
        if value is not None and not math.isfinite(value):
            value = None
        out[name] = MeasureDetail(value, status, error, dict(params))
    return out


def measure(model: nn.Module, train: object, *, init: nn.Module | Mapping | None = None,
            measures: str | Sequence[str] = "*", budget: str = "fast",
            device: str | torch.device = "cpu", seed: int = 0) -> dict[str, float | None]:
    """The measures of `model` on its training set: {measure: value}, None where the
    measure has no value (it needs `init`, the weights after epoch 1 or the training
    trace, which were not given, or it failed: measure_details says why).

    train: an (x, y) pair of tensors, x (N, C, H, W) images as the model takes them
    (normalised), y (N,) integer labels; or a torch Dataset of (image, label) items.
    model: any network of Conv2d / Linear layers, BatchNorm, pooling, activations,
    dropout, flatten and residual additions (traced with torch.fx, BatchNorm folded);
    one it cannot read raises UnsupportedModel naming the layer.
    init: the initial weights, a module of the same architecture or its state dict.
    measures: a glob ("*", "pacbayes_*"), a comma list or a list of names.
    budget: the σ/α searches' budget, "fast", "paper" or "thorough"; seed: the
    searches' seed. Raises FgmError (UnsupportedModel for a network the measures
    cannot read) with what was wrong."""
    return {name: d.value for name, d in measure_details(
        model, train, init=init, measures=measures, budget=budget, device=device,
        seed=seed).items()}


__all__ = ["MeasureDetail", "UnsupportedModel", "list_measures", "measure", "measure_details"]
