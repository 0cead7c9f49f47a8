"""fgm-query: ask the warehouse. Read-only, every command with --format table|csv|json."""

from __future__ import annotations

import click
from fgm.warehouse import connect
from fgm.warehouse.cli import db_option, emit_frame, format_option, friendly_errors

from .sql import create_hp_wide, lock_down, run_readonly


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Query the fgm warehouse (read-only)."""


def open_readonly(db: str | None):
    con = connect(db, read_only=True)
    create_hp_wide(con)
    return con


@main.command()
@click.argument("query")
@db_option
@format_option
@friendly_errors
def sql(query: str, db: str | None, fmt: str) -> None:
    """Run a SELECT on the warehouse. Tables: models, hyperparameters, outcomes,
    measures, traces, checkpoints, sweeps; views: model_measures, model_outcomes,
    model_levels, measure_summary, hp_wide (a column per axis)."""
    con = open_readonly(db)
    try:
        lock_down(con)
        emit_frame(run_readonly(con, query), fmt)
    finally:
        con.close()


@main.command()
@db_option
@format_option
@friendly_errors
def models(db: str | None, fmt: str) -> None:
    """List the models: hyperparameters, gap, convergence."""
    con = open_readonly(db)
    try:
        frame = con.sql("SELECT w.*, o.train_acc, o.test_acc, o.gap, o.converged "
                        "FROM hp_wide AS w JOIN model_outcomes AS o USING (model_id) "
                        "ORDER BY w.model_id").pl()
        frame = frame.drop([c for c in frame.columns if c.endswith("_level")] + ["sweep_id"])
        emit_frame(frame, fmt)
    finally:
        con.close()


@main.command()
@db_option
@format_option
@friendly_errors
def measures(db: str | None, fmt: str) -> None:
    """List the measures: how many models have a value, failed, or miss one."""
    con = open_readonly(db)
    try:
        emit_frame(con.sql("SELECT * FROM measure_summary").pl(), fmt)
    finally:
        con.close()
