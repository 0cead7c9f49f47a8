"""Build small warehouses from in-memory tables, for any test that needs one."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl

from fgm.ingest.table import ingest_table
from fgm.warehouse import connect

TABLES = ["fgm_meta", "sweeps", "models", "hyperparameters", "checkpoints", "traces",
          "outcomes", "measures", "measure_definitions", "architectures", "datasets",
          "model_builds"]


def build_warehouse(path: Path, table: pl.DataFrame | dict, *, sweep: str = "fixture",
                    dataset: str | None = None) -> Path:
    """Write `table` (results-table format, SPEC §5) into a new warehouse at `path`."""
    frame = table if isinstance(table, pl.DataFrame) else pl.DataFrame(table)
    con = connect(path)
    try:
        ingest_table(con, Path(f"{sweep}.csv"), frame=frame, sweep=sweep, dataset=dataset)
    finally:
        con.close()
    return path


def ingest_file(db: Path, path: Path, **kw):
    """fgm-ingest of one results table, through the library: its IngestSummary."""
    con = connect(db)
    try:
        return ingest_table(con, path, **kw)
    finally:
        con.close()


def dump(path: Path) -> dict[str, list[tuple]]:
    """Every row of every table, sorted: equal dumps mean an unchanged warehouse."""
    con = connect(path, read_only=True)
    try:
        return {t: con.sql(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in TABLES}
    finally:
        con.close()


@contextmanager
def lock_held(path: Path, read_only: bool = False) -> Iterator[None]:
    """Another process holds the warehouse open (for writing, or read-only) while the
    block runs: until its stdin closes, not for a time a loaded machine may outlast."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import duckdb, sys
        con = duckdb.connect({str(path)!r}, read_only={read_only!r})
        print("holding", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield
    finally:
        holder.stdin.close()
        holder.wait()

