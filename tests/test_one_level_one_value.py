"""Within a sweep one level means one value, whatever path the models came by, and
evaluation never ranks models whose levels mean different values together
(warehouse/levels.py)."""

import itertools

import duckdb
import polars as pl
import pytest
from click.testing import CliRunner
from test_ingest_bundles import VALUES, make_bundle, models
from warehouse_fixture import build_warehouse, dump

from fgm.analysis.cli import main as query
from fgm.ingest.bundles import ingest_tree
from fgm.ingest.cli import main as ingest
from fgm.train.cli import main as train
from fgm.warehouse.levels import level_conflicts


def frame(models_: dict[str, dict[str, tuple]]) -> pl.DataFrame:
    return pl.DataFrame([{"model_id": m, "axis": a, "level": lv, "value_text": str(v)}
                         for m, axes in models_.items() for a, (v, lv) in axes.items()])


# --------------------------------------------------------------------------- the rule

def test_levels_per_optimizer_are_one_levelling():
    """Level 0 of the learning rate is 0.1 for SGD and 1e-3 for Adam: told apart by
    the optimizer's level, so no conflict."""
    hp = frame({f"{o}{i}": {"optimizer": (o, j), "learning_rate": (lr, i)}
                for j, (o, lrs) in enumerate([("sgd", [0.1, 0.01]), ("adam", [1e-3, 1e-4])])
                for i, lr in enumerate(lrs)})
    assert level_conflicts(hp, limit=None) == []


def test_a_narrowed_grid_beside_its_parent_is_a_conflict():
    parent = {f"w{w}d{d}": {"width": (w, i), "depth": (d, j)}
              for (i, w), (j, d) in itertools.product(enumerate([24, 48, 96]),
                                                      enumerate([2, 3, 4]))}
    narrow = {"n": {"width": (16, 0), "depth": (2, 0)}}
    [c] = level_conflicts(frame(parent | narrow), limit=None)
    assert (c.axis, c.rule, c.level) == ("width", "level", 0)
    assert {c.value, c.other_value} == {"16", "24"} and "n" in {c.model, c.other_model}
    # a value given two levels is the other rule
    [c] = level_conflicts(frame(parent | {"m": {"width": (48, 0), "depth": (5, 3)}}))
    assert (c.axis, c.rule) == ("width", "value")
    # the narrowed grid apart on every axis still shares level vectors with its parent
    apart = {"k": {"width": (16, 0), "depth": (5, 0)}}
    found = {(c.axis, c.rule) for c in level_conflicts(frame(parent | apart), limit=None)}
    assert found == {("width", "level"), ("depth", "level")}


def test_focus_ignores_what_the_stored_models_already_break():
    stored = {"a": {"width": (24, 0)}, "b": {"width": (16, 0)}}
    assert level_conflicts(frame(stored), focus={"c"}) == []
    assert level_conflicts(frame(stored | {"c": {"width": (32, 0)}}), focus={"c"})


# --------------------------------------------------------------------------- ingest

FULL = {"hp.width": [24, 48, 96] * 2, "hp.depth": [2] * 3 + [3] * 3,
        "train_acc": [1.0] * 6, "test_acc": [0.9, 0.8, 0.7, 0.85, 0.75, 0.65],
        "complexity.path_norm": [1.0, 2.0, 3.0, 1.5, 2.5, 3.5]}


def test_a_results_table_that_relevels_a_sweep_is_refused_whole(db, tmp_path):
    build_warehouse(db, FULL, sweep="grid")
    before = dump(db)
    narrow = tmp_path / "narrow.csv"
    narrow.write_text("hp.width,hp.depth,train_acc,test_acc\n16,2,1.0,0.95\n16,3,1.0,0.9\n")
    out = CliRunner().invoke(ingest, [str(narrow), "--sweep", "grid", "--db", str(db)])
    assert out.exit_code == 1
    assert "row 1, column 'hp.width'" in out.output
    assert "level 0 of width is 16" in out.output and "24" in out.output
    assert "--sweep NAME" in out.output
    assert dump(db) == before
    # its own sweep takes it
    ok = CliRunner().invoke(ingest, [str(narrow), "--sweep", "narrow", "--db", str(db)])
    assert ok.exit_code == 0, ok.output


