"""What a new user hits first: output formats that hold every column, commands
that read never creating a warehouse, and an empty selection said in words."""

import csv
import io
import json
from pathlib import Path

import click
import duckdb
import polars as pl
import pytest
from click.testing import CliRunner
from warehouse_fixture import build_warehouse

from fgm.analysis.cli import main as query
from fgm.measures.cli import main as measure
from fgm.warehouse.cli import friendly_errors

TABLE = {"model_id": ["a", "b", "c", "d"], "hp.depth": [2, 4, 2, 4],
         "hp.optimizer": ["sgd", "sgd", "adam", "adam"],
         "train_acc": [1.0, 1.0, 1.0, 1.0], "test_acc": [0.9, 0.8, 0.85, 0.7],
         "is.converged": ["true", "true", "false", "true"],
         "complexity.path_norm": [1.0, 2.0, 1.5, 3.0]}


@pytest.fixture
def wh(db):
    return build_warehouse(db, TABLE)


def run(*args):
    return CliRunner().invoke(query, [str(a) for a in args])


@pytest.mark.parametrize("view", ["model_measures", "model_levels"])
def test_map_columns_come_out_as_json_text_in_csv_and_table(wh, view):
    out = run("sql", f"SELECT * FROM {view} ORDER BY model_id LIMIT 3", "--db", wh,
              "--format", "csv")
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(io.StringIO(out.output)))
    assert len(rows) == 3
    levels = json.loads(rows[0]["levels"])
    assert levels == {"depth": 0, "optimizer": 1}       # a: depth 2 (level 0), sgd after adam
    table = run("sql", f"SELECT levels FROM {view} ORDER BY model_id LIMIT 1", "--db", wh)
    assert table.exit_code == 0 and '{"depth": 0, "optimizer": 1}' in table.output
    as_json = json.loads(run("sql", f"SELECT levels FROM {view} ORDER BY model_id LIMIT 1",
                             "--db", wh, "--format", "json").output)
    assert as_json == [{"levels": {"depth": 0, "optimizer": 1}}]


@pytest.mark.parametrize("error", [
    duckdb.ConversionException("Conversion Error: Could not convert string 'x' to INT32\n\nLINE 1"),
    pl.exceptions.ComputeError("cannot compare string with numeric type (i64)\nmore detail"),
])
def test_duckdb_and_polars_errors_become_one_line(error):
    @click.command()
    @friendly_errors
    def cmd():
        raise error
    out = CliRunner().invoke(cmd, [])
    assert out.exit_code == 1 and out.exception.__class__ is SystemExit
    assert out.output.strip() == "Error: " + str(error).splitlines()[0]


def test_fgm_measure_never_creates_a_warehouse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FGM_DB", raising=False)
    out = CliRunner().invoke(measure, ["--device", "cpu"])
    assert out.exit_code == 1 and "no warehouse here" in out.output
    assert not (tmp_path / "fgm.duckdb").exists()


def test_an_empty_selection_is_an_error_that_says_why(wh, db):
    out = run("table", "--where", "depth > 100", "--db", wh)
    assert out.exit_code == 1
    assert "no model matches --where 'depth > 100'" in out.output
    assert "holds 4 models" in out.output
    out = run("psi", "-m", "path_norm", "--dataset", "unknown", "--where", "depth = 4",
              "--where", "optimizer = 'adam' AND depth = 2", "--db", wh)
    assert out.exit_code == 1 and "--all-models" in out.output    # c did not converge


def test_unknown_measure_suggests_the_closest(wh):
    out = run("psi", "-m", "path_nrom", "--db", wh)
    assert out.exit_code == 1 and "Did you mean 'path_norm'?" in out.output


GRID = {"hp.width": [16, 32, 64] * 3, "hp.depth": [2] * 3 + [4] * 3 + [8] * 3,
        "hp.dropout": [0.0] * 9,
        "train_acc": [1.0] * 9,
        "test_acc": [0.90, 0.85, 0.80, 0.86, 0.82, 0.75, 0.80, 0.78, 0.70],
        "complexity.m": [1.0, 2.0, 3.5, 1.5, 2.2, 3.0, 2.5, 2.9, 4.0]}


def test_an_axis_that_does_not_vary_takes_no_part_and_is_said_once(db):
    build_warehouse(db, GRID)
    res = json.loads(run("psi", "-m", "m", "--db", db, "--format", "json").output)
    assert set(res["psi"]) == {"depth", "width"}
    assert res["constant_axes"] == {"dropout": "0"}
    pgdl = json.loads(run("cmi", "-m", "m", "--pgdl", "--db", db, "--format", "json").output)
    assert "dropout" not in (pgdl["argmin"] or []) and set(pgdl["per_axis"]) == {"depth", "width"}
    out = run("table", "--db", db)
    assert out.exit_code == 0
    header = out.output.splitlines()[0].split()
    assert "dropout" not in header and "depth" in header
    assert out.output.count("left out, constant in this selection: dropout = 0") == 1


def test_k_without_a_set_is_not_labelled_with_an_empty_set():
    from fgm.analysis.queries import cmi_quantities
    rows = cmi_quantities({"per_axis": {}, "s0": None, "s1": None, "s2": None, "K": None,
                      "argmin": None})
    assert rows[-1][0] == "K"
    rows = cmi_quantities({"per_axis": {}, "s0": 0.1, "s1": 0.1, "s2": 0.1, "K": 0.1,
                      "argmin": ["depth", "width"]})
    assert rows[-1][0] == "K (S = {depth, width})"


