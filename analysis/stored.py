"""Evaluations kept in the warehouse: what psi, cmi, table, oracle and robust computed,
so that SQL can join τ, Ψ and K with measure families, sweeps and earlier runs.

An evaluation is read in one read-only connection, as every query is. While that
connection is open, the selected models' ids and a fingerprint of the rows the
evaluation could read (view evaluation_input_rows: outcomes, hyperparameters and
the values of the measures it evaluates, over the selection's dataset and sweep)
are taken from the same snapshot of the file. After the answer is printed, one short
write transaction stores the evaluation and its figures. evaluation_status
recomputes the fingerprint: when it differs, the data changed since and the
evaluation is stale. The fingerprint covers the whole dataset and sweep, not only
the models that --where selected (a predicate cannot be re-run inside a view), so a
change to a model outside the predicate marks it stale too: stale means "the data it
read may have changed", never "reused although it changed".

Storing is best effort: --no-store skips it; a warehouse that cannot be opened for
writing (a read-only file or folder, another process holding it) is left alone with
a one-line note on stderr, and the answer stands; so is a write that fails (a full
disk: DuckDB's commit refused), the transaction rolled back.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb
import polars as pl

from fgm.warehouse import FgmError, code_version, connect, scalar, transaction
from fgm.warehouse.store import briefly
from fgm.warehouse.upsert import upsert

from .evaluate import Selection

# How long storing waits for another process that holds the file (a reader or a
# writer) before it gives up with a note: short, the answer is already printed.
LOCK_WAIT = 2.0

# The fingerprint of what an evaluation read; evaluation_status.sql computes the same.
FINGERPRINT = """
SELECT md5(string_agg(line, chr(10) ORDER BY line)) FROM evaluation_input_rows
WHERE ($dataset::VARCHAR IS NULL OR dataset = $dataset)
  AND ($sweep::VARCHAR IS NULL OR sweep = $sweep OR sweep_id = $sweep)
  AND (measure IS NULL OR $scope = '*' OR measure = $scope)
"""


@dataclass(frozen=True)
class Snapshot:
    """The models behind an evaluation and the fingerprint of the data it read."""
    scope: str | None          # the measures read: one name, '*' (all) or None (none)
    n_models: int
    models_sha256: str
    inputs_md5: str


def snapshot(con: duckdb.DuckDBPyConnection, sel: Selection, ids,
             scope: str | None) -> Snapshot:
    """Taken on the connection that evaluated, so it describes exactly what was read."""
    ids = sorted(str(i) for i in ids)
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()
    inputs = scalar(con, FINGERPRINT, {"dataset": sel.dataset, "sweep": sel.sweep,
                                       "scope": scope})
    return Snapshot(scope, len(ids), digest, inputs or "")


# --------------------------------------------------------------------------- figures

def _row(measure: str, kind: str, axis: str, quantity: str, value, detail=None) -> dict:
    number = None if value is None or isinstance(value, bool) else float(value)
    return {"measure": measure, "kind": kind, "axis": axis, "quantity": quantity,
            "value": number, "detail": detail}


def _spread_rows(res: dict, name: str, kind: str, keys: tuple[str, ...]) -> list[dict]:
    """Std across seeds and jackknife bounds of the overall figures."""
    rows = []
    if "seeds" in res:
        rows.append(_row(name, kind, "all", "n_seeds", res["seeds"]["n"]))
        rows += [_row(name, kind, "all", f"{k}_std", res["seeds"]["std"].get(k)) for k in keys]
    if "ci" in res:
        for k in keys:
            lo, hi = res["ci"].get(k) or (None, None)
            rows += [_row(name, kind, "all", f"{k}_lo", lo), _row(name, kind, "all", f"{k}_hi", hi)]
    return rows


def psi_rows(res: dict, kind: str = "measure", name: str | None = None) -> list[dict]:
    """τ, ψ per axis, Ψ (and their spread) of psi's object."""
    name = name or res["measure"]
    rows = [_row(name, kind, "all", "n_models", res["n_models"]),
            _row(name, kind, "all", "tau", res["tau"]),
            *(_row(name, kind, a, "psi", v) for a, v in res["psi"].items()),
            _row(name, kind, "all", "Psi", res["Psi"])]
    std = res.get("seeds", {}).get("std", {}).get("psi") or {}
    rows += [_row(name, kind, a, "psi_std", v) for a, v in std.items()]
    if "unconverged_searches" in res:
        rows.append(_row(name, kind, "all", "unconverged_searches", res["unconverged_searches"]))
    return rows + _spread_rows(res, name, kind, ("tau", "Psi"))


