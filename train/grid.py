"""Grids as plain data: a TOML file of axes and training settings, expanded into
configurations. Presets live in train/grids/*.toml."""

from __future__ import annotations

import difflib
import itertools
import math
import re
import tomllib
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from fgm.warehouse import FgmError
from fgm.warehouse.ids import config_hash

AXES = ("width", "depth", "dropout", "batch_size", "optimizer", "learning_rate",
        "weight_decay")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
PER_OPTIMIZER = ("learning_rate", "weight_decay")  # may be tables keyed by optimizer
DATASETS = ("cifar10", "svhn", "fashion_mnist", "digits")
# Upper bounds that keep a typo (width = 1000000) from asking for terabytes: the paper's
# largest NiN is width 768, depth 8, batch 128.
MAX_WIDTH, MAX_DEPTH, MAX_BATCH_SIZE = 4096, 64, 65536
# ...and of the numbers: a learning rate or weight decay past these diverges at once,
# a stop above MAX_STOP (in nats; a guess among 10 classes costs 2.3) stops at once,
# and a billion steps (max_steps, lr_drop_steps, trace_every) is years of training.
MAX_LEARNING_RATE, MAX_WEIGHT_DECAY, MAX_STOP = 10.0, 1.0, 10.0
MAX_STEPS, MAX_ESTIMATE_BATCHES = 10**9, 100_000
MAX_TRAIN_EXAMPLES = 10**9
SEED_MAX = 2**31 - 1     # seeds are 32-bit integers in the warehouse
MAX_MODELS = 100_000   # a larger grid (configurations x seeds) needs fgm-train grid --yes
# [train] settings with no default: absent, they are not part of the training hash,
# so the models of grids written before them keep their ids.
# train_examples: train on the first N images of the training set (by count, in the
# dataset's own order), normalised with their own mean and std; measures read the same.
TRAIN_OPTIONAL = ("train_examples",)
TRAIN_DEFAULTS = {
    "stop_cross_entropy": 0.01, "max_steps": 300_000, "lr_drop_steps": [60_000, 90_000],
    "lr_drop_factor": 0.1, "estimate_batches": 100, "trace_every": 500,
}
ALLOWED = {
    "width": f"positive integers up to {MAX_WIDTH}",
    "depth": f"positive integers up to {MAX_DEPTH}",
    "dropout": "finite numbers in [0, 1)",
    "batch_size": f"positive integers up to {MAX_BATCH_SIZE}",
    "optimizer": f"names among {', '.join(OPTIMIZERS)}",
    "learning_rate": f"finite positive numbers up to {MAX_LEARNING_RATE:g}, or a table "
                     "{sgd = [...], adam = [...], rmsprop = [...]}",
    "weight_decay": f"finite numbers >= 0 up to {MAX_WEIGHT_DECAY:g}, or a table "
                    "{sgd = [...], adam = [...], rmsprop = [...]}",
}


