"""fgm-train against hostile or careless input: grid files, grid sizes, and two runs
sharing one output directory."""

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from fgm.ingest.bundles import find_bundles
from fgm.train import cli as train_cli_module
from fgm.train import loop as train_loop_module
from fgm.train.bundle import clean_stale, manifest_for, sha256_file, write_bundle
from fgm.train.cli import main as train_cli
from fgm.train.grid import MAX_MODELS, load_grid, override, parse_grid
from fgm.warehouse import FgmError, connect

AXES = ("[axes]\nwidth = [8]\ndepth = [1]\ndropout = [0.0]\nbatch_size = [8]\n"
        "optimizer = ['sgd']\nlearning_rate = [0.1]\nweight_decay = [0.0]\n")


def grid_text(**replace) -> str:
    """AXES with `key = value` lines replaced (or added under [train] when prefixed
    train_)."""
    lines = AXES.splitlines()
    train = []
    for key, value in replace.items():
        if key.startswith("train_"):
            train.append(f"{key[6:]} = {value}")
            continue
        lines = [f"{key} = {value}" if line.split(" = ")[0] == key else line for line in lines]
    return "\n".join(lines) + "\n" + ("[train]\n" + "\n".join(train) + "\n" if train else "")


def bad(tmp_path, text: str | bytes) -> str:
    path = tmp_path / "bad.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(FgmError) as err:
        load_grid(path=path)
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    return message


# --------------------------------------------------------------------------- values

@pytest.mark.parametrize("key,value,message", [
    ("learning_rate", "[inf]", "axes.learning_rate: inf is not allowed; expected finite positive"),
    ("learning_rate", "[nan]", "axes.learning_rate: nan is not allowed"),
    ("learning_rate", "[true]", "axes.learning_rate: True is not allowed"),
    ("learning_rate", "{ sgd = [inf] }", "axes.learning_rate.sgd: inf is not allowed"),
    ("weight_decay", "[inf]", "axes.weight_decay: inf is not allowed; expected finite numbers >= 0"),
    ("weight_decay", "{ sgd = [false] }", "axes.weight_decay.sgd: False is not allowed"),
    ("dropout", "[false]", "axes.dropout: False is not allowed; expected finite numbers in [0, 1)"),
    ("width", "[true]", "axes.width: True is not allowed; expected positive integers up to 4096"),
    ("width", "[1e6]", "axes.width: 1000000.0 is not allowed; expected positive integers up to 4096"),
    ("width", "[1000000]", "axes.width: 1000000 is not allowed; expected positive integers up to 4096"),
    ("width", "[4097]", "axes.width: 4097 is not allowed"),
    ("depth", "[65]", "axes.depth: 65 is not allowed; expected positive integers up to 64"),
    ("batch_size", "[65537]", "axes.batch_size: 65537 is not allowed; expected positive integers up to 65536"),
    ("optimizer", "[true]", "axes.optimizer: True is not allowed"),
    ("train_stop_cross_entropy", "inf", "train.stop_cross_entropy: inf is not allowed; expected a finite positive number"),
    ("train_stop_cross_entropy", "true", "train.stop_cross_entropy: True is not allowed"),
    ("train_max_steps", "true", "train.max_steps: True is not allowed; expected a positive integer"),
    ("train_trace_every", "false", "train.trace_every: False is not allowed"),
    ("train_lr_drop_steps", "[true]", "train.lr_drop_steps: [True] is not allowed"),
    ("train_lr_drop_factor", "true", "train.lr_drop_factor: True is not allowed; expected a number in (0, 1]"),
    ("train_lr_drop_factor", "nan", "train.lr_drop_factor: nan is not allowed"),
])
def test_non_finite_and_boolean_values_are_refused(tmp_path, key, value, message):
    assert message in bad(tmp_path, grid_text(**{key: value}))


def test_the_largest_allowed_values_still_load(tmp_path):
    path = tmp_path / "big.toml"
    path.write_text(grid_text(width="[4096]", depth="[64]", batch_size="[65536]",
                              train_stop_cross_entropy="1e-300"))
    g = load_grid(path=path)
    assert g.axes["width"] == [4096] and g.train["stop_cross_entropy"] == 1e-300


# --------------------------------------------------------------------------- files

def test_a_directory_is_not_a_grid_file(tmp_path):
    with pytest.raises(FgmError, match=f"^{tmp_path}: is a directory; expected a grid file"):
        load_grid(path=tmp_path)


