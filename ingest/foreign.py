"""A results table of models fgm did not train (fgm-ingest TABLE --models TOML).

The table is today's results table (ingest/table.py) with, per row:

    arch              the name of an [arch.NAME] of models.toml (or an hp.arch axis)
    checkpoint.final  the trained weights: a state dict, .safetensors or .pt
    checkpoint.init   optional: the weights at initialisation
    checkpoint.epoch1 optional: the weights after the first epoch
    trace             optional: a CSV or Parquet of step, train_loss

Paths are relative to the table's folder (or --checkpoint-root) and stay inside
it. Every checkpoint is hashed and loaded once into its architecture, and the
model is run on two images of its dataset, before anything is written: a row
that does not fit rejects the table with the row, the file and what was
expected, and the warehouse is left as it was.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from fgm.warehouse import FgmError, InputError

from .table import PreparedTable, _as_text, _row_label, prepare_table
from .zoo import (
    OWN_DATASETS,
    ModelsToml,
    arch_id,
    build_model,
    classifier_classes,
    confined,
    dataset_id,
    fill_kwargs,
    hp_references,
    load_dataset_spec,
    load_weights,
    read_models_toml,
    sha256_file,
    user_imports,
)

ROLES = ("init", "epoch1", "final")
FOREIGN_COLUMNS = ("arch", *(f"checkpoint.{r}" for r in ROLES), "trace")
# a model's accuracy on the first images of its training set, as models.toml
# preprocesses them, against the table's train_acc: further apart than this, the
# data, mean, std or layout are not what the model was trained on
ACCURACY_SAMPLE, ACCURACY_TOLERANCE = 500, 0.1


@dataclass
class ForeignFrames:
    """What a foreign table adds to a results table's rows."""
    checkpoints: pl.DataFrame
    traces: pl.DataFrame
    architectures: pl.DataFrame
    datasets: pl.DataFrame
    model_builds: pl.DataFrame
    same_model: list[tuple[int, dict]] = field(default_factory=list)


