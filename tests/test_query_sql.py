import json

import pytest
from click.testing import CliRunner
from warehouse_fixture import build_warehouse, write_lock_held

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


def test_a_writer_holding_the_file_gives_a_clear_message(wh):
    with write_lock_held(wh):
        out = run("models", "--db", wh)
        assert out.exit_code == 1
        assert f"{wh}: the warehouse is in use by another process" in out.output
        assert "Traceback" not in out.output
