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
    """Ingest PATH: a results table (.csv / .parquet, one row per model) or a
    directory tree of run bundles written by fgm-train (on this or any machine)."""
    if not path.exists():
        raise FgmError(f"{path}: no such file or directory")
    if path.is_dir():
        from .bundles import ingest_tree  # imports torch: only when there are bundles
        con = connect(db)
        try:
            report = ingest_tree(con, path)
        finally:
            con.close()
        if not report.failed and report.added + report.updated + report.unchanged == 0:
            raise FgmError(f"{path}: no run bundles here (directories with a manifest.json "
                           "written by fgm-train)")
        click.echo(str(report))
        if report.failed:
            raise SystemExit(1)
        return
    con = connect(db)
    try:
        summary = ingest_table(con, path, sweep=sweep, dataset=dataset)
    finally:
        con.close()
    click.echo(str(summary))
