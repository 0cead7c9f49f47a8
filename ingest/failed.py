"""A model whose training failed for good (its task failed after every retry): stored
as failed, with its error, in the tables the warehouse already has.

    models          status 'failed' (the schema's other status beside 'done')
    hyperparameters its configuration, as a bundle of it would give them
    measures        the measures training produces (cross_entropy, steps_*) as NULL,
                    status 'failed', error = why the training failed

It has no outcome and no checkpoint, so evaluation (which reads model_outcomes)
and fgm-measure (which measures models with a final checkpoint) leave it out;
`fgm-query sql` finds it (`WHERE status = 'failed'`). Running the grid again
trains it again, and its bundle then overwrites these rows (status 'done').
A model the warehouse holds as done is never marked failed.
"""

from __future__ import annotations

import json
from datetime import datetime

import duckdb
import polars as pl

from fgm.warehouse import code_version, transaction
from fgm.warehouse.upsert import upsert

from .bundles import TRAINING_MEASURES
from .table import sweep_id_for


def store_failed_model(con: duckdb.DuckDBPyConnection, *, model_id: str, sweep: str,
                       dataset: str, sweep_config: dict, seed: int, config_hash: str,
                       hyperparameters: list[dict], error: str) -> bool:
    """Write the failure in one transaction; False (nothing written) when the
    warehouse holds this model as done already."""
    now, version = datetime.now().replace(microsecond=0), code_version()
    sid = sweep_id_for(sweep)
    with transaction(con):
        status = con.execute("SELECT status FROM models WHERE model_id = ?",
                             [model_id]).fetchall()
        if status and status[0][0] == "done":
            return False
        upsert(con, "sweeps", pl.DataFrame([{
            "sweep_id": sid, "name": sweep, "dataset": dataset,
            "config": json.dumps(sweep_config), "code_version": version}]),
            ["sweep_id"], ignore=("code_version", "config"))
        upsert(con, "models", pl.DataFrame([{
            "model_id": model_id, "sweep_id": sid, "dataset": dataset, "seed": int(seed),
            "config_hash": config_hash, "status": "failed"}]), ["model_id"])
        upsert(con, "hyperparameters", pl.DataFrame(
            [{"model_id": model_id, "axis": h["axis"], "level": int(h["level"]),
              "value_text": str(h["value"]),
              "value_num": None if isinstance(h["value"], str) else float(h["value"])}
             for h in hyperparameters],
            schema={"model_id": pl.String, "axis": pl.String, "level": pl.Int64,
                    "value_text": pl.String, "value_num": pl.Float64}),
            ["model_id", "axis"])
        upsert(con, "measures", pl.DataFrame(
            [{"model_id": model_id, "measure": name, "value": None, "status": "failed",
              "error": f"training failed: {error}", "params": json.dumps({"source": "training"}),
              "computed_at": now, "code_version": version} for name in TRAINING_MEASURES],
            schema_overrides={"value": pl.Float64}),
            ["model_id", "measure"], ignore=("computed_at", "code_version"))
    return True