def cmi_rows(res: dict, kind: str = "measure", name: str | None = None) -> list[dict]:
    """Per-axis CMI, the |S| = 0, 1, 2 minima and K (with its set) of cmi's object."""
    name = name or res["measure"]
    argmin = "+".join(res["argmin"]) if res.get("argmin") is not None else None
    rows = [_row(name, kind, "all", "n_models", res["n_models"]),
            *(_row(name, kind, a, "cmi", v) for a, v in res["per_axis"].items()),
            *(_row(name, kind, "all", f"cmi_{k}", res[k]) for k in ("s0", "s1", "s2")),
            _row(name, kind, "all", "K", res["K"], argmin)]
    if "stderr" in res:   # the oracle's Monte Carlo
        rows.append(_row(name, kind, "all", "K_stderr", res["stderr"]["K"]))
    return rows + _spread_rows(res, name, kind, ("K",))


def oracle_rows(res: dict) -> list[dict]:
    name = f"oracle_{res['eps']:g}"
    return [*psi_rows(res, "oracle", name),
            *(r for r in cmi_rows(res["cmi"], "oracle", name) if r["quantity"] != "n_models")]


def robust_rows(res: dict) -> list[dict]:
    name, rows = res["measure"], []
    for axis, v in [*res["per_axis"].items(), ("all", res["overall"])]:
        rows.append(_row(name, "measure", axis, "environments", v.get("environments")))
        rows += [_row(name, "measure", axis, f"sign_error_{k}", v.get(k))
                 for k in ("mean", "p90", "max")]
    return rows + [_row(name, "measure", "all", "n_models", res["n_models"])]


_TABLE_QUANTITY = {"s0": "cmi_s0", "s1": "cmi_s1", "s2": "cmi_s2", "seeds": "n_seeds"}


def table_rows(frame: pl.DataFrame, kind: str, axes: list[str]) -> list[dict]:
    """table's frame, one figure a row: an axis's column is ψ (kind psi) or CMI (cmi)."""
    per_axis = "psi" if kind == "psi" else "cmi"
    rows = []
    for r in frame.iter_rows(named=True):
        for column, value in r.items():
            if column in ("kind", "measure", "argmin"):
                continue
            if column in axes:
                rows.append(_row(r["measure"], r["kind"], column, per_axis, value))
            else:
                rows.append(_row(r["measure"], r["kind"], "all",
                                 _TABLE_QUANTITY.get(column, column), value,
                                 r.get("argmin") if column == "K" else None))
    return rows


# --------------------------------------------------------------------------- storing

def question_key(command: str, sel: Selection, options: dict, *, pgdl: bool = False,
                 ci: float | None = None, blocks: int | None = None,
                 seed: int | None = None) -> str:
    """The same question (command, options, selection) gives the same key."""
    question = {"command": command, "options": options, "where": sel.where,
                "dataset": sel.dataset, "sweep": sel.sweep, "all_models": sel.all_models,
                "relevel": sel.relevel, "pool_seeds": sel.pool_seeds,
                "converged_searches_only": sel.converged_searches_only, "pgdl": pgdl,
                "ci": ci, "blocks": blocks if ci else None, "seed": seed}
    if sel.seeds is not None:   # (absent otherwise: the keys of older evaluations stand)
        question["seeds"] = list(sel.seeds)
    return hashlib.sha256(json.dumps(question, sort_keys=True).encode()).hexdigest()[:16]


