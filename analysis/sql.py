"""Read-only SQL over the warehouse, and the per-axis wide view of hyperparameters."""

from __future__ import annotations

import duckdb
import polars as pl

from fgm.warehouse import FgmError

ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def axes(con: duckdb.DuckDBPyConnection) -> list[tuple[str, bool]]:
    """[(axis, numeric)] for every axis the warehouse holds."""
    return [(a, bool(n)) for a, n in con.sql(
        "SELECT axis, bool_and(value_num IS NOT NULL) FROM hyperparameters "
        "GROUP BY axis ORDER BY axis").fetchall()]


def create_hp_wide(con: duckdb.DuckDBPyConnection) -> None:
    """TEMP VIEW hp_wide: one row per model, a column per axis (its value, a number where
    the axis is numeric) and `<axis>_level`. Built per connection, since the axes are data."""
    cols = []
    for axis, numeric in axes(con):
        value = "value_num" if numeric else "value_text"
        literal = "'" + axis.replace("'", "''") + "'"
        cols.append(f"any_value({value}) FILTER (WHERE axis = {literal}) AS {_quote(axis)}")
        cols.append(f"any_value(level) FILTER (WHERE axis = {literal}) "
                    f"AS {_quote(axis + '_level')}")
    select = ", ".join(["m.model_id", "m.dataset", "m.seed", "m.sweep_id"] + cols)
    con.execute(f"CREATE OR REPLACE TEMP VIEW hp_wide AS SELECT {select} FROM models AS m "
                "LEFT JOIN hyperparameters AS h USING (model_id) "
                "GROUP BY m.model_id, m.dataset, m.seed, m.sweep_id")


def lock_down(con: duckdb.DuckDBPyConnection) -> None:
    """No file access beyond the open warehouse, and no way to turn that back on."""
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def run_readonly(con: duckdb.DuckDBPyConnection, sql: str) -> pl.DataFrame:
    """Run one or more SELECT statements; return the last one's rows. Anything that
    writes (to the warehouse or to a file) or attaches another database is refused."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise FgmError(str(exc)) from None
    if not statements:
        raise FgmError("no SQL statement given")
    for st in statements:
        if st.type not in ALLOWED:
            kind = st.type.name.replace("_", " ")
            raise FgmError(f"refused: fgm-query sql is read-only and runs SELECT queries only; "
                           f"this is a {kind} statement ({st.query.strip()[:60]!r}).")
    try:
        for st in statements[:-1]:
            con.sql(st.query).fetchall()
        return con.sql(statements[-1].query).pl()
    except duckdb.Error as exc:
        raise FgmError(str(exc).strip()) from None
