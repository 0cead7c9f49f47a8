"""A warehouse file is input like any other: someone may hand you one whose catalog
they wrote. fgm locks every connection down before it runs SQL of its own on it,
reads only tables that are tables, and refuses files that are not its own."""

import hashlib
import json
import socket
import subprocess
import sys
import textwrap

import duckdb
import pytest
from click.testing import CliRunner
from warehouse_fixture import build_warehouse

from fgm.analysis.cli import main as query
from fgm.ingest.cli import main as ingest
from fgm.measures.cli import main as measure

TABLE = {"model_id": ["a", "b", "c"], "hp.depth": [2, 4, 8], "hp.optimizer": ["sgd", "adam", "sgd"],
         "train_acc": [1.0, 1.0, 0.99], "test_acc": [0.9, 0.8, 0.85],
         "complexity.path_norm": [1.0, 2.0, None]}
SECRET = socket.gethostname()


@pytest.fixture
def wh(db):
    return build_warehouse(db, TABLE)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tamper(path, *statements):
    con = duckdb.connect(str(path))
    for s in statements:
        con.execute(s)
    con.close()


def csv_file(tmp_path):
    path = tmp_path / "more.csv"
    path.write_text("model_id,hp.depth,hp.optimizer,train_acc,test_acc\nd,2,adam,1.0,0.7\n")
    return path


READS_A_FILE = ("SELECT * FROM (VALUES ('m', 'depth', 0, '2', 2.0)) "
                "AS t(model_id, axis, level, value_text, value_num) "
                "UNION ALL SELECT content, 'leak', 0, content, 0.0 FROM read_text('/etc/hostname')")


def commands(wh, tmp_path):
    """Every command that opens a warehouse: query, measure, ingest, report."""
    return {
        "sql": (query, ["sql", "SELECT * FROM duckdb_columns()", "--db", str(wh)]),
        "models": (query, ["models", "--db", str(wh)]),
        "psi": (query, ["psi", "-m", "path_norm", "--db", str(wh)]),
        "report": (query, ["report", "--out", str(tmp_path / "r"), "--db", str(wh)]),
        "measure": (measure, ["--db", str(wh), "--device", "cpu"]),
        "ingest": (ingest, [str(csv_file(tmp_path)), "--db", str(wh)]),
    }


@pytest.mark.parametrize("command", ["sql", "models", "psi", "report", "measure", "ingest"])
def test_a_view_in_place_of_an_fgm_table_is_refused_by_every_command(wh, tmp_path, command):
    tamper(wh, "DROP TABLE hyperparameters",
           f"CREATE VIEW hyperparameters AS {READS_A_FILE}")
    before = sha(wh)
    cli, args = commands(wh, tmp_path)[command]
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 1, out.output
    assert "hyperparameters should be a table but is a view" in out.output
    assert SECRET not in out.output
    assert sha(wh) == before
    assert not (tmp_path / "r").exists()


def test_a_view_of_the_authors_own_reads_no_file_either(wh):
    """Not fgm's table, so fgm never reads it itself; a user's SELECT of it is stopped
    by the lock-down, which is in force before the first statement."""
    tamper(wh, "CREATE VIEW notes AS SELECT content FROM read_text('/etc/hostname')")
    out = CliRunner().invoke(query, ["sql", "SELECT * FROM notes", "--db", str(wh)])
    assert out.exit_code == 1 and SECRET not in out.output
    assert "disabled by configuration" in out.output


def test_a_macro_that_shadows_a_builtin_is_refused_before_any_query(wh):
    tamper(wh, "CREATE MACRO list_contains(a, b) AS true")
    for args in (["sql", "SELECT 1 AS x"], ["models"], ["psi", "-m", "path_norm"]):
        out = CliRunner().invoke(query, [*args, "--db", str(wh)])
        assert out.exit_code == 1 and "SQL functions of its own (list_contains)" in out.output


def test_a_schema_version_that_is_not_a_number_is_one_line(wh, tmp_path):
    tamper(wh, "UPDATE fgm_meta SET value = 'two' WHERE key = 'schema_version'")
    before = sha(wh)
    for cli, args in (commands(wh, tmp_path)[c] for c in ("sql", "measure", "ingest")):
        out = CliRunner().invoke(cli, args)
        assert out.exit_code == 1 and isinstance(out.exception, SystemExit), out.output
        assert "schema_version is 'two', not a whole number" in out.output
        assert str(wh) in out.output
    assert sha(wh) == before