def _number(v: object) -> bool:
    """A finite int or float; not a boolean (which Python counts as an int)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: object, top: int | None = None) -> bool:
    """A positive int (not a boolean), at most `top`."""
    return (isinstance(v, int) and not isinstance(v, bool) and v > 0
            and (top is None or v <= top))


@dataclass(frozen=True)
class Config:
    """One model of the grid: a value and a level per axis."""
    values: dict[str, object]
    levels: dict[str, int]

    @property
    def hash(self) -> str:
        return config_hash(self.values)


@dataclass
class Grid:
    name: str
    dataset: str
    axes: dict[str, object]
    train: dict[str, object] = field(default_factory=dict)
    source: str = ""
    seeds: list[int] | None = None     # the grid's own seeds (fgm-train grid --seeds wins)

    def size(self) -> int:
        """How many configurations configs() gives, counted without building them."""
        plain = math.prod(len(self.axes[a]) for a in AXES
                          if a not in PER_OPTIMIZER and a != "optimizer")
        return plain * sum(math.prod(len(self._values_for(a, opt)) for a in PER_OPTIMIZER)
                           for opt in self.axes["optimizer"])

    def check_size(self, seeds: int = 1, limit: int | None = MAX_MODELS) -> int:
        """The number of models (configurations x seeds); past `limit` an FgmError."""
        n = self.size() * seeds
        if limit is not None and n > limit:
            per_seed = f" ({self.size():,} configurations x {seeds} seeds)" if seeds > 1 else ""
            raise FgmError(f"{self.source or self.name}: the grid has {n:,} models{per_seed}, "
                           f"more than the limit of {limit:,}; shrink an axis, or give "
                           f"fgm-train grid --yes to train them all anyway")
        return n

    def configs(self, limit: int | None = MAX_MODELS) -> list[Config]:
        """Every combination. Levels: a number's rank among its axis's values
        (ascending; per optimizer for tables), a name's position in its list.
        A grid of more than `limit` configurations is refused before any is built."""
        self.check_size(1, limit)
        plain = [a for a in AXES if a not in PER_OPTIMIZER]
        out = []
        for combo in itertools.product(*(self.axes[a] for a in plain)):
            values = dict(zip(plain, combo, strict=True))
            per = [self._values_for(a, values["optimizer"]) for a in PER_OPTIMIZER]
            for extra in itertools.product(*per):
                v = dict(values, **dict(zip(PER_OPTIMIZER, extra, strict=True)))
                levels = {a: self._level(a, v[a], v["optimizer"]) for a in AXES}
                out.append(Config({a: v[a] for a in AXES}, levels))
        return out

    def _values_for(self, axis: str, optimizer: str) -> list:
        spec = self.axes[axis]
        return spec[optimizer] if isinstance(spec, dict) else spec

    def _level(self, axis: str, value: object, optimizer: str) -> int:
        values = self._values_for(axis, optimizer)
        if isinstance(value, str):
            return values.index(value)
        return sorted(set(values)).index(value)

    def as_dict(self) -> dict:
        out = {"name": self.name, "dataset": self.dataset, "axes": self.axes,
               "train": self.train}
        if self.seeds is not None:
            out["seeds"] = self.seeds
        return out


def preset_names() -> list[str]:
    return sorted(Path(f.name).stem for f in files("fgm.train").joinpath("grids").iterdir()
                  if f.name.endswith(".toml"))


def load_grid(preset: str | None = None, path: Path | None = None) -> Grid:
    if path is not None:
        text, source = _read_grid_file(Path(path)), str(path)
    else:
        preset = preset or "demo"
        if preset not in preset_names():
            raise FgmError(f"unknown preset {preset!r}; presets: {', '.join(preset_names())}")
        text = files("fgm.train").joinpath("grids", f"{preset}.toml").read_text()
        source = f"preset:{preset}"
    return parse_grid(_toml(text, source), source)


def _read_grid_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FgmError(f"{path}: no such grid file") from None
    except IsADirectoryError:
        raise FgmError(f"{path}: is a directory; expected a grid file (TOML)") from None
    except OSError as exc:
        raise FgmError(f"{path}: cannot read the grid file: {exc.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise FgmError(f"{path}: line {line}: not UTF-8 text (byte {raw[exc.start]:#04x}); "
                       f"a grid file is TOML, which is UTF-8") from None


def _toml(text: str, source: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FgmError(f"{source}: not valid TOML: {exc}") from None
    except RecursionError:
        raise FgmError(f"{source}: arrays or tables nested too deeply to read; a grid "
                       f"file needs lists of values, one level deep") from None


def _bad(source: str, key: str, message: str) -> FgmError:
    return FgmError(f"{source}: {key}: {message}")


def _show(value: object, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def parse_grid(data: dict, source: str = "<grid>") -> Grid:
    unknown = set(data) - {"name", "dataset", "axes", "train", "seeds"}
    if unknown:
        raise _bad(source, sorted(unknown)[0], "unknown key; expected name, dataset, seeds, "
                   "axes, train")
    seeds = data.get("seeds")
    if seeds is not None and not (
            isinstance(seeds, list) and seeds and len(set(map(str, seeds))) == len(seeds)
            and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= SEED_MAX
                    for x in seeds)):
        raise _bad(source, "seeds", f"{_show(seeds)} is not allowed; expected a list of "
                   f"distinct integers in [0, {SEED_MAX}], e.g. seeds = [0, 1]")
    train = dict(TRAIN_DEFAULTS)
    given = data.get("train", {})
    if not isinstance(given, dict):
        raise _bad(source, "train", f"{_show(given)} is not allowed; expected a table [train] "
                   f"of settings among {', '.join(TRAIN_DEFAULTS)}")
    for key, value in given.items():
        if key not in TRAIN_DEFAULTS and key not in TRAIN_OPTIONAL:
            raise _bad(source, f"train.{key}", f"unknown setting; settings are "
                       f"{', '.join([*TRAIN_DEFAULTS, *TRAIN_OPTIONAL])}")
        train[key] = value
    _check_train(source, train)
    axes = data.get("axes")
    if not isinstance(axes, dict):
        raise _bad(source, "axes", f"missing table; it needs {', '.join(AXES)}")
    for key in axes:
        if key not in AXES:
            close = difflib.get_close_matches(str(key), AXES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _bad(source, f"axes.{key}", f"unknown axis{hint}; axes are {', '.join(AXES)}")
    for axis in AXES:
        if axis not in axes:
            raise _bad(source, f"axes.{axis}", f"missing; expected a list of {ALLOWED[axis]}")
        _check_axis(source, axis, axes[axis], axes.get("optimizer", []))
    dataset = data.get("dataset", "cifar10")
    if not isinstance(dataset, str) or dataset not in DATASETS:
        raise _bad(source, "dataset", f"{_show(dataset)} is not one of {', '.join(DATASETS)}")
    return Grid(str(data.get("name", Path(source).stem)), dataset, axes, train, source,
                [int(x) for x in seeds] if seeds is not None else None)


def _check_axis(source: str, axis: str, spec: object, optimizers: list) -> None:
    key = f"axes.{axis}"
    if isinstance(spec, dict) and axis in PER_OPTIMIZER:
        for opt in optimizers:
            if opt not in spec:
                raise _bad(source, key, f"no values for optimizer {opt!r}; expected a table "
                           f"with keys {', '.join(map(str, optimizers))}")
        for opt, values in spec.items():
            if opt not in OPTIMIZERS:
                raise _bad(source, f"{key}.{opt}", f"unknown optimizer; allowed: "
                           f"{', '.join(OPTIMIZERS)}")
            _check_values(source, f"{key}.{opt}", axis, values)
        return
    _check_values(source, key, axis, spec)


def _check_values(source: str, key: str, axis: str, values: object) -> None:
    if not isinstance(values, list) or not values:
        raise _bad(source, key, f"expected a non-empty list of {ALLOWED[axis]}")
    if len(set(map(str, values))) != len(values):
        raise _bad(source, key, "a value is listed twice")
    for v in values:
        ok = {
            "width": _integer(v, MAX_WIDTH),
            "depth": _integer(v, MAX_DEPTH),
            "batch_size": _integer(v, MAX_BATCH_SIZE),
            "dropout": _number(v) and 0 <= v < 1,
            "optimizer": isinstance(v, str) and v in OPTIMIZERS,
            "learning_rate": _number(v) and 0 < v <= MAX_LEARNING_RATE,
            "weight_decay": _number(v) and 0 <= v <= MAX_WEIGHT_DECAY,
        }[axis]
        if not ok:
            raise _bad(source, key, f"{_show(v)} is not allowed; expected {ALLOWED[axis]}")


def _check_train(source: str, train: dict) -> None:
    def need(key, cond, what):
        if not cond:
            raise _bad(source, f"train.{key}", f"{_show(train[key])} is not allowed; "
                       f"expected {what}")
    if "train_examples" in train:
        need("train_examples", _integer(train["train_examples"], MAX_TRAIN_EXAMPLES),
             f"a positive integer up to {MAX_TRAIN_EXAMPLES:,} (the first N training images)")
    need("stop_cross_entropy", _number(train["stop_cross_entropy"])
         and 0 < train["stop_cross_entropy"] <= MAX_STOP,
         f"a finite positive number up to {MAX_STOP:g}")
    for key, top in (("max_steps", MAX_STEPS), ("estimate_batches", MAX_ESTIMATE_BATCHES),
                     ("trace_every", MAX_STEPS)):
        need(key, _integer(train[key], top), f"a positive integer up to {top:,}")
    need("lr_drop_steps", isinstance(train["lr_drop_steps"], list)
         and all(_integer(s, MAX_STEPS) for s in train["lr_drop_steps"]),
         f"a list of positive step numbers up to {MAX_STEPS:,}")
    need("lr_drop_factor", _number(train["lr_drop_factor"])
         and 0 < train["lr_drop_factor"] <= 1, "a number in (0, 1]")


def override(grid: Grid, settings: list[str]) -> Grid:
    """Apply `axis=v1,v2` overrides from the command line (numbers parsed as TOML)."""
    axes = dict(grid.axes)
    for item in settings:
        if "=" not in item:
            raise FgmError(f"--set {item!r}: expected AXIS=VALUE[,VALUE...]")
        axis, raw = item.split("=", 1)
        axis = axis.strip()
        try:
            values = tomllib.loads(f"v = [{raw}]")["v"]
        except (tomllib.TOMLDecodeError, RecursionError):
            values = [v.strip() for v in raw.split(",")]
        axes[axis] = values
    out = parse_grid({"name": grid.name, "dataset": grid.dataset, "axes": axes,
                      "train": grid.train}, "--set")
    out.seeds = grid.seeds
    return out


def check_grid_name(name: str) -> str:
    """--name: a sweep is named `<grid>/<dataset>`, so a grid's name is one path part
    of letters, digits and `._-+`, at most 64."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}", name):
        raise FgmError(f"--name {name[:70]!r}: expected letters, digits and . _ - + (at most "
                       "64, starting with a letter or digit)")
    return name


