"""Results tables (SPEC §5): one row per model, read into the warehouse.

Columns: `hp.<axis>` (value), optional `level.<axis>` (else the dense rank of
the value on its axis, ascending), `complexity.<measure>`, `train_acc` and
`test_acc` (fractions) or `gen.gap`, optional `model_id`, `seed`, `dataset`,
`is.converged`. This is the convention of the public table of 10,000 models
from "In Search of Robust Measures of Generalization" (Dziugaite et al. 2020).

Everything is checked before anything is written; the write is one
transaction, so a bad table leaves the warehouse exactly as it was.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import duckdb
import polars as pl

from fgm.warehouse import InputError, code_version, transaction
from fgm.warehouse.ids import config_hash, model_id_for, sweep_id_for
from fgm.warehouse.levels import sweep_conflict
from fgm.warehouse.upsert import unregister_quietly, upsert

from .validate import (
    INT32_MAX,
    axis_name_problem,
    case_clash,
    check_axes_against_warehouse,
    describe_conflict,
    identity_conflicts,
    measure_name_problem,
)

NULL_TOKENS = ["", "na", "nan", "null", "none", "n/a"]
TRUE_TOKENS = {"true", "1", "yes", "t", "y", "1.0"}
FALSE_TOKENS = {"false", "0", "no", "f", "n", "0.0"}
KNOWN = {"model_id", "seed", "dataset", "train_acc", "test_acc", "gen.gap", "is.converged",
         "test_size"}


@dataclass
class ParsedTable:
    """A results table split into the warehouse's tables (Polars frames)."""
    path: Path
    models: pl.DataFrame
    hyperparameters: pl.DataFrame
    outcomes: pl.DataFrame
    measures: pl.DataFrame
    axes: list[str]
    measure_names: list[str]
    ignored_columns: list[str] = field(default_factory=list)
    frame: pl.DataFrame | None = None      # the table as read


