"""Rules every writer applies before a row reaches the warehouse: what an axis or
a measure may be called, which numbers make sense, and when an incoming model
is a different model than the one stored under its id.

Each check returns the problem as text (None when all is well) or raises an
InputError naming the file, the row and the rule, so the table reader and the
bundle reader give the same answer for the same mistake.
"""

from __future__ import annotations

import math

import duckdb
import polars as pl

from fgm.warehouse import InputError
from fgm.warehouse.names import (  # noqa: F401  (the rules, re-exported for the readers)
    AXIS_RULE,
    MEASURE_RULE,
    RESERVED_COLUMNS,
    axis_name_problem,
    case_clash,
    measure_name_problem,
)
from fgm.warehouse.upsert import unregister_quietly

# Seeds and levels are stored as INTEGER (32-bit signed) in schema.sql.
INT32_MAX = 2**31 - 1


def check_axes_against_warehouse(con: duckdb.DuckDBPyConnection, path, axes: list[str]) -> None:
    """An incoming axis that differs from a stored one only by case would give
    hp_wide two columns of one name: refuse it."""
    stored = [r[0] for r in con.execute("SELECT DISTINCT axis FROM hyperparameters").fetchall()]
    by_lower = {s.lower(): s for s in stored}
    for a in axes:
        other = by_lower.get(a.lower())
        if other is not None and other != a:
            raise InputError(path, f"axis {a!r} differs only by case from the warehouse's "
                             f"axis {other!r}; SQL cannot tell them apart. Rename it to {other!r}.")


def finite_problem(value: object, *, low: float | None = None, high: float | None = None,
                   integer: bool = False) -> str | None:
    """Why `value` is not a finite number in [low, high] (an integer if asked), or None.
    Booleans are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"expected a number, found {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"expected a finite number, found {value!r}"
    if integer and (isinstance(value, float) and not value.is_integer()):
        return f"expected an integer, found {value!r}"
    if low is not None and value < low:
        return f"expected a number >= {low:g}, found {value!r}"
    if high is not None and value > high:
        return f"expected a number <= {high:g}, found {value!r}"
    return None


def identity_conflicts(con: duckdb.DuckDBPyConnection, models: pl.DataFrame, *,
                       sweep: bool = False) -> pl.DataFrame:
    """Incoming models whose model_id the warehouse already holds with another identity
    (configuration hash, seed or dataset; and sweep, with sweep=True): model_id plus
    both identities."""
    con.register("_incoming_identity", models.select("model_id", "config_hash", "seed",
                                                     "dataset", "sweep_id"))
    moved = "OR i.sweep_id IS DISTINCT FROM m.sweep_id" if sweep else ""
    try:
        return con.sql(f"""
            SELECT i.model_id,
                   i.config_hash AS new_config_hash, m.config_hash AS stored_config_hash,
                   i.seed AS new_seed, m.seed AS stored_seed,
                   i.dataset AS new_dataset, m.dataset AS stored_dataset,
                   i.sweep_id AS new_sweep_id, m.sweep_id AS stored_sweep_id,
                   s.name AS stored_sweep
            FROM _incoming_identity AS i
            JOIN models AS m USING (model_id)
            LEFT JOIN sweeps AS s ON s.sweep_id = m.sweep_id
            WHERE i.config_hash IS DISTINCT FROM m.config_hash
               OR i.seed IS DISTINCT FROM m.seed
               OR i.dataset IS DISTINCT FROM m.dataset
               {moved}
            ORDER BY i.model_id""").pl()
    finally:
        unregister_quietly(con, "_incoming_identity")


def describe_conflict(row: dict) -> str:
    """One sentence: what differs between the incoming and the stored model."""
    diffs = []
    if row["new_config_hash"] != row["stored_config_hash"]:
        diffs.append("another configuration of hyperparameters")
    if row["new_seed"] != row["stored_seed"]:
        diffs.append(f"seed {row['new_seed']} (stored: {row['stored_seed']})")
    if row["new_dataset"] != row["stored_dataset"]:
        diffs.append(f"dataset {row['new_dataset']!r} (stored: {row['stored_dataset']!r})")
    sweep = f" of sweep {row['stored_sweep']!r}" if row.get("stored_sweep") else ""
    if not diffs and row.get("new_sweep_id") != row.get("stored_sweep_id"):
        return (f"model_id {row['model_id']!r} is already in the warehouse{sweep}; this "
                f"table would move it into another sweep. Nothing was written. Ingest it "
                f"with --sweep {row.get('stored_sweep') or 'NAME'} to update that sweep, "
                "or pass --replace to move it")
    return (f"model_id {row['model_id']!r} is already in the warehouse{sweep} as a different "
            f"model: this one has {', '.join(diffs)}. Nothing was written. Give it another "
            "model_id, or pass --replace to overwrite the stored model")