def test_a_file_that_is_not_utf8(tmp_path):
    message = bad(tmp_path, b"name = 'ok'\nwidth = '\xff\xfe'\n")
    assert "line 2: not UTF-8 text (byte 0xff)" in message


def test_deeply_nested_toml(tmp_path):
    message = bad(tmp_path, "a = " + "[" * 100_000)
    assert "nested too deeply" in message


@pytest.mark.parametrize("text,message", [
    ("train = 3\n" + AXES, "train: 3 is not allowed; expected a table [train]"),
    ("dataset = 3\n" + AXES, "dataset: 3 is not one of cifar10"),
    ("axes = [1]\n", "axes: missing table"),
])
def test_tables_of_the_wrong_kind(tmp_path, text, message):
    assert message in bad(tmp_path, text)


def test_bad_grid_files_through_the_cli_are_one_line(tmp_path):
    (tmp_path / "deep.toml").write_text("a = " + "[" * 100_000)
    (tmp_path / "latin1.toml").write_bytes(b"name = '\xe9'\n")
    for path in (tmp_path, tmp_path / "deep.toml", tmp_path / "latin1.toml"):
        out = CliRunner().invoke(train_cli, ["grid", "--grid", str(path), "--out",
                                             str(tmp_path / "runs"), "--no-ingest"])
        assert out.exit_code == 1 and "Traceback" not in out.output
        assert out.output.startswith(f"Error: {path}: ")


def test_set_with_deep_nesting_is_a_clear_error():
    with pytest.raises(FgmError, match="--set: axes.width"):
        override(load_grid("demo"), ["width=" + "[" * 100_000])


# --------------------------------------------------------------------------- sizes

def test_size_counts_per_optimizer_tables_without_building():
    assert load_grid("paper").size() == len(load_grid("paper").configs()) == 3 ** 7
    axes = {"width": [8, 16], "depth": [1], "dropout": [0.0, 0.5], "batch_size": [8],
            "optimizer": ["sgd", "adam"],
            "learning_rate": {"sgd": [0.1, 0.2, 0.3], "adam": [1e-3], "rmsprop": [1, 2]},
            "weight_decay": {"sgd": [0.0], "adam": [0.0, 1e-4], "rmsprop": [0.0]}}
    g = parse_grid({"axes": axes})
    assert g.size() == len(g.configs()) == 2 * 2 * (3 * 1 + 1 * 2)


HUGE = ["--set", "width=" + ",".join(map(str, range(1, 61))),
        "--set", "depth=" + ",".join(map(str, range(1, 61))),
        "--set", "batch_size=" + ",".join(map(str, range(1, 61))),
        "--set", "dropout=" + ",".join(f"{i / 100}" for i in range(60)),
        "--set", "optimizer=sgd,adam,rmsprop",
        "--set", "learning_rate=" + ",".join(f"{i / 1000}" for i in range(1, 11)),
        "--set", "weight_decay=" + ",".join(f"{i / 1000}" for i in range(10))]


def test_a_huge_grid_is_refused_before_it_is_built():
    g = override(load_grid("demo"), [HUGE[i + 1] for i in range(0, len(HUGE), 2)])
    assert g.size() == 60 ** 4 * 3 * 10 * 10 == 3_888_000_000
    with pytest.raises(FgmError, match="the grid has 3,888,000,000 models, more than the "
                                       "limit of 100,000; .* --yes"):
        g.configs()


