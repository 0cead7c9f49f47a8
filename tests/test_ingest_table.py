import json

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from warehouse_fixture import build_warehouse, dump, ingest_file, lock_held

from fgm.analysis.cli import main as query
from fgm.ingest.cli import main as ingest_cli
from fgm.ingest.synthetic import synthetic_table
from fgm.warehouse import InputError, connect

GOOD = """\
model_id,hp.lr,hp.optimizer,level.optimizer,complexity.a,complexity.b,train_acc,test_acc,is.converged
m1,0.1,sgd,0,1.5,2,1.0,0.8,true
m2,0.01,adam,1,2.5,,0.99,0.9,false
m3,0.1,adam,1,-4e-3,3,1,0.7,1
"""


def write(tmp_path, text, name="t.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


ingest = ingest_file


def test_round_trip_values_in_equal_values_out(db, tmp_path):
    table = synthetic_table(n_measures=3, null_share=0.1, converged_share=0.8).head(200)
    path = tmp_path / "r.parquet"
    table.write_parquet(path)
    ingest(db, path)
    con = connect(db, read_only=True)
    got = con.sql("SELECT model_id, measure, value FROM measures").pl()
    gaps = con.sql("SELECT model_id, gap, converged FROM outcomes").pl()
    levels = con.sql("SELECT model_id, axis, level, value_num FROM hyperparameters").pl()
    con.close()
    for m in ["measure_00", "measure_01", "measure_02"]:
        ours = got.filter(pl.col("measure") == m).sort("model_id")["value"].to_numpy()
        ref = table.sort("model_id")[f"complexity.{m}"].to_numpy()
        assert np.isnan(ref).sum() > 0
        np.testing.assert_array_equal(ours, ref)  # NULL comes back as NaN, where NaN went in
    ref_gap = (table["train_acc"] - table["test_acc"]).to_numpy()
    assert (gaps.sort("model_id")["gap"].to_numpy() == ref_gap[table["model_id"].arg_sort()]
            ).all()
    assert gaps["converged"].sum() == table["is.converged"].sum()
    depth = levels.filter(pl.col("axis") == "depth").sort("model_id")
    assert depth["level"].to_list() == table.sort("model_id")["level.depth"].to_list()
    assert depth["value_num"].to_list() == table.sort("model_id")["hp.depth"].cast(
        pl.Float64).to_list()


def test_csv_round_trip_and_levels(db, tmp_path):
    summary = ingest(db, write(tmp_path, GOOD))
    assert summary.models == (3, 0, 0) and summary.values == (6, 0, 0)
    con = connect(db, read_only=True)
    rows = dict(con.sql("SELECT model_id || axis, level FROM hyperparameters").fetchall())
    values = dict(con.sql("SELECT model_id || measure, value FROM measures").fetchall())
    status = dict(con.sql("SELECT model_id || measure, status FROM measures").fetchall())
    conv = dict(con.sql("SELECT model_id, converged FROM outcomes").fetchall())
    con.close()
    # lr has no level column: dense rank of the value, ascending
    assert rows["m1lr"] == 1 and rows["m2lr"] == 0 and rows["m3lr"] == 1
    assert rows["m1optimizer"] == 0 and rows["m2optimizer"] == 1
    assert values["m3a"] == -4e-3 and values["m2b"] is None and status["m2b"] == "missing"
    assert conv == {"m1": True, "m2": False, "m3": True}


def test_reingest_is_idempotent_and_updates_are_counted(db, tmp_path):
    path = write(tmp_path, GOOD)
    ingest(db, path)
    before = dump(db)
    again = ingest(db, path)
    assert again.models == (0, 0, 3) and again.values == (0, 0, 6)
    assert dump(db) == before
    changed = write(tmp_path, GOOD.replace("m1,0.1,sgd,0,1.5", "m1,0.1,sgd,0,9.5"))
    with pytest.raises(InputError, match="measure a = 1.5; this table says 9.5"):
        ingest(db, changed)          # a stored result is overwritten on purpose only
    summary = ingest(db, changed, replace=True)
    assert summary.values == (0, 1, 5) and summary.models == (0, 0, 3)
    con = connect(db, read_only=True)
    assert con.sql("SELECT value FROM measures WHERE model_id='m1' AND measure='a'"
                   ).fetchall() == [(9.5,)]
    con.close()


MALFORMED = {
    "no gap columns": ("model_id,hp.lr,complexity.a\nm1,0.1,1\n", r"no gap columns"),
    "non-numeric measure": (GOOD.replace("-4e-3", "abc"),
                            r"row 3, column 'complexity.a': expected a number, found 'abc'"),
    "contradicting level": (GOOD.replace("m3,0.1,adam,1", "m3,0.1,adam,2"),
                            r"row 3, column 'level.optimizer': value adam has level 1 in row 2"),
    "duplicate model_id": (GOOD.replace("m3,", "m1,"),
                           r"row 3, column 'model_id': duplicate model_id 'm1'"),
    "empty file": ("", r"the file is empty"),
    "header only": (GOOD.splitlines()[0] + "\n", r"no rows"),
    "accuracy in percent": (GOOD.replace("1.0,0.8", "100,80"), r"fraction in \[0, 1\]"),
    "bad converged flag": (GOOD.replace("true", "maybe"), r"expected true/false"),
    "missing hp value": (GOOD.replace("m2,0.01", "m2,"), r"row 2, column 'hp.lr'"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_table_is_rejected_and_changes_nothing(db, tmp_path, case):
    ingest(db, write(tmp_path, GOOD, "first.csv"))
    before = dump(db)
    text, message = MALFORMED[case]
    path = write(tmp_path, text, "bad.csv")
    with pytest.raises(InputError, match=message) as err:
        ingest(db, path)
    assert "bad.csv" in str(err.value)
    assert dump(db) == before


def test_level_contradicting_the_warehouse_is_rejected(db, tmp_path):
    ingest(db, write(tmp_path, GOOD, "a.csv"))
    before = dump(db)
    other = "model_id,hp.lr,train_acc,test_acc\nm9,0.1,1,0.5\n"  # 0.1 would be level 0 alone
    with pytest.raises(InputError, match=r"already stores level 1"):
        ingest(db, write(tmp_path, other, "b.csv"))
    assert dump(db) == before


def test_failure_inside_the_transaction_rolls_back(db, tmp_path, monkeypatch):
    ingest(db, write(tmp_path, GOOD))
    before = dump(db)
    import fgm.ingest.table as mod
    calls = {"n": 0}
    real = mod.upsert

    def flaky(con, table, *a, **kw):
        calls["n"] += 1
        if table == "measures":
            raise RuntimeError("disk full")
        return real(con, table, *a, **kw)

    monkeypatch.setattr(mod, "upsert", flaky)
    with pytest.raises(RuntimeError):
        ingest(db, write(tmp_path, GOOD.replace("m1,", "m7,"), "new.csv"), sweep="t")
    assert calls["n"] >= 4 and dump(db) == before


def test_model_ids_derived_from_configuration_are_stable(db, tmp_path):
    text = "hp.depth,hp.width,gen.gap,complexity.x\n2,8,0.1,1\n4,8,0.2,2\n"
    ingest(db, write(tmp_path, text))
    ingest(db, write(tmp_path, "hp.width,hp.depth,gen.gap,complexity.x\n8,2,0.1,1\n8,4,0.2,2\n"))
    con = connect(db, read_only=True)
    assert con.sql("SELECT count(*) FROM models").fetchall() == [(2,)]
    con.close()


def test_cli_summary_and_error_without_traceback(db, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(ingest_cli, [str(write(tmp_path, GOOD)), "--db", str(db)])
    assert ok.exit_code == 0, ok.output
    assert "3 models (3 added, 0 updated, 0 unchanged), 2 measures, 6 values" in ok.output
    bad = runner.invoke(ingest_cli, [str(write(tmp_path, "x,y\n1,2\n", "bad.csv")),
                                     "--db", str(db)])
    assert bad.exit_code == 1
    assert "bad.csv: no gap columns" in bad.output and "Traceback" not in bad.output


def test_fixture_helper_builds_a_queryable_warehouse(db):
    build_warehouse(db, {"hp.depth": [2, 4, 8], "gen.gap": [0.3, 0.2, 0.1],
                         "complexity.m": [3.0, 2.0, 1.0]})
    con = connect(db, read_only=True)
    rows = con.sql("SELECT levels['depth'], gap, value FROM model_measures ORDER BY gap"
                   ).fetchall()
    con.close()
    assert rows == [(2, 0.1, 1.0), (1, 0.2, 2.0), (0, 0.3, 3.0)]


def test_a_second_writer_is_told_which_file_is_busy(db, tmp_path):
    path = write(tmp_path, GOOD)
    ingest(db, path)
    with lock_held(db):
        out = CliRunner().invoke(ingest_cli, [str(path), "--db", str(db)])
        assert out.exit_code == 1
        assert f"{db}: the warehouse is in use by another process" in out.output
        assert "Traceback" not in out.output
    assert ingest(db, path).models == (0, 0, 3)  # nothing was lost or half-written


def test_a_directory_gets_a_clear_error(db, tmp_path):
    out = CliRunner().invoke(ingest_cli, [str(tmp_path), "--db", str(db)])
    assert out.exit_code == 1 and "no run bundles here" in out.output
    assert "Traceback" not in out.output


def test_axis_names_are_sql_identifiers(db, tmp_path):
    """An axis becomes a column of hp_wide: a quote in its name is refused by the
    rule, and a plain identifier is usable in SQL as it is."""
    with pytest.raises(InputError, match="letter followed by letters, digits or underscores"):
        ingest(db, write(tmp_path, "hp.it's,gen.gap,complexity.m\n1,0.1,1\n2,0.2,2\n"))
    ingest(db, write(tmp_path, "hp.lr_2,gen.gap,complexity.m\n1,0.1,1\n2,0.2,2\n"))
    out = CliRunner().invoke(query, ["sql", "select lr_2 as v from hp_wide order by 1",
                                     "--db", str(db), "--format", "json"])
    assert out.exit_code == 0, out.output
    assert [r["v"] for r in json.loads(out.output)] == [1.0, 2.0]


def test_synthetic_table_writer_feeds_the_quickstart(db, tmp_path, capsys):
    from fgm.ingest.synthetic import main as synthetic_main
    out = tmp_path / "results.csv"
    synthetic_main([str(out), "--models", "100", "--measures", "2"])
    assert "100 models, 2 measures" in capsys.readouterr().out
    summary = ingest(db, out)
    assert summary.models == (100, 0, 0) and summary.values == (200, 0, 0)
    con = connect(db, read_only=True)
    axes = con.sql("SELECT count(DISTINCT axis) FROM hyperparameters").fetchall()
    con.close()
    assert axes == [(7,)]


def test_upsert_refuses_a_frame_that_repeats_a_key(db):
    from fgm.warehouse.upsert import upsert
    con = connect(db)
    frame = pl.DataFrame({"model_id": ["a", "a"], "step": [1, 1], "epoch": [0.1, 0.2]})
    with pytest.raises(ValueError, match="repeat the key"):
        upsert(con, "traces", frame, ["model_id", "step"])
    con.close()
