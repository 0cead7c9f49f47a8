"""The PGDL competition's format read without TensorFlow (issue #23): TFRecord
shards of serialized tensors, and Keras Sequential configs with their HDF5
weights converted to PyTorch. tests/pgdl/fixture was written by the real
TensorFlow and tf-keras (tests/pgdl/make_fixture.py); every converted model's
logits must equal Keras's own to 1e-5."""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fgm.ingest.keras import KerasSequential
from fgm.ingest.tfrecord import read_examples
from fgm.warehouse import FgmError

FIXTURE = Path(__file__).parent / "pgdl" / "fixture"
TASK = FIXTURE / "input_data" / "task_tiny"
SHARD = TASK / "dataset_1" / "train" / "shard_1.tfrecord"


def shard_arrays(path=SHARD):
    ex = read_examples(path, ("inputs", "output"))
    return np.stack([e["inputs"] for e in ex]), np.stack([e["output"] for e in ex])


def converted(k: int, weights: str = "weights.hdf5") -> KerasSequential:
    cfg = json.loads((TASK / f"model_{k}" / "config.json").read_text())
    model = KerasSequential(cfg["model_config"], cfg["input_shape"])
    model.load_state_dict(model.keras_state_dict(TASK / f"model_{k}" / weights), strict=True)
    return model.eval()


def test_the_shard_reads_as_tensorflow_wrote_it():
    x, y = shard_arrays()
    assert x.shape == (64, 9, 12, 3) and x.dtype == np.float32
    assert y.shape == (64,) and y.dtype == np.int32 and 0 <= y.min() and y.max() < 10
    assert 0 <= x.min() and x.max() < 1       # the generator's uniform floats


