"""fgm-measure over a warehouse of trained models, and fgm-train running it."""

import json
import math

import pytest
from click.testing import CliRunner

from fgm.analysis.cli import main as query
from fgm.measures import list_measures
from fgm.measures.cli import main as measure_cli
from fgm.measures.registry import REGISTRY
from fgm.train.cli import main as train_cli
from fgm.warehouse import connect

N_MEASURES = len(list_measures())


@pytest.fixture(scope="module")
def grid_db(tmp_path_factory, grid_file):
    """Two tiny models trained with their measures (fgm-train without --no-measures)."""
    root = tmp_path_factory.mktemp("jobs")
    out = CliRunner().invoke(train_cli, ["grid", "--grid", str(grid_file), "--set", "width=24",
                                         "--out", str(root / "runs"), "--db",
                                         str(root / "w.duckdb"), "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert "measures" in out.output
    return root / "w.duckdb"


def values(db):
    con = connect(db, read_only=True)
    try:
        return con.sql("SELECT model_id, measure, value, status, error, params "
                       "FROM measures ORDER BY ALL").fetchall()
    finally:
        con.close()


def test_training_fills_every_measure_for_every_converged_model(grid_db):
    rows = values(grid_db)
    by_model = {}
    for model_id, name, value, status, _, params in rows:
        by_model.setdefault(model_id, {})[name] = (value, status, params)
    assert len(by_model) == 2
    for measures in by_model.values():
        assert set(measures) == {s.name for s in list_measures()}
        assert all(status == "ok" and math.isfinite(v) for v, status, _ in measures.values())
    params = json.loads(next(iter(by_model.values()))["pacbayes_flatness"][2])
    assert {"draws", "bisection_steps", "target_deviation", "tolerance", "seed"} <= set(params)
    table = json.loads(CliRunner().invoke(query, ["table", "--db", str(grid_db), "--format",
                                                  "json"]).output)
    measured = {r["measure"]: r for r in table if r["kind"] == "measure"}
    assert len(measured) == N_MEASURES
    assert all(r["n_models"] == 2 for r in measured.values())
    con = connect(grid_db, read_only=True)
    defs = con.sql("SELECT count(*) FROM measure_definitions").fetchall()[0][0]
    con.close()
    assert defs == N_MEASURES


def test_rerun_computes_nothing_and_recompute_recomputes(grid_db):
    before = values(grid_db)
    out = CliRunner().invoke(measure_cli, ["--db", str(grid_db)])
    assert out.exit_code == 0 and out.output.startswith("0 models, 0 values")
    assert values(grid_db) == before
    out = CliRunner().invoke(measure_cli, ["--db", str(grid_db), "--measures", "*fro*",
                                           "--recompute"])
    n_fro = len(list_measures("*fro*"))
    assert f"2 models, {2 * n_fro} values computed, 0 failed" in out.output
    after = values(grid_db)
    assert [r[:3] for r in after] == [r[:3] for r in before]   # same values, deterministic


def test_a_failing_measure_is_stored_as_null_with_its_error_and_the_job_goes_on(
        grid_db, monkeypatch, tmp_path):
    import shutil
    db = tmp_path / "copy.duckdb"
    shutil.copy(grid_db, db)

    def broken(ctx):
        raise RuntimeError("boom")
    spec = REGISTRY["path_norm"]
    monkeypatch.setitem(REGISTRY, "path_norm", spec.__class__(
        spec.name, spec.eq, spec.family, spec.needs, broken, spec.description))
    out = CliRunner().invoke(measure_cli, ["--db", str(db), "--measures", "path_norm,param_norm",
                                           "--recompute"])
    assert out.exit_code == 0, out.output
    assert "2 models, 2 values computed, 2 failed" in out.output
    assert "path_norm: RuntimeError: boom" in out.output
    con = connect(db, read_only=True)
    rows = con.sql("SELECT value, status, error FROM measures WHERE measure = 'path_norm'"
                   ).fetchall()
    ok = con.sql("SELECT count(*) FROM measures WHERE measure = 'param_norm' AND status = 'ok'"
                 ).fetchall()
    con.close()
    assert all(v is None and s == "failed" and "boom" in e for v, s, e in rows)
    assert ok == [(2,)]
    psi = json.loads(CliRunner().invoke(query, ["psi", "-m", "path_norm", "--db", str(db),
                                                "--format", "json"]).output)
    assert psi["n_models"] == 0 and psi["tau"] is None   # NULLs are left out, never 0


def test_list_and_unknown_pattern(grid_db):
    out = CliRunner().invoke(measure_cli, ["--list", "--measures", "*spec*", "--format", "json"])
    rows = json.loads(out.output)
    assert {r["measure"] for r in rows} == {s.name for s in list_measures("*spec*")}
    assert all(r["equation"] for r in rows)
    out = CliRunner().invoke(measure_cli, ["--db", str(grid_db), "--measures", "nothing*"])
    assert out.exit_code == 1 and "no measure matches 'nothing*'" in out.output


def test_a_moved_checkpoint_is_reported_not_fatal(grid_db, tmp_path):
    import shutil
    db = tmp_path / "moved.duckdb"
    shutil.copy(grid_db, db)
    con = connect(db)
    con.execute("UPDATE checkpoints SET path = '/nonexistent/final.safetensors' "
                "WHERE role = 'final' AND model_id = (SELECT min(model_id) FROM models)")
    con.close()
    out = CliRunner().invoke(measure_cli, ["--db", str(db), "--recompute", "--measures",
                                           "param_norm"])
    assert out.exit_code == 0
    assert "1 models, 1 values computed" in out.output and "checkpoint not found" in out.output


def test_a_rerun_fills_measures_that_a_killed_run_left_missing(grid_db, grid_file, tmp_path):
    import shutil
    db = tmp_path / "killed.duckdb"
    shutil.copy(grid_db, db)
    con = connect(db)
    con.execute("DELETE FROM measures WHERE measure IN ('path_norm', 'vc_dim')")
    con.close()
    out = CliRunner().invoke(train_cli, ["grid", "--grid", str(grid_file), "--set", "width=24",
                                         "--out", str(grid_db.parent / "runs"), "--db", str(db),
                                         "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert "0 to train" in out.output
    # a line for each finished model whose measures the killed run left missing
    assert out.output.count("measures of w=24") == 2, out.output
    assert len(values(db)) == len(values(grid_db))


def test_a_changed_setting_recomputes_only_the_measures_it_affects(grid_db):
    """--spectral exact after an FFT run: the spectral family is computed again
    (README: fgm-measure --spectral exact), everything else is left as it was."""
    before = {(m, n): (v, p) for m, n, v, _, _, p in values(grid_db)}
    out = CliRunner().invoke(measure_cli, ["--db", str(grid_db), "--device", "cpu",
                                           "--spectral", "exact", "--measures", "*spec*,path_norm"])
    assert out.exit_code == 0, out.output
    after = {(m, n): (v, p) for m, n, v, _, _, p in values(grid_db)}
    spectral = {k for k in after if json.loads(after[k][1]).get("spectral") is not None}
    assert spectral and all(json.loads(after[k][1])["spectral"] == "exact" for k in spectral)
    assert all(json.loads(before[k][1])["spectral"] == "fft" for k in spectral)
    assert all(after[k] == before[k] for k in after if k not in spectral)   # path_norm too
    again = CliRunner().invoke(measure_cli, ["--db", str(grid_db), "--device", "cpu",
                                             "--spectral", "exact", "--measures", "*spec*"])
    assert again.exit_code == 0 and again.output.startswith("0 models")


def test_readers_get_in_while_a_measure_computes(grid_db, monkeypatch, tmp_path):
    """The warehouse is open only to read a model's inputs and to write its values:
    while a measure runs, another process can open it (fgm-query, say)."""
    import shutil
    import subprocess
    import sys
    db = tmp_path / "copy.duckdb"
    shutil.copy(grid_db, db)
    opened = []

    def a_reader_gets_in(ctx):
        probe = subprocess.run([sys.executable, "-c", "import duckdb, sys; "
                                f"duckdb.connect({str(db)!r}, read_only=True).close()"],
                               capture_output=True, text=True, timeout=120)
        opened.append(probe.returncode == 0)
        return 1.0
    spec = REGISTRY["param_norm"]
    monkeypatch.setitem(REGISTRY, "param_norm", spec.__class__(
        spec.name, spec.eq, spec.family, spec.needs, a_reader_gets_in, spec.description))
    from fgm.measures.runner import measure_models
    job = measure_models(db, pattern="param_norm", recompute=True)
    assert job.models == 2 and opened == [True, True]
