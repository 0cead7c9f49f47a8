"""The DuckDB store: find the file, open it, apply schema.sql and the views.

Writers open the file read-write (one process at a time, DuckDB's rule);
queries open it read-only. schema.sql is the only definition of the tables;
views come from warehouse/views/*.sql, one view per file.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path

import duckdb

from .errors import FgmError, SchemaVersionError, WarehouseLocked

DEFAULT_DB = "fgm.duckdb"
_PKG = files("fgm.warehouse")


def schema_sql() -> str:
    return _PKG.joinpath("schema.sql").read_text()


def _declared_version(sql: str) -> int:
    match = re.search(r"'schema_version',\s*'(\d+)'", sql)
    if match is None:  # pragma: no cover - guards edits to schema.sql
        raise RuntimeError("schema.sql does not declare a schema_version")
    return int(match.group(1))


SCHEMA_VERSION = _declared_version(schema_sql())
# How long a writer waits for another process that holds the file (every writer:
# a results table, a bundle tree, a grid's models, fgm-measure's values).
LOCK_WAIT = 10.0

# What brings a warehouse of each older version to the next one, run after schema.sql
# by the first writer that opens it. Every change so far only added tables, which
# schema.sql's CREATE TABLE IF NOT EXISTS makes by itself, so the statements are
# empty; a change that alters an existing table must put its ALTERs here.
MIGRATIONS: dict[int, str] = {
    1: "",   # version 2 adds evaluations and evaluation_values (fgm-query's stored results)
    # version 3 adds architectures, datasets and model_builds (models fgm did not train),
    # whose traces may not know the epoch
    2: "ALTER TABLE traces ALTER COLUMN epoch DROP NOT NULL",
}


def view_files() -> dict[str, str]:
    """{view name: SELECT body} from warehouse/views/*.sql, in file-name order, and
    `paper_figures`, the paper's published figures as a view of constants."""
    views = _PKG.joinpath("views")
    return {
        **{Path(f.name).stem: f.read_text()
           for f in sorted(views.iterdir(), key=lambda f: f.name)
           if f.name.endswith(".sql")},
        "paper_figures": paper_figures_view(),
    }


PAPER_AXES = ("batch_size", "dropout", "learning_rate", "depth", "optimizer",
              "weight_decay", "width")
PAPER_OVERALL = {"tau": "tau", "Psi": "Psi", "s0": "cmi_s0", "s1": "cmi_s1",
                 "s2": "cmi_s2", "K": "K"}


@functools.cache   # view_files() runs on every connect; the CSV never changes under it
def paper_figures_view() -> str:
    """analysis/paper_figures.csv (shipped with fgm), one figure a row, named as
    evaluation_values names its figures (axis 'all' for overall ones; a std across
    seeds, Table 10, as <quantity>_std). A VALUES list: the view holds the data,
    so no file path enters a warehouse's catalog and any reader has it."""
    import csv
    import io
    text = files("fgm.analysis").joinpath("paper_figures.csv").read_text()

    def lit(v: str | None) -> str:
        return "NULL" if v is None or v == "" else "'" + v.replace("'", "''") + "'"

    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        suffix = "_std" if r["statistic"] == "std" else ""
        figures = [(a, r["quantity"], r[a]) for a in PAPER_AXES]
        figures += [("all", q, r[c]) for c, q in PAPER_OVERALL.items()]
        for axis, quantity, value in figures:
            if value not in ("", None):
                rows.append(f"({int(r['table'])}, {int(r['row'])}, {lit(r['statistic'])}, "
                            f"{lit(r['kind'])}, {lit(r['label'])}, {lit(r['measure'])}, "
                            f"'{axis}', '{quantity}{suffix}', {float(value)!r})")
    return ("-- The paper's published figures (analysis/paper_figures.csv), one a row\n"
            "SELECT paper_table, paper_row, statistic, kind, paper_label, measure, axis, "
            "quantity, CAST(paper_value AS DOUBLE) AS paper_value FROM (VALUES\n"
            + ",\n".join(rows) + "\n) AS t(paper_table, paper_row, statistic, kind, "
            "paper_label, measure, axis, quantity, paper_value)")


def resolve_db(db: str | os.PathLike | None = None) -> Path:
    """--db, else $FGM_DB, else ./fgm.duckdb."""
    return Path(db or os.environ.get("FGM_DB") or DEFAULT_DB)


def _open(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    # File access is off from the first moment, as a setting of the connection: DuckDB
    # shares one database between the connections of a process to the same file, and
    # this keeps fgm's lock-down off a plain connection a user has open to it (DuckDB
    # refuses to mix the two configurations instead).
    try:
        return duckdb.connect(str(path), read_only=read_only,
                              config={"enable_external_access": False})
    except duckdb.ConnectionException as exc:
        if "different configuration" in str(exc):
            raise FgmError(
                f"{path}: this process has the file open through another DuckDB connection "
                "(a plain duckdb.connect); close that connection first, or ask through fgm "
                "(fgm.open(...).sql)") from None
        raise FgmError(f"{path}: cannot open the warehouse: {exc}") from None
    except duckdb.IOException as exc:
        text = str(exc)
        if "lock" in text.lower():
            holder = re.search(r"held in (.*)", text)
            who = f" ({holder.group(1).split('. See')[0]})" if holder else ""
            raise WarehouseLocked(
                f"{path}: the warehouse is in use by another process{who}. "
                "Wait for it to finish, or use another --db.") from None
        raise FgmError(f"{path}: cannot open the warehouse: {text}") from None
    except duckdb.Error as exc:
        raise FgmError(f"{path}: not a DuckDB warehouse ({exc})") from None


def _secure(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Run first on every connection, before any SQL of fgm's own: a warehouse is a
    file someone may have handed you, and its author chose its catalog. So no file
    access beyond the open database (a view of the file's author that calls
    read_text() fails instead of reading), fgm's tables must be tables (not views
    standing in for them), and the file may define no SQL functions of its own (a
    macro in it would shadow a built-in such as list_contains and change what fgm's
    queries mean)."""
    con.execute("SET enable_external_access = false")
    # first the functions, and no function call of fgm's own before: a macro of the
    # file's named like a built-in (lower, list_contains) would be what ran
    macros = [name for (name,) in con.execute(
        "SELECT DISTINCT function_name FROM duckdb_functions() WHERE NOT internal "
        "ORDER BY 1").fetchall()]
    if macros:
        raise FgmError(
            f"{path}: the file defines SQL functions of its own ({', '.join(macros[:5])}), "
            "which would change what fgm's queries mean; an fgm warehouse has none. "
            "fgm does not read it.")
    # DuckDB finds names whatever their case: a view "Outcomes" answers for outcomes
    kinds = {name.lower(): kind for name, kind in con.execute(
        "SELECT table_name, table_type FROM information_schema.tables "
        "WHERE table_schema = 'main' AND table_catalog = current_database()").fetchall()}
    fake = sorted(t for t in FGM_TABLES if kinds.get(t, "BASE TABLE") != "BASE TABLE")
    if fake:
        raise FgmError(
            f"{path}: {', '.join(fake)} should be a table but is a {kinds[fake[0]].lower()} "
            "in this file: it was not written by fgm, or was altered. fgm does not read it.")


class NotAWarehouse(FgmError):
    """A DuckDB file without fgm_meta; `foreign`: the tables it holds (none: empty)."""

    def __init__(self, message: str, foreign: list[str]):
        super().__init__(message)
        self.foreign = foreign


def _foreign(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The tables and views of a DuckDB file that holds no fgm_meta, in any of its
    schemas: someone else's, whatever their names (a table `models` of the user's
    own is not fgm's)."""
    return [name if schema == "main" else f"{schema}.{name}"
            for schema, name in con.execute(
                "SELECT table_schema, table_name FROM information_schema.tables "
                "WHERE table_catalog = current_database() ORDER BY 1, 2").fetchall()]


def scalar(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None):
    """The first column of the first row, or None. Fetches the whole result:
    DuckDB refuses further work on a connection while a result is half read."""
    rows = con.execute(sql, params or []).fetchall()
    return rows[0][0] if rows else None


def stored_version(con: duckdb.DuckDBPyConnection) -> int | None:
    has_meta = scalar(con, "SELECT count(*) FROM information_schema.tables "
                      "WHERE table_name = 'fgm_meta' AND table_schema = 'main'")
    if not has_meta:
        return None
    value = scalar(con, "SELECT value FROM fgm_meta WHERE key = 'schema_version'")
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SchemaVersionError(
            f"fgm_meta's schema_version is {str(value)[:40]!r}, not a whole number: the "
            "file is damaged, or was not written by fgm") from None


def _check_version(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    found = stored_version(con)
    if found is not None and found > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{path}: the warehouse has schema version {found}, newer than this fgm "
            f"understands (version {SCHEMA_VERSION}). Upgrade fgm to read it.")
    if found is not None and found < SCHEMA_VERSION and not _migratable(found):
        raise SchemaVersionError(
            f"{path}: the warehouse has schema version {found}, older than this fgm "
            f"(version {SCHEMA_VERSION}), and no migration exists for it.")


def _migratable(found: int) -> bool:
    return all(v in MIGRATIONS for v in range(found, SCHEMA_VERSION))


def _table_statements() -> dict[str, str]:
    """{table: its CREATE TABLE statement} from schema.sql."""
    return {m.group(1): m.group(0) for m in re.finditer(
        r"CREATE TABLE IF NOT EXISTS (\w+) \(.*?\n\);", schema_sql(), flags=re.S)}


FGM_TABLES = frozenset(_table_statements())


def _shadow_missing_tables(con: duckdb.DuckDBPyConnection) -> None:
    """A reader of a warehouse older than this code: the tables added since are made
    empty TEMP tables of this connection, so that the views over them work (and say
    there is nothing yet) without writing a byte. The first writer migrates the file."""
    present = {r[0] for r in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
        "AND table_catalog = current_database()").fetchall()}
    for table, statement in _table_statements().items():
        if table not in present:
            con.execute(statement.replace("CREATE TABLE", "CREATE TEMP TABLE", 1))


def views_digest() -> str:
    """sha256 of this code's view definitions: stored in fgm_meta, so a writer
    recreates the views only when the code's differ from the file's."""
    text = "\n".join(f"{name}\n{body}" for name, body in view_files().items())
    return hashlib.sha256(text.encode()).hexdigest()


def apply_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Apply schema.sql, migrate an older warehouse, (re)create the views. Idempotent."""
    found = stored_version(con)
    con.execute(schema_sql())
    if found is not None and found < SCHEMA_VERSION:
        for version in range(found, SCHEMA_VERSION):
            if MIGRATIONS[version]:
                con.execute(MIGRATIONS[version])
        con.execute("UPDATE fgm_meta SET value = ? WHERE key = 'schema_version'",
                    [str(SCHEMA_VERSION)])
    apply_views(con)
    from .wide import create_hp_wide
    create_hp_wide(con, temp=False)    # for any DuckDB reader of the file (wide.py)
    con.execute("INSERT INTO fgm_meta VALUES ('views_sha256', ?) ON CONFLICT (key) "
                "DO UPDATE SET value = excluded.value", [views_digest()])


def _schema_is_current(con: duckdb.DuckDBPyConnection) -> bool:
    """The file already has this schema version and these views: nothing to write,
    so opening it for writing (even for a write that is then refused) changes no byte."""
    if stored_version(con) != SCHEMA_VERSION:
        return False
    if not scalar(con, "SELECT count(*) FROM information_schema.tables WHERE table_schema = "
                  "'main' AND table_catalog = current_database() AND table_name = 'hp_wide'"):
        return False    # a file written before fgm kept hp_wide in it (wide.py)
    return scalar(con, "SELECT value FROM fgm_meta WHERE key = 'views_sha256'") == \
        views_digest()


def apply_views(con: duckdb.DuckDBPyConnection, *, temp: bool = False) -> None:
    """Create the views; temp=True makes them TEMP views of this connection (read-only
    connections), which shadow the stored ones: a warehouse written by an older fgm
    is read through this code's views."""
    kind = "TEMP VIEW" if temp else "VIEW"
    pending = view_files()
    # Views are bound when created, so one may need another first: create in
    # passes until every file is done; a pass that creates none is an error.
    while pending:
        failed: dict[str, Exception] = {}
        for name, body in pending.items():
            try:
                con.execute(f'CREATE OR REPLACE {kind} "{name}" AS {body}')
            except duckdb.CatalogException as exc:
                failed[name] = exc
        if len(failed) == len(pending):
            name, exc = next(iter(failed.items()))
            raise RuntimeError(f"warehouse/views/{name}.sql: {exc}")
        pending = {name: pending[name] for name in failed}


def _missing(path: Path) -> FgmError:
    return FgmError(f"{path}: no warehouse here. Ingest a results table (fgm-ingest) or "
                    "train a grid (fgm-train grid) first, or point --db / $FGM_DB at one.")


def connect(db: str | os.PathLike | None = None, *, read_only: bool = False,
            create: bool = True) -> duckdb.DuckDBPyConnection:
    """Open the warehouse. Writers get schema.sql applied; readers get a version check.
    create=False: a writer that only adds to an existing warehouse (fgm-measure)
    refuses a path where there is none, instead of creating an empty one."""
    path = resolve_db(db)
    if not path.exists() and (read_only or not create):
        raise _missing(path)
    if not read_only and path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    con = _open(path, read_only=read_only)
    try:
        _secure(con, path)
        _check_version(con, path)
        found = stored_version(con)
        if found is None:
            foreign = _foreign(con)
            if read_only or foreign:
                held = f" It holds {', '.join(foreign[:8])}." if foreign else ""
                raise NotAWarehouse(f"{path}: a DuckDB file, but not an fgm warehouse (no "
                                    f"fgm_meta).{held} Give --db a new file or an fgm "
                                    "warehouse.", foreign)
        if read_only:
            if found < SCHEMA_VERSION:
                _shadow_missing_tables(con)
            apply_views(con, temp=True)
        elif not _schema_is_current(con):
            apply_schema(con)
    except BaseException as exc:
        con.close()
        if isinstance(exc, SchemaVersionError) and not str(exc).startswith(str(path)):
            raise SchemaVersionError(f"{path}: {exc}") from None
        if isinstance(exc, duckdb.Error):
            # a catalog fgm cannot read: fgm_meta without its columns, and the like
            raise FgmError(f"{path}: not a warehouse fgm can read ({str(exc).strip()})") \
                from None
        raise
    return con


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """All or nothing: on any error the warehouse is left exactly as it was."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException as exc:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:
            pass  # a failed COMMIT has ended the transaction already
        if isinstance(exc, duckdb.IOException) or (
                isinstance(exc, duckdb.TransactionException)
                and "failed to commit" in str(exc).lower()):
            # a full disk, a file size limit, a vanished directory: say it in the OS's words
            raise FgmError(f"the warehouse could not be written ({str(exc).strip()}); the "
                           "transaction was rolled back and nothing was written") from None
        raise


# A warehouse as the writers take it: a path (None: $FGM_DB, else ./fgm.duckdb),
# a function that opens a writing connection, or an open connection.
Warehouse = str | os.PathLike | None | duckdb.DuckDBPyConnection | Callable[
    [], duckdb.DuckDBPyConnection]


def writer(db: Warehouse, lock_wait: float = LOCK_WAIT):
    """(open, close) for one short write. A connection given is used as it is and
    left open; a path or a factory is opened per write, waiting up to `lock_wait`
    seconds for a reader or writer that holds the file."""
    if isinstance(db, duckdb.DuckDBPyConnection):
        return (lambda: db), (lambda con: None)
    factory = db if callable(db) else (lambda: connect(db))
    return (lambda: when_free(factory, lock_wait)), (lambda con: con.close())


def when_free(open_: Callable[[], duckdb.DuckDBPyConnection],
              lock_wait: float) -> duckdb.DuckDBPyConnection:
    """open_(), tried again every 0.1 s for up to `lock_wait` seconds while another
    process holds the file (WarehouseLocked); then that error, naming the holder."""
    deadline = time.monotonic() + lock_wait
    while True:
        try:
            return open_()
        except WarehouseLocked:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


@contextmanager
def briefly(db: Warehouse,
            lock_wait: float = LOCK_WAIT) -> Iterator[duckdb.DuckDBPyConnection]:
    """The warehouse open for one short piece of work, then closed again, so that
    readers are locked out only while it runs."""
    open_, close = writer(db, lock_wait)
    con = open_()
    try:
        yield con
    finally:
        close(con)