def test_explicit_levels_that_agree_are_accepted(db, tmp_path):
    build_warehouse(db, FULL, sweep="grid")
    more = tmp_path / "more.csv"
    more.write_text("hp.width,level.width,hp.depth,level.depth,train_acc,test_acc\n"
                    "48,1,4,2,1.0,0.7\n")
    out = CliRunner().invoke(ingest, [str(more), "--sweep", "grid", "--db", str(db)])
    assert out.exit_code == 0, out.output


def test_a_bundle_levelled_otherwise_than_its_sweep_is_refused(db, tmp_path):
    first = make_bundle(tmp_path / "a")
    report = ingest_tree(db, tmp_path / "a")
    assert report.added == 1
    other = make_bundle(tmp_path / "b", values=dict(VALUES, width=8))   # also level 0
    report = ingest_tree(db, tmp_path / "b")
    assert report.added == 0 and len(report.failed) == 1
    path, why = report.failed[0]
    assert path == other
    assert "level 0 of width is" in why and "--name NAME" in why
    assert models(db) == [first.name]


# --------------------------------------------------------------------------- training

def test_a_narrowed_grid_is_refused_before_anything_trains(db, tmp_path, grid_file):
    """The new user's move: the grid again, narrowed with --set to a width it lacks,
    into the same warehouse. Refused before training, with the way out."""
    table = {"model_id": ["a", "b"], "hp.width": [24, 32], "hp.depth": [2, 2],
             "hp.dropout": [0.0] * 2, "hp.batch_size": [128] * 2,
             "hp.optimizer": ["adam"] * 2, "hp.learning_rate": [1e-3] * 2,
             "hp.weight_decay": [0.0] * 2, "train_acc": [1.0] * 2, "test_acc": [0.9, 0.8]}
    build_warehouse(db, table, sweep="tiny/digits")
    out_dir = tmp_path / "runs"
    out = CliRunner().invoke(train, ["grid", "--grid", str(grid_file), "--set", "width=16",
                                     "--out", str(out_dir), "--db", str(db),
                                     "--device", "cpu"])
    assert out.exit_code == 1, out.output
    assert "disagree with sweep 'tiny/digits'" in out.output
    assert "level 0 of width is 16" in out.output and "--name NAME" in out.output
    assert not out_dir.exists()
    # a subset that keeps the levels (depth 2 of [2, 3] is level 0 either way) is fine
    from fgm.train.grid import check_levels_against_sweep, load_grid, override
    check_levels_against_sweep(db, override(load_grid(path=grid_file), ["depth=2"]))
    renamed = override(load_grid(path=grid_file), ["width=16"])
    renamed.name = "tiny-narrow"
    check_levels_against_sweep(db, renamed)


@pytest.mark.parametrize("name", ["", "a/b", "x" * 65, "../up", "-lead"])
def test_a_grid_name_is_one_path_part(name, db, grid_file):
    out = CliRunner().invoke(train, ["grid", "--grid", str(grid_file), "--name", name,
                                     "--db", str(db), "--device", "cpu"])
    assert out.exit_code == 1 and "--name" in out.output


# --------------------------------------------------------------------------- evaluation

def mixed_warehouse(db):
    """A sweep as an older fgm left it: the parent grid and, in the same sweep, a
    narrowed one whose width 16 is level 0 (written past ingest's checks)."""
    build_warehouse(db, FULL, sweep="grid")
    con = duckdb.connect(str(db))
    for mid, depth, level, test_acc, norm in (("n2", 2, 0, 0.95, 0.5), ("n3", 3, 1, 0.9, 0.7)):
        # rows like a stored model's, but this one's
        con.execute("INSERT INTO models BY NAME SELECT * REPLACE (? AS model_id, "
                    "? AS config_hash) FROM models LIMIT 1", [mid, mid])
        con.execute("INSERT INTO hyperparameters VALUES (?, 'width', 0, '16', 16), "
                    "(?, 'depth', ?, ?, ?)", [mid, mid, level, str(depth), depth])
        con.execute("INSERT INTO outcomes BY NAME SELECT * REPLACE (? AS model_id, ? AS "
                    "test_acc, ? AS gap) FROM outcomes LIMIT 1", [mid, test_acc, 1.0 - test_acc])
        con.execute("INSERT INTO measures BY NAME SELECT * REPLACE (? AS model_id, ? AS value) "
                    "FROM measures WHERE measure = 'path_norm' LIMIT 1", [mid, norm])
    con.close()


