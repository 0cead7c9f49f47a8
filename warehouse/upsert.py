"""Bulk upserts from Polars frames: never row by row, and with honest counts."""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import polars as pl


@dataclass(frozen=True)
class UpsertResult:
    added: pl.DataFrame      # key columns of the rows that were new
    updated: pl.DataFrame    # key columns of the rows whose values changed
    unchanged: int

    def counts(self) -> tuple[int, int, int]:
        return self.added.height, self.updated.height, self.unchanged


def upsert(con: duckdb.DuckDBPyConnection, table: str, frame: pl.DataFrame,
           keys: list[str], *, ignore: tuple[str, ...] = ()) -> UpsertResult:
    """Insert new rows and update changed ones (`INSERT ... BY NAME ... ON CONFLICT`).

    A row is changed when a column other than `keys` and `ignore` differs
    (NULL equals NULL). Unchanged rows are not written at all, so columns such
    as computed_at keep telling when a value really was computed.
    """
    dup = frame.group_by(keys).len().filter(pl.col("len") > 1)
    if dup.height:
        raise ValueError(f"{table}: the rows to write repeat the key "
                         f"{dict(zip(keys, dup.row(0)[:-1], strict=True))}")
    compare = [c for c in frame.columns if c not in keys and c not in ignore]
    name = f"_incoming_{table}"
    con.register(name, frame)
    try:
        on = " AND ".join(f'i."{k}" = t."{k}"' for k in keys)
        differs = " OR ".join(f'i."{c}" IS DISTINCT FROM t."{c}"' for c in compare) or "false"
        key_list = ", ".join(f'i."{k}"' for k in keys)
        marked = con.sql(
            f"SELECT {key_list}, t.\"{keys[0]}\" IS NULL AS _new, "
            f"coalesce({differs}, false) AS _changed "
            f'FROM "{name}" AS i LEFT JOIN "{table}" AS t ON {on}').pl()
        added = marked.filter(pl.col("_new")).select(keys)
        updated = marked.filter(~pl.col("_new") & pl.col("_changed")).select(keys)
        if added.height or updated.height:
            write = pl.concat([added, updated]).join(frame, on=keys, how="inner")
            con.register(name, write)
            setters = ", ".join(f'"{c}" = excluded."{c}"'
                                for c in frame.columns if c not in keys) or None
            action = f"DO UPDATE SET {setters}" if setters else "DO NOTHING"
            con.execute(f'INSERT INTO "{table}" BY NAME SELECT * FROM "{name}" '
                        f'ON CONFLICT ({", ".join(keys)}) {action}')
    finally:
        unregister_quietly(con, name)
    if table == "hyperparameters" and (added.height or updated.height):
        # the file's hp_wide follows its axes, for any DuckDB reader (warehouse/wide.py)
        from .wide import create_hp_wide
        create_hp_wide(con, temp=False)
    return UpsertResult(added, updated, frame.height - added.height - updated.height)


def unregister_quietly(con: duckdb.DuckDBPyConnection, name: str) -> None:
    """Drop a registered frame. In a transaction that a failed write aborted, DuckDB
    refuses even this; the failure that aborted it is the one worth reporting."""
    try:
        con.unregister(name)
    except duckdb.Error:
        pass