def _header(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().strip().split(",")
    except (OSError, UnicodeDecodeError):
        return []


def foreign_model_id(arch_id: str, config: str, dataset: str, seed: int, final: str) -> str:
    """A foreign model's id: its architecture, hyperparameters, dataset, seed and the
    sha256 of its final checkpoint."""
    key = f"foreign|{arch_id}|{config}|{dataset}|{int(seed)}|{final}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _read_trace(path: Path, table: Path, row: int) -> pl.DataFrame:
    """step, train_loss (and epoch, lr, seconds where given) of one model."""
    def bad(message: str) -> InputError:
        return InputError(table, f"trace {path}: {message}", row=row, column="trace")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pl.read_csv(path, infer_schema_length=None)
        elif suffix in (".parquet", ".pq"):
            frame = pl.read_parquet(path)
        else:
            raise bad("expected a .csv or .parquet file")
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as exc:
        raise bad(f"cannot be read ({' '.join(str(exc).split())[:200]})") from None
    missing = [c for c in ("step", "train_loss") if c not in frame.columns]
    if missing:
        raise bad(f"no {' or '.join(missing)} column (columns: {', '.join(frame.columns)})")
    keep = [c for c in ("step", "epoch", "train_loss", "lr", "seconds") if c in frame.columns]
    frame = frame.select(keep)
    for c in keep:
        if not frame[c].dtype.is_numeric():
            raise bad(f"column {c!r} must hold numbers")
    frame = frame.with_columns(pl.col(c).cast(pl.Float64) for c in keep)
    if frame.height == 0:
        raise bad("no rows")
    for c in keep:
        s = frame[c]
        if s.null_count() or not s.is_finite().all():
            i = (s.is_null() | ~s.is_finite().fill_null(False)).arg_true()[0]
            raise bad(f"line {i + 2}: {c} must be a finite number")
    step = frame["step"]
    if (step < 0).any() or (step != step.round(0)).any():
        raise bad("step must be whole numbers >= 0")
    if step.n_unique() != len(step):
        raise bad("a step appears twice")
    if (frame["train_loss"] < 0).any():
        raise bad("train_loss is a cross-entropy: it cannot be negative")
    out = frame.with_columns(pl.col("step").cast(pl.Int64))
    for c in ("epoch", "lr", "seconds"):
        if c not in out.columns:
            out = out.with_columns(pl.lit(None, pl.Float64).alias(c))
    return out.select("step", "epoch", "train_loss", "lr", "seconds").sort("step")


def _file(base: Path, cell: str, table: Path, row: int, column: str) -> Path:
    try:
        path = confined(base, cell, "the path", table)
    except InputError as exc:
        raise InputError(table, str(exc).split(": ", 1)[1], row=row, column=column) from None
    if not path.is_file():
        raise InputError(table, f"{path}: no such file", row=row, column=column)
    return path


def prepare_foreign(path: Path | str, models_toml: Path | str | ModelsToml, *,
                    sweep: str | None = None, dataset: str | None = None,
                    checkpoint_root: Path | None = None, data_root: Path | None = None,
                    progress=None, frame: pl.DataFrame | None = None) -> PreparedTable:
    """Read and check a results table of foreign models: every row's architecture
    built, every checkpoint loaded into it, every model run on its data. Needs no
    warehouse; the table (a PreparedTable with `foreign` set) is written by
    write_table. `models_toml` may be one read already (ingest/pgdl.py makes its
    own), and `frame` the table in memory (then `path` only names it)."""
    import torch

    path = Path(path)
    toml = models_toml if isinstance(models_toml, ModelsToml) else \
        read_models_toml(Path(models_toml))
    try:
        prepared = prepare_table(path, frame, sweep=sweep, dataset=dataset,
                                 extra_columns=FOREIGN_COLUMNS)
    except InputError as exc:
        if "duplicate configuration" in str(exc) and frame is None and "arch" in _header(path):
            raise InputError(path, f"{str(exc).split(': ', 1)[1]}. Rows that differ only "
                             "in their architecture are models of another hyperparameter: "
                             "name the column hp.arch, so that evaluation can tell them "
                             "apart", row=exc.row) from None
        raise
    parsed = prepared.parsed
    frame = parsed.frame
    base = Path(checkpoint_root) if checkpoint_root is not None else path.parent
    if checkpoint_root is not None and not base.is_dir():
        raise FgmError(f"--checkpoint-root {base}: no such directory")
    n = frame.height
    cols = frame.columns
    if "checkpoint.final" not in cols:
        raise InputError(path, "no checkpoint.final column: with --models each row names "
                         "its trained weights (a .safetensors or .pt state dict)")
    # the architecture of each row: the arch column, or the hp.arch axis
    arch_col = _as_text(frame, "arch") if "arch" in cols else None
    hp_arch = _as_text(frame, "hp.arch") if "hp.arch" in cols else None
    if arch_col is None and hp_arch is None:
        raise InputError(path, "no arch column: with --models each row names its "
                         f"architecture, one of {', '.join(toml.architectures)} (or give "
                         "an hp.arch axis)")
    arch_names = []
    for i in range(n):
        a = arch_col[i] if arch_col is not None else None
        h = hp_arch[i] if hp_arch is not None else None
        if a is not None and h is not None and a != h:
            raise InputError(path, f"arch {a!r} and hp.arch {h!r} disagree", row=i + 1,
                             column="arch")
        name = a if a is not None else h
        if name is None:
            raise InputError(path, "an architecture is required", row=i + 1,
                             column="arch" if arch_col is not None else "hp.arch")
        if name not in toml.architectures:
            import difflib
            close = difflib.get_close_matches(name, list(toml.architectures), n=1)
            raise InputError(path, f"architecture {name!r} is not in {toml.path} (it has "
                             f"{', '.join(toml.architectures)})"
                             + (f"; did you mean {close[0]!r}?" if close else ""),
                             row=i + 1, column="arch" if arch_col is not None else "hp.arch")
        arch_names.append(name)
    axes = set(parsed.axes)
    for name in dict.fromkeys(arch_names):
        refs = hp_references(toml.architectures[name].kwargs) - axes
        if refs:
            raise InputError(toml.path, f"[arch.{name}] kwargs take "
                             f"{', '.join('hp.' + r for r in sorted(refs))}, which the table "
                             f"{path} has no column for")
    # each row's hyperparameters as values (numbers where the axis is numeric)
    hp = parsed.hyperparameters
    values: list[dict] = [{} for _ in range(n)]
    row_of = {m: i for i, m in enumerate(parsed.models["model_id"].to_list())}
    for r in hp.iter_rows(named=True):
        values[row_of[r["model_id"]]][r["axis"]] = (
            r["value_num"] if r["value_num"] is not None else r["value_text"])
    # datasets: models.toml's, or fgm's own; each loaded once
    names = parsed.models["dataset"].to_list()
    data, specs, digests = {}, {}, {}
    for i, name in enumerate(names):
        if name in data:
            continue
        if name in toml.datasets:
            spec = toml.datasets[name].spec()
            try:
                d = load_dataset_spec(spec)
            except FgmError as exc:
                raise InputError(toml.path, f"[dataset.{name}]: {exc}") from None
            specs[name], digests[name] = spec, d.info["sha256"]
        elif name in OWN_DATASETS:
            from fgm.train.data import load_dataset
            try:
                d = load_dataset(name, data_root)
            except FgmError as exc:
                raise InputError(path, f"dataset {name!r}: {str(exc).split('; pass')[0]}; "
                                 "give fgm-ingest --data-root DIR", row=i + 1,
                                 column="dataset" if "dataset" in cols else None) from None
        else:
            where = "no dataset column and no --dataset" if name == "unknown" else \
                f"dataset {name!r} is neither a [dataset.NAME] of {toml.path} nor one of " \
                f"fgm's ({', '.join(OWN_DATASETS)})"
            raise InputError(path, where, row=i + 1,
                             column="dataset" if "dataset" in cols else None)
        data[name] = d
    ck_cells = {r: _as_text(frame, f"checkpoint.{r}") for r in ROLES
                if f"checkpoint.{r}" in cols}
    trace_cells = _as_text(frame, "trace") if "trace" in cols else None
    checkpoints, traces, builds, arch_rows = [], [], [], {}
    new_ids = []
    given_ids = "model_id" in cols
    arch_specs: dict[str, tuple[dict, str]] = {}
    train_acc = parsed.outcomes["train_acc"].to_list()
    for i in range(n):
        row = _row_label(i)
        arch = toml.architectures[arch_names[i]]
        kwargs = fill_kwargs(arch.kwargs, values[i])
        try:
            model = build_model(arch.spec(), kwargs)
            if arch.name not in arch_specs:   # the files its file imports, once built
                spec = {**arch.spec(), "imports": user_imports(arch.spec())}
                arch_specs[arch.name] = (spec, arch_id(spec))
        except FgmError as exc:
            raise InputError(path, str(exc), row=row, column="arch") from None
        spec, aid = arch_specs[arch.name]
        arch_rows[aid] = {"arch_id": aid, "name": arch.name, "source": arch.source,
                          "code_path": arch.code_path, "code_sha256": arch.code_sha256,
                          "spec": json.dumps(spec, sort_keys=True)}
        files = {}
        for role in ROLES:      # final last: the model keeps its weights for the check
            cell = ck_cells[role][i] if role in ck_cells else None
            if cell is None:
                if role == "final":
                    raise InputError(path, "the trained weights are required",
                                     row=row, column="checkpoint.final")
                continue
            file = _file(base, cell, path, row, f"checkpoint.{role}")
            try:
                load_weights(model, file)
            except FgmError as exc:
                raise InputError(path, f"{exc} (architecture {arch.name!r})", row=row,
                                 column=f"checkpoint.{role}") from None
            files[role] = file
        d = data[names[i]]
        try:
            classes = classifier_classes(model, d.x_train, [d.y_train, d.y_test],
                                         f"architecture {arch.name!r} on dataset "
                                         f"{names[i]!r}")
        except FgmError as exc:
            raise InputError(path, str(exc), row=row) from None
        if train_acc[i] is not None:
            k = min(ACCURACY_SAMPLE, len(d.x_train))
            with torch.no_grad():
                acc = float((model(d.x_train[:k]).argmax(1) == d.y_train[:k]).double().mean())
            if abs(acc - train_acc[i]) > ACCURACY_TOLERANCE:
                raise InputError(path, f"the model's accuracy on the first {k} training "
                                 f"images of dataset {names[i]!r}, as {toml.path.name} "
                                 f"preprocesses them, is {acc:.3f}, but train_acc says "
                                 f"{train_acc[i]:.3f}: are the data, mean, std and layout "
                                 "those it was trained on, and the checkpoint its final "
                                 "weights?", row=row, column="train_acc")
        del model
        hashes = {role: (sha256_file(f), f.stat().st_size) for role, f in files.items()}
        ds_id = dataset_id(specs[names[i]], digests[names[i]]) if names[i] in specs else None
        if given_ids:
            mid = parsed.models["model_id"][i]
        else:
            mid = foreign_model_id(aid, parsed.models["config_hash"][i],
                                   ds_id or names[i], parsed.models["seed"][i],
                                   hashes["final"][0])
        new_ids.append(mid)
        for role, file in files.items():
            checkpoints.append({"model_id": mid, "role": role, "path": str(file),
                                "sha256": hashes[role][0], "bytes": hashes[role][1]})
        if trace_cells is not None and trace_cells[i] is not None:
            trace = _read_trace(_file(base, trace_cells[i], path, row, "trace"), path, row)
            traces.append(trace.with_columns(pl.lit(mid).alias("model_id")))
        builds.append({"model_id": mid, "arch_id": aid,
                       "kwargs": json.dumps(kwargs, sort_keys=True), "dataset_id": ds_id,
                       "num_classes": classes})
        if progress:
            progress(i + 1, n)
    dup = {}
    for i, mid in enumerate(new_ids):
        if mid in dup:
            raise InputError(path, f"the same model as row {dup[mid] + 1} (architecture, "
                             "hyperparameters, dataset, seed and final checkpoint)",
                             row=i + 1)
        dup[mid] = i
    datasets = [{"dataset_id": dataset_id(specs[nm], digests[nm]), "name": nm,
                 "source": specs[nm]["source"], "sha256": digests[nm],
                 "train_size": len(data[nm].x_train), "test_size": len(data[nm].x_test),
                 "spec": json.dumps(specs[nm], sort_keys=True)} for nm in specs]
    foreign = ForeignFrames(
        pl.DataFrame(checkpoints, schema={"model_id": pl.String, "role": pl.String,
                                          "path": pl.String, "sha256": pl.String,
                                          "bytes": pl.Int64}),
        pl.concat(traces).select("model_id", "step", "epoch", "train_loss", "lr", "seconds")
        if traces else pl.DataFrame(schema={"model_id": pl.String, "step": pl.Int64,
                                            "epoch": pl.Float64, "train_loss": pl.Float64,
                                            "lr": pl.Float64, "seconds": pl.Float64}),
        pl.DataFrame(list(arch_rows.values()), schema={
            "arch_id": pl.String, "name": pl.String, "source": pl.String,
            "code_path": pl.String, "code_sha256": pl.String, "spec": pl.String}),
        pl.DataFrame(datasets, schema={"dataset_id": pl.String, "name": pl.String,
                                       "source": pl.String, "sha256": pl.String,
                                       "train_size": pl.Int64, "test_size": pl.Int64,
                                       "spec": pl.String}),
        pl.DataFrame(builds, schema={"model_id": pl.String, "arch_id": pl.String,
                                     "kwargs": pl.String, "dataset_id": pl.String,
                                     "num_classes": pl.Int32}))
    train_sizes = [len(data[nm].x_train) for nm in names]
    prepared.foreign_toml = toml.path
    return prepared.with_ids(new_ids, foreign, train_sizes)