@dataclass
class IngestSummary:
    path: Path
    models: tuple[int, int, int]   # added, updated, unchanged
    n_measures: int
    values: tuple[int, int, int]   # added, updated, unchanged
    ignored_columns: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        m, v = self.models, self.values
        lines = [
            f"{self.path}: {sum(m)} models ({m[0]} added, {m[1]} updated, {m[2]} unchanged), "
            f"{self.n_measures} measures, {sum(v)} values "
            f"({v[0]} added, {v[1]} updated, {v[2]} unchanged)"]
        if self.ignored_columns:
            lines.append(f"ignored columns (not part of the format): "
                         f"{', '.join(self.ignored_columns)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- reading

def read_table(path: Path) -> pl.DataFrame:
    """CSV (every column read as text, so that each cell is checked by us) or Parquet."""
    suffix = path.suffix.lower()
    if not path.exists():
        raise InputError(path, "no such file")
    if path.stat().st_size == 0:
        raise InputError(path, "the file is empty: expected a header and one row per model")
    if suffix not in (".csv", ".parquet", ".pq"):
        raise InputError(path, "expected a .csv or .parquet results table")
    if suffix == ".csv":
        _check_csv_shape(path)
    try:
        if suffix == ".csv":
            frame = pl.read_csv(path, infer_schema=False, null_values=None)
        else:
            frame = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(path, f"cannot be read as {suffix[1:]}: {_reason(exc)}") from None
    if suffix == ".csv" and frame.height:
        # the empty lines at the end (the only place _check_csv_shape allows them)
        empty = pl.all_horizontal(pl.col(c).is_null() | (pl.col(c).str.strip_chars() == "")
                                  for c in frame.columns)
        flags = frame.select(empty.alias("e"))["e"].to_list()
        while flags and flags[-1]:
            flags.pop()
        frame = frame.head(len(flags))
    if frame.height == 0:
        raise InputError(path, "the table has no rows: expected one row per model")
    # text stored as a dictionary (pandas' category, Polars' Categorical/Enum) is text
    frame = frame.with_columns(pl.col(c).cast(pl.String) for c, t in frame.schema.items()
                               if isinstance(t, pl.Categorical | pl.Enum))
    for col, dtype in frame.schema.items():
        if not (dtype.is_numeric() or dtype in (pl.String, pl.Boolean, pl.Null)):
            raise InputError(path, f"a column of type {dtype} cannot be read: expected "
                             "numbers, text or true/false in every cell", column=col)
    return frame


def _reason(exc: Exception) -> str:
    """An exception's first line, with the OS's own words where there are some."""
    return (exc.strerror or str(exc)) if isinstance(exc, OSError) else \
        str(exc).strip().splitlines()[0]


def _check_csv_shape(path: Path) -> None:
    """Polars renames a repeated header (`m` twice becomes `m_duplicated_0`) and
    fills short rows with nulls: read the shape ourselves first, row by row."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if not header:
                raise InputError(path, "the first line is empty: expected the header")
            seen: dict[str, int] = {}
            for i, name in enumerate(header):
                if name in seen:
                    raise InputError(path, f"the header names column {name!r} twice (columns "
                                     f"{seen[name] + 1} and {i + 1})", column=name)
                seen[name] = i
            blank = None
            for row_number, row in enumerate(rows, start=1):
                if not row:                      # an empty line: fine at the end only
                    blank = blank or row_number
                    continue
                if blank is not None:
                    raise InputError(path, "an empty line in the middle of the table",
                                     row=blank)
                if len(row) != len(header):
                    raise InputError(path, f"{len(row)} cells, but the header has "
                                     f"{len(header)} columns", row=row_number)
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise InputError(path, f"not a readable CSV file ({exc})") from None


def _row_label(index: int) -> int:
    """1-based data row (the header is not a row)."""
    return index + 1


def _as_text(frame: pl.DataFrame, col: str) -> pl.Series:
    s = frame[col]
    if s.dtype == pl.String:
        text = s.str.strip_chars()
    else:
        text = s.cast(pl.String)
    return pl.Series(col, [None if t is None or t.lower() in NULL_TOKENS else t
                           for t in text.to_list()], dtype=pl.String)


def _as_float(path: Path, frame: pl.DataFrame, col: str, *, required: bool,
              low: float | None = None, high: float | None = None,
              integer: bool = False, what: str | None = None) -> pl.Series:
    """The column as finite numbers (NULL where empty): anything else, including
    true/false, infinities and numbers outside [low, high], names its row."""
    s = frame[col]
    if s.dtype == pl.Boolean:
        raise InputError(path, "expected numbers, found a true/false column", column=col)
    if s.dtype.is_numeric():
        values = s.cast(pl.Float64)
        values = values.fill_nan(None)
    else:
        text = _as_text(frame, col)
        values = text.cast(pl.Float64, strict=False).fill_nan(None)
        bad = (text.is_not_null() & values.is_null()).arg_true()
        if bad.len():
            i = bad[0]
            raise InputError(path, f"expected a number, found {text[i]!r}",
                             row=_row_label(i), column=col)
    if required and values.null_count():
        i = values.is_null().arg_true()[0]
        raise InputError(path, "a value is required here", row=_row_label(i), column=col)
    rules = [(~values.is_finite(), "expected a finite number")]
    if integer:
        rules.append((values != values.round(0), "expected an integer"))
    if low is not None:
        rules.append((values < low, what or f"expected a number >= {_plain(low)}"))
    if high is not None:
        rules.append((values > high, what or f"expected a number <= {_plain(high)}"))
    for bad, rule in rules:
        rows = bad.fill_null(False).arg_true()
        if rows.len():
            i = rows[0]
            raise InputError(path, f"{rule}, found {_shown(s, i)}", row=_row_label(i),
                             column=col)
    return values.alias(col)


def _plain(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _shown(s: pl.Series, i: int) -> str:
    v = s[i]
    return repr(v.strip()) if isinstance(v, str) else repr(v)


def _canonical(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


# --------------------------------------------------------------------------- parsing

# the columns of a table of models fgm did not train (ingest/foreign.py)
MODEL_COLUMNS = ("arch", "checkpoint.final", "checkpoint.init", "checkpoint.epoch1", "trace")


def parse_table(path: Path | str, frame: pl.DataFrame | None = None, *,
                dataset: str | None = None, sweep_id: str = "",
                extra_columns: tuple[str, ...] = ()) -> ParsedTable:
    """`extra_columns`: columns a caller reads itself (not reported as ignored)."""
    path = Path(path)
    frame = read_table(path) if frame is None else frame
    cols = frame.columns
    if len(set(cols)) != len(cols):
        raise InputError(path, "duplicate column names in the header")
    hp_cols = [c for c in cols if c.startswith("hp.")]
    level_cols = [c for c in cols if c.startswith("level.")]
    measure_cols = [c for c in cols if c.startswith("complexity.")]
    models_named = [c for c in MODEL_COLUMNS if c in cols and c not in extra_columns]
    if models_named:
        raise InputError(path, f"the table names models' files ({', '.join(models_named)}): "
                         "pass --models models.toml to ingest the models themselves "
                         "(README: Bring your own models), or drop the column",
                         column=models_named[0])
    ignored = [c for c in cols if c not in KNOWN and c not in hp_cols + level_cols + measure_cols
               and c not in extra_columns]
    axes = [c[3:] for c in hp_cols]
    for axis in axes:
        problem = axis_name_problem(axis)
        if problem:
            raise InputError(path, problem, column=f"hp.{axis}")
    clash = case_clash(axes)
    if clash:
        raise InputError(path, f"axes {clash[0]!r} and {clash[1]!r} differ only by case; SQL "
                         "cannot tell them apart", column=f"hp.{clash[1]}")
    for c in measure_cols:
        problem = measure_name_problem(c[len("complexity."):])
        if problem:
            raise InputError(path, problem, column=c)
    for c in level_cols:
        if c[6:] not in axes:
            raise InputError(path, f"there is no hp.{c[6:]} column for this level", column=c)

    # the gap: gen.gap, or train_acc - test_acc
    train_acc = test_acc = None
    if "train_acc" in cols or "test_acc" in cols:
        if not {"train_acc", "test_acc"} <= set(cols):
            raise InputError(path, "train_acc and test_acc go together: one is missing")
        train_acc, test_acc = (
            _as_float(path, frame, c, required="gen.gap" not in cols, low=0.0, high=1.0,
                      what="expected an accuracy as a fraction in [0, 1]")
            for c in ("train_acc", "test_acc"))
    if "gen.gap" in cols:
        gap = _as_float(path, frame, "gen.gap", required=True, low=-1.0, high=1.0,
                        what="expected a gap of accuracies, in [-1, 1]")
        if train_acc is not None:
            off = ((train_acc - test_acc - gap).abs() > 1e-6).fill_null(False).arg_true()
            if off.len():
                i = off[0]
                raise InputError(path, f"gen.gap {gap[i]} disagrees with train_acc - test_acc = "
                                 f"{train_acc[i] - test_acc[i]}", row=_row_label(i),
                                 column="gen.gap")
    elif train_acc is not None:
        gap = (train_acc - test_acc).alias("gen.gap")
    else:
        raise InputError(path, "no gap columns: expected train_acc and test_acc (fractions), "
                         f"or gen.gap. Columns found: {', '.join(cols)}")

    n = frame.height
    seeds = _as_float(path, frame, "seed", required=True, integer=True, low=0,
                      high=INT32_MAX) if "seed" in cols else pl.Series("seed", [0.0] * n)
    seeds = seeds.cast(pl.Int64)
    test_size = (_as_float(path, frame, "test_size", required=False, integer=True, low=1,
                           high=2.0**53).cast(pl.Int64)
                 if "test_size" in cols else pl.Series("test_size", [None] * n, pl.Int64))
    if "dataset" in cols:
        datasets = _as_text(frame, "dataset").fill_null(dataset or "unknown")
    else:
        datasets = pl.Series("dataset", [dataset or "unknown"] * n)
    converged = pl.Series("converged", [None] * n, dtype=pl.Boolean)
    if "is.converged" in cols:
        text = _as_text(frame, "is.converged")
        vals = []
        for i, t in enumerate(text.to_list()):
            if t is None:
                vals.append(None)
            elif t.lower() in TRUE_TOKENS:
                vals.append(True)
            elif t.lower() in FALSE_TOKENS:
                vals.append(False)
            else:
                raise InputError(path, f"expected true/false, found {t!r}",
                                 row=_row_label(i), column="is.converged")
        converged = pl.Series("converged", vals, dtype=pl.Boolean)

    # hyperparameters: value as text and number, level given or dense-ranked
    hp_parts = []
    canon_values = {}
    for axis in axes:
        col = f"hp.{axis}"
        text = _as_text(frame, col)
        if text.null_count():
            i = text.is_null().arg_true()[0]
            raise InputError(path, "a hyperparameter value is required", row=_row_label(i),
                             column=col)
        num = text.cast(pl.Float64, strict=False)
        numeric = num.null_count() == 0
        if numeric and not num.is_finite().all():
            i = (~num.is_finite()).arg_true()[0]
            raise InputError(path, f"expected a finite number, found {text[i]!r}",
                             row=_row_label(i), column=col)
        value_text = num.map_elements(_canonical, return_dtype=pl.String) if numeric else text
        value_num = num if numeric else pl.Series([None] * n, dtype=pl.Float64)
        if f"level.{axis}" in cols:
            lv = _as_float(path, frame, f"level.{axis}", required=True, integer=True, low=0,
                           high=INT32_MAX)
            level = lv.cast(pl.Int64)
        else:
            key = value_num if numeric else value_text
            level = (key.rank("dense") - 1).cast(pl.Int64)
        part = pl.DataFrame({"row": range(n), "axis": axis, "level": level,
                             "value_text": value_text, "value_num": value_num})
        clash = part.group_by("value_text").agg(pl.col("level").n_unique().alias("k"),
                                                pl.col("row"), pl.col("level"))
        clash = clash.filter(pl.col("k") > 1)
        if clash.height:
            r = clash.row(0, named=True)
            rows, levels = r["row"], r["level"]
            j = next(k for k in range(len(rows)) if levels[k] != levels[0])
            raise InputError(path, f"value {r['value_text']} has level {levels[0]} in row "
                             f"{rows[0] + 1} but level {levels[j]} here",
                             row=rows[j] + 1, column=f"level.{axis}")
        hp_parts.append(part)
        canon_values[axis] = value_num.to_list() if numeric else value_text.to_list()

    hashes = [config_hash({axis: canon_values[axis][i] for axis in axes}) for i in range(n)]
    if "model_id" in cols:
        ids = _as_text(frame, "model_id")
        if ids.null_count():
            i = ids.is_null().arg_true()[0]
            raise InputError(path, "empty model_id", row=_row_label(i), column="model_id")
    else:
        ids = pl.Series("model_id", [
            model_id_for(h, d, s)
            for h, d, s in zip(hashes, datasets.to_list(), seeds.to_list(), strict=True)])
    dup = pl.DataFrame({"id": ids, "row": range(n)}).group_by("id").agg(pl.col("row"))
    dup = dup.filter(pl.col("row").list.len() > 1)
    if dup.height:
        r = dup.row(0, named=True)
        what = "model_id" if "model_id" in cols else "configuration, seed and dataset"
        raise InputError(path, f"duplicate {what} {r['id']!r}: also in row {r['row'][0] + 1}",
                         row=r["row"][1] + 1, column="model_id" if "model_id" in cols else None)

    ids = ids.alias("model_id")
    models = pl.DataFrame({"model_id": ids, "sweep_id": sweep_id, "dataset": datasets,
                           "seed": seeds, "config_hash": hashes, "status": "done"})
    hyperparameters = (pl.concat(hp_parts).join(pl.DataFrame({"row": range(n), "model_id": ids}),
                                                on="row").drop("row")
                       if hp_parts else
                       pl.DataFrame(schema={"axis": pl.String, "level": pl.Int64,
                                            "value_text": pl.String, "value_num": pl.Float64,
                                            "model_id": pl.String}))
    outcomes = pl.DataFrame({
        "model_id": ids, "train_acc": train_acc if train_acc is not None else [None] * n,
        "test_acc": test_acc if test_acc is not None else [None] * n,
        "gap": gap, "converged": converged, "test_size": test_size}, schema_overrides={
            "train_acc": pl.Float64, "test_acc": pl.Float64})
    measure_names = [c[len("complexity."):] for c in measure_cols]
    if measure_cols:
        values = pl.DataFrame([ids] + [_as_float(path, frame, c, required=False)
                                       .alias(c[len("complexity."):]) for c in measure_cols])
        measures = values.unpivot(index="model_id", variable_name="measure", value_name="value")
    else:
        measures = pl.DataFrame(schema={"model_id": pl.String, "measure": pl.String,
                                        "value": pl.Float64})
    return ParsedTable(path, models, hyperparameters, outcomes, measures, axes, measure_names,
                       ignored, frame)


# --------------------------------------------------------------------------- writing

def _check_levels_against_warehouse(con: duckdb.DuckDBPyConnection,
                                    parsed: ParsedTable) -> None:
    con.register("_incoming_levels", parsed.hyperparameters)
    try:
        clash = con.sql("""
            SELECT i.model_id, i.axis, i.value_text, i.level, h.level AS stored, h.model_id AS other
            FROM _incoming_levels AS i
            JOIN hyperparameters AS h USING (axis, value_text)
            WHERE h.level <> i.level AND h.model_id NOT IN (SELECT model_id FROM _incoming_levels)
            LIMIT 1""").fetchall()
    finally:
        unregister_quietly(con, "_incoming_levels")
    if clash:
        model_id, axis, value, level, stored, other = clash[0]
        row = parsed.models["model_id"].to_list().index(model_id) + 1
        raise InputError(parsed.path, f"{axis} = {value} has level {level} here, but the "
                         f"warehouse already stores level {stored} for that value (model "
                         f"{other}). Give level.{axis} explicitly so the levels agree.",
                         row=row, column=f"hp.{axis}")


def _check_levels_in_sweep(con: duckdb.DuckDBPyConnection, prepared: PreparedTable) -> None:
    """Within a sweep one level means one value (warehouse/levels.py): a table whose
    levels would mix with the sweep's stored ones is refused, naming the row."""
    parsed = prepared.parsed
    name = prepared.sweeps["name"][0]
    conflict = sweep_conflict(con, prepared.sweeps["sweep_id"][0], parsed.hyperparameters)
    if conflict is None:
        return
    ids = parsed.models["model_id"].to_list()
    mine = conflict.model if conflict.model in ids else conflict.other_model
    raise InputError(parsed.path, f"{conflict.describe()}: within sweep {name!r} a level "
                     "must mean one value. Ingest this table as a sweep of its own "
                     f"(--sweep NAME), or give level.{conflict.axis} so that the levels "
                     "agree", row=ids.index(mine) + 1, column=f"hp.{conflict.axis}")


@dataclass
class PreparedTable:
    """A results table parsed and checked, with every frame ready to write: made
    before the warehouse is opened, so the write lock is held only to write.
    `foreign`: the checkpoints, traces, architectures, datasets and builds of a
    table of models fgm did not train (ingest/foreign.py)."""
    parsed: ParsedTable
    sweeps: pl.DataFrame
    measures: pl.DataFrame
    foreign: object | None = None
    foreign_toml: Path | None = None     # the models.toml of a foreign table

    def with_ids(self, ids: list[str], foreign, train_sizes: list[int]) -> PreparedTable:
        """The same table with each row's model under ids[row] (foreign models' ids
        derive from their architecture and final checkpoint), and its files."""
        p = self.parsed
        old = p.models["model_id"].to_list()
        mapping = pl.DataFrame({"model_id": old, "_new": ids})

        def moved(frame: pl.DataFrame) -> pl.DataFrame:
            order = frame.columns
            return (frame.join(mapping, on="model_id", how="left")
                    .with_columns(pl.col("_new").alias("model_id")).drop("_new")
                    .select(order))
        row = {m: i for i, m in enumerate(old)}
        outcomes = moved(p.outcomes).with_columns(
            pl.Series("train_size", [train_sizes[row[m]] for m in
                                     p.outcomes["model_id"].to_list()], pl.Int64))
        parsed = dataclasses.replace(p, models=moved(p.models),
                                     hyperparameters=moved(p.hyperparameters),
                                     outcomes=outcomes, measures=moved(p.measures))
        return PreparedTable(parsed, self.sweeps, moved(self.measures), foreign,
                             self.foreign_toml)


def prepare_table(path: Path | str, frame: pl.DataFrame | None = None, *,
                  sweep: str | None = None, dataset: str | None = None,
                  extra_columns: tuple[str, ...] = ()) -> PreparedTable:
    """Read and check a results table (`frame` gives it in memory; then `path` only
    names it in messages). Needs no warehouse."""
    path = Path(path)
    name = sweep or path.stem
    sid = sweep_id_for(name)
    parsed = parse_table(path, frame, dataset=dataset, sweep_id=sid,
                         extra_columns=extra_columns)
    now = datetime.now().replace(microsecond=0)
    version = code_version()
    datasets = parsed.models["dataset"].unique().to_list()
    sweeps = pl.DataFrame({
        "sweep_id": [sid], "name": [name],
        "dataset": [datasets[0] if len(datasets) == 1 else None],
        "config": [json.dumps({"source": str(path.resolve()), "axes": parsed.axes})],
        "code_version": [version]})
    measures = parsed.measures.with_columns(
        pl.when(pl.col("value").is_null()).then(pl.lit("missing")).otherwise(pl.lit("ok"))
        .alias("status"),
        pl.when(pl.col("value").is_null()).then(pl.lit("empty in the results table"))
        .otherwise(pl.lit(None, pl.String)).alias("error"),
        pl.lit(json.dumps({"source": str(path.name)})).alias("params"),
        pl.lit(now).alias("computed_at"), pl.lit(version).alias("code_version"))
    return PreparedTable(parsed, sweeps, measures)


MODEL_TABLES = ("hyperparameters", "outcomes", "measures", "checkpoints", "traces",
                "model_builds")


def _check_identities(con: duckdb.DuckDBPyConnection, parsed: ParsedTable,
                      replace: bool) -> list[str]:
    """Ids the warehouse holds as another model (configuration, seed, dataset or
    sweep): an error naming the first, or with `replace` the ids to clear first."""
    conflicts = identity_conflicts(con, parsed.models, sweep=True)
    if conflicts.height and not replace:
        first = conflicts.row(0, named=True)
        row = parsed.models["model_id"].to_list().index(first["model_id"]) + 1
        more = f" ({conflicts.height} such models in all)" if conflicts.height > 1 else ""
        raise InputError(parsed.path, describe_conflict(first) + more, row=row,
                         column="model_id")
    return conflicts["model_id"].to_list()


def _check_same_results(con: duckdb.DuckDBPyConnection, prepared: PreparedTable,
                        replace: bool) -> pl.DataFrame:
    """A stored model's results are not overwritten in passing: another gap,
    accuracy or measure value for a model the warehouse holds is refused by row
    unless `replace` (two runs' tables of one name would otherwise overwrite each
    other). An empty cell never erases a stored value. The measures to write."""
    parsed = prepared.parsed
    rows = {m: i + 1 for i, m in enumerate(parsed.models["model_id"].to_list())}
    con.register("_incoming_outcomes", parsed.outcomes)
    con.register("_incoming_measures", prepared.measures.select("model_id", "measure", "value"))
    try:
        moved = con.execute("""
            SELECT i.model_id, c.name, c.new, c.old FROM _incoming_outcomes AS i
            JOIN outcomes AS o USING (model_id),
            LATERAL (VALUES ('gap', i.gap, o.gap), ('train_acc', i.train_acc, o.train_acc),
                            ('test_acc', i.test_acc, o.test_acc)) AS c(name, new, old)
            WHERE c.new IS NOT NULL AND c.old IS NOT NULL AND abs(c.new - c.old) > 1e-12
            ORDER BY i.model_id LIMIT 1""").fetchall()
        changed = con.execute("""
            SELECT i.model_id, i.measure, i.value, m.value FROM _incoming_measures AS i
            JOIN measures AS m USING (model_id, measure)
            WHERE i.value IS NOT NULL AND m.value IS NOT NULL
              AND abs(i.value - m.value) > 1e-12 * greatest(1, abs(m.value))
            ORDER BY i.model_id, i.measure LIMIT 1""").fetchall()
        erased = con.sql("""
            SELECT i.model_id, i.measure FROM _incoming_measures AS i
            JOIN measures AS m USING (model_id, measure)
            WHERE i.value IS NULL AND m.value IS NOT NULL""").pl()
    finally:
        unregister_quietly(con, "_incoming_outcomes")
        unregister_quietly(con, "_incoming_measures")
    if not replace and (moved or changed):
        mid, name, new, old = (moved or changed)[0]
        what, column = (f"its {name}", name) if moved else (f"measure {name}",
                                                           f"complexity.{name}")
        raise InputError(parsed.path, f"model {mid!r} is in the warehouse with {what} = "
                         f"{old!r}; this table says {new!r}. Nothing was written: pass "
                         "--replace to overwrite stored results", row=rows.get(mid),
                         column=column)
    return prepared.measures.join(erased, on=["model_id", "measure"], how="anti")


def write_table(con: duckdb.DuckDBPyConnection, prepared: PreparedTable, *,
                replace: bool = False) -> IngestSummary:
    """Write a prepared table in one transaction. A model_id that the warehouse
    holds as a different model is refused (nothing written) unless `replace`, which
    drops everything stored about that model before writing the new one."""
    parsed = prepared.parsed
    with transaction(con):
        check_axes_against_warehouse(con, parsed.path, parsed.axes)
        replaced = _check_identities(con, parsed, replace)
        _drop_rows(con, replaced, MODEL_TABLES)   # (the model row itself is upserted)
        if prepared.foreign is not None:
            replaced += _check_same_models(con, prepared, replace, replaced)
        _check_levels_against_warehouse(con, parsed)
        _check_levels_in_sweep(con, prepared)
        measures = _check_same_results(con, prepared, replace)
        upsert(con, "sweeps", prepared.sweeps, ["sweep_id"], ignore=("code_version", "config"))
        touched = [upsert(con, "models", parsed.models, ["model_id"]),
                   upsert(con, "hyperparameters", parsed.hyperparameters, ["model_id", "axis"]),
                   upsert(con, "outcomes", parsed.outcomes, ["model_id"])]
        values = upsert(con, "measures", measures, ["model_id", "measure"],
                        ignore=("computed_at", "code_version", "params"))
        files_changed = _write_foreign(con, prepared) if prepared.foreign is not None \
            else set()
    added = set(touched[0].added["model_id"].to_list())
    changed = set().union(*(t.updated["model_id"].to_list() for t in touched),
                          touched[1].added["model_id"].to_list(), replaced,
                          files_changed) - added
    n = parsed.models.height
    return IngestSummary(parsed.path, (len(added), len(changed),
                                       n - len(added) - len(changed)),
                         len(parsed.measure_names), values.counts(), parsed.ignored_columns)


def _check_same_models(con: duckdb.DuckDBPyConnection, prepared: PreparedTable,
                       replace: bool, replaced: list[str]) -> list[str]:
    """Foreign models whose stored measures the incoming rows would leave wrong are
    refused unless `replace`; with it they are dropped first (measures and all) and
    written afresh. The ids to drop. Refused:
    - a stored model of this id built differently (architecture, its code, kwargs,
      dataset or its preprocessing), with other weights in a checkpoint it has, or
      with another trace (files the stored model lacked may be added: what they
      make computable is computed by the next fgm-measure);
    - a stored model of another id with this row's configuration, dataset name and
      seed in this sweep (retrained, or re-ingested with another architecture or
      preprocessing): two models where evaluation expects one;
    - a dataset name the warehouse holds with other data or preprocessing, for a
      model that stays."""
    parsed, foreign = prepared.parsed, prepared.foreign
    rows = {m: i + 1 for i, m in enumerate(parsed.models["model_id"].to_list())}
    incoming = parsed.models.join(foreign.model_builds, on="model_id").select(
        "model_id", "sweep_id", "config_hash", "dataset", "seed", "arch_id", "kwargs",
        "dataset_id", "num_classes")
    names = {"_incoming_builds": incoming, "_incoming_checkpoints": foreign.checkpoints,
             "_incoming_traces": foreign.traces, "_incoming_datasets": foreign.datasets}
    for name, frame in names.items():
        con.register(name, frame)
    try:
        problems = con.sql("""
            SELECT i.model_id, 'arch' AS col, 'its architecture, kwargs or dataset' AS what
            FROM _incoming_builds AS i JOIN model_builds AS b USING (model_id)
            WHERE b.arch_id <> i.arch_id OR CAST(b.kwargs AS VARCHAR) <> i.kwargs
               OR b.dataset_id IS DISTINCT FROM i.dataset_id OR b.num_classes <> i.num_classes
            UNION ALL
            SELECT i.model_id, 'arch', 'no architecture (a model fgm trained, or a table''s)'
            FROM _incoming_builds AS i JOIN models AS m USING (model_id)
            WHERE i.model_id NOT IN (SELECT model_id FROM model_builds)
            UNION ALL
            SELECT i.model_id, 'checkpoint.' || i.role, 'another ' || i.role || ' checkpoint'
            FROM _incoming_checkpoints AS i JOIN checkpoints AS c USING (model_id, role)
            WHERE c.sha256 <> i.sha256
            UNION ALL
            SELECT c.model_id, 'checkpoint.' || c.role, 'a ' || c.role || ' checkpoint this '
                   || 'table does not give'
            FROM checkpoints AS c JOIN _incoming_builds USING (model_id)
            WHERE (c.model_id, c.role) NOT IN (SELECT (model_id, role) FROM _incoming_checkpoints)
            UNION ALL
            SELECT s.model_id, 'trace', 'another trace'
            FROM (SELECT model_id, list((step, epoch, train_loss) ORDER BY step) AS rows
                  FROM traces WHERE model_id IN (SELECT model_id FROM _incoming_traces)
                  GROUP BY model_id) AS s
            JOIN (SELECT model_id, list((step, epoch, train_loss) ORDER BY step) AS rows
                  FROM _incoming_traces GROUP BY model_id) AS n USING (model_id)
            WHERE s.rows IS DISTINCT FROM n.rows
            UNION ALL
            SELECT DISTINCT t.model_id, 'trace', 'a trace this table does not give'
            FROM traces AS t JOIN _incoming_builds USING (model_id)
            WHERE t.model_id NOT IN (SELECT model_id FROM _incoming_traces)
            ORDER BY 1, 2""").fetchall()
        twins = con.sql("""
            SELECT i.model_id, m.model_id AS stored FROM _incoming_builds AS i
            JOIN models AS m USING (sweep_id, config_hash, dataset, seed)
            WHERE m.model_id NOT IN (SELECT model_id FROM _incoming_builds)
            ORDER BY i.model_id, m.model_id""").fetchall()
        drop = sorted({m for m, *_ in problems} | {stored for _, stored in twins}
                      - set(replaced)) if replace else []
        clash = con.execute("""
            SELECT i.name, d.dataset_id FROM _incoming_datasets AS i
            JOIN datasets AS d USING (name)
            JOIN model_builds AS b ON b.dataset_id = d.dataset_id
            WHERE d.dataset_id <> i.dataset_id
              AND NOT list_contains(?::VARCHAR[], b.model_id)
              AND b.model_id NOT IN (SELECT model_id FROM _incoming_builds)
            LIMIT 1""", [drop]).fetchall()
    finally:
        for name in names:
            unregister_quietly(con, name)
    if not replace and problems:
        mid, column, what = problems[0]
        more = f" ({len({p[0] for p in problems})} such models in all)" \
            if len({p[0] for p in problems}) > 1 else ""
        raise InputError(parsed.path, f"model {mid!r} is in the warehouse with {what} than "
                         f"this row gives{more}; its stored measures are of that model. "
                         "Nothing was written: pass --replace to drop the stored model and "
                         "ingest this one", row=rows[mid], column=column)
    if not replace and twins:
        mid, stored = twins[0]
        raise InputError(parsed.path, f"the warehouse holds model {stored!r} with this row's "
                         "hyperparameters, dataset and seed in this sweep, but another "
                         "architecture, code, preprocessing or weights. Nothing was written: "
                         "pass --replace to drop the stored model (retrained, or corrected), "
                         "or ingest the table with --sweep NAME as a sweep of its own",
                         row=rows[mid])
    if clash:
        name, _ = clash[0]
        raise InputError(prepared.foreign_toml or parsed.path, f"[dataset.{name}]: the "
                         "warehouse holds models of a dataset of this name with other data "
                         "or preprocessing; give this one another name (a model's dataset "
                         "name is how evaluation groups and selects it)")
    _drop_rows(con, drop, ("models", *MODEL_TABLES))   # another id: the whole model goes
    return drop


def _drop_rows(con: duckdb.DuckDBPyConnection, ids: list[str], tables) -> None:
    """Every row of these models in `tables` (names this module owns)."""
    if ids:
        for table in tables:
            con.execute(f"DELETE FROM {table} WHERE list_contains(?::VARCHAR[], model_id)",
                        [ids])


def _write_foreign(con: duckdb.DuckDBPyConnection, prepared: PreparedTable) -> set[str]:
    """The files, architectures, datasets and builds of foreign models. A model's
    measures that were not applicable (no init checkpoint, no trace) are cleared:
    the files given now may have what they lacked."""
    foreign = prepared.foreign
    ids = prepared.parsed.models["model_id"].to_list()
    upsert(con, "architectures", foreign.architectures, ["arch_id"])
    upsert(con, "datasets", foreign.datasets, ["dataset_id"])
    ck = upsert(con, "checkpoints", foreign.checkpoints, ["model_id", "role"])
    traced = foreign.traces["model_id"].unique().to_list()
    changed = set()
    if traced:   # a trace given is the whole trace of its model
        con.register("_incoming_traces", foreign.traces)
        try:
            changed |= {r[0] for r in con.execute(
                "SELECT DISTINCT model_id FROM ((SELECT * FROM traces WHERE list_contains("
                "?::VARCHAR[], model_id)) EXCEPT (SELECT model_id, step, epoch, train_loss, lr, "
                "seconds FROM _incoming_traces))", [traced]).fetchall()}
            changed |= {r[0] for r in con.execute(
                "SELECT DISTINCT model_id FROM ((SELECT model_id, step, epoch, train_loss, lr, "
                "seconds FROM _incoming_traces) EXCEPT (SELECT * FROM traces))").fetchall()}
            con.execute("DELETE FROM traces WHERE list_contains(?::VARCHAR[], model_id)",
                        [traced])
            con.execute("INSERT INTO traces BY NAME SELECT * FROM _incoming_traces")
        finally:
            unregister_quietly(con, "_incoming_traces")
    builds = upsert(con, "model_builds", foreign.model_builds, ["model_id"])
    for result in (ck, builds):
        changed |= set(result.added["model_id"].to_list())
        changed |= set(result.updated["model_id"].to_list())
    # a model given a file it lacked: what was not applicable for want of it is
    # computed by the next fgm-measure (the others are measured as they were)
    added = sorted(changed & set(ids))
    if added:
        con.execute("DELETE FROM measures WHERE status = 'not_applicable' AND "
                    "list_contains(?::VARCHAR[], model_id)", [added])
    return changed


def ingest_table(con: duckdb.DuckDBPyConnection, path: Path | str, *,
                 frame: pl.DataFrame | None = None, sweep: str | None = None,
                 dataset: str | None = None, replace: bool = False) -> IngestSummary:
    """Validate, then write a results table in one transaction (prepare_table, then
    write_table). `frame` gives the table in memory (then `path` only names it)."""
    return write_table(con, prepare_table(path, frame, sweep=sweep, dataset=dataset),
                       replace=replace)