def test_the_cli_refuses_a_huge_grid_at_once(tmp_path):
    """In a subprocess with a timeout: a grid built eagerly would hang, not fail."""
    cmd = [sys.executable, "-m", "fgm.train.cli", "grid", "--preset", "demo", *HUGE,
           "--out", str(tmp_path / "runs"), "--no-ingest", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "the grid has 3,888,000,000 models, more than the limit of 100,000" in out.stderr
    assert not (tmp_path / "runs").exists()


QUICK = "dataset = 'digits'\n" + grid_text(train_max_steps="3", train_estimate_batches="1",
                                            train_trace_every="1", train_lr_drop_steps="[2]")


def test_seeds_count_towards_the_limit_and_yes_lifts_it(tmp_path, monkeypatch):
    monkeypatch.setattr(train_cli_module, "MAX_MODELS", 2)
    grid = tmp_path / "one.toml"
    grid.write_text(QUICK)
    args = ["grid", "--grid", str(grid), "--seeds", "0,1,2",
            "--out", str(tmp_path / "runs"), "--no-ingest", "--device", "cpu"]
    refused = CliRunner().invoke(train_cli, args)
    assert refused.exit_code == 1
    assert "the grid has 3 models (1 configurations x 3 seeds), more than the limit of 2" \
        in refused.output
    done = CliRunner().invoke(train_cli, [*args, "--yes"])
    assert done.exit_code == 0, done.output
    assert len(find_bundles(tmp_path / "runs")) == 3
    assert MAX_MODELS == 100_000


# --------------------------------------------------------------------------- bundles

def _states(value: float) -> dict:
    t = {"w": torch.full((3,), value)}
    return {"init": t, "epoch1": t, "final": t}


TRACE = [{"step": 0, "epoch": 0.0, "train_loss": 1.0, "lr": 0.1, "seconds": 0.0}]


def test_a_finished_bundle_is_never_replaced(tmp_path):
    first = write_bundle(tmp_path, "m1", {"who": "first"}, _states(1.0), TRACE)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    second = write_bundle(tmp_path, "m1", {"who": "second"}, _states(2.0), TRACE)
    assert second == first
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert json.loads((first / "manifest.json").read_text())["who"] == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m1"]   # ours dropped, no temp


def test_something_unfinished_in_the_way_is_replaced(tmp_path):
    (tmp_path / "m1").mkdir()
    (tmp_path / "m1" / "final.safetensors").write_bytes(b"half")
    bundle = write_bundle(tmp_path, "m1", {"who": "us"}, _states(1.0), TRACE)
    assert json.loads((bundle / "manifest.json").read_text())["who"] == "us"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m1"]


def test_clean_stale_spares_the_temp_dirs_of_live_runs(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        names = [f".m1.tmp-{live.pid}", f".m2.tmp-{dead.pid}", f".m3.tmp-{os.getpid()}",
                 f".m4.tmp-{dead.pid}-aside", ".m5.tmp-notapid"]
        for name in names:
            (tmp_path / name).mkdir()
            (tmp_path / name / "init.safetensors").write_bytes(b"x")
        removed = clean_stale(tmp_path)
        assert sorted(p.name for p in removed) == [f".m2.tmp-{dead.pid}",
                                                   f".m4.tmp-{dead.pid}-aside"]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [f".m1.tmp-{live.pid}", f".m3.tmp-{os.getpid()}", ".m5.tmp-notapid"])
    finally:
        live.stdin.close()
        live.wait()
    assert [p.name for p in clean_stale(tmp_path)] == [f".m1.tmp-{live.pid}"]


def test_a_run_that_finishes_second_keeps_the_first_runs_bundle(tmp_path, monkeypatch):
    """Another run sharing --out finishes the same model while this one trains it: its
    bundle stays, ours is dropped, and the warehouse holds what is on disk."""
    out, db = tmp_path / "runs", tmp_path / "w.duckdb"
    grid_file = tmp_path / "quick.toml"
    grid_file.write_text(QUICK)
    real = train_loop_module.train_one
    rivals = {}

    def train_then_lose_the_race(config, data, train, seed, dev, on_step=None, **options):
        result = real(config, data, train, seed, dev, on_step=on_step, **options)
        from fgm.warehouse.ids import model_id_for, training_hash
        mid = model_id_for(config.hash, data.name, seed, training_hash(train))
        rival = {role: {k: v + 1 if v.is_floating_point() else v for k, v in s.items()}
                 for role, s in (("init", result.init_state), ("epoch1", result.epoch1_state),
                                 ("final", result.final_state))}
        manifest = manifest_for(
            load_grid(path=grid_file), config, seed, data, result, dev)
        bundle = write_bundle(out, mid, manifest, rival, result.trace)
        rivals[mid] = (bundle, sha256_file(bundle / "final.safetensors"))
        return result

    monkeypatch.setattr(train_loop_module, "train_one", train_then_lose_the_race)
    run = CliRunner().invoke(train_cli, ["grid", "--grid", str(grid_file), "--out", str(out),
                                         "--db", str(db), "--device", "cpu", "--no-measures"])
    assert run.exit_code == 0, run.output
    (bundle,) = find_bundles(out)
    ((rival_bundle, rival_final),) = rivals.values()
    assert rival_bundle == bundle
    assert sha256_file(bundle / "final.safetensors") == rival_final   # theirs, not ours
    on_disk = {r: sha256_file(bundle / f"{r}.safetensors") for r in ("init", "epoch1", "final")}
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {r: manifest["checkpoints"][r]["sha256"] for r in on_disk} == on_disk
    con = connect(db, read_only=True)
    try:
        stored = dict(con.sql("SELECT role, sha256 FROM checkpoints").fetchall())
    finally:
        con.close()
    assert stored == on_disk
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
