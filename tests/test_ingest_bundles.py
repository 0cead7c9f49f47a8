"""Run bundles into the warehouse: hostile and broken bundles (ingest/bundles.py)."""

import json
import math
import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
import torch
from click.testing import CliRunner
from warehouse_fixture import dump, lock_held

import fgm.ingest.bundles as bundles
from fgm.ingest.bundles import ingest_tree
from fgm.ingest.cli import main as ingest_cli
from fgm.train.bundle import manifest_for, sha256_file, write_bundle
from fgm.train.grid import Config, Grid
from fgm.train.nin import NiN
from fgm.warehouse import connect
from fgm.warehouse.ids import model_id_for, training_hash

VALUES = {"width": 4, "depth": 1, "dropout": 0.0, "batch_size": 32, "optimizer": "adam",
          "learning_rate": 0.001, "weight_decay": 0.0}
OUTCOME = {"train_acc": 1.0, "test_acc": 0.75, "train_loss": 0.009, "test_loss": 0.8,
           "gap": 0.25, "converged": True, "steps": 40, "steps_to_0.1": 30,
           "steps_0.1_to_0.01": 10, "stop_checks": 1}


def make_bundle(out: Path, *, values: dict = VALUES, seed: int = 0,
                dataset: str = "digits") -> Path:
    """A valid bundle in milliseconds: a manifest as fgm-train writes it (manifest_for)
    and the random weights of a tiny NiN."""
    grid = Grid("tiny", dataset, {a: [v] for a, v in VALUES.items()},
                {"stop_cross_entropy": 0.01})
    config = Config(dict(values), {a: 0 for a in values})
    data = SimpleNamespace(name=dataset, info={"source": "test", "train_size": 120,
                                               "test_size": 60})
    result = SimpleNamespace(outcome=dict(OUTCOME), timing={"seconds": 0.5})
    manifest = manifest_for(grid, Config(VALUES, {a: 0 for a in VALUES}), seed, data, result,
                            "cpu")
    if values != VALUES:  # axes of its own, listed as manifest_for lists them
        manifest["hyperparameters"] = [{"axis": a, "value": v, "level": 0}
                                       for a, v in values.items()]
        manifest["config_hash"] = config.hash
    torch.manual_seed(seed)
    states = {role: NiN(1, 10, 4, 1).state_dict() for role in ("init", "epoch1", "final")}
    trace = [{"step": 10 * i, "epoch": i / 4, "train_loss": 1 / i, "lr": 1e-3,
              "seconds": 0.1 * i} for i in range(1, 5)]
    mid = model_id_for(config.hash, dataset, seed, training_hash(manifest["train"]))
    return write_bundle(out, mid, manifest, states, trace)


