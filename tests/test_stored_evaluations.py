"""Evaluations kept in the warehouse: what each command printed is what it stored,
one row per question and data, stale when the data it read changed, never stored
where the file cannot be written."""

import hashlib
import itertools
import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from reference import psi_ref, tau_ref
from warehouse_fixture import build_warehouse, dump, ingest_file, lock_held

from fgm.analysis import stored
from fgm.analysis.cli import main as query
from fgm.warehouse import connect

AXES = {"depth": [2, 4, 8], "width": [16, 32]}


def results(seed=0, bump=None, dataset=None, prefix="m"):
    """Two measures, good (the gap plus noise) and noise; `bump`: good of model 0 changed."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, (depth, width) in enumerate(itertools.product(*AXES.values())):
        gap = round(0.05 * AXES["depth"].index(depth) + float(rng.normal(0, 0.03)), 3)
        good = gap + float(rng.normal(0, 0.01))
        rows.append({"model_id": f"{prefix}{i}", "hp.depth": depth, "hp.width": width,
                     "gen.gap": gap, "complexity.good": good + (bump if bump and i == 0 else 0),
                     "complexity.noise": float(rng.integers(0, 3))})
    frame = pl.DataFrame(rows)
    return frame if dataset is None else frame.with_columns(pl.lit(dataset).alias("dataset"))


@pytest.fixture
def wh(db):
    return build_warehouse(db, results())


def run(*args):
    out = CliRunner().invoke(query, [str(a) for a in args])
    assert out.exit_code == 0, out.output
    return out.output


def rows(db, sql, params=None):
    con = connect(db, read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def values(db, command, measure):
    """{(axis, quantity): value} of the latest evaluation of a command and measure."""
    return {(a, q): v for a, q, v in rows(db, (
        "SELECT axis, quantity, value FROM latest_evaluation WHERE command = ? AND measure = ?"),
        [command, measure])}


def test_every_command_stores_what_it_printed(wh):
    table = results()
    psi = json.loads(run("psi", "-m", "good", "--db", wh, "--format", "json"))
    mu, g = table["complexity.good"].to_list(), table["gen.gap"].to_list()
    levels = [[AXES["depth"].index(d), AXES["width"].index(w)]
              for d, w in zip(table["hp.depth"], table["hp.width"], strict=True)]
    stored_psi = values(wh, "psi", "good")
    # the stored figures are the printed ones, and those are the reference's
    assert stored_psi[("all", "tau")] == psi["tau"] == pytest.approx(tau_ref(mu, g))
    assert [stored_psi[(a, "psi")] for a in AXES] == pytest.approx(psi_ref(mu, g, levels))
    assert stored_psi[("all", "Psi")] == psi["Psi"] and stored_psi[("all", "n_models")] == 6

    cmi = json.loads(run("cmi", "-m", "good", "--db", wh, "--format", "json"))
    stored_cmi = values(wh, "cmi", "good")
    assert stored_cmi[("all", "K")] == cmi["K"]
    assert {a: stored_cmi[(a, "cmi")] for a in AXES} == cmi["per_axis"]
    assert rows(wh, "SELECT detail FROM latest_evaluation WHERE command = 'cmi' "
                    "AND quantity = 'K'") == [("+".join(cmi["argmin"]),)]

    oracle = json.loads(run("oracle", "--eps", "0.05", "--db", wh, "--format", "json"))
    stored_oracle = values(wh, "oracle", "oracle_0.05")
    assert stored_oracle[("all", "tau")] == oracle["tau"]
    assert stored_oracle[("all", "K")] == oracle["cmi"]["K"]
    assert stored_oracle[("all", "K_stderr")] == oracle["cmi"]["stderr"]["K"]

    robust = json.loads(run("robust", "-m", "good", "--test-size", "100000", "--db", wh,
                            "--weighting", "hoeffding", "--format", "json"))
    stored_robust = values(wh, "robust", "good")
    assert stored_robust[("all", "sign_error_mean")] == robust["overall"]["mean"]
    assert stored_robust[("depth", "environments")] == robust["per_axis"]["depth"]["environments"]

    frame = json.loads(run("table", "--db", wh, "--format", "json"))
    noise = next(r for r in frame if r["measure"] == "noise")
    stored_noise = values(wh, "table psi", "noise")
    assert stored_noise[("width", "psi")] == noise["width"]
    assert stored_noise[("all", "Psi")] == noise["Psi"]
    assert {r[0] for r in rows(wh, "SELECT DISTINCT kind FROM latest_evaluation "
                                   "WHERE command = 'table psi'")} == \
        {"measure", "oracle", "canonical", "random"}

    # the selection and the models behind each: all six, named by a hash of their ids
    ids = sorted(f"m{i}" for i in range(6))
    assert rows(wh, "SELECT DISTINCT n_models, models_sha256 FROM evaluations") == [
        (6, hashlib.sha256("\n".join(ids).encode()).hexdigest())]
    assert sorted(r[0] for r in rows(wh, "SELECT command FROM evaluations")) == [
        "cmi", "oracle", "psi", "robust", "table psi"]
    assert rows(wh, "SELECT options->>'weighting' FROM evaluations WHERE command = 'robust'") \
        == [("hoeffding",)]
    assert not any(r[0] for r in rows(wh, "SELECT stale FROM evaluation_status"))


def test_the_same_question_of_the_same_data_is_one_row(wh):
    run("psi", "-m", "good", "--db", wh)
    ((first, at),) = rows(wh, "SELECT evaluation_id, created_at FROM evaluations")
    run("psi", "-m", "good", "--db", wh)
    ((again, at_again),) = rows(wh, "SELECT evaluation_id, created_at FROM evaluations")
    assert again == first and at_again >= at     # one row, dated by the latest asking
    run("psi", "-m", "good", "--where", "depth >= 4", "--db", wh)
    assert rows(wh, "SELECT where_sql, n_models FROM evaluations ORDER BY created_at") == [
        (None, 6), ("depth >= 4", 4)]
    assert rows(wh, "SELECT count(DISTINCT question_key) FROM evaluations") == [(2,)]


def test_changed_data_marks_an_evaluation_stale_and_a_fresh_answer_wins(wh):
    run("psi", "-m", "good", "--db", wh)
    run("psi", "-m", "noise", "--db", wh)
    run("table", "--db", wh)
    old_tau = values(wh, "psi", "good")[("all", "tau")]

    def stale():
        return dict(rows(wh, "SELECT coalesce(options->>'measure', command), stale "
                             "FROM evaluation_status"))

    assert stale() == {"good": False, "noise": False, "table psi": False}
    # one value of `good` changes: its evaluations go stale, noise's does not
    ingest_file(wh, Path("fixture.csv"), frame=results(bump=1.0), sweep="fixture",
                replace=True)
    assert stale() == {"good": True, "noise": False, "table psi": True}
    latest = rows(wh, "SELECT value, stale FROM latest_evaluation WHERE command = 'psi' "
                      "AND measure = 'good' AND quantity = 'tau'")
    assert latest == [(old_tau, True)]          # shown, but flagged: nothing fresh yet
    run("psi", "-m", "good", "--db", wh)
    table = results(bump=1.0)
    fresh = tau_ref(table["complexity.good"].to_list(), table["gen.gap"].to_list())
    assert fresh != pytest.approx(old_tau)
    latest = rows(wh, "SELECT value, stale FROM latest_evaluation WHERE command = 'psi' "
                      "AND measure = 'good' AND quantity = 'tau'")
    assert latest == [(pytest.approx(fresh), False)]
    assert rows(wh, "SELECT count(*), count(*) FILTER (WHERE stale) FROM evaluation_status "
                    "WHERE options->>'measure' = 'good'") == [(2, 1)]


def test_models_outside_the_selection_leave_it_fresh(db):
    build_warehouse(db, results(dataset="a"), sweep="first")
    run("psi", "-m", "good", "--dataset", "a", "--db", db)
    run("psi", "-m", "good", "--sweep", "first", "--db", db)
    run("psi", "-m", "good", "--db", db)
    # models of another dataset and sweep land
    ingest_file(db, Path("second.csv"), frame=results(seed=1, dataset="b", prefix="b"),
                sweep="second")
    assert rows(db, "SELECT dataset, sweep, stale FROM evaluation_status ORDER BY ALL") == [
        ("a", None, False), (None, "first", False), (None, None, True)]


def test_no_store_writes_nothing(wh):
    before, raw = dump(wh), hashlib.sha256(wh.read_bytes()).hexdigest()
    for args in (["psi", "-m", "good"], ["cmi", "-m", "good"], ["oracle", "--eps", "0.1"],
                 ["table"], ["robust", "-m", "good", "--test-size", "1000"]):
        run(*args, "--no-store", "--db", wh)
    assert dump(wh) == before and hashlib.sha256(wh.read_bytes()).hexdigest() == raw
    assert rows(wh, "SELECT count(*) FROM evaluations") == [(0,)]


def test_a_warehouse_another_process_reads_is_answered_and_not_stored(wh, monkeypatch):
    monkeypatch.setattr(stored, "LOCK_WAIT", 0.0)
    with lock_held(wh, read_only=True):
        out = CliRunner().invoke(query, ["psi", "-m", "good", "--db", str(wh)])
    assert out.exit_code == 0, out.output
    assert "Psi" in out.output
    notes = [line for line in out.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "not stored" in notes[0] and "in use" in notes[0]
    assert rows(wh, "SELECT count(*) FROM evaluations") == [(0,)]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes a read-only file all the same")
def test_a_read_only_warehouse_is_answered_and_not_stored(wh):
    wh.chmod(0o444)
    wh.parent.chmod(0o555)
    try:
        out = CliRunner().invoke(query, ["psi", "-m", "good", "--db", str(wh)])
    finally:
        wh.parent.chmod(0o755)
        wh.chmod(0o644)
    assert out.exit_code == 0, out.output
    assert "Psi" in out.output and "note: evaluation not stored" in out.output
    assert rows(wh, "SELECT count(*) FROM evaluations") == [(0,)]


def test_storing_changes_no_other_table(wh):
    before = dump(wh)
    run("table", "--kind", "cmi", "--draws", "2", "--db", wh)
    assert dump(wh) == before
    assert rows(wh, "SELECT options FROM evaluations") == [('{"draws": 2}',)]


def test_evaluation_vs_paper_puts_the_papers_figure_beside_the_stored_one(db):
    """The view joins each stored figure with the paper's (read here from the shipped
    CSV on its own): a warehouse whose measure is named like one of the paper's."""
    import csv
    from importlib.resources import files
    frame = results().rename({"complexity.good": "complexity.path_norm"})
    build_warehouse(db, frame)
    out = json.loads(run("psi", "-m", "path_norm", "--db", db, "--format", "json"))
    paper = [r for r in csv.DictReader(files("fgm.analysis").joinpath(
        "paper_figures.csv").read_text().splitlines())
        if r["measure"] == "path_norm" and r["table"] == "5"]
    assert len(paper) == 1
    got = rows(db, "SELECT axis, quantity, paper_value, value, same_sign FROM "
                   "evaluation_vs_paper WHERE paper_table = 5 ORDER BY axis, quantity")
    expected = sorted([("all", "Psi", float(paper[0]["Psi"]), out["Psi"]),
                       ("all", "tau", float(paper[0]["tau"]), out["tau"]),
                       *((a, "psi", float(paper[0][a]), out["psi"][a]) for a in ("depth", "width"))])
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    assert [g[2:4] for g in got] == [pytest.approx(e[2:4]) for e in expected]
    assert all(g[4] == ((g[2] > 0) == (g[3] > 0)) for g in got if g[2] and g[3])
    # every paper table that reports path_norm's τ shows up beside the one evaluation
    tables = {r[0] for r in rows(db, "SELECT DISTINCT paper_table FROM evaluation_vs_paper "
                                     "WHERE quantity = 'tau'")}
    assert tables == {int(r["table"]) for r in csv.DictReader(files("fgm.analysis").joinpath(
        "paper_figures.csv").read_text().splitlines())
        if r["measure"] == "path_norm" and r["tau"] and r["statistic"] != "std"}


