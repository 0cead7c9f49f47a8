"""fgm-ingest: results tables and run-bundle trees into the warehouse."""

from __future__ import annotations

from pathlib import Path

import click

from fgm.warehouse import FgmError, connect
from fgm.warehouse.cli import db_option, friendly_errors

from .table import ingest_table


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("path", type=click.Path(path_type=Path))
@db_option
@click.option("--sweep", default=None, help="Sweep name for a results table (default: file name).")
@click.option("--dataset", default=None, help="Dataset of a table without a dataset column.")
@friendly_errors
def main(path: Path, db: str | None, sweep: str | None, dataset: str | None) -> None:
    """Ingest PATH: a results table (.csv / .parquet, one row per model)."""
    if not path.exists():
        raise FgmError(f"{path}: no such file or directory")
    if path.is_dir():
        raise FgmError(f"{path}: a directory. Ingesting trees of run bundles comes with "
                       "fgm-train's run bundles, which this version does not have yet; "
                       "give a .csv or .parquet results table.")
    con = connect(db)
    try:
        summary = ingest_table(con, path, sweep=sweep, dataset=dataset)
    finally:
        con.close()
    click.echo(str(summary))