def edit(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def model_id(bundle: Path) -> str:
    return json.loads((bundle / "manifest.json").read_text())["model_id"]


def models(db: Path) -> list[str]:
    con = connect(db, read_only=True)
    try:
        return [r[0] for r in con.sql("SELECT model_id FROM models ORDER BY 1").fetchall()]
    finally:
        con.close()


def reasons(report) -> dict[Path, str]:
    return dict(report.failed)


def test_valid_bundles_land_and_a_second_ingest_changes_nothing(db, tmp_path):
    runs = tmp_path / "runs"
    a, b = make_bundle(runs, seed=0), make_bundle(runs, seed=1)
    first = ingest_tree(db, runs)
    assert (first.added, first.failed) == (2, [])
    assert models(db) == sorted([model_id(a), model_id(b)])
    before = dump(db)
    again = ingest_tree(db, runs)
    assert (again.added, again.updated, again.unchanged, again.failed) == (0, 0, 2, [])
    assert dump(db) == before


# --------------------------------------------------------------------------- 1. confinement

@pytest.mark.parametrize("how,why", [
    ("absolute", "is an absolute path"),
    ("dotdot", "leaves the bundle directory"),
    ("symlinked file", "is a symbolic link"),
    ("symlinked directory", "is a symbolic link"),
])
def test_a_manifest_cannot_name_a_file_outside_its_bundle(db, tmp_path, how, why):
    runs = tmp_path / "runs"
    victim, bundle = make_bundle(runs, seed=1), make_bundle(runs, seed=0)
    theirs = victim / "final.safetensors"
    if how == "absolute":
        name = str(theirs.resolve())
    elif how == "dotdot":
        name = f"../{victim.name}/final.safetensors"
    elif how == "symlinked file":
        name = "final.safetensors"
        (bundle / name).unlink()
        (bundle / name).symlink_to(theirs)
    else:
        (bundle / "other").symlink_to(victim, target_is_directory=True)
        name = "other/final.safetensors"

    def point_at_theirs(m):
        m["checkpoints"]["final"].update(file=name, sha256=sha256_file(theirs),
                                         bytes=theirs.stat().st_size)
    edit(bundle, point_at_theirs)
    report = ingest_tree(db, runs)
    assert report.added == 1 and list(reasons(report)) == [bundle]
    assert str(bundle / "manifest.json") in reasons(report)[bundle]
    assert "checkpoints.final.file" in reasons(report)[bundle]
    assert why in reasons(report)[bundle]
    assert models(db) == [model_id(victim)]


def test_a_manifest_that_is_a_symlink_is_refused(db, tmp_path):
    runs = tmp_path / "runs"
    bundle = make_bundle(runs)
    elsewhere = tmp_path / "manifest.json"
    shutil.move(bundle / "manifest.json", elsewhere)
    (bundle / "manifest.json").symlink_to(elsewhere)
    report = ingest_tree(db, runs)
    assert "is a symbolic link" in reasons(report)[bundle] and not db.exists()


# --------------------------------------------------------------------------- 2. one bad bundle

def _raw(text_change):
    def change(bundle):
        path = bundle / "manifest.json"
        path.write_text(text_change(path.read_text()))
    return change


def _edit(change):
    return lambda bundle: edit(bundle, change)


def _dir_manifest(bundle):
    (bundle / "manifest.json").unlink()
    (bundle / "manifest.json").mkdir()


BROKEN = {
    "checkpoints is a list": (_edit(lambda m: m.update(checkpoints=[])),
                              "checkpoints: expected an object, found a list"),
    "outcome is text": (_edit(lambda m: m.update(outcome="x")),
                        "outcome: expected an object, found 'x'"),
    "steps 1e400": (_raw(lambda t: t.replace('"steps": 40', '"steps": 1e400')),
                    "outcome.steps: a step count is an integer >= 0: expected a finite"),
    "manifest is a directory": (_dir_manifest, "expected a JSON file, found a directory"),
    "hyperparameters an object": (_edit(lambda m: m.update(hyperparameters={"a": 1})),
                                  "hyperparameters: expected a list"),
    "a hyperparameter is a number": (_edit(lambda m: m["hyperparameters"].insert(0, 3)),
                                     "hyperparameters[0]: expected an object, found 3"),
    "an extra checkpoint role": (
        _edit(lambda m: m["checkpoints"].update(best=m["checkpoints"]["final"])),
        "checkpoints: expected exactly the roles init, epoch1, final"),
    "the manifest is a list": (_raw(lambda t: "[1, 2]"),
                               "not an fgm run bundle manifest"),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_a_broken_bundle_costs_only_itself_and_the_exit_status(db, tmp_path, case):
    runs = tmp_path / "runs"
    good, bad = make_bundle(runs, seed=0), make_bundle(runs, seed=1)
    breaker, message = BROKEN[case]
    breaker(bad)
    out = CliRunner().invoke(ingest_cli, [str(runs), "--db", str(db)])
    assert out.exit_code == 1, out.output
    assert "1 added" in out.output and "1 failed" in out.output
    assert f"FAILED {bad}: {bad / 'manifest.json'}: " in out.output
    assert message in out.output
    assert models(db) == [model_id(good)]


def test_unexpected_errors_cost_only_their_bundle(db, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    parse_fails, write_fails, good = (make_bundle(runs, seed=s) for s in range(3))
    read_trace, upsert = bundles._read_trace, bundles.upsert

    def flaky_read(file):
        if file.parent == parse_fails:
            raise RuntimeError("boom while parsing")
        return read_trace(file)

    def flaky_upsert(con, table, frame, *a, **kw):
        if table == "traces" and frame["model_id"][0] == model_id(write_fails):
            raise ZeroDivisionError("boom while writing")
        return upsert(con, table, frame, *a, **kw)
    monkeypatch.setattr(bundles, "_read_trace", flaky_read)
    monkeypatch.setattr(bundles, "upsert", flaky_upsert)
    report = ingest_tree(db, runs)
    assert reasons(report) == {
        parse_fails: "unexpected error, RuntimeError: boom while parsing",
        write_fails: "unexpected error, ZeroDivisionError: boom while writing"}
    assert report.added == 1 and models(db) == [model_id(good)]  # the failed write rolled back


# --------------------------------------------------------------------------- 3. values

def _hp(i, **kw):
    return lambda m: m["hyperparameters"][i].update(kw)


SENSELESS = [
    (lambda m: m["outcome"].update(gap=math.nan), "outcome.gap", "expected a finite number"),
    (lambda m: m["outcome"].update(train_loss=math.inf), "outcome.train_loss",
     "a cross-entropy is a finite number >= 0: expected a finite number, found inf"),
    (lambda m: m["outcome"].update(test_loss=-0.5), "outcome.test_loss", ">= 0"),
    (lambda m: m["outcome"].update(train_acc=7), "outcome.train_acc",
     "an accuracy is a fraction in [0, 1]: expected a number <= 1, found 7"),
    (lambda m: m["outcome"].update(test_acc="0.7"), "outcome.test_acc", "expected a number"),
    (lambda m: m["outcome"].update(gap=0.3), "outcome.gap",
     "the gap is train_acc - test_acc (within 1e-06): found 0.3"),
    (lambda m: m["outcome"].update(converged="yes"), "outcome.converged",
     "expected true or false"),
    (lambda m: m["outcome"].update(steps=-1), "outcome.steps", "expected a number >= 0"),
    (lambda m: m["outcome"].update(steps=2.5), "outcome.steps", "expected an integer"),
    (lambda m: m["outcome"].pop("test_loss"), "outcome.test_loss", "missing"),
    (lambda m: m.update(seed=1.7), "seed", "a seed is an integer in [0, 2147483647]: "
     "expected an integer, found 1.7"),
    (lambda m: m.update(seed=True), "seed", "expected a number, found True"),
    (lambda m: m.update(seed=-1), "seed", "expected a number >= 0"),
    (lambda m: m.update(seed=2**31), "seed", "integer in [0, 2147483647]"),
    (_hp(0, level=1e30), "hyperparameters[0] (width).level",
     "a level is an integer in [0, 2147483647]"),
    (_hp(0, level=-1), "hyperparameters[0] (width).level", "expected a number >= 0"),
    (_hp(0, level="0"), "hyperparameters[0] (width).level", "expected a number"),
    (_hp(1, value=math.inf), "hyperparameters[1] (depth).value",
     "a hyperparameter value is a finite number or a text: expected a finite number"),
    (_hp(1, value=math.nan), "hyperparameters[1] (depth).value", "expected a finite number"),
    (_hp(1, value=10**400), "hyperparameters[1] (depth).value", "expected a number <= 1e+300"),
    (lambda m: m["outcome"].update(test_loss=10**400), "outcome.test_loss", "<= 1e+300"),
    (_hp(1, value=None), "hyperparameters[1] (depth).value", "expected a number, found None"),
    (_hp(1, value=True), "hyperparameters[1] (depth).value", "expected a number, found True"),
    (_hp(1, axis=""), "hyperparameters[1].axis", "empty axis name"),
    (_hp(1, axis="model_id"), "hyperparameters[1].axis", "axis name 'model_id' is reserved"),
    (_hp(1, axis="depth_level"), "hyperparameters[1].axis", "is reserved"),
    (_hp(1, axis="two words"), "hyperparameters[1].axis", "is not allowed"),
    (_hp(1, axis="width"), "hyperparameters[1] (width).axis", "given twice"),
    (_hp(1, axis="Width"), "hyperparameters", "axes 'width' and 'Width' differ only by case"),
    (lambda m: m["dataset"].update(name=""), "dataset.name", "expected a non-empty text"),
    (lambda m: m["dataset"].update(train_size=-3), "dataset.train_size", ">= 0"),
    (lambda m: m["sweep"]["config"]["train"].update(stop_cross_entropy=math.nan),
     "sweep.config.train.stop_cross_entropy", "NaN and infinities cannot be stored"),
    (lambda m: m["checkpoints"]["init"].update(sha256="abc"), "checkpoints.init.sha256",
     "expected 64 lowercase hex digits"),
    (lambda m: m["checkpoints"]["init"].update(bytes=1.5), "checkpoints.init.bytes",
     "expected an integer"),
    (lambda m: m["trace"].update(file=7), "trace.file", "expected a file name"),
    (lambda m: m.update(format_version=0), "format_version", "expected a number >= 1"),
]


@pytest.mark.parametrize("change,key,rule", SENSELESS,
                         ids=[f"{k}:{r[:30]}" for _, k, r in SENSELESS])
def test_senseless_values_are_refused_with_path_key_and_rule(db, tmp_path, change, key, rule):
    runs = tmp_path / "runs"
    bundle = make_bundle(runs)
    edit(bundle, change)
    report = ingest_tree(db, runs)
    why = reasons(report)[bundle]
    assert why.startswith(f"{bundle / 'manifest.json'}: {key}: "), why
    assert rule in why
    assert not db.exists()  # checked before the warehouse was opened: not even created


def test_an_axis_that_differs_by_case_from_the_warehouses_is_refused(db, tmp_path):
    make_bundle(tmp_path / "a")
    assert ingest_tree(db, tmp_path / "a").added == 1
    before = dump(db)
    values = {("Width" if a == "width" else a): v for a, v in VALUES.items()}
    bundle = make_bundle(tmp_path / "b", values=values)
    report = ingest_tree(db, tmp_path / "b")
    assert "axis 'Width' differs only by case from the warehouse's axis 'width'" in \
        reasons(report)[bundle]
    assert dump(db) == before


# --------------------------------------------------------------------------- 4. identities

def _store_other_model(db: Path, mid: str, *, config_hash: str, seed: int, dataset: str):
    """The warehouse holds `mid` as some other model, with a measure and an axis of its own."""
    con = connect(db)
    try:
        now = datetime(2024, 1, 1)
        con.execute("INSERT INTO sweeps (sweep_id, name) VALUES ('s0', 'old sweep')")
        con.execute("INSERT INTO models VALUES (?, 's0', ?, ?, ?, 'done', ?)",
                    [mid, dataset, seed, config_hash, now])
        con.execute("INSERT INTO hyperparameters VALUES (?, 'colour', 0, 'red', NULL)", [mid])
        con.execute("INSERT INTO measures VALUES (?, 'old_measure', 1.0, 'ok', NULL, NULL, ?, "
                    "NULL)", [mid, now])
    finally:
        con.close()


@pytest.mark.parametrize("differs", ["config_hash", "seed", "dataset"])
def test_a_model_id_stored_as_another_model_is_refused_unless_replace(db, tmp_path, differs):
    runs = tmp_path / "runs"
    bundle = make_bundle(runs, seed=3)
    manifest = json.loads((bundle / "manifest.json").read_text())
    stored = {"config_hash": manifest["config_hash"], "seed": 3, "dataset": "digits"}
    stored[differs] = {"config_hash": "f" * 64, "seed": 4, "dataset": "svhn"}[differs]
    _store_other_model(db, model_id(bundle), **stored)
    before = dump(db)
    out = CliRunner().invoke(ingest_cli, [str(runs), "--db", str(db)])
    assert out.exit_code == 1
    assert (f"model_id {model_id(bundle)!r} is already in the warehouse of sweep 'old sweep' "
            "as a different model") in out.output
    assert "0 updated" in out.output and "1 failed" in out.output
    assert dump(db) == before

    out = CliRunner().invoke(ingest_cli, [str(runs), "--db", str(db), "--replace"])
    assert out.exit_code == 0, out.output
    assert "1 replaced" in out.output
    con = connect(db, read_only=True)
    try:
        assert con.sql("SELECT config_hash, seed, dataset FROM models").fetchall() == [
            (manifest["config_hash"], 3, "digits")]
        axes = {r[0] for r in con.sql("SELECT axis FROM hyperparameters").fetchall()}
        assert axes == set(VALUES)  # the old model's rows are gone, not merged
        names = {r[0] for r in con.sql("SELECT measure FROM measures").fetchall()}
        assert "old_measure" not in names and "cross_entropy" in names
    finally:
        con.close()


TAMPERED = {
    "a value changed": (_hp(6, value=0.5), "config_hash", "is not the hash of the manifest's "
                        "hyperparameters"),
    "an axis renamed": (_hp(6, axis="decay"), "config_hash", "is not the hash"),
    "the seed changed": (lambda m: m.update(seed=9), "model_id",
                         "is not the model_id of this configuration, dataset 'digits', "
                         "seed 9 and training settings"),
    "the training settings changed": (lambda m: m["train"].update(stop_cross_entropy=0.1),
                                      "model_id", "is not the model_id"),
    "the dataset changed": (lambda m: m["dataset"].update(name="svhn"), "model_id",
                            "is not the model_id"),
    "the model_id changed": (lambda m: m.update(model_id="0123456789abcdef"), "model_id",
                             "the manifest was edited or is corrupt"),
}


@pytest.mark.parametrize("case", TAMPERED, ids=list(TAMPERED))
def test_a_manifest_whose_ids_do_not_match_its_content_is_refused(db, tmp_path, case):
    runs = tmp_path / "runs"
    bundle = make_bundle(runs)
    change, key, message = TAMPERED[case]
    edit(bundle, change)
    report = ingest_tree(db, runs)
    why = reasons(report)[bundle]
    assert why.startswith(f"{bundle / 'manifest.json'}: {key}: ") and message in why, why


def test_two_bundles_of_one_model_id_are_both_refused(db, tmp_path):
    runs = tmp_path / "runs"
    bundle, other = make_bundle(runs, seed=0), make_bundle(runs, seed=1)
    copy = runs / "backup" / bundle.name
    shutil.copytree(bundle, copy)
    report = ingest_tree(db, runs)
    assert set(reasons(report)) == {bundle, copy}
    assert f"is also the model_id of {copy}" in reasons(report)[bundle]
    assert f"is also the model_id of {bundle}" in reasons(report)[copy]
    assert report.added == 1 and models(db) == [model_id(other)]


def test_a_corrupt_copy_does_not_block_the_good_bundle(db, tmp_path):
    runs = tmp_path / "runs"
    bundle = make_bundle(runs)
    copy = runs / "copy"
    shutil.copytree(bundle, copy)
    (copy / "init.safetensors").write_bytes(b"garbage")
    report = ingest_tree(db, runs)
    assert list(reasons(report)) == [copy] and "truncated or corrupt" in reasons(report)[copy]
    assert models(db) == [model_id(bundle)]


# --------------------------------------------------------------------------- 5. readers

def test_the_warehouse_is_not_held_between_bundles(db, tmp_path):
    runs = tmp_path / "runs"
    for seed in range(3):
        make_bundle(runs, seed=seed)
    reader = ("import duckdb, sys; duckdb.connect(sys.argv[1], read_only=True).execute("
              "'SELECT count(*) FROM models').fetchall()")
    seen = []

    def progress(bundle):
        opened = subprocess.run([sys.executable, "-c", reader, str(db)], capture_output=True,
                                text=True, timeout=60)
        seen.append((bundle.name, opened.returncode, opened.stderr[-300:]))
    report = ingest_tree(db, runs, progress=progress)
    assert report.added == 3
    assert [rc for _, rc, _ in seen] == [0, 0, 0], seen


def test_bundles_are_checked_before_the_warehouse_is_opened(db, tmp_path):
    runs = tmp_path / "runs"
    good, bad = make_bundle(runs, seed=0), make_bundle(runs, seed=1)
    edit(bad, lambda m: m["outcome"].update(gap=math.nan))
    connect(db).close()
    with lock_held(db):
        report = ingest_tree(db, runs, lock_wait=0)
    why = reasons(report)
    assert "outcome.gap" in why[bad]  # its own problem, found without the warehouse
    assert why[good].startswith("not written: ") and "in use by another process" in why[good]


def test_a_table_is_checked_before_the_warehouse_is_opened(db, tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("model_id,hp.lr,train_acc,test_acc\nm1,0.1,1.0,x\n")
    connect(db).close()
    with lock_held(db):
        out = CliRunner().invoke(ingest_cli, [str(table), "--db", str(db)])
    assert out.exit_code == 1
    assert "expected a number, found 'x'" in out.output and "in use" not in out.output


def test_replace_is_documented():
    out = CliRunner().invoke(ingest_cli, ["--help"])
    assert out.exit_code == 0 and "--replace" in out.output
    assert "another configuration, seed or dataset" in " ".join(out.output.split())


def test_train_cli_helper_still_ingests_one_bundle_on_an_open_connection(db, tmp_path):
    bundle = make_bundle(tmp_path / "runs")
    con = connect(db)
    try:
        assert bundles.ingest_bundle(con, bundle) == "added"
        assert bundles.ingest_bundle(con, bundle) == "unchanged"
        report = ingest_tree(con, tmp_path / "runs")   # a connection given: used, not closed
        assert report.unchanged == 1
        assert con.execute("SELECT count(*) FROM models").fetchall() == [(1,)]
    finally:
        con.close()
    assert os.path.exists(db)


def test_a_retrained_model_drops_the_measures_of_its_old_weights(db, tmp_path):
    """The same model (identity) trained again, with other final weights: the new
    run is stored and what was measured on the old weights goes, to be filled again."""
    runs, again = tmp_path / "runs", tmp_path / "again"
    bundle = make_bundle(runs, seed=0)
    assert ingest_tree(db, runs).added == 1
    con = connect(db)
    con.execute("INSERT INTO measures VALUES (?, 'param_norm', 1.0, 'ok', NULL, '{}', "
                "now(), 'x')", [model_id(bundle)])
    con.close()
    torch.manual_seed(99)
    states = {role: NiN(1, 10, 4, 1).state_dict() for role in ("init", "epoch1", "final")}
    manifest = json.loads((bundle / "manifest.json").read_text())
    for key in ("checkpoints", "trace", "format", "format_version", "model_id"):
        manifest.pop(key)
    trace = pl.read_parquet(bundle / "trace.parquet").to_dicts()
    write_bundle(again, model_id(bundle), manifest, states, trace)
    report = ingest_tree(db, again)
    assert report.updated == 1, report
    con = connect(db, read_only=True)
    left = {r[0] for r in con.sql("SELECT measure FROM measures").fetchall()}
    con.close()
    assert "param_norm" not in left and left <= {"cross_entropy", "steps_to_0.1_loss",
                                                 "steps_0.1_to_0.01_loss"}


def test_the_same_weights_with_another_outcome_are_refused_unless_replace(db, tmp_path):
    runs = tmp_path / "runs"
    bundle = make_bundle(runs, seed=0)
    assert ingest_tree(db, runs).added == 1
    before = dump(db)
    edit(bundle, lambda m: m["outcome"].update(test_acc=m["outcome"]["test_acc"] - 0.25,
                                               gap=m["outcome"]["gap"] + 0.25))
    report = ingest_tree(db, runs)
    assert "with these very weights but another outcome" in reasons(report)[bundle]
    assert dump(db) == before
    assert ingest_tree(db, runs, replace=True).failed == []
