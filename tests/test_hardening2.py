"""Hardening, second pass (issue #20): fgm-query measures says why values failed or
are missing; a full disk while storing an evaluation leaves the answer standing; a
symlinked bundle directory is refused by path, not skipped without a word."""

import csv
import io
import json
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner
from test_ingest_bundles import make_bundle, model_id, models
from warehouse_fixture import build_warehouse, dump

from fgm.analysis.cli import main as query
from fgm.ingest.cli import main as ingest_cli
from fgm.warehouse import connect

BASE = {"model_id": ["a", "b", "c", "d"], "hp.width": [24, 48, 24, 48],
        "hp.depth": [2, 2, 4, 4], "train_acc": [1.0, 1.0, 0.99, 1.0],
        "test_acc": [0.90, 0.80, 0.85, 0.70], "complexity.m": [1.0, 2.0, 1.5, 3.0],
        "complexity.spec": [1.0, None, None, 4.0]}
SINGULAR = "LinAlgError: singular matrix\n  (spectral.py:42)"


@pytest.fixture
def wh(db):
    build_warehouse(db, BASE, sweep="first")
    con = connect(db)
    # two models whose m failed, as fgm-measure stores a failure: NULL, status, error
    con.execute("UPDATE measures SET value = NULL, status = 'failed', error = ? "
                "WHERE measure = 'm' AND model_id IN ('a', 'b')", [SINGULAR])
    con.close()
    return db


def run(*args):
    return CliRunner().invoke(query, [str(a) for a in args])


# --------------------------------------------------------------------------- 1. measures

def test_measures_says_why_in_json_with_the_old_columns_kept(wh):
    out = run("measures", "--db", wh, "--format", "json")
    assert out.exit_code == 0, out.output
    rows = {r["measure"]: r for r in json.loads(out.output)}
    assert (rows["m"]["n_values"], rows["m"]["n_failed"], rows["m"]["n_missing"]) == (2, 2, 0)
    assert rows["m"]["reasons"] == [{"status": "failed", "reason": SINGULAR, "n_models": 2}]
    assert rows["spec"]["reasons"] == [{"status": "missing",
                                        "reason": "empty in the results table", "n_models": 2}]


def test_measures_says_why_in_csv_as_json_text(wh):
    out = run("measures", "--db", wh, "--format", "csv")
    assert out.exit_code == 0, out.output
    rows = {r["measure"]: r for r in csv.DictReader(io.StringIO(out.output))}
    assert {"n_values", "n_failed", "n_missing", "reasons"} <= set(rows["m"])
    assert rows["m"]["n_failed"] == "2"
    assert json.loads(rows["m"]["reasons"]) == [{"status": "failed", "reason": SINGULAR,
                                                 "n_models": 2}]
    assert json.loads(rows["spec"]["reasons"])[0]["reason"] == "empty in the results table"


def test_measures_says_why_in_a_table_below_the_counts(wh):
    out = run("measures", "--db", wh)
    assert out.exit_code == 0, out.output
    summary, why = out.output.split("why values failed or are missing:")
    assert summary.splitlines()[0].split()[:4] == ["measure", "n_values", "n_failed",
                                                   "n_missing"]
    lines = why.strip().splitlines()
    assert lines[0].split() == ["measure", "status", "n_models", "reason"]
    # one line each, the error's own line breaks folded
    assert lines[2].split() == ["m", "failed", "2", *" ".join(SINGULAR.split()).split()]
    assert lines[3].split()[:3] == ["spec", "missing", "2"]
    assert lines[3].endswith("empty in the results table") and len(lines) == 4


# --------------------------------------------------------------------------- 2. full disk

def test_a_full_disk_while_storing_leaves_the_answer_and_a_one_line_note(wh):
    """A file-size limit stands in for a full disk (EFBIG instead of ENOSPC, the same
    path): DuckDB refuses the commit of the evaluation. The answer was printed and
    stands, the exit status is 0, one line on stderr says it was not stored and why."""
    before = dump(wh)
    code = textwrap.dedent(f"""
        import resource, signal, sys
        from fgm.analysis.cli import main
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))   # the WAL cannot grow
        main(["psi", "-m", "m", "--all-models", "--db", {str(wh)!r}])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith("measure m, n_models 2")
    assert "tau" in out.stdout and "Psi" in out.stdout
    note = out.stderr.strip().splitlines()
    assert len(note) == 1, out.stderr
    assert note[0].startswith("note: evaluation not stored in the warehouse (")
    assert "File too large" in note[0]
    assert dump(wh) == before
    con = connect(wh, read_only=True)
    try:
        assert con.sql("SELECT count(*) FROM evaluations").fetchall() == [(0,)]
    finally:
        con.close()


# --------------------------------------------------------------------------- 3. symlinks

def test_a_symlinked_bundle_directory_is_refused_by_path(db, tmp_path):
    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    real = make_bundle(runs, seed=0)
    outside = make_bundle(elsewhere, seed=1)
    make_bundle(elsewhere / "more", seed=2)
    linked = runs / "linked"
    linked.symlink_to(outside, target_is_directory=True)           # a bundle directory
    tree = runs / "sub" / "tree"
    tree.parent.mkdir()
    tree.symlink_to(elsewhere / "more", target_is_directory=True)  # a tree of bundles
    (runs / "alias").symlink_to(real, target_is_directory=True)    # inside: read as real
    (tmp_path / "plain").mkdir()
    (runs / "data").symlink_to(tmp_path / "plain", target_is_directory=True)  # no bundles
    out = CliRunner().invoke(ingest_cli, [str(runs), "--db", str(db)])
    assert out.exit_code == 1, out.output
    assert "1 added" in out.output and "2 failed" in out.output
    for link, target in ((linked, outside), (tree, elsewhere / "more")):
        assert f"FAILED {link}: a symbolic link to a directory holding run bundles " \
               f"({target.resolve()}); bundles are read only from real directories " \
               "inside the tree" in out.output
    assert "alias" not in out.output
    assert models(db) == [model_id(real)]


def test_a_small_write_that_fails_at_commit_says_so_in_fgms_words(wh, tmp_path):
    """A write small enough to stay in memory until COMMIT fails there, as DuckDB's
    TransactionException, not an IOException: still the one rolled-back message."""
    before = dump(wh)
    table = tmp_path / "more.csv"
    table.write_text("hp.width,hp.depth,train_acc,test_acc\n96,2,1.0,0.5\n")
    code = textwrap.dedent(f"""
        import resource, signal
        from fgm.ingest.table import ingest_table
        from fgm.warehouse import connect, FgmError
        con = connect({str(wh)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))
        try:
            ingest_table(con, {str(table)!r}, sweep="second")
        except FgmError as exc:
            print("FgmError:", exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert "FgmError: the warehouse could not be written" in out.stdout, (out.stdout, out.stderr)
    assert "rolled back" in out.stdout
    assert dump(wh) == before
