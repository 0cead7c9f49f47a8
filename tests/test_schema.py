from pathlib import Path

import duckdb
import pytest
from sqlalchemy import ARRAY, Boolean, DateTime, Float, Integer, String, TypeDecorator
from warehouse_fixture import TABLES, build_warehouse, dump

from fgm.warehouse import SCHEMA_VERSION, SchemaVersionError, apply_schema, connect, resolve_db
from fgm.warehouse.rows import ROW_CLASSES
from fgm.warehouse.store import schema_sql, view_files


def test_schema_applies_to_an_empty_database_and_reapplies_cleanly(db):
    con = connect(db)
    tables = {r[0] for r in con.sql("SELECT table_name FROM information_schema.tables "
                                     "WHERE table_type = 'BASE TABLE'").fetchall()}
    assert set(TABLES) <= tables
    con.close()
    before = dump(db)
    con = connect(db)
    apply_schema(con)
    apply_schema(con)
    con.close()
    assert dump(db) == before


def test_reapplying_keeps_data(db):
    build_warehouse(db, {"hp.depth": [2, 4], "gen.gap": [0.1, 0.2], "complexity.m": [1.0, 2.0]})
    before = dump(db)
    con = connect(db)
    con.execute(schema_sql())
    con.close()
    assert dump(db) == before and len(before["models"]) == 2


def test_schema_version_is_stored(db):
    connect(db).close()
    con = duckdb.connect(str(db))
    assert con.sql("SELECT value FROM fgm_meta WHERE key='schema_version'").fetchall() == [
        (str(SCHEMA_VERSION),)]
    con.close()


def test_a_newer_warehouse_gives_a_clear_error(db):
    connect(db).close()
    con = duckdb.connect(str(db))
    con.execute("UPDATE fgm_meta SET value = '999' WHERE key = 'schema_version'")
    con.close()
    for read_only in (False, True):
        with pytest.raises(SchemaVersionError, match=r"version 999, newer than this fgm"):
            connect(db, read_only=read_only)


def test_views_come_from_sql_files_one_per_file(db):
    con = connect(db)
    views = {r[0] for r in con.sql("SELECT view_name FROM duckdb_views() "
                                   "WHERE NOT internal").fetchall()}
    con.close()
    # and hp_wide, built from the axes the file holds (warehouse/wide.py), not a file
    assert set(view_files()) | {"hp_wide"} == views
    assert "hp_wide" not in view_files()
    assert {"model_measures", "model_outcomes"} <= views


DUCK_TO_SA = {"VARCHAR": String, "INTEGER": Integer, "BIGINT": Integer, "DOUBLE": Float,
              "BOOLEAN": Boolean, "TIMESTAMP": DateTime, "JSON": String}


@pytest.mark.parametrize("row_class", ROW_CLASSES, ids=lambda c: c.__tablename__)
def test_sqlmodel_rows_match_schema_sql(db, row_class):
    con = connect(db)
    cols = con.sql("SELECT column_name, data_type FROM information_schema.columns "
                   "WHERE table_name = ? ORDER BY ordinal_position",
                   params=[row_class.__tablename__]).fetchall()
    keys = con.sql("SELECT constraint_column_names FROM duckdb_constraints() "
                   "WHERE table_name = ? AND constraint_type = 'PRIMARY KEY'",
                   params=[row_class.__tablename__]).fetchall()
    con.close()
    table = row_class.__table__
    assert [c for c, _ in cols] == [c.name for c in table.columns]
    for name, duck_type in cols:
        sa_type = table.columns[name].type
        if isinstance(sa_type, TypeDecorator):  # sqlmodel's AutoString wraps String
            sa_type = sa_type.impl_instance
        if duck_type.endswith("[]"):
            assert isinstance(sa_type, ARRAY) and isinstance(sa_type.item_type, String)
        else:
            assert isinstance(sa_type, DUCK_TO_SA[duck_type]), (name, duck_type, sa_type)
    assert set(keys[0][0]) == {c.name for c in table.primary_key.columns}


