import json

import pytest
from click.testing import CliRunner
from warehouse_fixture import build_warehouse, lock_held

from fgm.analysis.cli import main as query

TABLE = {"model_id": ["a", "b", "c"], "hp.depth": [2, 4, 8], "hp.optimizer": ["sgd", "adam", "sgd"],
         "train_acc": [1.0, 1.0, 0.99], "test_acc": [0.9, 0.8, 0.85],
         "complexity.path_norm": [1.0, 2.0, None]}


@pytest.fixture
def wh(db):
    return build_warehouse(db, TABLE)


def run(*args):
    return CliRunner().invoke(query, [str(a) for a in args])


def test_sql_json_rows_are_objects(wh):
    out = run("sql", "select count(*) as n from models", "--db", wh, "--format", "json")
    assert out.exit_code == 0 and json.loads(out.output) == [{"n": 3}]


def test_sql_csv_and_table(wh):
    out = run("sql", "select model_id, gap from model_outcomes order by model_id",
              "--db", wh, "--format", "csv")
    lines = out.output.strip().splitlines()
    assert lines[0] == "model_id,gap" and lines[1].startswith("a,0.09")
    table = run("sql", "select depth, optimizer from hp_wide order by depth", "--db", wh)
    assert table.exit_code == 0 and "sgd" in table.output and "adam" in table.output


@pytest.mark.parametrize("statement", [
    "DROP TABLE models", "INSERT INTO sweeps (sweep_id, name) VALUES ('x', 'y')",
    "COPY models TO 'out.csv'", "ATTACH 'other.duckdb'", "DELETE FROM measures",
    "select 1; drop table models", "CREATE TABLE t AS SELECT 1",
])
def test_sql_refuses_writes(wh, statement, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run("sql", statement, "--db", wh)
    assert out.exit_code == 1
    assert "refused: fgm-query sql is read-only" in out.output
    assert "Traceback" not in out.output
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "other.duckdb").exists()
    check = run("sql", "select count(*) as n from models", "--db", wh, "--format", "json")
    assert json.loads(check.output) == [{"n": 3}]


