"""One warehouse, many grids: a second grid never overwrites the first one's models,
and grids whose levels disagree are evaluated apart unless pooled on purpose."""

import json

import pytest
from click.testing import CliRunner
from conftest import GRID

from fgm.analysis.cli import main as query
from fgm.train.cli import main as train_cli
from fgm.warehouse import connect


def grid_text(name: str, depth: list[int], steps: int) -> str:
    """conftest's tiny grid, one width, with its own name, depths and step budget."""
    return (GRID.replace('name = "tiny"', f'name = "{name}"')
            .replace("width = [24, 32]", "width = [24]")
            .replace("depth = [2, 3]", f"depth = {depth}")
            .replace("max_steps = 1500", f"max_steps = {steps}"))


@pytest.fixture(scope="module")
def two_grids(tmp_path_factory):
    root = tmp_path_factory.mktemp("grids")
    db = root / "w.duckdb"
    for name, depth, steps in (("first", [2, 3], 40), ("second", [3, 4], 50)):
        path = root / f"{name}.toml"
        path.write_text(grid_text(name, depth, steps))
        out = CliRunner().invoke(train_cli, ["grid", "--grid", str(path), "--out",
                                             str(root / "runs"), "--db", str(db),
                                             "--device", "cpu", "--no-measures"])
        assert out.exit_code == 0, out.output
        if name == "first":
            con = connect(db, read_only=True)
            first = con.sql("SELECT * FROM model_outcomes ORDER BY model_id").fetchall()
            con.close()
    return db, first


def test_the_second_grid_adds_models_and_changes_none_of_the_first(two_grids):
    db, first = two_grids
    con = connect(db, read_only=True)
    rows = con.sql("SELECT * FROM model_outcomes ORDER BY model_id").fetchall()
    depth3 = con.sql("SELECT o.sweep, count(*) FROM model_outcomes AS o JOIN hyperparameters "
                     "AS h USING (model_id) WHERE h.axis = 'depth' AND h.value_num = 3 "
                     "GROUP BY ALL ORDER BY 1").fetchall()
    con.close()
    assert len(rows) == 4
    assert set(first) <= set(rows)          # the first grid's models, untouched
    # width 24, depth 3 is in both grids, trained with other settings: two models
    assert depth3 == [("first/digits", 1), ("second/digits", 1)]


def test_grids_whose_levels_disagree_are_evaluated_apart(two_grids):
    db, _ = two_grids
    mixed = CliRunner().invoke(query, ["psi", "-m", "cross_entropy", "--all-models",
                                       "--db", str(db)])
    assert mixed.exit_code == 1
    assert "'depth'" in mixed.output and "first/digits" in mixed.output
    assert "second/digits" in mixed.output and "--sweep" in mixed.output
    for sweep in ("first/digits", "second/digits"):
        one = CliRunner().invoke(query, ["psi", "-m", "cross_entropy", "--all-models",
                                         "--sweep", sweep, "--db", str(db), "--format", "json"])
        assert one.exit_code == 0, one.output
        assert json.loads(one.output)["n_models"] == 2
    pooled = CliRunner().invoke(query, ["psi", "-m", "cross_entropy", "--all-models",
                                        "--relevel", "--db", str(db), "--format", "json"])
    assert pooled.exit_code == 0, pooled.output
    res = json.loads(pooled.output)
    assert res["n_models"] == 4 and set(res["psi"]) == {"depth"}


def test_a_level_that_means_other_values_in_another_sweep_is_not_pooled(db, tmp_path):
    """Two tables that each rank their own depths from 0: level 0 is depth 2 in one
    and depth 8 in the other, no value in common."""
    from warehouse_fixture import ingest_file
    a = tmp_path / "a.csv"
    a.write_text("hp.depth,gen.gap,complexity.m\n2,0.1,1\n4,0.2,2\n")
    b = tmp_path / "b.csv"
    b.write_text("hp.depth,gen.gap,complexity.m\n8,0.3,3\n16,0.1,4\n")
    ingest_file(db, a)
    ingest_file(db, b)
    out = CliRunner().invoke(query, ["psi", "-m", "m", "--db", str(db)])
    assert out.exit_code == 1 and "level 0 is 2 in sweep 'a' but 8 in sweep 'b'" in out.output
    pooled = CliRunner().invoke(query, ["psi", "-m", "m", "--relevel", "--db", str(db),
                                        "--format", "json"])
    assert pooled.exit_code == 0, pooled.output
    # re-ranked by value, 2 < 4 < 8 < 16: gaps 0.1 0.2 0.3 0.1 against m 1 2 3 4
    assert json.loads(pooled.output)["n_models"] == 4