def test_did_you_mean_for_axes_and_help_everywhere(db, tmp_path):
    build_warehouse(db, GRID)
    out = run("plot", "-m", "m", "--color", "widht", "--db", db, "--out", tmp_path)
    assert out.exit_code == 1 and "Did you mean 'width'?" in out.output
    from fgm.train.grid import parse_grid
    from fgm.warehouse import FgmError
    with pytest.raises(FgmError, match="did you mean 'dropout'"):
        parse_grid({"axes": {"drop_out": [0.0]}})
    assert "The measure to draw" in run("plot", "--help").output
    assert "Seed of the oracle" in run("oracle", "--help").output


def test_report_and_plot_take_format(db, tmp_path):
    build_warehouse(db, GRID)
    out = run("plot", "-m", "m", "--color", "width", "--db", db, "--out", tmp_path,
              "--format", "json")
    assert out.exit_code == 0, out.output
    files = json.loads(out.output)
    assert {f["kind"] for f in files} == {"png", "svg", "html"}
    assert all(Path(f["file"]).exists() for f in files)


def test_models_come_in_grid_order(db):
    build_warehouse(db, GRID)
    rows = json.loads(run("models", "--db", db, "--format", "json").output)
    order = [(r["depth"], r["width"]) for r in rows]
    assert order == sorted(order)


def test_fgm_warnings_are_one_plain_line_once():
    import warnings

    from fgm.train.data import DatasetWarning

    @click.command()
    @friendly_errors
    def cmd():
        for _ in range(3):
            warnings.warn("files are not the official ones", DatasetWarning, stacklevel=1)
    out = CliRunner().invoke(cmd, [])
    assert out.exit_code == 0
    assert out.output == "warning: files are not the official ones\n"


def test_robust_says_what_test_size_would_be_needed(db):
    """On a small test set every Hoeffding weight is 0: the note says so, and which
    test-set size would let the largest gap difference count."""
    import itertools
    import math
    import re

    from fgm.analysis.robust import min_confident_gap
    build_warehouse(db, dict(GRID, test_size=[20] * 9))
    res = json.loads(run("robust", "-m", "m", "--db", db, "--format", "json").output)
    note = res["overall"]["note"]
    assert res["overall"]["environments"] == 0 and "all weights 0" in note
    n = int(re.search(r"more than ([\d,]+) examples", note).group(1).replace(",", ""))
    gap = [tr - te for tr, te in zip(GRID["train_acc"], GRID["test_acc"], strict=True)]
    cells = list(zip(GRID["hp.width"], GRID["hp.depth"], strict=True))
    largest = max(abs(gap[i] - gap[j]) for i, j in itertools.combinations(range(9), 2)
                  if sum(a != b for a, b in zip(cells[i], cells[j], strict=True)) == 1)
    assert min_confident_gap(n + 1) < largest <= min_confident_gap(n) * (1 + 1e-9)
    assert not math.isnan(largest)
    table = run("robust", "-m", "m", "--db", db)
    assert table.exit_code == 0 and "would count with a test set of more than" in table.output


def test_a_hostile_text_value_cannot_open_a_script_in_the_report(db, tmp_path):
    hostile = "</script><script>document.title='XSS'</script>"
    table = dict(GRID, **{"hp.optimizer": [hostile, "adam", "sgd"] * 3})
    build_warehouse(db, table)
    out = run("report", "--out", tmp_path / "r", "--db", db)
    assert out.exit_code == 0, out.output
    page = (tmp_path / "r" / "index.html").read_text()
    assert hostile not in page
    assert "\\u003c/script\\u003e\\u003cscript\\u003edocument.title" in page
    plot = run("plot", "-m", "m", "--color", "optimizer", "--out", tmp_path / "p", "--db", db)
    assert plot.exit_code == 0, plot.output
    html = next((tmp_path / "p").glob("*.html")).read_text()
    assert hostile not in html


def test_a_measure_without_any_value_gives_a_null_k_not_a_traceback(db, tmp_path):
    build_warehouse(db, dict(GRID, **{"complexity.empty": [None] * 9}))
    out = run("cmi", "-m", "empty", "--db", db, "--format", "json")
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    assert res["K"] is None and res["n_models"] == 0 and res["note"]
    assert run("table", "--kind", "cmi", "--db", db).exit_code == 0


def test_a_seed_collision_or_two_does_not_decide_every_figure(db):
    """40 models, each its own seed but for one shared seed: refused, not Ψ = 1."""
    n = 40
    table = {"hp.depth": [2 + i % 3 for i in range(n)], "hp.width": [16 * (1 + i % 4)
                                                                  for i in range(n)],
             "gen.gap": [0.01 * (i % 7) for i in range(n)],
             "complexity.m": [float(i % 5) for i in range(n)],
             "seed": [0] + list(range(n - 1)), "model_id": [f"m{i}" for i in range(n)]}
    build_warehouse(db, table)
    out = run("psi", "-m", "m", "--db", db)
    assert out.exit_code == 1 and "--pool-seeds" in out.output
    assert run("psi", "-m", "m", "--db", db, "--pool-seeds").exit_code == 0


@pytest.mark.parametrize("args", [["sql", "select 1", "--timeout", "nan"],
                                  ["sql", "select 1", "--timeout", "inf"],
                                  ["robust", "-m", "m", "--test-size", "0"]])
def test_numbers_out_of_range_are_refused_by_the_option(wh, args):
    out = run(*args, "--db", wh)
    assert out.exit_code == 2 and "Traceback" not in out.output