def test_evaluation_refuses_a_sweep_whose_levels_mean_two_values(db):
    mixed_warehouse(db)
    for args in (["psi", "-m", "path_norm"], ["table"], ["cmi", "-m", "path_norm"]):
        out = CliRunner().invoke(query, [*args, "--db", str(db), "--no-store"])
        assert out.exit_code == 1, out.output
        assert "disagree on what the levels of 'width' mean" in out.output
        assert "in sweep 'grid'" in out.output and "--relevel" in out.output


def test_relevel_ranks_the_mixed_sweep_as_one_well_levelled_grid(db, tmp_path):
    mixed_warehouse(db)
    mixed = CliRunner().invoke(query, ["psi", "-m", "path_norm", "--relevel", "--db", str(db),
                                       "--no-store", "--format", "json"])
    assert mixed.exit_code == 0, mixed.output
    # the same eight models, levelled from the start by ingest (dense rank of the values)
    whole = {k: v + w for (k, v), w in zip(FULL.items(), ([16, 16], [2, 3], [1.0, 1.0],
                                                          [0.95, 0.9], [0.5, 0.7]),
                                           strict=True)}
    ref = build_warehouse(tmp_path / "ref.duckdb", whole, sweep="grid")
    clean = CliRunner().invoke(query, ["psi", "-m", "path_norm", "--db", str(ref),
                                       "--no-store", "--format", "json"])
    assert clean.exit_code == 0, clean.output
    import json
    got, want = json.loads(mixed.output), json.loads(clean.output)
    assert got["n_models"] == want["n_models"] == 8
    assert got["psi"] == want["psi"] and got["tau"] == want["tau"]


def test_a_table_with_an_axis_more_than_its_sweep_is_refused(db, tmp_path):
    """Its models share no level vector with the sweep's, yet evaluation would rank
    its width 16 as the sweep's level-0 width 24."""
    build_warehouse(db, FULL, sweep="grid")
    before = dump(db)
    more = tmp_path / "more.csv"
    more.write_text("hp.width,hp.depth,hp.dropout,train_acc,test_acc\n16,2,0.0,1.0,0.9\n")
    out = CliRunner().invoke(ingest, [str(more), "--sweep", "grid", "--db", str(db)])
    assert out.exit_code == 1 and "has the axis 'dropout'" in out.output, out.output
    assert dump(db) == before


def test_a_learning_rate_per_optimizer_may_repeat_a_value_at_another_level(db):
    """0.01 is level 1 of SGD's rates and level 0 of Adam's: one grid, legitimately."""
    from fgm.warehouse import connect
    from fgm.warehouse.levels import sweep_conflict
    rows = [("s0", "sgd", 0, 0.01, 0), ("s1", "sgd", 0, 0.1, 1),
            ("a0", "adam", 1, 0.01, 0), ("a1", "adam", 1, 0.001, 1)]
    incoming = pl.DataFrame([
        r for mid, opt, ol, lr, ll in rows for r in (
            {"model_id": mid, "axis": "optimizer", "level": ol, "value_text": opt,
             "value_num": None},
            {"model_id": mid, "axis": "learning_rate", "level": ll, "value_text": str(lr),
             "value_num": lr})], schema_overrides={"value_num": pl.Float64})
    con = connect(db)
    try:
        assert sweep_conflict(con, "no-such-sweep", incoming) is None
    finally:
        con.close()


def test_relevel_ranks_numbers_and_names_of_one_axis_apart():
    from fgm.analysis.evaluate import _relevel
    hp = pl.DataFrame({"model_id": ["a", "b", "c", "d"], "axis": ["wd"] * 4,
                       "level": [0, 1, 0, 1], "value_text": ["0", "0.0001", "none", "tiny"],
                       "value_num": [0.0, 1e-4, None, None], "sweep": ["x", "x", "y", "y"]})
    got = dict(_relevel(hp, {"wd"}).select("model_id", "level").iter_rows())
    assert got == {"a": 0, "b": 1, "c": 2, "d": 3}
