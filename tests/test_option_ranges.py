"""Every numeric option of fgm-train, fgm-measure and fgm-query has a range and
refuses nan and infinity, before anything trains, computes or writes; paths and
addresses that would end in a traceback are refused in one line (issue #20)."""

import json
import socket
import socketserver
import subprocess
import sys
import threading

import polars as pl
import pytest
from click.testing import CliRunner
from warehouse_fixture import build_warehouse

from fgm.analysis.cli import main as query
from fgm.measures.cli import main as measure_cli
from fgm.measures.context import Settings
from fgm.measures.registry import list_measures
from fgm.measures.runner import measure_models
from fgm.train import ray_executor
from fgm.train.cli import main as train_cli
from fgm.train.executor import executor_settings
from fgm.train.grid import load_grid
from fgm.warehouse import FgmError, connect

QUICK = """dataset = 'digits'
[axes]
width = [8]
depth = [1]
dropout = [0.0]
batch_size = [8]
optimizer = ['sgd']
learning_rate = [0.1]
weight_decay = [0.0]
[train]
max_steps = {max_steps}
estimate_batches = 1
trace_every = {trace_every}
lr_drop_steps = [{drop}]
{extra}
"""


def quick(max_steps="3", trace_every="1", drop="2", extra="") -> str:
    return QUICK.format(max_steps=max_steps, trace_every=trace_every, drop=drop, extra=extra)


@pytest.fixture
def warehouse(db):
    """Nine configurations of two axes, two seeds each, one measure."""
    rows = []
    for i, (d, w) in enumerate((d, w) for d in (2, 4, 8) for w in (16, 32, 64)):
        for seed in (0, 1):
            gap = 0.1 + 0.01 * i + 0.003 * seed
            rows.append({"model_id": f"m{i}-{seed}", "seed": seed, "hp.depth": d,
                         "hp.width": w, "gen.gap": gap, "complexity.m": gap * (1 + 0.1 * seed)})
    return build_warehouse(db, pl.DataFrame(rows))


def count(db, table: str) -> int:
    con = connect(db, read_only=True)
    try:
        return con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
    finally:
        con.close()


# --------------------------------------------------------------------------- fgm-train

@pytest.mark.parametrize("seeds,why", [
    ("", "no seed given"),
    (" , ", "no seed given"),
    ("-1", "-1 is out of range"),
    ("1000000000000", "1000000000000 is out of range"),
    ("2147483648", "2147483648 is out of range"),
    ("0,0", "0 is listed twice"),
    ("0,,1", "an empty seed between commas"),
])
def test_seeds_are_checked_before_anything_trains(tmp_path, seeds, why):
    grid = tmp_path / "quick.toml"
    grid.write_text(quick())
    out = CliRunner().invoke(train_cli, ["grid", "--grid", str(grid), "--seeds", seeds,
                                         "--out", str(tmp_path / "runs"), "--no-ingest",
                                         "--device", "cpu"])
    assert out.exit_code == 2, out.output
    assert f"Invalid value for --seeds: {seeds!r}: {why}; expected integers in " \
           f"[0, 2147483647]" in out.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("grid,message", [
    (quick(max_steps="1000000000000000000"), "train.max_steps: 1000000000000000000 is not "
     "allowed; expected a positive integer up to 1,000,000,000"),
    (quick(max_steps="1000000001"), "train.max_steps: 1000000001 is not allowed"),
    (quick(trace_every="10000000000"), "train.trace_every: 10000000000 is not allowed"),
    (quick(drop="1000000000000"), "train.lr_drop_steps: [1000000000000] is not allowed; "
     "expected a list of positive step numbers up to 1,000,000,000"),
    (quick(extra="stop_cross_entropy = 1e300"), "train.stop_cross_entropy: 1e+300 is not "
     "allowed; expected a finite positive number up to 10"),
    (quick().replace("estimate_batches = 1", "estimate_batches = 10000000"),
     "train.estimate_batches: 10000000 is not allowed; expected a positive integer up to "
     "100,000"),
    (quick().replace("learning_rate = [0.1]", "learning_rate = [1e300]"),
     "axes.learning_rate: 1e+300 is not allowed; expected finite positive numbers up to 10"),
    (quick().replace("weight_decay = [0.0]", "weight_decay = [1e300]"),
     "axes.weight_decay: 1e+300 is not allowed; expected finite numbers >= 0 up to 1"),
])
def test_grid_numbers_past_their_caps_are_refused(tmp_path, grid, message):
    path = tmp_path / "big.toml"
    path.write_text(grid)
    with pytest.raises(FgmError) as err:
        load_grid(path=path)
    assert message in str(err.value)