def test_sql_cannot_reach_files_through_a_select(wh, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    out = run("sql", f"select * from read_csv('{secret}')", "--db", wh)
    assert out.exit_code == 1 and "disabled" in out.output


def test_bad_query_prints_duckdb_message_only(wh):
    out = run("sql", "select * from no_such_table", "--db", wh)
    assert out.exit_code == 1
    assert "Table with name no_such_table does not exist" in out.output
    assert "Traceback" not in out.output


def test_models_and_measures_listings(wh):
    models = run("models", "--db", wh, "--format", "json")
    rows = json.loads(models.output)
    assert [r["model_id"] for r in rows] == ["a", "b", "c"]
    assert rows[1]["depth"] == 4.0 and rows[1]["optimizer"] == "adam"
    assert rows[0]["gap"] == pytest.approx(0.1)
    measures = json.loads(run("measures", "--db", wh, "--format", "json").output)
    assert measures[0]["measure"] == "path_norm"
    assert measures[0]["n_values"] == 2 and measures[0]["n_missing"] == 1


def test_missing_warehouse_is_a_clear_error(tmp_path):
    out = run("models", "--db", tmp_path / "none.duckdb")
    assert out.exit_code == 1 and "none.duckdb: no warehouse here" in out.output


def test_a_writer_holding_the_file_gives_a_clear_message(wh, monkeypatch):
    from fgm.analysis import queries
    monkeypatch.setattr(queries, "READ_WAIT", 0.2)    # the holder keeps it past any wait
    with lock_held(wh):
        out = run("models", "--db", wh)
        assert out.exit_code == 1
        assert f"{wh}: the warehouse is in use by another process" in out.output
        assert "Traceback" not in out.output


def test_a_query_waits_for_a_brief_writer(wh, monkeypatch):
    """fgm-query itself writes now (each evaluation it stores): a query that finds
    the file held for a short write waits for it, instead of failing at once."""
    import threading

    from fgm.analysis import cli, queries  # noqa: F401  (cli: the command's own reader)
    from fgm.warehouse import WarehouseLocked
    monkeypatch.setattr(queries, "READ_WAIT", 120.0)   # longer than any loaded machine needs
    refused, answers, real = threading.Event(), [], queries.connect

    def connect(*args, **kw):
        try:
            return real(*args, **kw)
        except WarehouseLocked:
            refused.set()
            raise
    monkeypatch.setattr(queries, "connect", connect)

    def query():
        with cli.readonly(str(wh)) as con:
            answers.append(con.sql("SELECT count(*) FROM models").fetchall()[0][0])
    reader = threading.Thread(target=query)
    with lock_held(wh):
        reader.start()
        assert refused.wait(120)          # it found the writer there...
    reader.join(120)                      # ...and, the writer gone, answered
    assert answers == [len(TABLE["model_id"])]


# --------------------------------------------------------------------------- hardening

def _temp_tables_after(wh, statement):
    """Run `statement`, then list the temp tables of the same connection: whatever the
    statement created would show there (the warehouse itself is opened read-only)."""
    from fgm.analysis.sql import lock_down, run_readonly
    from fgm.warehouse import FgmError, connect
    con = connect(wh, read_only=True)
    try:
        lock_down(con)
        try:
            run_readonly(con, statement)
            error = None
        except FgmError as exc:
            error = str(exc)
        made = con.sql("SELECT table_name FROM duckdb_tables() WHERE temporary").fetchall()
    finally:
        con.close()
    return error, made


@pytest.mark.parametrize("statement", [
    "EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1",
    "explain analyse create temp table t as select 1",
    "EXPLAIN /* hidden */ ANALYZE CREATE TEMP TABLE t AS SELECT 1",
    "EXPLAIN\n-- a comment\n  ANALYZE\n CREATE TEMP TABLE t AS SELECT 1",
    "EXPLAIN (ANALYZE) CREATE TEMP TABLE t AS SELECT 1",
    "explain(analyze)create temp table t as select 1",
    "EXPLAIN (FORMAT json, ANALYZE) CREATE TEMP TABLE t AS SELECT 1",
    "EXPLAIN (ANALYZE false) CREATE TEMP TABLE t AS SELECT 1",
    'EXPLAIN ("analyze") CREATE TEMP TABLE t AS SELECT 1',
    "select 1; EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1",
])
def test_explain_analyze_is_refused_and_runs_nothing(wh, statement):
    error, made = _temp_tables_after(wh, statement)
    assert error is not None and error.startswith("refused: EXPLAIN ANALYZE runs the statement")
    assert made == []


@pytest.mark.parametrize("statement", [
    "EXPLAIN ANALYZE CHECKPOINT", "EXPLAIN /**/ ANALYZE SELECT count(*) FROM models",
    "EXPLAIN (ANALYZE, FORMAT json) SELECT 1",
])
def test_explain_analyze_of_checkpoint_or_select_is_refused_by_the_cli(wh, statement):
    out = run("sql", statement, "--db", wh)
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "refused: EXPLAIN ANALYZE runs the statement it explains" in out.output


@pytest.mark.parametrize("statement", [
    "EXPLAIN CREATE TEMP TABLE t AS SELECT 1", "EXPLAIN CHECKPOINT",
    "EXPLAIN (FORMAT json) CREATE TEMP TABLE t AS SELECT 1",
])
def test_explain_of_anything_but_a_select_is_refused(wh, statement):
    error, made = _temp_tables_after(wh, statement)
    assert error is not None and "explains SELECT queries only" in error and made == []


@pytest.mark.parametrize("statement", [
    "EXPLAIN SELECT count(*) FROM models", "explain /* plan */ select * from hp_wide",
    "EXPLAIN (FORMAT json) SELECT 1", "EXPLAIN (select 1)", "EXPLAIN (FORMAT json) (select 1)",
    "EXPLAIN FROM models", "EXPLAIN WITH x AS (SELECT 1) SELECT * FROM x",
])
def test_plain_explain_of_a_select_still_works(wh, statement):
    out = run("sql", statement, "--db", wh, "--format", "json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)[0]["explain_key"] == "physical_plan"


def test_a_long_query_is_stopped_by_the_timeout(wh):
    slow = ("select sum(a.range * b.range) as s "
            "from range(1000000000) a, range(1000000000) b")
    out = run("sql", slow, "--db", wh, "--timeout", "1")
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "the query timed out after 1 s" in out.output and "--timeout SECONDS" in out.output


def test_the_timeout_covers_every_statement_of_a_script(wh):
    slow = ("select 1; select sum(a.range * b.range) as s "
            "from range(1000000000) a, range(1000000000) b; select 2")
    out = run("sql", slow, "--db", wh, "--timeout", "0.5")
    assert out.exit_code == 1 and "timed out after 0.5 s" in out.output


def test_memory_limit_is_applied_before_the_configuration_is_locked(wh):
    out = run("sql", "select current_setting('memory_limit') as m", "--db", wh,
              "--memory-limit", "300MB", "--format", "json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)[0]["m"].replace(" ", "") in ("286.1MiB", "300.0MB")
    default = run("sql", "select current_setting('memory_limit') as m", "--db", wh,
                  "--format", "json")
    assert json.loads(default.output)[0]["m"].replace(" ", "") in ("3.7GiB", "4.0GB")
    locked = run("sql", "select current_setting('lock_configuration') as l", "--db", wh,
                 "--format", "json")
    assert json.loads(locked.output) == [{"l": True}]


def test_a_bad_memory_limit_is_a_clear_error(wh):
    out = run("sql", "select 1", "--db", wh, "--memory-limit", "lots")
    assert out.exit_code == 2 and "Traceback" not in out.output     # a usage error
    assert "--memory-limit 'lots'" in out.output and "4GB" in out.output