@pytest.mark.parametrize("k", range(4))
def test_converted_models_give_keras_logits(k):
    x, _ = shard_arrays()
    want = np.load(FIXTURE / "keras_logits.npz")[f"model_{k}"]
    with torch.no_grad():
        got = converted(k)(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert got.shape == want.shape == (64, 10)
    assert np.abs(got - want).max() <= 1e-5, np.abs(got - want).max()
    assert np.abs(want).max() > 0.01          # not a trivially zero output


def test_same_padding_is_kerass_uneven_one():
    """9 x 12 input, 3x3 kernels, stride 2: 9 -> 5 with one row each side, 12 -> 6 with
    the one extra column on the right only (a ZeroPad2d before the convolution)."""
    layers = list(converted(0).layers)
    assert isinstance(layers[0], torch.nn.ZeroPad2d) and layers[0].padding == (0, 1, 1, 1)
    assert isinstance(layers[1], torch.nn.Conv2d) and layers[1].padding == (0, 0)


@pytest.mark.parametrize("layer,message", [
    ({"layer_name": "LSTM", "units": 3}, "layer 1: LSTM: a layer type the converter does not"),
    ({"layer_name": "Conv2D", "filters": 2, "kernel_size": 3, "padding": "causal"},
     "padding 'causal'"),
    ({"layer_name": "Conv2D", "filters": 2, "kernel_size": 3, "data_format": "channels_first"},
     "data_format 'channels_first'"),
    ({"layer_name": "Conv2D", "filters": 2.5, "kernel_size": 3}, "filters = 2.5"),
    ({"layer_name": "Dense", "units": 3, "activation": "softmax"}, "a softmax"),
    ({"layer_name": "Dense", "units": 3, "kernel_size": 2}, "kernel_size not handled"),
])
def test_what_the_converter_does_not_handle_is_named_with_the_layer(layer, message):
    config = [{"layer_name": "Flatten"}, layer, {"layer_name": "Dense", "units": 10}]
    if layer["layer_name"] == "Conv2D":
        config = [{"layer_name": "Conv2D", "filters": 2, "kernel_size": 1}, layer,
                  {"layer_name": "GlobalAveragePooling2D"}]
    with pytest.raises(FgmError) as err:
        KerasSequential(config, [8, 8, 3])
    assert message in str(err.value)


def test_weights_that_do_not_match_the_config_are_named(tmp_path):
    bad = tmp_path / "w.hdf5"
    shutil.copy(TASK / "model_2" / "weights.hdf5", bad)       # filters 4, not model_1's 8
    cfg = json.loads((TASK / "model_1" / "config.json").read_text())
    model = KerasSequential(cfg["model_config"], cfg["input_shape"])
    with pytest.raises(FgmError, match=r"layer 0 \(Conv2D, 'conv2d\w*'\): weight: shape "
                                       r"\(4, 3, 3, 3\) where the config gives \(8, 3, 3, 3\)"):
        model.keras_state_dict(bad)
    with h5py.File(bad, "r+") as f:
        names = list(f.attrs["layer_names"])
        f.attrs["layer_names"] = names[:-1]
    with pytest.raises(FgmError, match="13 layers, but the config has 14"):
        model.keras_state_dict(bad)
    cfg = json.loads((TASK / "model_0" / "config.json").read_text())
    model = KerasSequential(cfg["model_config"], cfg["input_shape"])
    shutil.copy(TASK / "model_0" / "weights.hdf5", bad)
    with h5py.File(bad, "r+") as f:
        f["dense_1"]["dense_1"]["kernel:0"][0, 0] = np.nan
    with pytest.raises(FgmError, match=r"layer 11 \(Dense, 'dense_1'\): kernel: not finite"):
        model.keras_state_dict(bad)


def test_a_truncated_or_corrupt_shard_names_the_record(tmp_path):
    blob = SHARD.read_bytes()
    cut = tmp_path / "cut.tfrecord"
    cut.write_bytes(blob[:len(blob) - 100])
    with pytest.raises(FgmError, match=r"cut.tfrecord, record 63 .*truncated"):
        read_examples(cut, ("inputs", "output"))
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    bad = tmp_path / "bad.tfrecord"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(FgmError, match=r"bad.tfrecord, record \d+ .*checksum does not match"):
        read_examples(bad, ("inputs", "output"))
    with pytest.raises(FgmError, match="no feature label"):
        read_examples(SHARD, ("inputs", "label"))


# --------------------------------------------------------------------------- fgm-ingest pgdl

REFERENCE = FIXTURE / "reference_data" / "task_tiny" / "model_configs.json"


def run(cli, *args):
    from click.testing import CliRunner
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_a_task_goes_through_ingest_measure_and_the_pgdl_scorer(tmp_path):
    from fgm.analysis.cli import main as query
    from fgm.ingest.cli import main as ingest
    from fgm.measures.cli import main as measure
    from fgm.warehouse import connect
    db = tmp_path / "w.duckdb"
    out = run(ingest, "pgdl", TASK, "--reference", REFERENCE, "--db", db)
    assert out.exit_code == 0 and "4 models (4 added" in out.output, out.output
    con = connect(db, read_only=True)
    models = con.sql("SELECT m.model_id, s.name FROM models AS m JOIN sweeps AS s "
                     "USING (sweep_id) ORDER BY 1").fetchall()
    levels = con.sql("SELECT model_id, axis, level, value_text FROM hyperparameters "
                     "WHERE axis = 'head' ORDER BY 1").fetchall()
    gaps = dict(con.sql("SELECT model_id, gap FROM outcomes").fetchall())
    roles = con.sql("SELECT role, count(*) FROM checkpoints GROUP BY ALL ORDER BY 1").fetchall()
    con.close()
    assert models == [(f"task_tiny/model_{k}", "task_tiny") for k in range(4)]
    assert [r[2:] for r in levels] == [(0, "dense")] * 3 + [(1, "gap")]
    ref = json.loads(REFERENCE.read_text())
    for k in range(4):
        m = ref[f"model_{k}"]["metrics"]
        assert gaps[f"task_tiny/model_{k}"] == pytest.approx(m["train_acc"] - m["test_acc"])
    assert roles == [("final", 4), ("init", 4)]
    out = run(measure, "--measures", "cross_entropy,param_norm,frobenius_distance,"
              "spectral_orig", "--budget", "fast", "--db", db)
    assert out.exit_code == 0 and "4 models" in out.output, out.output
    con = connect(db, read_only=True)
    status = dict(con.sql("SELECT model_id || ' ' || measure, status FROM measures").fetchall())
    ce = con.sql("SELECT value FROM measures WHERE measure = 'cross_entropy' AND "
                 "model_id = 'task_tiny/model_1'").fetchall()[0][0]
    con.close()
    # model_0's BatchNorms follow ReLUs (they do not fold): measures on w do not apply
    assert status["task_tiny/model_0 param_norm"] == "not_applicable"
    assert status["task_tiny/model_1 param_norm"] == "ok"
    assert status["task_tiny/model_1 frobenius_distance"] == "ok"   # weights_init.hdf5
    x, y = shard_arrays()
    logits = torch.from_numpy(np.load(FIXTURE / "keras_logits.npz")["model_1"]).double()
    want = float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(y).long()))
    assert ce == pytest.approx(want, rel=1e-5)       # Keras's own logits, on the shard
    table = run(query, "table", "--pgdl", "--all-models", "--no-store", "--format", "json",
                "--db", db)
    cmi = run(query, "cmi", "-m", "cross_entropy", "--pgdl", "--all-models", "--no-store",
              "--format", "json", "--db", db)
    assert table.exit_code == 0 and cmi.exit_code == 0, table.output + cmi.output
    row = next(r for r in json.loads(table.output) if r["measure"] == "cross_entropy")
    assert row["K"] == json.loads(cmi.output)["K"] and row["K"] is not None
    assert not any(r["kind"] == "oracle" for r in json.loads(table.output))
    # published scores beside fgm's (a user's CSV), in the unit they are given in
    scores = tmp_path / "published.csv"
    scores.write_text("measure,task,score\ncross_entropy,task_tiny,12.5\n"
                      "vc_dim,task_tiny,3\ncross_entropy,task_other,1\n")
    out = run(query, "compare", "--pgdl-scores", scores, "--scores-unit", "percent",
              "--all-models", "--format", "json", "--db", db)
    assert out.exit_code == 0, out.output
    got = {(r["measure"], r["task"]): r for r in json.loads(out.output)}
    ce = got[("cross_entropy", "task_tiny")]
    assert ce["fgm"] == pytest.approx(100 * row["K"]) and ce["published"] == 12.5
    assert ce["difference"] == pytest.approx(ce["fgm"] - 12.5) and ce["n_models"] == 4
    assert got[("vc_dim", "task_tiny")]["fgm"] is None and "fgm-measure" in \
        got[("vc_dim", "task_tiny")]["note"]
    assert "no sweep of this name" in got[("cross_entropy", "task_other")]["note"]
    out = run(query, "compare", "--pgdl-scores", scores, "--db", db)
    assert out.exit_code != 0 and "--scores-unit fraction|percent" in out.output
    scores.write_text("measure,task,score\ncross_entropy,task_tiny,high\n")
    out = run(query, "compare", "--pgdl-scores", scores, "--scores-unit", "fraction",
              "--db", db)
    assert out.exit_code == 1 and "row 1, column 'score': expected a number, found 'high'" \
        in out.output, out.output