def test_the_caps_are_allowed_and_one_past_them_is_not(tmp_path):
    path = tmp_path / "edge.toml"
    path.write_text(quick(max_steps="1000000000", trace_every="1000000000", drop="1000000000",
                          extra="stop_cross_entropy = 10.0")
                    .replace("learning_rate = [0.1]", "learning_rate = [10.0]")
                    .replace("weight_decay = [0.0]", "weight_decay = [1.0]"))
    g = load_grid(path=path)
    assert g.train["max_steps"] == 10 ** 9 and g.axes["learning_rate"] == [10.0]
    path.write_text(path.read_text().replace("1000000000", "1000000001"))
    with pytest.raises(FgmError, match="train.max_steps: 1000000001 is not allowed"):
        load_grid(path=path)


# --------------------------------------------------------------------------- executors

@pytest.mark.parametrize("args,message", [
    ((None, 100.0, None, None), "--gpus-per-model 100: expected a number in [0, 64]"),
    ((None, float("nan"), None, None), "--gpus-per-model nan: expected a number in [0, 64]"),
    ((None, None, 5000, None), "--cpus-per-model 5000: expected an integer in [1, 1024]"),
    ((None, None, None, 10 ** 6), "--max-retries 1000000: expected an integer in [0, 100]"),
    (("ray://h:99999", None, None, None), "--address 'ray://h:99999': expected auto, "
     "host:port or ray://host:port (a port in 1-65535)"),
])
def test_ray_options_have_ranges(args, message):
    with pytest.raises(FgmError) as err:
        executor_settings("ray", *args)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("address,message", [
    ("a" * 3000 + ":6379", "longer than 300 characters; expected auto, host:port or "
     "ray://host:port"),
    ("x" * 70 + ".example:6379", "the host is not a host name (dot-separated labels of 1 "
     "to 63 characters) or an IP address"),
    ("ray://a..b:10001", "the host is not a host name"),
])
def test_an_address_no_host_can_have_is_refused_before_anything_starts(tmp_path, address,
                                                                        message, db):
    """Today idna's UnicodeError, a traceback, after the run began."""
    grid = tmp_path / "quick.toml"
    grid.write_text(quick())
    out = CliRunner().invoke(train_cli, ["grid", "--grid", str(grid), "--out",
                                         str(tmp_path / "runs"), "--no-ingest",
                                         "--executor", "ray", "--address", address])
    assert out.exit_code == 1, out.output
    assert out.output.startswith("Error: --address '") and message in out.output
    assert len(out.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
    out = CliRunner().invoke(measure_cli, ["--db", str(db), "--executor", "ray",
                                           "--address", address])
    assert out.exit_code == 1 and message in out.output and not db.exists()


class _CloseAtOnce(socketserver.BaseRequestHandler):
    def handle(self):   # returning closes the connection: accepted, then closed
        pass


@pytest.mark.parametrize("behaviour", ["closes", "silent"])
def test_a_port_that_accepts_and_never_answers_is_named_for_what_it_did(monkeypatch,
                                                                       behaviour):
    """No Ray here: a plain TCP server on 127.0.0.1 that accepts and closes at once, or
    a listening socket that never says a word. Either was called "not a Ray cluster"."""
    pytest.importorskip("grpc")
    monkeypatch.setattr(ray_executor, "PROBE_SECONDS", 1.0)
    monkeypatch.setattr(ray_executor, "OBSERVE_SECONDS", 0.5, raising=False)
    if behaviour == "closes":
        server = socketserver.TCPServer(("127.0.0.1", 0), _CloseAtOnce)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        port = server.server_address[1]
    else:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)      # the kernel completes the handshake; nobody reads
        port = listener.getsockname()[1]
    try:
        with pytest.raises(FgmError) as err:
            ray_executor.probe_address(f"127.0.0.1:{port}")
    finally:
        if behaviour == "closes":
            server.shutdown()
            server.server_close()
            thread.join()
        else:
            listener.close()
    text = str(err.value)
    assert text.startswith(f"--address 127.0.0.1:{port}: the port accepted the connection ")
    observed = ("and closed it without answering" if behaviour == "closes"
                else "but never answered (nothing within 1 s)")
    assert observed in text
    assert "not a Ray cluster's port or a Ray Client server, or a firewall or proxy" in text


