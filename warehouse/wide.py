"""hp_wide: one row per model, a column per axis (its value, a number where the axis is
numeric) and `<axis>_level`. The axes are data, so the view is built from them: kept in
the file by every write of hyperparameters (so that any DuckDB reader can ask it), and
built afresh as a TEMP view on each of fgm's own read connections (which shadows the
file's: a file written by an older fgm, or altered, is read through this code's view)."""

from __future__ import annotations

import duckdb

from .names import axis_name_problem


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def hp_wide_select(con: duckdb.DuckDBPyConnection) -> str:
    """The view's SELECT over models and hyperparameters, for the axes stored now."""
    # a name that breaks the rules (stored by an older fgm), or that repeats a more
    # common one but for case, gets no column, rather than making the view fail
    usable: dict[str, str] = {}
    for (axis,) in con.execute("SELECT axis FROM hyperparameters GROUP BY axis "
                               "ORDER BY count(*) DESC, axis").fetchall():
        if not axis_name_problem(axis):
            usable.setdefault(axis.lower(), axis)
    cols = []
    for axis, numeric in con.execute(
            "SELECT axis, bool_and(value_num IS NOT NULL) FROM hyperparameters "
            "GROUP BY axis ORDER BY axis").fetchall():
        if usable.get(axis.lower()) != axis:
            continue
        value = "value_num" if numeric else "value_text"
        literal = "'" + axis.replace("'", "''") + "'"
        cols.append(f"any_value({value}) FILTER (WHERE axis = {literal}) AS {_quote(axis)}")
        cols.append(f"any_value(level) FILTER (WHERE axis = {literal}) "
                    f"AS {_quote(axis + '_level')}")
    select = ", ".join(["m.model_id", "m.dataset", "m.seed", "m.sweep_id"] + cols)
    return (f"SELECT {select} FROM models AS m "
            "LEFT JOIN hyperparameters AS h USING (model_id) "
            "GROUP BY m.model_id, m.dataset, m.seed, m.sweep_id")


def create_hp_wide(con: duckdb.DuckDBPyConnection, *, temp: bool = True) -> None:
    """CREATE OR REPLACE the view: TEMP (this connection's), or in the file. In the file
    only over a view of that name, never over a table someone made there: theirs stays,
    and fgm's readers build their own TEMP view all the same."""
    if not temp:
        kind = con.execute("SELECT table_type FROM information_schema.tables "
                           "WHERE table_schema = 'main' AND table_catalog = current_database() "
                           "AND lower(table_name) = 'hp_wide'").fetchall()
        if kind and kind[0][0] != "VIEW":
            return
    kind = "TEMP VIEW" if temp else "VIEW"
    con.execute(f"CREATE OR REPLACE {kind} hp_wide AS {hp_wide_select(con)}")