def test_evaluation_vs_paper_tells_the_questions_apart(db):
    """The same measure's K (SPEC's, the PGDL scorer's) and Ψ (all models, a --where):
    each row of the view carries the question it answers, so rows that look alike
    beside the paper's figure can be told apart and filtered."""
    build_warehouse(db, results().rename({"complexity.good": "complexity.path_norm"}))
    spec_k = json.loads(run("cmi", "-m", "path_norm", "--db", db, "--format", "json"))["K"]
    pgdl_k = json.loads(run("cmi", "-m", "path_norm", "--pgdl", "--db", db,
                            "--format", "json"))["K"]
    every = json.loads(run("psi", "-m", "path_norm", "--db", db, "--format", "json"))["Psi"]
    deep = json.loads(run("psi", "-m", "path_norm", "--where", "depth >= 4", "--db", db,
                          "--format", "json"))["Psi"]
    k = rows(db, "SELECT pgdl, value FROM evaluation_vs_paper WHERE paper_table = 2 "
                 "AND quantity = 'K' ORDER BY pgdl")
    assert pgdl_k is None     # six models are too few for the PGDL scorer's slices
    assert k == [(False, pytest.approx(spec_k)), (True, None)]
    psi = rows(db, "SELECT where_sql, all_models, pool_seeds, ci_level, value "
                   "FROM evaluation_vs_paper WHERE paper_table = 5 AND quantity = 'Psi' "
                   "ORDER BY where_sql NULLS FIRST")
    assert psi == [(None, False, False, None, pytest.approx(every)),
                   ("depth >= 4", False, False, None, pytest.approx(deep))]


def test_latest_evaluation_follows_the_code_run_last(wh, monkeypatch):
    """The same question of the same data by code NEW, then an older checkout OLD,
    then NEW again: the latest evaluation is NEW's, not the OLD answer stored after
    NEW's first row."""
    for version in ("2.0+gNEW", "1.0+gOLD", "2.0+gNEW"):
        monkeypatch.setattr(stored, "code_version", lambda v=version: v)
        run("psi", "-m", "good", "--db", wh)
    assert rows(wh, "SELECT count(*) FROM evaluations") == [(2,)]
    assert rows(wh, "SELECT DISTINCT code_version FROM latest_evaluation") == [("2.0+gNEW",)]