def _task_copy(tmp_path) -> Path:
    return Path(shutil.copytree(TASK, tmp_path / "task_tiny"))


@pytest.mark.parametrize("case,expected", [
    ("unsupported layer", "SKIPPED model_2: layer 4: LSTM: a layer type the converter"),
    ("weights of another model", "SKIPPED model_1: "),
    ("no weights", "SKIPPED model_3: no weights.hdf5"),
    ("non-finite weight", "SKIPPED model_2: "),
    ("another input shape", "SKIPPED model_3: input_shape [10, 13, 3], but the task's "
                            "images are [9, 12, 3]"),
    ("a missing argument", "SKIPPED model_2: layer 13 (Dense): no units"),
    ("a zero stride", "SKIPPED model_1: layer 0 (Conv2D): strides = 0"),
    ("float16", "SKIPPED model_1: layer 1 (BatchNormalization): dtype 'float16'"),
    ("a bad initial weights file", "SKIPPED model_2: "),
])
def test_a_model_that_cannot_be_read_is_named_and_the_others_go_in(tmp_path, case, expected):
    from fgm.ingest.cli import main as ingest
    task = _task_copy(tmp_path)
    if case == "unsupported layer":
        cfg = json.loads((task / "model_2" / "config.json").read_text())
        cfg["model_config"][4] = {"layer_name": "LSTM", "units": 3}
        (task / "model_2" / "config.json").write_text(json.dumps(cfg))
    elif case == "weights of another model":
        shutil.copy(task / "model_2" / "weights.hdf5", task / "model_1" / "weights.hdf5")
    elif case == "no weights":
        (task / "model_3" / "weights.hdf5").unlink()
    elif case in ("another input shape", "a missing argument", "a zero stride", "float16"):
        k = {"another input shape": 3, "a missing argument": 2}.get(case, 1)
        cfg = json.loads((task / f"model_{k}" / "config.json").read_text())
        if case == "another input shape":
            cfg["input_shape"] = [10, 13, 3]
        elif case == "a missing argument":
            del cfg["model_config"][-1]["units"]
        elif case == "a zero stride":
            cfg["model_config"][0]["strides"] = 0
        else:
            cfg["model_config"][1]["dtype"] = "float16"
        (task / f"model_{k}" / "config.json").write_text(json.dumps(cfg))
    elif case == "a bad initial weights file":
        shutil.copy(task / "model_3" / "weights.hdf5", task / "model_2" / "weights_init.hdf5")
    else:
        with h5py.File(task / "model_2" / "weights.hdf5", "r+") as f:
            name = [n for n in f.attrs["layer_names"] if str(n).startswith("conv2d")][0]
            kernel = [w for w in f[name].attrs["weight_names"] if "kernel" in str(w)][0]
            f[name][kernel][0, 0, 0, 0] = np.inf
    out = run(ingest, "pgdl", task, "--reference", REFERENCE, "--db", tmp_path / "w.duckdb")
    assert out.exit_code == 1 and "3 models (3 added" in out.output, out.output   # the rest in
    assert expected in out.output, out.output


