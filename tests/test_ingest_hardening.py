"""Results tables that the red-team found could overwrite, brick or poison a
warehouse: each is now refused by file, row and column, and nothing is written."""

import hashlib
import json
import math
import subprocess
import sys
import textwrap

import duckdb
import polars as pl
import pytest
from click.testing import CliRunner
from warehouse_fixture import build_warehouse, dump, ingest_file

from fgm.analysis.cli import main as query
from fgm.warehouse import InputError, connect

BASE = {"model_id": ["a", "b", "c", "d"], "hp.width": [24, 48, 24, 48],
        "hp.depth": [2, 2, 4, 4], "train_acc": [1.0, 1.0, 0.99, 1.0],
        "test_acc": [0.90, 0.80, 0.85, 0.70], "complexity.m": [1.0, 2.0, 1.5, 3.0]}


@pytest.fixture
def wh(db):
    return build_warehouse(db, BASE, sweep="first")


ingest = ingest_file


def write(tmp_path, text, name="t.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- identity

def test_a_model_id_reused_for_another_model_is_a_conflict(wh, tmp_path):
    before, raw = dump(wh), sha(wh)
    text = "model_id,hp.width,hp.depth,gen.gap,complexity.m\nz,24,2,0.1,1\nb,999,2,0.5,2\n"
    with pytest.raises(InputError, match=r"row 2, column 'model_id': model_id 'b' is already "
                                         r"in the warehouse of sweep 'first' as a different"):
        ingest(wh, write(tmp_path, text), sweep="first")
    assert dump(wh) == before
    assert sha(wh) == raw   # not even the schema or views were rewritten


def test_replace_overwrites_the_model_whole(wh, tmp_path):
    # the sweep's axes (a sweep's models have the same ones), values and levels of its own
    text = ("model_id,hp.width,level.width,hp.depth,level.depth,gen.gap,complexity.other\n"
            "b,999,5,8,5,0.5,7\n")
    summary = ingest(wh, write(tmp_path, text), sweep="first", replace=True)
    assert summary.models == (0, 1, 0)
    con = connect(wh, read_only=True)
    hp = dict(con.sql("SELECT axis, value_text FROM hyperparameters WHERE model_id = 'b'")
              .fetchall())
    measures = con.sql("SELECT measure FROM measures WHERE model_id = 'b'").fetchall()
    gap = con.sql("SELECT gap FROM outcomes WHERE model_id = 'b'").fetchall()[0][0]
    con.close()
    # nothing of the old model b survives beside the new one: no old value, no measure m
    assert hp == {"width": "999", "depth": "8"}
    assert measures == [("other",)] and gap == 0.5


def test_the_same_models_under_another_sweep_are_a_conflict(wh, tmp_path):
    path = tmp_path / "second.csv"
    pl.DataFrame(BASE).write_csv(path)
    before = dump(wh)
    with pytest.raises(InputError, match="would move it into another sweep.*--sweep first"):
        ingest(wh, path)
    assert dump(wh) == before
    assert ingest(wh, path, sweep="first").models == (0, 0, 4)


def test_cli_replace_flag(wh, tmp_path):
    from fgm.ingest.cli import main as ingest_cli
    # width 999 gets a level of its own: the sweep's level 0 is width 24
    path = write(tmp_path, "model_id,hp.width,level.width,hp.depth,gen.gap\nb,999,5,2,0.5\n")
    out = CliRunner().invoke(ingest_cli, [str(path), "--db", str(wh), "--sweep", "first"])
    assert out.exit_code == 1 and "--replace" in out.output
    out = CliRunner().invoke(ingest_cli, [str(path), "--db", str(wh), "--sweep", "first",
                                          "--replace"])
    assert out.exit_code == 0, out.output


# --------------------------------------------------------------------------- names

@pytest.mark.parametrize("header, column", [
    ("hp.,gen.gap", "hp."),
    ("hp.model_id,gen.gap", "hp.model_id"),
    ("hp.width_level,gen.gap", "hp.width_level"),
    ("hp.1st,gen.gap", "hp.1st"),
    ("hp.a-b,gen.gap", "hp.a-b"),
    ("hp.x,complexity.,gen.gap", "complexity."),
    ("hp.x,complexity.a b,gen.gap", "complexity.a b"),
])
def test_bad_axis_and_measure_names_are_refused(wh, tmp_path, header, column):
    n = header.count(",") + 1
    text = header + "\n" + ",".join(["1"] * (n - 1) + ["0.1"]) + "\n"
    before = dump(wh)
    with pytest.raises(InputError, match="not allowed|reserved|empty") as err:
        ingest(wh, write(tmp_path, text))
    assert err.value.column == column
    assert dump(wh) == before


def test_axes_equal_but_for_case_are_refused(wh, tmp_path):
    with pytest.raises(InputError, match="differ only by case"):
        ingest(wh, write(tmp_path, "hp.lr,hp.LR,gen.gap\n1,2,0.1\n"))
    with pytest.raises(InputError, match="'Width' differs only by case from the warehouse's"):
        ingest(wh, write(tmp_path, "hp.Width,gen.gap\n1,0.1\n"))


def test_a_bad_axis_already_stored_does_not_brick_queries(wh):
    """A warehouse written before the rule (an empty axis, an axis named model_id)."""
    con = connect(wh)
    con.execute("INSERT INTO hyperparameters VALUES ('a', '', 0, 'x', NULL), "
                "('a', 'model_id', 0, 'y', NULL), ('b', 'WIDTH', 0, '1', 1)")
    con.close()
    out = CliRunner().invoke(query, ["sql", "SELECT count(*) AS n FROM hp_wide", "--db", str(wh),
                                     "--format", "json"])
    assert out.exit_code == 0, out.output and json.loads(out.output) == [{"n": 4}]
    out = CliRunner().invoke(query, ["psi", "-m", "m", "--db", str(wh), "--format", "json"])
    assert out.exit_code == 0, out.output
    assert set(json.loads(out.output)["psi"]) == {"width", "depth"}


# --------------------------------------------------------------------------- values

BAD_VALUES = {
    "accuracy 7": ("hp.x,train_acc,test_acc\n1,7,0.5\n", "train_acc", "fraction in"),
    "infinite accuracy": ("hp.x,train_acc,test_acc\n1,inf,0.5\n", "train_acc", "finite"),
    "gap above 1": ("hp.x,gen.gap\n1,1.5\n", "gen.gap", r"in \[-1, 1\]"),
    "seed 1.7": ("hp.x,gen.gap,seed\n1,0.1,1.7\n", "seed", "integer"),
    "seed true": ("hp.x,gen.gap,seed\n1,0.1,true\n", "seed", "expected a number"),
    "seed 1e30": ("hp.x,gen.gap,seed\n1,0.1,1e30\n", "seed", "<= 2147483647"),
    "level 1e30": ("hp.x,level.x,gen.gap\n1,1e30,0.1\n", "level.x", "<= 2147483647"),
    "level -1": ("hp.x,level.x,gen.gap\n1,-1,0.1\n", "level.x", ">= 0"),
    "measure inf": ("hp.x,gen.gap,complexity.m\n1,0.1,inf\n", "complexity.m", "finite"),
    "measure 1e309": ("hp.x,gen.gap,complexity.m\n1,0.1,1e309\n", "complexity.m", "finite"),
    "hyperparameter inf": ("hp.x,gen.gap\ninf,0.1\n", "hp.x", "finite"),
    "test_size 0": ("hp.x,gen.gap,test_size\n1,0.1,0\n", "test_size", ">= 1"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_values_that_make_no_sense_are_refused(wh, tmp_path, case):
    text, column, message = BAD_VALUES[case]
    before = dump(wh)
    with pytest.raises(InputError, match=message) as err:
        ingest(wh, write(tmp_path, text))
    assert err.value.row == 1 and err.value.column == column
    assert dump(wh) == before


def test_parquet_booleans_and_nan_are_not_numbers(wh, tmp_path):
    path = tmp_path / "t.parquet"
    pl.DataFrame({"hp.x": [1, 2], "gen.gap": [0.1, 0.2], "seed": [True, False]}).write_parquet(path)
    with pytest.raises(InputError, match="true/false column") as err:
        ingest(wh, path)
    assert err.value.column == "seed"
    pl.DataFrame({"hp.x": [1, 2], "gen.gap": [0.1, math.nan]}).write_parquet(path)
    with pytest.raises(InputError, match="a value is required") as err:
        ingest(wh, path)
    assert err.value.row == 2


def test_parquet_nested_columns_are_refused_and_uint64_read(wh, tmp_path):
    path = tmp_path / "t.parquet"
    pl.DataFrame({"hp.x": [1, 2], "gen.gap": [0.1, 0.2],
                  "complexity.m": [[1.0], [2.0]]}).write_parquet(path)
    with pytest.raises(InputError, match="column 'complexity.m': a column of type List"):
        ingest(wh, path)
    pl.DataFrame({"hp.x": pl.Series([1, 2], dtype=pl.UInt64), "gen.gap": [0.1, 0.2],
                  "seed": pl.Series([3, 4], dtype=pl.UInt64)}).write_parquet(path)
    assert ingest(wh, path).models == (2, 0, 0)
    pl.DataFrame({"hp.x": [1, 2], "gen.gap": [0.1, 0.2],
                  "seed": pl.Series([3, 2**64 - 1], dtype=pl.UInt64)}).write_parquet(path)
    with pytest.raises(InputError, match="<= 2147483647") as err:
        ingest(wh, path, sweep="other")
    assert err.value.row == 2


# --------------------------------------------------------------------------- CSV shape

@pytest.mark.parametrize("text, row, message", [
    ("hp.x,complexity.m,complexity.m,gen.gap\n1,2,3,0.1\n", None, "names column 'complexity.m' twice"),
    ("hp.x,complexity.m,gen.gap\n1,2,0.1\n2,0.2\n", 2, "2 cells, but the header has 3 columns"),
    ("hp.x,complexity.m,gen.gap\n1,2,0.1,9\n", 1, "4 cells, but the header has 3 columns"),
])
def test_csv_shape_is_checked_row_by_row(wh, tmp_path, text, row, message):
    before = dump(wh)
    with pytest.raises(InputError, match=message) as err:
        ingest(wh, write(tmp_path, text))
    assert err.value.row == row
    assert dump(wh) == before


def test_non_utf8_csv(wh, tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"hp.x,gen.gap\n\xff\xfe,0.1\n")
    with pytest.raises(InputError, match="not UTF-8"):
        ingest(wh, path)


# --------------------------------------------------------------------------- the disk

def test_a_full_disk_is_reported_in_the_os_words_and_loses_nothing(wh, tmp_path):
    """A file-size limit stands in for a full disk: the write fails with EFBIG
    instead of ENOSPC, through the same path."""
    before = dump(wh)
    code = textwrap.dedent(f"""
        import resource, signal
        from fgm.ingest.synthetic import synthetic_table
        from fgm.ingest.table import ingest_table
        from fgm.warehouse import connect, FgmError
        table = synthetic_table(n_models=20000, n_measures=20)
        con = connect({str(wh)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        size = {wh.stat().st_size}
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 2_000_000, size + 2_000_000))
        try:
            ingest_table(con, "big.csv", frame=table, sweep="big")
        except FgmError as exc:
            print("FgmError:", exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert "FgmError: the warehouse could not be written" in out.stdout, out.stderr
    assert "File too large" in out.stdout and "transaction is aborted" not in out.stdout
    assert dump(wh) == before


# --------------------------------------------------------------------------- test_size

def test_test_size_column_lets_robust_run_without_a_flag(db, tmp_path):
    table = dict(BASE, test_size=[10000] * 4)
    build_warehouse(db, table)
    con = duckdb.connect(str(db), read_only=True)
    assert con.sql("SELECT DISTINCT test_size FROM outcomes").fetchall() == [(10000,)]
    con.close()
    out = CliRunner().invoke(query, ["robust", "-m", "m", "--db", str(db), "--format", "json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["test_size"] == 10000



def test_a_second_table_of_one_name_does_not_overwrite_the_first_ones_results(db, tmp_path):
    """runA/results.csv and runB/results.csv (no model_id column): one sweep, one set
    of ids, other results. The second is refused by row; --replace overwrites."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write(tmp_path / "a", "hp.x,gen.gap,complexity.m\n1,0.1,5\n2,0.2,6\n", "results.csv")
    ingest(db, first)
    before = dump(db)
    second = write(tmp_path / "b", "hp.x,gen.gap,complexity.m\n1,0.1,5\n2,0.4,6\n",
                   "results.csv")
    with pytest.raises(InputError, match=r"row 2, column 'gap'.*its gap = 0\.2; this table "
                                         r"says 0\.4.*--replace"):
        ingest(db, second)
    measure = write(tmp_path / "b", "hp.x,gen.gap,complexity.m\n1,0.1,5\n2,0.2,7\n",
                    "results.csv")
    with pytest.raises(InputError, match=r"column 'complexity.m'.*measure m = 6\.0"):
        ingest(db, measure)
    assert dump(db) == before
    assert ingest(db, measure, replace=True).values[1] == 1   # m 6 -> 7, on purpose


def test_an_empty_cell_never_erases_a_stored_value(db, tmp_path):
    ingest(db, write(tmp_path, "hp.x,gen.gap,complexity.m\n1,0.1,5\n2,0.2,6\n"))
    ingest(db, write(tmp_path, "hp.x,gen.gap,complexity.m\n1,0.1,\n2,0.2,6\n"))
    con = connect(db, read_only=True)
    values = con.sql("SELECT value, status FROM measures ORDER BY value").fetchall()
    con.close()
    assert values == [(5.0, "ok"), (6.0, "ok")]


def test_trailing_empty_lines_and_categorical_text_are_fine(wh, tmp_path):
    assert ingest(wh, write(tmp_path, "hp.x,gen.gap\n1,0.1\n2,0.2\n\n\n"),
                  sweep="t").models == (2, 0, 0)
    with pytest.raises(InputError, match="an empty line in the middle") as err:
        ingest(wh, write(tmp_path, "hp.x,gen.gap\n1,0.1\n\n2,0.2\n", "u.csv"))
    assert err.value.row == 2
    path = tmp_path / "c.parquet"
    pl.DataFrame({"hp.opt": pl.Series(["sgd", "adam"], dtype=pl.Categorical),
                  "gen.gap": [0.1, 0.2]}).write_parquet(path)
    assert ingest(wh, path).models == (2, 0, 0)