def test_db_path_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("FGM_DB", raising=False)
    assert str(resolve_db()) == "fgm.duckdb"
    monkeypatch.setenv("FGM_DB", str(tmp_path / "env.duckdb"))
    assert resolve_db() == tmp_path / "env.duckdb"
    assert resolve_db(tmp_path / "x.duckdb") == tmp_path / "x.duckdb"


# --------------------------------------------------------------------------- migration

def _version_1_warehouse(path, tmp_path):
    """A warehouse as fgm wrote it before evaluations were stored: tests/schema_v1.sql
    (schema.sql as it was), the four views of then, and the rows of a real ingest."""
    source = build_warehouse(tmp_path / "source.duckdb", {
        "hp.depth": [2, 2, 4, 4, 8, 8], "hp.width": [8, 16, 8, 16, 8, 16],
        "gen.gap": [0.1, 0.12, 0.2, 0.19, 0.3, 0.33],
        "complexity.m": [1.0, 1.5, 2.0, 1.8, 3.0, 3.5]})
    con = duckdb.connect(str(path))
    con.execute((Path(__file__).parent / "schema_v1.sql").read_text())
    old_views = ("measure_summary", "model_levels", "model_measures", "model_outcomes")
    pending = [v for v in old_views]
    while pending:   # created in dependency order, as the store does
        for name in list(pending):
            try:
                con.execute(f'CREATE VIEW "{name}" AS {view_files()[name]}')
                pending.remove(name)
            except duckdb.CatalogException:
                pass
    con.execute("INSERT INTO fgm_meta VALUES ('views_sha256', 'of version 1')")
    con.execute(f"ATTACH '{source}' AS src (READ_ONLY)")
    for table in TABLES[1:]:
        if table not in ("architectures", "datasets", "model_builds"):   # version 3's
            con.execute(f"INSERT INTO {table} SELECT * FROM src.{table}")
    con.close()
    return path


def test_a_version_1_warehouse_is_read_as_it_is_and_migrated_by_the_first_writer(db, tmp_path):
    import hashlib

    from click.testing import CliRunner

    from fgm.analysis.cli import main as query
    _version_1_warehouse(db, tmp_path)
    before, raw = dump(db), hashlib.sha256(db.read_bytes()).hexdigest()
    assert len(before["models"]) == 6 and before["fgm_meta"][0] == ("schema_version", "1")
    # a reader: the new views answer (nothing stored yet), and not a byte is written
    con = connect(db, read_only=True)
    assert con.sql("SELECT count(*) FROM latest_evaluation").fetchall() == [(0,)]
    con.close()
    out = CliRunner().invoke(query, ["psi", "-m", "m", "--no-store", "--db", str(db)])
    assert out.exit_code == 0 and "Psi" in out.output, out.output
    assert hashlib.sha256(db.read_bytes()).hexdigest() == raw
    # storing writes: the file is migrated to this version, every row of version 1 kept
    out = CliRunner().invoke(query, ["psi", "-m", "m", "--db", str(db)])
    assert out.exit_code == 0 and "note" not in out.output, out.output
    after = dump(db)
    assert dict(after["fgm_meta"])["schema_version"] == str(SCHEMA_VERSION) == "3"
    assert {t: v for t, v in after.items() if t != "fgm_meta"} == \
        {t: v for t, v in before.items() if t != "fgm_meta"}
    con = connect(db, read_only=True)
    assert con.sql("SELECT command, n_models, stale FROM evaluation_status").fetchall() == [
        ("psi", 6, False)]
    # version 3: the tables of models fgm did not train, and traces that may lack the epoch
    assert con.sql("SELECT count(*) FROM architectures").fetchall() == [(0,)]
    assert con.sql("SELECT is_nullable FROM information_schema.columns WHERE table_name = "
                   "'traces' AND column_name = 'epoch'").fetchall() == [("YES",)]
    con.close()


def test_a_version_without_a_migration_is_refused(db):
    connect(db).close()
    con = duckdb.connect(str(db))
    con.execute("UPDATE fgm_meta SET value = '0' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(SchemaVersionError, match=r"version 0, older than this fgm.*no migration"):
        connect(db)
