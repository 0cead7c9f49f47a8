"""Training: the NiN, the grid files, the loop's stop rule, bundles, resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import SHARED
from torch import nn

from fgm.ingest.bundles import find_bundles, ingest_tree
from fgm.ingest.cli import main as ingest_cli
from fgm.train.bundle import sha256_file
from fgm.train.cli import main as train_cli
from fgm.train.data import Data, load_digits
from fgm.train.grid import Config, load_grid, override, parse_grid
from fgm.train.loop import lr_at, train_one
from fgm.train.nin import NiN
from fgm.warehouse import FgmError, connect

FAST = {"stop_cross_entropy": 0.01, "max_steps": 2000, "lr_drop_steps": [1500],
        "lr_drop_factor": 0.1, "estimate_batches": 10, "trace_every": 10}


def tiny_data(n_train=120, n_test=60) -> Data:
    d = load_digits()
    return Data("digits", d.x_train[:n_train], d.y_train[:n_train], d.x_test[:n_test],
                d.y_test[:n_test], 10, dict(d.info, train_size=n_train, test_size=n_test))


def config(width=16, depth=2, batch=32, opt="adam", lr=3e-3, dropout=0.0, wd=0.0) -> Config:
    values = {"width": width, "depth": depth, "dropout": dropout, "batch_size": batch,
              "optimizer": opt, "learning_rate": lr, "weight_decay": wd}
    return Config(values, {a: 0 for a in values})


# --------------------------------------------------------------------------- NiN

@pytest.mark.parametrize("c_in,classes,width,depth,size", [
    (3, 10, 8, 1, 32), (3, 10, 16, 2, 32), (1, 10, 24, 4, 8), (3, 100, 12, 8, 32),
    (1, 7, 5, 3, 28)])
def test_nin_shapes_and_parameter_count(c_in, classes, width, depth, size):
    model = NiN(c_in, classes, width, depth)
    out = model(torch.randn(2, c_in, size, size))
    assert out.shape == (2, classes)
    # by hand: per block a 3x3 conv (c_in*w*9 + w) and two 1x1 convs (w*w + w each),
    # three BatchNorms (2w each); then the 1x1 classifier (w*classes + classes)
    ref = 0
    c = c_in
    for _ in range(depth):
        ref += c * width * 9 + width + 2 * (width * width + width) + 3 * 2 * width
        c = width
    ref += width * classes + classes
    assert sum(p.numel() for p in model.parameters()) == ref


def test_nin_layer_order_batchnorm_after_every_conv_and_no_activation_on_logits():
    model = NiN(3, 10, 8, 2, dropout=0.25)
    mods = list(model.features)
    assert len(mods) == 2 * (3 * 3 + 1)
    for b in range(2):
        block = mods[b * 10:(b + 1) * 10]
        kinds = [type(m) for m in block]
        assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 3 + [nn.Dropout]
        assert block[0].kernel_size == (3, 3) and block[0].stride == (2, 2)
        assert block[3].kernel_size == (1, 1) and block[6].kernel_size == (1, 1)
        assert block[9].p == 0.25
    assert isinstance(model.classifier, nn.Conv2d) and model.classifier.kernel_size == (1, 1)
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        nn.init.normal_(model.classifier.bias, -5.0, 0.1)
        logits = model(torch.randn(16, 3, 32, 32))
    assert (logits < 0).any(), "logits must be able to go negative (no ReLU before pooling)"


# --------------------------------------------------------------------------- grids

def test_presets_expand_to_the_papers_grid_and_the_demo():
    paper = load_grid("paper").configs()
    assert len(paper) == 3 ** 7
    sgd = {c.values["learning_rate"]: c.levels["learning_rate"] for c in paper
           if c.values["optimizer"] == "sgd"}
    adam = {c.values["learning_rate"]: c.levels["learning_rate"] for c in paper
            if c.values["optimizer"] == "adam"}
    assert sgd == {0.01: 0, 0.032: 1, 0.1: 2} and adam == {1e-4: 0, 3.2e-4: 1, 1e-3: 2}
    rms_wd = {c.values["weight_decay"] for c in paper if c.values["optimizer"] == "rmsprop"}
    assert rms_wd == {0.0, 1e-4, 3e-4}
    demo = load_grid("demo")
    varied = [a for a in demo.axes if isinstance(demo.axes[a], list) and len(demo.axes[a]) == 3]
    assert len(demo.configs()) >= 27 and len(varied) >= 3 and demo.dataset == "digits"


@pytest.mark.parametrize("text,message", [
    ("[axes]\nwidth = [8]\n", "axes.depth: missing"),
    ("[axes]\nwidth = [8]\ndepth=[1]\ndropout=[0.0]\nbatch_size=[8]\noptimizer=['lbfgs']\n"
     "learning_rate=[0.1]\nweight_decay=[0.0]\n", "axes.optimizer: 'lbfgs' is not allowed; "
     "expected names among sgd, adam, rmsprop"),
    ("[axes]\nwidth = [-8]\n", "axes.width: -8 is not allowed; expected positive integers"),
    ("[axes]\ncolour = [1]\n", "axes.colour: unknown axis"),
    ("[train]\nmax_step = 3\n[axes]\n", "train.max_step: unknown setting; settings are stop_cross_entropy"),
    ("[axes\n", "not valid TOML"),
])
def test_bad_grid_file_names_key_and_allowed_values(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(FgmError, match="bad.toml") as err:
        load_grid(path=path)
    assert message in str(err.value)


def test_per_optimizer_table_must_cover_every_optimizer():
    axes = {"width": [8], "depth": [1], "dropout": [0.0], "batch_size": [8],
            "optimizer": ["sgd", "adam"], "learning_rate": {"sgd": [0.1]}, "weight_decay": [0.0]}
    with pytest.raises(FgmError, match="axes.learning_rate: no values for optimizer 'adam'"):
        parse_grid({"axes": axes})


def test_cli_override_of_an_axis():
    g = override(load_grid("demo"), ["width=8,16", "optimizer=sgd,adam"])
    assert g.axes["width"] == [8, 16] and {c.values["optimizer"] for c in g.configs()} == {
        "sgd", "adam"}


# --------------------------------------------------------------------------- loop

def test_lr_schedule():
    assert [lr_at(s, 0.1, [3, 5], 0.1) for s in range(7)] == pytest.approx(
        [0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    r = train_one(config(lr=1e-3), tiny_data(), dict(FAST, lr_drop_steps=[20, 40],
                                                     stop_cross_entropy=1e-9, max_steps=50),
                  0, torch.device("cpu"))
    lrs = {p["step"]: p["lr"] for p in r.trace}
    assert lrs[10] == pytest.approx(1e-3) and lrs[30] == pytest.approx(1e-4)
    assert lrs[50] == pytest.approx(1e-5)
    assert not r.outcome["converged"] and r.outcome["steps"] == 50


def test_stop_rule_confirms_on_the_full_training_set():
    data = tiny_data()
    r = train_one(config(), data, FAST, 0, torch.device("cpu"))
    o = r.outcome
    assert o["converged"] and o["steps"] < FAST["max_steps"]
    assert o["train_loss"] <= FAST["stop_cross_entropy"]
    r.model.eval()
    with torch.no_grad():
        ce = nn.functional.cross_entropy(r.model(data.x_train), data.y_train).item()
    assert ce == pytest.approx(o["train_loss"], rel=1e-5)
    assert o["steps_to_0.1"] < o["steps"]
    assert o["steps_0.1_to_0.01"] == o["steps"] - o["steps_to_0.1"]
    assert o["gap"] == pytest.approx(o["train_acc"] - o["test_acc"])
    # the three checkpoints differ: training happened after epoch 1
    k = "classifier.weight"
    assert not torch.equal(r.init_state[k], r.epoch1_state[k])
    assert not torch.equal(r.epoch1_state[k], r.final_state[k])


def test_same_config_and_seed_give_the_same_final_checkpoint(tmp_path, grid_file):
    args = ["grid", "--grid", str(grid_file), "--set", "width=24", "--set", "depth=2",
            "--no-ingest", "--device", "cpu"]
    hashes = []
    for run in ("a", "b"):
        out = CliRunner().invoke(train_cli, [*args, "--out", str(tmp_path / run)])
        assert out.exit_code == 0, out.output
        (bundle,) = find_bundles(tmp_path / run)
        hashes.append(sha256_file(bundle / "final.safetensors"))
    assert hashes[0] == hashes[1]


# --------------------------------------------------------------------------- bundles

@pytest.fixture(scope="module")
def trained(tmp_path_factory, grid_file):
    root = tmp_path_factory.mktemp("runs")
    out = CliRunner().invoke(train_cli, ["grid", "--grid", str(grid_file), "--set", "width=24",
                                         "--out", str(root / "runs"),
                                         "--db", str(root / "w.duckdb"), "--device", "cpu"])
    assert out.exit_code == 0, out.output
    return root


def test_bundle_to_warehouse_round_trip(trained):
    bundles = find_bundles(trained / "runs")
    assert len(bundles) == 2
    con = connect(trained / "w.duckdb", read_only=True)
    try:
        for b in bundles:
            m = json.loads((b / "manifest.json").read_text())
            mid = m["model_id"]
            o = con.sql("SELECT train_acc, test_acc, gap, converged, steps, train_size "
                        "FROM outcomes WHERE model_id = ?", params=[mid]).fetchall()[0]
            assert o == (m["outcome"]["train_acc"], m["outcome"]["test_acc"],
                         m["outcome"]["gap"], m["outcome"]["converged"], m["outcome"]["steps"],
                         m["dataset"]["train_size"])
            hp = dict(con.sql("SELECT axis, level FROM hyperparameters WHERE model_id = ?",
                              params=[mid]).fetchall())
            assert hp == {h["axis"]: h["level"] for h in m["hyperparameters"]}
            ck = dict(con.sql("SELECT role, sha256 FROM checkpoints WHERE model_id = ?",
                              params=[mid]).fetchall())
            assert ck == {r: sha256_file(b / f"{r}.safetensors") for r in ck}
            meas = dict(con.sql("SELECT measure, value FROM measures WHERE model_id = ?",
                                params=[mid]).fetchall())
            assert meas["cross_entropy"] == m["outcome"]["train_loss"]
            assert meas["steps_to_0.1_loss"] == m["outcome"]["steps_to_0.1"]
            n_trace = con.sql("SELECT count(*) FROM traces WHERE model_id = ?",
                              params=[mid]).fetchall()[0][0]
            assert n_trace > 3
    finally:
        con.close()


def test_reingest_is_a_no_op_and_corrupt_bundles_are_reported(trained, tmp_path):
    import shutil
    runs = tmp_path / "runs"
    shutil.copytree(trained / "runs", runs)
    db = tmp_path / "w.duckdb"
    first = CliRunner().invoke(ingest_cli, [str(runs), "--db", str(db)])
    assert first.exit_code == 0 and "2 added" in first.output
    again = CliRunner().invoke(ingest_cli, [str(runs), "--db", str(db)])
    assert "0 added, 0 updated, 2 unchanged" in again.output
    good, bad = find_bundles(runs)
    for extra in ("trunc", "json", "orphan"):
        shutil.copytree(good, runs / extra)
    ck = runs / "trunc" / "final.safetensors"
    ck.write_bytes(ck.read_bytes()[:100])
    (runs / "json" / "manifest.json").write_text('{"format": "fgm-run')
    (runs / "orphan" / "manifest.json").unlink()
    shutil.rmtree(bad)
    out = CliRunner().invoke(ingest_cli, [str(runs), "--db", str(db)])
    assert out.exit_code == 1
    assert f"{runs / 'trunc' / 'final.safetensors'}: truncated or corrupt" in out.output
    assert f"{runs / 'json' / 'manifest.json'}: truncated or corrupt JSON" in out.output
    assert f"{runs / 'orphan'}: checkpoints without a manifest.json" in out.output
    assert "1 unchanged), 3 failed" in out.output


def test_resume_after_kill_9_loses_at_most_the_model_in_training(tmp_path, grid_file):
    out, db = tmp_path / "runs", tmp_path / "w.duckdb"
    cmd = [sys.executable, "-m", "fgm.train.cli", "grid", "--grid", str(grid_file),
           "--out", str(out), "--db", str(db), "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    # Wait for an observable state, however loaded the machine: the first finished
    # bundle (its manifest.json, renamed into place whole). No fixed sleep decides it.
    deadline = time.monotonic() + 900
    try:
        while not (out.exists() and find_bundles(out)):
            assert proc.poll() is None, f"the grid run exited ({proc.returncode}) early"
            assert time.monotonic() < deadline, "no bundle finished within 15 minutes"
            time.sleep(0.02)   # a poll interval, not a wait for anything
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = find_bundles(out)
    # the next three models (and the first one's measures) take seconds; the poll, 20 ms
    assert 1 <= len(done_before) < 4, "the kill should land mid-grid"
    con = connect(db)
    tree = ingest_tree(con, out)   # whatever was left is never accepted half-written
    con.close()
    assert not tree.failed
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done_before)} already finished" in rerun.stderr
    assert len(find_bundles(out)) == 4 and not list(out.glob(".*tmp*"))
    con = connect(db, read_only=True)
    assert con.sql("SELECT count(*) FROM models").fetchall() == [(4,)]
    con.close()
    quick = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert "4 already finished, 0 to train" in quick.stderr


def test_progress_is_plain_lines_without_a_terminal(trained, grid_file):
    out = CliRunner().invoke(train_cli, ["grid", "--grid", str(grid_file), "--set", "width=24",
                                         "--out", str(trained / "runs"),
                                         "--db", str(trained / "w.duckdb")])
    assert out.exit_code == 0 and "2 already finished, 0 to train" in out.output
    assert "\x1b[" not in out.output


def test_a_model_that_does_not_converge_is_kept_and_flagged(tmp_path):
    r = train_one(config(lr=1e-5), tiny_data(), dict(FAST, max_steps=30), 0,
                  torch.device("cpu"))
    assert not r.outcome["converged"] and r.outcome["steps"] == 30
    assert r.outcome["steps_0.1_to_0.01"] is None


def test_unknown_device_request_is_clear():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = CliRunner().invoke(train_cli, ["grid", "--device", "cuda", "--out", "x"])
    assert out.exit_code == 1 and "no CUDA device" in out.output




def test_cifar10_small_preset_is_the_papers_grid_cut():
    """Seven axes, two levels each; every value but width and depth one of the
    paper's (SPEC §3), and levels ordered as the paper's."""
    small, paper = load_grid("cifar10-small"), load_grid("paper")
    configs = small.configs()
    assert len(configs) == 2 ** 7 and small.dataset == "cifar10"
    for axis in ("width", "depth", "dropout", "batch_size", "optimizer", "learning_rate",
                 "weight_decay"):
        assert len({c.levels[axis] for c in configs}) == 2, axis
    for axis in ("dropout", "batch_size", "optimizer"):
        assert set(small.axes[axis]) <= set(paper.axes[axis]), axis
    for axis in ("learning_rate", "weight_decay"):
        for opt in small.axes["optimizer"]:
            assert set(small.axes[axis][opt]) <= set(paper.axes[axis][opt]), (axis, opt)
    sgd_lr = {c.values["learning_rate"]: c.levels["learning_rate"] for c in configs
              if c.values["optimizer"] == "sgd"}
    assert sgd_lr == {0.032: 0, 0.1: 1}
    assert max(small.axes["width"]) < min(paper.axes["width"])
    assert small.train["stop_cross_entropy"] == 0.01


# --------------------------------------------------------------------------- subsets, seeds

def test_a_grid_may_name_its_seeds_and_its_training_subset(tmp_path):
    text = (Path(__file__).parents[1] / "train" / "grids" / "demo.toml").read_text()
    path = tmp_path / "g.toml"
    path.write_text("seeds = [0, 1]\n" + text.replace("[train]", "[train]\ntrain_examples = 300"))
    g = load_grid(path=path)
    assert g.seeds == [0, 1] and g.train["train_examples"] == 300
    assert g.as_dict()["seeds"] == [0, 1] and override(g, ["width=8"]).seeds == [0, 1]
    # absent, the training hash (and so every model id) of a grid is what it was
    from fgm.warehouse.ids import training_hash
    assert training_hash(load_grid("demo").train) != training_hash(g.train)
    assert "train_examples" not in load_grid("demo").train
    for bad, message in (("seeds = [0, 0]\n", "seeds: [0, 0] is not allowed"),
                         ("seeds = [true]\n", "seeds: [True] is not allowed"),
                         ("seeds = [-1]\n", "seeds: [-1] is not allowed")):
        path.write_text(bad + text)
        with pytest.raises(FgmError, match="g.toml") as err:
            load_grid(path=path)
        assert message in str(err.value)
    path.write_text(text.replace("[train]", "[train]\ntrain_examples = 0"))
    with pytest.raises(FgmError, match="train.train_examples: 0 is not allowed"):
        load_grid(path=path)


def test_the_first_n_images_are_the_same_from_any_root(tmp_path):
    """A folder that holds only the first 1,000 CIFAR-10 training images, and the
    4,000-image subset: train_examples = 500 gives the same tensors from both (the
    normalisation is the first 500's own), as it would from a full download."""
    import pickle

    import numpy as np

    from fgm.train.data import first_examples, load_cifar10
    from fgm.train.tasks import DataSpec, load_data
    full = SHARED / "data" / "cifar10-subset"
    small = tmp_path / "cifar-10-batches-py"
    small.mkdir(parents=True)
    src = full / "cifar-10-batches-py"
    shutil.copy(src / "batches.meta", small)
    shutil.copy(src / "test_batch", small)
    with open(src / "data_batch_1", "rb") as f:
        first = pickle.load(f, encoding="bytes")
    with open(src / "data_batch_2", "rb") as f:
        second = pickle.load(f, encoding="bytes")
    images = np.concatenate([np.asarray(first[b"data"]), np.asarray(second[b"data"])])[:1000]
    labels = (list(first[b"labels"]) + list(second[b"labels"]))[:1000]
    for k in range(5):                          # the first 1,000 images, 200 a batch
        part = {b"data": images[200 * k:200 * (k + 1)], b"labels": labels[200 * k:200 * (k + 1)],
                b"batch_label": b"x", b"filenames": [b"f"] * 200}
        with open(small / f"data_batch_{k + 1}", "wb") as f:
            pickle.dump(part, f)
    with pytest.warns(UserWarning):
        a = load_data(DataSpec("cifar10", full, train_examples=500))
        b = first_examples(load_cifar10(tmp_path), 500)
    assert len(b.x_train) == 500 and a.info["train_size"] == 500
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert torch.equal(a.x_test, b.x_test)
    # normalised with the 500 images' own statistics, computed here from the pixels
    raw = torch.as_tensor(np.asarray(first[b"data"])[:500].reshape(500, 3, 32, 32)).double()
    want = (raw - raw.mean(dim=(0, 2, 3), keepdim=True)) / raw.std(dim=(0, 2, 3), keepdim=True)
    assert torch.allclose(a.x_train.double(), want, atol=1e-5)
    with pytest.raises(FgmError, match="train_examples = 1,001, but the training set here has "
                                       "1,000 images"), pytest.warns(UserWarning):
        first_examples(load_cifar10(tmp_path), 1001)


def test_measures_are_taken_on_the_first_n_images_the_model_trained_on(tmp_path):
    """A grid with train_examples = 200: its in-run measures, and fgm-measure's later
    on the full dataset, are both on those 200 images as the model saw them."""
    from fgm.measures.cli import main as measure_cli
    grid = tmp_path / "g.toml"
    grid.write_text('name = "sub"\ndataset = "digits"\n[axes]\nwidth = [16]\ndepth = [2]\n'
                    'dropout = [0.0]\nbatch_size = [32]\noptimizer = ["adam"]\n'
                    'learning_rate = [3e-3]\nweight_decay = [0.0]\n[train]\n'
                    'train_examples = 200\nmax_steps = 1500\nlr_drop_steps = [1200]\n'
                    'estimate_batches = 10\ntrace_every = 25\n')
    db = tmp_path / "w.duckdb"
    out = CliRunner().invoke(train_cli, ["grid", "--grid", str(grid), "--out",
                                         str(tmp_path / "runs"), "--db", str(db)])
    assert out.exit_code == 0, out.output
    con = connect(db, read_only=True)
    (mid, size), = con.sql("SELECT model_id, train_size FROM outcomes").fetchall()
    in_run = dict(con.sql("SELECT measure, value FROM measures WHERE measure IN "
                          "('cross_entropy', 'input_grad_norm', 'inverse_margin')").fetchall())
    path = con.sql("SELECT path FROM checkpoints WHERE role = 'final'").fetchall()[0][0]
    con.close()
    assert size == 200
    # the loss on the first 200 training digits, normalised with their own statistics
    d = load_digits()
    raw = d.raw[0][:200].to(torch.float32)
    x = (raw - raw.mean(dim=(0, 2, 3), keepdim=True)) / raw.std(dim=(0, 2, 3), keepdim=True)
    from safetensors.torch import load_file
    net = NiN(1, 10, 16, 2)
    net.load_state_dict(load_file(path))
    with torch.no_grad():
        ce = float(torch.nn.functional.cross_entropy(net.eval()(x).double(), d.y_train[:200]))
    assert in_run["cross_entropy"] == pytest.approx(ce, rel=1e-5)
    # (the grid's cross-entropy is the training loop's own evaluation; the others, the
    # measure job's, on the same 200 images in either run)
    again = CliRunner().invoke(measure_cli, ["--measures", "input_grad_norm,inverse_margin,"
                                             "cross_entropy", "--recompute", "--db", str(db)])
    assert again.exit_code == 0 and "1 models, 3 values computed" in again.output, again.output
    con = connect(db, read_only=True)
    later = dict(con.sql("SELECT measure, value FROM measures WHERE model_id = ?",
                         params=[mid]).fetchall())
    con.close()
    assert later["input_grad_norm"] == in_run["input_grad_norm"]
    assert later["inverse_margin"] == in_run["inverse_margin"]
    assert later["cross_entropy"] == pytest.approx(ce, rel=1e-5)


def test_cifar10_protocol_preset_keeps_the_protocol():
    """Issue #25's preset: every axis varies over two levels, two seeds, the stop rule
    the paper's, the first 500 training images; its values the paper's but for the
    sizes (width, depth) and dropout, which the preset's comments explain."""
    g, paper = load_grid("cifar10-protocol"), load_grid("paper")
    configs = g.configs()
    assert len(configs) == 2 ** 7 and g.seeds == [0, 1] and g.dataset == "cifar10"
    for axis in ("width", "depth", "dropout", "batch_size", "optimizer", "learning_rate",
                 "weight_decay"):
        assert len({c.levels[axis] for c in configs}) == 2, axis
    assert g.train["stop_cross_entropy"] == paper.train["stop_cross_entropy"] == 0.01
    assert g.train["train_examples"] == 500
    for axis in ("batch_size", "optimizer"):
        assert set(g.axes[axis]) <= set(paper.axes[axis]), axis
    for axis in ("learning_rate", "weight_decay"):
        for opt in g.axes["optimizer"]:
            assert set(g.axes[axis][opt]) <= set(paper.axes[axis][opt]), (axis, opt)
    assert max(g.train["lr_drop_steps"]) < g.train["max_steps"]