def check_levels_against_sweep(db, grid: Grid) -> None:
    """Before anything trains: the grid's levels must agree with those of the sweep
    the warehouse holds under its name (warehouse/levels.py: within a sweep, one level
    means one value). A grid narrowed with --set to a value its preset does not have
    (width 16 as level 0 where the sweep's level 0 is 24) is refused, with the way
    out: a name of its own. Nothing to check where there is no warehouse yet."""
    import polars as pl

    from fgm.warehouse.ids import sweep_id_for
    from fgm.warehouse.levels import sweep_conflict
    from fgm.warehouse.store import LOCK_WAIT, NotAWarehouse, connect, resolve_db, when_free
    path = resolve_db(db)
    if not path.exists():
        return
    sweep = f"{grid.name}/{grid.dataset}"
    incoming = pl.DataFrame(
        [{"model_id": f"this grid's {c.hash[:12]}", "axis": a, "level": c.levels[a],
          "value_text": str(c.values[a]),
          "value_num": None if isinstance(c.values[a], str) else float(c.values[a])}
         for c in grid.configs(limit=None) for a in AXES],
        schema={"model_id": pl.String, "axis": pl.String, "level": pl.Int64,
                "value_text": pl.String, "value_num": pl.Float64})
    try:
        con = when_free(lambda: connect(path, read_only=True), LOCK_WAIT)
    except NotAWarehouse as exc:
        if exc.foreign:
            raise
        return          # an empty DuckDB file: the first write makes it a warehouse
    try:
        conflict = sweep_conflict(con, sweep_id_for(sweep), incoming)
    finally:
        con.close()
    if conflict is not None:
        raise FgmError(
            f"this grid's levels disagree with sweep {sweep!r} in {path}: "
            f"{conflict.describe()}. Within a sweep a level means one value; give this "
            f"grid a name of its own (--name NAME: its sweep is then NAME/{grid.dataset})")