def test_fgm_meta_without_its_columns_is_one_line(wh):
    tamper(wh, "DROP TABLE fgm_meta", "CREATE TABLE fgm_meta (k VARCHAR)")
    out = CliRunner().invoke(query, ["models", "--db", str(wh)])
    assert out.exit_code == 1 and isinstance(out.exception, SystemExit)
    assert "not a warehouse fgm can read" in out.output


def test_ingest_does_not_adopt_a_duckdb_file_of_someone_elses(db, tmp_path):
    tamper(db, "CREATE TABLE experiments (id INTEGER, note VARCHAR)",
           "INSERT INTO experiments VALUES (1, 'mine')", "CREATE VIEW recent AS SELECT 1")
    before = sha(db)
    out = CliRunner().invoke(ingest, [str(csv_file(tmp_path)), "--db", str(db)])
    assert out.exit_code == 1
    assert "not an fgm warehouse" in out.output and "experiments, recent" in out.output
    assert sha(db) == before


def test_an_empty_duckdb_file_becomes_a_warehouse(db, tmp_path):
    duckdb.connect(str(db)).close()
    out = CliRunner().invoke(ingest, [str(csv_file(tmp_path)), "--db", str(db)])
    assert out.exit_code == 0, out.output
    con = duckdb.connect(str(db), read_only=True)
    assert con.sql("SELECT count(*) FROM models").fetchall() == [(1,)]
    con.close()