# --------------------------------------------------------------------------- fgm-measure

@pytest.mark.parametrize("setting,message", [
    ("bisection_steps=1000000000", "bisection_steps = 1000000000: expected an integer in "
     "[1, 64]"),
    ("draws=10000000", "draws = 10000000: expected an integer in [draws_min, 100,000]"),
    ("power_iterations=100000000", "power_iterations = 100000000: expected an integer in "
     "[1, 100,000]"),
    ("restarts=1000000", "restarts = 1000000: expected an integer in [1, 1,000]"),
    ("ascent_steps=1000000", "ascent_steps = 1000000: expected an integer in [1, 100,000]"),
    ("ascent_batch=100000000", "ascent_batch = 100000000: expected an integer in "
     "[0, 10,000,000] (0: every example)"),
    ("draw_examples=100000000", "draw_examples = 100000000: expected an integer in "
     "[0, 10,000,000] (0: every example)"),
    ("batch=100000000", "batch = 100000000: expected an integer in [1, 10,000,000]"),
    ("sigma_start=1e300", "sigma_start = 1e+300: expected a number in (0, 1,000,000]"),
    ("ascent_lr=1e300", "ascent_lr = 1e+300: expected a number in (0, 1,000,000]"),
])
def test_every_set_value_has_a_range(setting, message):
    with pytest.raises(ValueError) as err:
        Settings.parse("paper", [setting])
    assert str(err.value) == message
    assert Settings.parse("paper", ["ascent_batch=0"]).ascent_batch == 0   # every example


@pytest.mark.parametrize("args,message", [
    (["--set", "bisection_steps=1000000000"],
     "Invalid value for --set: bisection_steps = 1000000000: expected an integer in [1, 64]"),
    (["--set", "draws=10000000"], "draws = 10000000: expected an integer in [draws_min"),
    (["--seed", "-1"], "Invalid value for '--seed': -1 is not in the range 0<=x<=999999999"),
    (["--measures", ""], "Invalid value for '--measures': no measure named ''"),
    (["--measures", " , "], "Invalid value for '--measures': no measure named ' , '"),
])
def test_fgm_measure_refuses_before_it_computes(warehouse, args, message):
    before = warehouse.read_bytes()
    out = CliRunner().invoke(measure_cli, ["--db", str(warehouse), "--device", "cpu", *args])
    assert out.exit_code == 2, out.output
    assert message in out.output
    assert warehouse.read_bytes() == before


def test_an_empty_pattern_is_no_measure():
    assert list_measures("") == [] and list_measures(" , ") == []
    with pytest.raises(FgmError, match="no measure matches ''"):
        measure_models("unused.duckdb", pattern="")


@pytest.mark.parametrize("where", ["1=1; DROP TABLE models", "nosuch > 1",
                                   "depth > 2 ORDER BY 1", "(SELECT 1) = 1"])
def test_a_refused_where_leaves_the_warehouse_as_it_was(warehouse, where):
    """fgm-measure wrote measure_definitions, then refused the predicate."""
    before = warehouse.read_bytes()
    assert count(warehouse, "measure_definitions") == 0
    out = CliRunner().invoke(measure_cli, ["--db", str(warehouse), "--where", where,
                                           "--device", "cpu"])
    assert out.exit_code == 1, out.output
    assert out.output.startswith(f"Error: --where {where!r}: ")
    assert warehouse.read_bytes() == before
    # the library refuses before its first write as well
    with pytest.raises(FgmError, match="--where"):
        measure_models(warehouse, where=where)
    assert count(warehouse, "measure_definitions") == 0


# --------------------------------------------------------------------------- fgm-query

