"""--where is one checked boolean expression, never SQL pasted into a statement:
every payload a red-team used against fgm-query and fgm-measure is refused with
nothing written, read or attached, and honest predicates still select models."""

import json

import duckdb
import pytest
from click.testing import CliRunner
from warehouse_fixture import build_warehouse, dump

from fgm.analysis.cli import main as query
from fgm.measures.cli import main as measure

TABLE = {
    "model_id": [f"m{i}" for i in range(8)],
    "hp.depth": [2, 2, 4, 4, 8, 8, 2, 4],
    "hp.optimizer": ["sgd", "adam"] * 4,
    "train_acc": [1.0] * 8,
    "test_acc": [0.90, 0.80, 0.85, 0.70, 0.60, 0.75, 0.95, 0.88],
    "complexity.path_norm": [1.0, 2.0, 1.5, 3.0, 4.0, 2.5, 0.5, 1.2],
}


@pytest.fixture
def wh(db):
    return build_warehouse(db, TABLE)


@pytest.fixture
def other(tmp_path):
    """Another DuckDB file an ATTACH payload would try to damage."""
    path = tmp_path / "other.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE precious AS SELECT 42 AS answer")
    con.close()
    return path


def payloads(tmp_path, other):
    out = tmp_path / "x.csv"
    return [
        "1=1); DELETE FROM measures; DELETE FROM outcomes; "
        "SELECT model_id, dataset FROM models WHERE (1=0",
        f"1=1); COPY (SELECT * FROM models) TO '{out}'; SELECT model_id FROM hp_wide WHERE (1=0",
        "(SELECT count(*) FROM read_text('/etc/passwd')) > 0",
        f"1=1); ATTACH '{other}' AS o; DROP TABLE o.precious; "
        "SELECT model_id FROM hp_wide WHERE (1=0",
        "1=1); EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1; SELECT model_id FROM hp_wide WHERE (1=0",
        "model_id IN (SELECT column0 FROM read_csv('/etc/passwd'))",
        "EXISTS (FROM glob('/*'))",
        "depth IN (SELECT 2 FROM (EXPLAIN ANALYZE SELECT 1))",
        "1=1 UNION SELECT model_id FROM models",
        "1=1 LIMIT 1",
        "1=1; DELETE FROM measures",
        "depth = 2 /* */ ; DROP TABLE measures; --",
        "getenv('HOME') IS NOT NULL",
        "current_setting('enable_external_access')",
        "depth::BLOB IS NOT NULL",
        "",
    ]


def _assert_untouched(before, wh, tmp_path, other):
    assert dump(wh) == before
    assert not (tmp_path / "x.csv").exists()
    con = duckdb.connect(str(other), read_only=True)
    assert con.sql("SELECT answer FROM precious").fetchall() == [(42,)]
    con.close()


@pytest.mark.parametrize("index", range(16))
def test_query_where_payloads_are_refused(wh, tmp_path, other, index):
    where = payloads(tmp_path, other)[index]
    before = dump(wh)
    out = CliRunner().invoke(query, ["psi", "-m", "path_norm", "--where", where, "--db", str(wh)])
    assert out.exit_code == 1, out.output
    assert "--where" in out.output and "Traceback" not in out.output
    _assert_untouched(before, wh, tmp_path, other)


@pytest.mark.parametrize("index", range(16))
def test_measure_where_payloads_are_refused(wh, tmp_path, other, index):
    """fgm-measure opens the warehouse read-write: the payload must not even run."""
    where = payloads(tmp_path, other)[index]
    before = dump(wh)
    out = CliRunner().invoke(measure, ["--where", where, "--db", str(wh), "--device", "cpu"])
    assert out.exit_code == 1, out.output
    assert "--where" in out.output
    after = dump(wh)
    # fgm-measure mirrors the registry into measure_definitions; nothing else may change
    after["measure_definitions"], before["measure_definitions"] = [], []
    assert after == before
    assert not (tmp_path / "x.csv").exists()
    con = duckdb.connect(str(other), read_only=True)
    assert con.sql("SELECT answer FROM precious").fetchall() == [(42,)]
    con.close()


def _n_models(wh, where):
    out = CliRunner().invoke(query, ["psi", "-m", "path_norm", "--where", where, "--db", str(wh),
                                     "--format", "json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.output)["n_models"]


@pytest.mark.parametrize("where, expected", [
    ("depth >= 4", 5),
    ("depth = 2 AND optimizer = 'sgd'", 2),
    ("depth IN (2, 8) OR optimizer LIKE 'ad%'", 7),
    ("NOT (depth BETWEEN 3 AND 5)", 5),
    ("depth_level = 0 -- a comment at the end", 3),
    ("/* leading comment */ lower(optimizer) = 'adam'", 4),
    ("CAST(depth AS INTEGER) % 4 = 0 AND CASE WHEN optimizer = 'sgd' THEN true ELSE false END", 2),
])
def test_honest_predicates_select_the_models_a_direct_filter_would(wh, where, expected):
    assert _n_models(wh, where) == expected


def test_hints_for_common_mistakes(wh):
    out = CliRunner().invoke(query, ["psi", "-m", "path_norm", "--where", "optimizer = sgd",
                                     "--db", str(wh)])
    assert out.exit_code == 1 and "quote it: 'sgd'" in out.output
    out = CliRunner().invoke(query, ["psi", "-m", "path_norm", "--where", "depht > 2",
                                     "--db", str(wh)])
    assert out.exit_code == 1 and "did you mean 'depth'" in out.output
    assert "optimizer_level" in out.output   # the usable columns are listed


@pytest.mark.parametrize("where", ["NOT " * 500 + "true", "abs(" * 400 + "depth" + ")" * 400])
def test_deep_nesting_is_one_line_not_a_recursion_error(wh, where):
    out = CliRunner().invoke(query, ["psi", "-m", "path_norm", "--where", where, "--db", str(wh)])
    assert out.exit_code == 1 and "nested more than" in out.output
    assert out.exception.__class__ is SystemExit


def test_what_runs_is_the_checked_tree_not_the_text(wh):
    """The serializer drops a WINDOW clause; what runs is its rendering of the tree,
    so a subquery hidden there never reaches DuckDB."""
    from fgm.analysis.predicate import checked_predicate
    from fgm.analysis.sql import create_hp_wide
    con = duckdb.connect(str(wh), read_only=True)
    create_hp_wide(con)
    sql = checked_predicate(con, "depth = 2 WINDOW w AS (PARTITION BY (SELECT count(*) FROM "
                                 "read_text('/etc/passwd')))")
    con.close()
    assert "read_text" not in sql and "WINDOW" not in sql.upper()


def test_a_macro_of_the_warehouse_that_shadows_a_builtin_is_not_called(wh, tmp_path):
    con = duckdb.connect(str(wh))
    con.execute("CREATE MACRO lower(x) AS (SELECT count(*) FROM read_text('/etc/hostname'))")
    con.close()
    out = CliRunner().invoke(measure, ["--where", "lower(optimizer) = 'sgd'", "--db", str(wh),
                                       "--device", "cpu"])
    # refused as the file is opened, before any predicate is parsed (warehouse/store.py)
    assert out.exit_code == 1 and "defines SQL functions of its own (lower)" in out.output