def test_a_results_table_waits_for_another_writer_as_bundles_do(wh, tmp_path, monkeypatch):
    """The holder lets go at the first retry: the ingest must be retrying, not failing."""
    import fgm.warehouse.store as store
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import duckdb, sys
        con = duckdb.connect({str(wh)!r})
        print("holding", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    retries = []

    def let_go(_seconds):
        retries.append(1)
        if holder.poll() is None:
            holder.stdin.close()
            holder.wait()
    monkeypatch.setattr(store.time, "sleep", let_go)
    try:
        out = CliRunner().invoke(ingest, [str(csv_file(tmp_path)), "--db", str(wh)])
    finally:
        if holder.poll() is None:
            holder.stdin.close()
            holder.wait()
    assert retries and out.exit_code == 0, out.output
    assert "1 models (1 added" in out.output


# --------------------------------------------------------------------------- sql results

def test_a_table_prints_at_most_max_rows_and_counts_the_rest(wh):
    out = CliRunner().invoke(query, ["sql", "SELECT range AS i FROM range(2500)",
                                     "--db", str(wh)])
    assert out.exit_code == 0
    lines = out.stdout.strip().splitlines()
    assert lines[0].strip() == "i" and len(lines) == 2 + 1000 and lines[-1].strip() == "999"
    assert "1,500 more rows not shown (1,000 printed)" in out.stderr
    some = CliRunner().invoke(query, ["sql", "SELECT range AS i FROM range(2500)",
                                      "--max-rows", "10", "--db", str(wh)])
    assert len(some.stdout.strip().splitlines()) == 12 and "2,490 more rows" in some.stderr
    every = CliRunner().invoke(query, ["sql", "SELECT range AS i FROM range(2500)",
                                       "--max-rows", "0", "--db", str(wh)])
    assert len(every.stdout.strip().splitlines()) == 2502 and not every.stderr


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_csv_and_json_stream_every_row_across_batches(wh, fmt):
    from fgm.analysis.sql import BATCH_ROWS
    n = 2 * BATCH_ROWS + 7
    out = CliRunner().invoke(query, ["sql", f"SELECT range AS i, 'r' || range AS s FROM range({n})",
                                     "--db", str(wh), "--format", fmt])
    assert out.exit_code == 0 and not out.stderr
    if fmt == "csv":
        lines = out.stdout.splitlines()
        assert lines[0] == "i,s" and len(lines) == n + 1 and lines[-1] == f"{n - 1},r{n - 1}"
    else:
        rows = json.loads(out.stdout)
        assert len(rows) == n and rows[-1] == {"i": n - 1, "s": f"r{n - 1}"}


@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_an_empty_answer_keeps_its_shape(wh, fmt):
    out = CliRunner().invoke(query, ["sql", "SELECT model_id, gap FROM model_outcomes WHERE false",
                                     "--db", str(wh), "--format", fmt])
    assert out.exit_code == 0
    expected = {"csv": "model_id,gap", "json": "[]"}.get(fmt, "model_id  gap")
    assert out.stdout.strip().splitlines()[0].strip() == expected


def test_rows_come_in_bounded_batches(wh):
    from fgm.analysis.sql import BATCH_ROWS, readonly_batches
    from fgm.warehouse import connect
    con = connect(wh, read_only=True)
    try:
        with readonly_batches(con, "SELECT range FROM range(100000)") as frames:
            sizes = [f.height for f in frames]
    finally:
        con.close()
    assert sum(sizes) == 100000 and max(sizes) <= BATCH_ROWS and len(sizes) > 1


def test_the_timeout_covers_reading_the_rows_not_only_the_query(wh, monkeypatch):
    """A reader that takes longer than --timeout to take the rows is stopped too: the
    clock is moved past the limit once the first batch is out."""
    import fgm.analysis.sql as sql
    from fgm.warehouse import FgmError, connect
    now = [0.0]
    monkeypatch.setattr(sql.time, "monotonic", lambda: now[0])
    con = connect(wh, read_only=True)
    try:
        with sql.readonly_batches(con, "SELECT range FROM range(100000)",
                                  timeout=30) as frames:
            first = next(frames)
            now[0] = 31.0
            with pytest.raises(FgmError, match="timed out after 30 s"):
                next(frames)
    finally:
        con.close()
    assert first.height > 0


# --------------------------------------------------------------------------- a review's attacks

def test_a_view_that_differs_from_an_fgm_table_only_in_case_is_refused(wh):
    """DuckDB finds names whatever their case: "Outcomes" answers for outcomes."""
    tamper(wh, "ALTER TABLE outcomes RENAME TO o_orig",
           'CREATE VIEW "Outcomes" AS SELECT * REPLACE (test_acc + 0.1 AS test_acc) FROM o_orig')
    out = CliRunner().invoke(query, ["models", "--db", str(wh)])
    assert out.exit_code == 1 and "outcomes should be a table but is a view" in out.output


@pytest.mark.parametrize("statements", [
    ["CREATE TABLE models (a INTEGER, b VARCHAR)"],          # a name fgm also uses
    ["CREATE SCHEMA analytics", "CREATE TABLE analytics.sales (x INTEGER)"],
])
def test_ingest_does_not_adopt_a_file_whose_tables_are_named_like_fgms_or_elsewhere(
        db, tmp_path, statements):
    tamper(db, *statements)
    before = sha(db)
    out = CliRunner().invoke(ingest, [str(csv_file(tmp_path)), "--db", str(db)])
    assert out.exit_code == 1 and "not an fgm warehouse" in out.output, out.output
    assert sha(db) == before


def test_a_grid_may_start_on_an_empty_duckdb_file(db, grid_file):
    from fgm.train.grid import check_levels_against_sweep, load_grid
    duckdb.connect(str(db)).close()
    check_levels_against_sweep(db, load_grid(path=grid_file))     # nothing to disagree with
    tamper(db, "CREATE TABLE mine (x INTEGER)")
    from fgm.warehouse import FgmError
    with pytest.raises(FgmError, match="not an fgm warehouse"):
        check_levels_against_sweep(db, load_grid(path=grid_file))


def test_rows_past_max_rows_are_counted_until_the_timeout_and_the_rows_still_print(wh):
    out = CliRunner().invoke(query, ["sql", "SELECT range AS i FROM range(10000000000)",
                                     "--db", str(wh), "--timeout", "2"])
    assert out.exit_code == 0, out.output
    assert len(out.stdout.strip().splitlines()) == 1002
    assert "at least" in out.stderr and "counting stopped at the timeout" in out.stderr


def test_earlier_statements_run_and_only_the_last_ones_rows_are_kept(wh):
    out = CliRunner().invoke(query, ["sql", "SELECT range FROM range(100000); SELECT 7 AS x",
                                     "--db", str(wh), "--format", "json"])
    assert out.exit_code == 0 and json.loads(out.stdout) == [{"x": 7}]
    bad = CliRunner().invoke(query, ["sql", "SELECT nope FROM range(3); SELECT 7 AS x",
                                     "--db", str(wh)])
    assert bad.exit_code == 1 and "nope" in bad.output


@pytest.mark.parametrize("limit", ["-5GB", "-1", "0", "lots"])
def test_a_memory_limit_that_is_no_limit_is_refused(wh, limit):
    out = CliRunner().invoke(query, ["sql", "SELECT 1", "--db", str(wh), "--memory-limit",
                                     limit])
    assert out.exit_code == 2 and "expected a positive size" in out.output


def test_a_report_folder_that_cannot_be_made_is_one_line(wh):
    out = CliRunner().invoke(query, ["report", "--out", "/proc/fgm-report", "--db", str(wh)])
    assert out.exit_code == 1 and isinstance(out.exception, SystemExit)
    assert "cannot make the folder" in out.output