def store_evaluation(db, snap: Snapshot | None, command: str, sel: Selection, options: dict,
                     rows: list[dict], *, pgdl: bool = False, ci: float | None = None,
                     blocks: int | None = None, seed: int | None = None) -> str | None:
    """Keep one evaluation: its row in evaluations, its figures in evaluation_values.
    Returns the evaluation id, or None when nothing was to be stored (snap None:
    --no-store). A warehouse that cannot be written raises one of WRITE_ERRORS;
    see keep()."""
    if snap is None:
        return None
    key = question_key(command, sel, options, pgdl=pgdl, ci=ci, blocks=blocks, seed=seed)
    version = code_version()
    evaluation_id = hashlib.sha256(
        f"{key}|{snap.inputs_md5}|{version}".encode()).hexdigest()[:16]
    head = pl.DataFrame([{
        "evaluation_id": evaluation_id,
        "created_at": datetime.now(UTC).replace(tzinfo=None), "command": command,
        "question_key": key, "options": json.dumps(options, sort_keys=True),
        "where_sql": sel.where, "dataset": sel.dataset, "sweep": sel.sweep,
        "all_models": sel.all_models, "relevel": sel.relevel, "pool_seeds": sel.pool_seeds,
        "converged_searches_only": sel.converged_searches_only, "pgdl": pgdl,
        "ci_level": ci, "ci_blocks": blocks if ci else None, "seed": seed,
        "measure_scope": snap.scope, "code_version": version, "n_models": snap.n_models,
        "models_sha256": snap.models_sha256, "inputs_md5": snap.inputs_md5}],
        schema_overrides={"where_sql": pl.String, "dataset": pl.String, "sweep": pl.String,
                          "ci_level": pl.Float64, "ci_blocks": pl.Int32, "seed": pl.Int32,
                          "measure_scope": pl.String})
    values = pl.DataFrame(rows, schema={"measure": pl.String, "kind": pl.String,
                                        "axis": pl.String, "quantity": pl.String,
                                        "value": pl.Float64, "detail": pl.String})
    values = values.with_columns(pl.lit(evaluation_id).alias("evaluation_id"))
    with briefly(lambda: connect(db, create=False), lock_wait=LOCK_WAIT) as con, \
            transaction(con):
        # asked again of the same data by the same code: the same row, its time the
        # latest asking's (so that latest_evaluation follows the code run last, never
        # an older checkout's answer that happened to be stored first)
        upsert(con, "evaluations", head, ["evaluation_id"])
        con.execute("DELETE FROM evaluation_values WHERE evaluation_id = ?", [evaluation_id])
        upsert(con, "evaluation_values", values,
               ["evaluation_id", "measure", "axis", "quantity"])
    return evaluation_id


# What a write that the file or the machine refuses raises: fgm's own errors (the
# warehouse locked, missing, or a write rolled back), the OS's, and DuckDB's errors of
# the environment: IOException, and TransactionException ("Failed to commit: Could not
# write file ...: No space left on device"), both OperationalError, a database
# invalidated by a failed write (FatalException), a permission refused. Not DuckDB's
# ProgrammingError, ConstraintException, ...: those are fgm's bugs and stay loud.
WRITE_ERRORS = (FgmError, OSError, duckdb.OperationalError, duckdb.FatalException,
                duckdb.PermissionException)


def keep(db, snap: Snapshot | None, command: str, sel: Selection, options: dict,
         rows: list[dict], **question) -> str | None:
    """store_evaluation, or a one-line note (not an error) when the warehouse cannot
    be written (read-only, held by another process, a full disk): the answer has been
    printed already and stands without it."""
    try:
        return store_evaluation(db, snap, command, sel, options, rows, **question)
    except WRITE_ERRORS as exc:
        import click
        reason = " ".join(str(exc).split())
        click.echo(f"note: evaluation not stored in the warehouse ({reason}); "
                   "--no-store skips storing", err=True)
        return None