def test_a_reference_that_does_not_match_or_a_corrupt_shard_writes_nothing(tmp_path):
    from fgm.ingest.cli import main as ingest
    task = _task_copy(tmp_path)
    ref = json.loads(REFERENCE.read_text())
    ref["model_9"] = ref.pop("model_3")
    bad_ref = tmp_path / "model_configs.json"
    bad_ref.write_text(json.dumps(ref))
    db = tmp_path / "w.duckdb"
    out = run(ingest, "pgdl", task, "--reference", bad_ref, "--db", db)
    assert out.exit_code == 1 and "folders without an entry: model_3" in out.output
    assert "entries without a folder: model_9" in out.output and not db.exists()
    shard = task / "dataset_1" / "train" / "shard_1.tfrecord"
    shard.write_bytes(shard.read_bytes()[:-50])
    out = run(ingest, "pgdl", task, "--reference", REFERENCE, "--db", db)
    assert out.exit_code == 1 and "shard_1.tfrecord, record 63" in out.output, out.output
    assert not db.exists()


def test_the_warehouse_finds_the_task_from_any_folder(tmp_path, monkeypatch):
    """A task ingested by a relative path: its shards and weights are stored by
    absolute path, so fgm-measure run from elsewhere still reads them."""
    from fgm.ingest.cli import main as ingest
    from fgm.measures.cli import main as measure
    shutil.copytree(TASK, tmp_path / "here" / "task_tiny")
    monkeypatch.chdir(tmp_path / "here")
    db = tmp_path / "w.duckdb"
    out = run(ingest, "pgdl", "task_tiny", "--reference", REFERENCE, "--db", db)
    assert out.exit_code == 0, out.output
    monkeypatch.chdir(tmp_path)
    out = run(measure, "--measures", "cross_entropy", "--db", db)
    assert out.exit_code == 0 and "4 models, 4 values computed" in out.output, out.output