@pytest.mark.parametrize("args,message", [
    (["psi", "-m", "m", "--ci", "nan"], "Invalid value for '--ci': 'nan' is not a finite "
     "number; expected 0<x<1"),
    (["psi", "-m", "m", "--ci", "inf"], "Invalid value for '--ci': 'inf' is not a finite"),
    (["cmi", "-m", "m", "--ci", "nan"], "Invalid value for '--ci': 'nan'"),
    (["psi", "-m", "m", "--ci", "0.9", "--seed", "-1"],
     "Invalid value for '--seed': -1 is not in the range 0<=x<=2147483647"),
    (["psi", "-m", "m", "--seed", "2147483648"], "Invalid value for '--seed': 2147483648"),
    (["psi", "-m", "m", "--ci", "0.9", "--blocks", "100000"],
     "Invalid value for '--blocks': 100000 is not in the range 5<=x<=10000"),
    (["oracle", "--eps", "nan"], "Invalid value for '--eps': 'nan' is not a finite number; "
     "expected 0<x<=1.0"),
    (["oracle", "--eps", "inf"], "Invalid value for '--eps': 'inf' is not a finite number"),
    (["oracle", "--eps", "1e300"], "Invalid value for '--eps': 1e+300 is not in the range"),
    (["oracle", "--eps", "0.05", "--draws", "10001"],
     "Invalid value for '--draws': 10001 is not in the range 2<=x<=10000"),
    (["table", "--kind", "cmi", "--draws", "10001"], "Invalid value for '--draws'"),
    (["robust", "-m", "m", "--min-ess", "nan"], "Invalid value for '--min-ess': 'nan' is not "
     "a finite number; expected 0<=x<=1000000.0"),
    (["robust", "-m", "m", "--min-ess", "inf"], "Invalid value for '--min-ess': 'inf'"),
    (["robust", "-m", "m", "--test-size", "100000000000"],
     "Invalid value for '--test-size': 100000000000 is not in the range 1<=x<=1000000000"),
])
def test_query_options_refuse_non_finite_and_out_of_range_values(warehouse, args, message):
    out = CliRunner().invoke(query, [*args, "--db", str(warehouse)])
    assert out.exit_code == 2, out.output
    assert message in out.output
    assert count(warehouse, "evaluations") == 0      # nothing computed, nothing stored


@pytest.mark.parametrize("name", ["a-file", "/dev/null", "", "a-file/inside"])
def test_report_and_plot_out_must_be_a_directory(warehouse, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)        # where --out '' wrote the report
    (tmp_path / "a-file").write_text("keep me")
    for command in (["report", "--draws", "2"], ["plot", "-m", "m", "--color", "depth"]):
        out = CliRunner().invoke(query, [*command, "--out", name, "--db", str(warehouse)])
        assert out.exit_code == 2, out.output
        assert "--out must be a directory" in out.output and "Traceback" not in out.output
    assert (tmp_path / "a-file").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "w.duckdb"]


def test_compare_says_a_constant_side_has_no_rank_correlation(db):
    """Every measure of this warehouse is the gap itself: its Ψ, τ and K are the same
    for all of them. scipy's ConstantInputWarning went to stderr as it was."""
    rows = []
    for i, (d, w) in enumerate((d, w) for d in (2, 4, 8) for w in (16, 32, 64)):
        gap = 0.1 + 0.01 * i
        rows.append({"model_id": f"m{i}", "hp.depth": d, "hp.width": w, "gen.gap": gap,
                     **{f"complexity.{m}": gap for m in ("path_norm", "spectral_orig",
                                                         "sharpness_flatness", "vc_dim")}})
    build_warehouse(db, pl.DataFrame(rows), dataset="cifar10")
    script = "from fgm.analysis.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", script, "compare", "--paper", "--db", str(db)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr and "ConstantInput" not in proc.stderr, proc.stderr
    for name in ("Ψ", "τ", "K"):
        assert (f"no rank correlation of {name}: undefined, as this warehouse's {name} is "
                f"the same for all 4 measures") in proc.stdout
    proc = subprocess.run([sys.executable, "-c", script, "compare", "--paper", "--db", str(db),
                           "--format", "json"], capture_output=True, text=True, timeout=300)
    assert "Warning" not in proc.stderr, proc.stderr
    psi = json.loads(proc.stdout)["rank_correlation"]["Psi"]
    assert psi == {"n": 4, "spearman": None, "kendall": None, "constant": "this warehouse's"}
