"""Bring your own models (issue #21): a results table whose rows name checkpoints of
networks fgm did not train, with a models.toml that says how to build them, goes
in with fgm-ingest --models, is measured by fgm-measure and ranked by fgm-query.

The zoo is the one `python -m fgm.ingest.example_zoo` writes (a ResNet with a
projection shortcut, a VGG with and without BatchNorm, an MLP, trained briefly on
scikit-learn's digits); the checks against it are computed here independently
(plain PyTorch on the npz file), never read back from fgm's own code.
"""

import csv
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from warehouse_fixture import dump

from fgm.ingest.cli import main as ingest
from fgm.ingest.example_zoo import make_zoo
from fgm.measures.cli import main as measure_cli
from fgm.warehouse import connect

CHEAP = "cross_entropy,num_params,param_norm,path_norm,frobenius_distance,grad_noise_*,steps_*"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    return make_zoo(tmp_path_factory.mktemp("zoo") / "zoo", steps=150, log=lambda *_: None)


@pytest.fixture
def copy(zoo, tmp_path) -> Path:
    """A copy of the zoo this test may change."""
    return Path(shutil.copytree(zoo, tmp_path / "zoo"))


def run(cli, *args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def rows(table: Path) -> list[dict]:
    with open(table, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(table: Path, data: list[dict]) -> None:
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(data[0]))
        w.writeheader()
        w.writerows(data)


def user_module(zoo: Path):
    """zoo.py imported here as a user would (not through fgm)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("user_zoo_for_test", zoo / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["user_zoo_for_test"] = module     # so that torch.save can pickle its classes
    spec.loader.exec_module(module)
    return module


def data(zoo: Path):
    """The training set as models.toml's preprocessing gives it, computed here."""
    import tomllib
    spec = tomllib.loads((zoo / "models.toml").read_text())["dataset"]["digits8"]
    z = np.load(zoo / "digits.npz")
    x = (z["x_train"].astype(np.float32) / 255 - np.float32(spec["mean"][0])) \
        / np.float32(spec["std"][0])
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.as_tensor(z["y_train"])


@pytest.fixture(scope="module")
def measured(zoo, tmp_path_factory):
    """The zoo ingested and its cheap measures computed: (warehouse, ingest output)."""
    db = tmp_path_factory.mktemp("wh") / "w.duckdb"
    out = run(ingest, zoo / "results.csv", "--models", zoo / "models.toml", "--db", db)
    assert out.exit_code == 0, out.output
    res = run(measure_cli, "--measures", CHEAP, "--budget", "fast", "--db", db)
    assert res.exit_code == 0, res.output
    return db, out.output


def test_the_zoo_lands_with_its_architectures_files_and_data(zoo, measured):
    db, output = measured
    assert "8 models (8 added" in output and "24 checkpoints of 8 models" in output
    con = connect(db, read_only=True)
    try:
        archs = dict(con.sql("SELECT name, source FROM architectures").fetchall())
        assert archs == {"resnet": "python:zoo.py:SmallResNet", "vgg": "python:zoo.py:VGG",
                         "vgg_bn": "python:zoo.py:VGG", "mlp": "python:zoo.py:MLP"}
        code = {r[0] for r in con.sql("SELECT code_sha256 FROM architectures").fetchall()}
        assert code == {hashlib.sha256((zoo / "zoo.py").read_bytes()).hexdigest()}
        (name, sha, n_train), = con.sql("SELECT name, sha256, train_size FROM datasets"
                                        ).fetchall()
        assert name == "digits8" and n_train == 1300 and len(sha) == 64
        for path, sha, size in con.sql("SELECT path, sha256, bytes FROM checkpoints"
                                       ).fetchall():
            blob = Path(path).read_bytes()
            assert hashlib.sha256(blob).hexdigest() == sha and len(blob) == size
            assert Path(path).is_relative_to(zoo.resolve())
        kwargs = con.sql("SELECT b.kwargs, h.value_text FROM model_builds AS b JOIN "
                         "hyperparameters AS h USING (model_id) WHERE h.axis = 'width'"
                         ).fetchall()
        assert len(kwargs) == 8 and all(json.loads(k)["width"] == int(v) for k, v in kwargs)
        assert con.sql("SELECT count(*) FROM traces").fetchall() == [(8 * 150,)]
        assert con.sql("SELECT DISTINCT dataset FROM models").fetchall() == [("digits8",)]
    finally:
        con.close()


def _value(db, arch: str, width: int, name: str):
    con = connect(db, read_only=True)
    try:
        return con.sql(
            "SELECT ms.value, ms.status, ms.error FROM measures AS ms JOIN hp_wide USING "
            "(model_id) WHERE arch = ? AND width = ? AND measure = ?",
            params=[arch, str(width), name]).fetchall()[0]
    finally:
        con.close()


@pytest.mark.parametrize("arch,cls,kw", [("resnet", "SmallResNet", {}),
                                         ("vgg", "VGG", {"batch_norm": False}),
                                         ("vgg_bn", "VGG", {"batch_norm": True}),
                                         ("mlp", "MLP", {})])
def test_measures_equal_plain_pytorch_on_the_users_own_model(zoo, measured, arch, cls, kw):
    db, _ = measured
    module, (x, y) = user_module(zoo), data(zoo)
    model = getattr(module, cls)(width=16, **kw)
    model.load_state_dict(load_file(zoo / "checkpoints" / f"{arch}-w16-s0-final.safetensors"))
    model.eval()
    with torch.no_grad():
        ce = float(F.cross_entropy(model(x).double(), y))
    value, status, _ = _value(db, arch, 16, "cross_entropy")
    assert status == "ok" and value == pytest.approx(ce, rel=1e-5)
    # the steps to cross-entropy 0.1: the first traced step at or below it
    with open(zoo / "traces" / f"{arch}-w16-s0.csv") as f:
        trace = [(int(r["step"]), float(r["train_loss"])) for r in csv.DictReader(f)]
    first = next((s for s, loss in trace if loss <= 0.1), None)
    value, status, _ = _value(db, arch, 16, "steps_to_0.1_loss")
    assert (value, status) == ((float(first), "ok") if first else (None, "failed"))
    if arch == "mlp":    # no BatchNorm: the folded network's layers are its own
        value, _, _ = _value(db, arch, 16, "num_params")   # Eq. 20 as printed: c_{i-1}(c_i+1)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert value == sum(m.in_features * (m.out_features + 1) for m in linears)
        init = load_file(zoo / "checkpoints" / f"{arch}-w16-s0-init.safetensors")
        dist = sum(float(((model.state_dict()[k] - init[k]).double() ** 2).sum())
                   for k in init if k.endswith("weight"))
        value, _, _ = _value(db, arch, 16, "frobenius_distance")
        assert value == pytest.approx(dist, rel=1e-6)


def test_path_norm_is_not_applicable_through_max_pooling_and_counted_apart(measured):
    db, _ = measured
    value, status, error = _value(db, "vgg", 8, "path_norm")
    assert (value, status) == (None, "not_applicable") and "max-pooling" in error
    assert _value(db, "resnet", 8, "path_norm")[1] == "ok"     # shortcuts: both branches
    from fgm.analysis.cli import main as query
    out = run(query, "table", "--no-store", "--format", "json", "--db", db)
    assert out.exit_code == 0, out.output
    table = {r["measure"]: r for r in json.loads(out.output) if r["kind"] == "measure"}
    assert (table["path_norm"]["n_models"], table["path_norm"]["not_applicable"],
            table["path_norm"]["failed"]) == (4, 4, 0)
    assert table["cross_entropy"]["not_applicable"] == 0


def test_a_model_without_init_epoch1_or_trace_is_measured_with_those_not_applicable(
        copy, db):
    table = copy / "results.csv"
    data_rows = [{k: v for k, v in r.items()
                  if k not in ("checkpoint.init", "checkpoint.epoch1", "trace")}
                 for r in rows(table) if r["hp.arch"] == "mlp"]
    write_rows(table, data_rows)
    assert run(ingest, table, "--models", copy / "models.toml", "--db", db).exit_code == 0
    out = run(measure_cli, "--measures", "cross_entropy,frobenius_distance,grad_noise_epoch1,"
              "steps_to_0.1_loss", "--budget", "fast", "--db", db)
    assert out.exit_code == 0 and "6 not applicable" in out.output, out.output
    con = connect(db, read_only=True)
    got = {(m, s): e for m, s, e in con.sql(
        "SELECT measure, status, error FROM measures").fetchall()}
    con.close()
    assert got[("frobenius_distance", "not_applicable")].startswith("no initial weights")
    assert "epoch 1" in got[("grad_noise_epoch1", "not_applicable")]
    assert "trace" in got[("steps_to_0.1_loss", "not_applicable")]
    assert ("cross_entropy", "ok") in got
    # the same models again, now with their initial weights: what was not applicable
    # for want of them is computed by the next fgm-measure, the rest kept
    with_init = [dict(r, **{"checkpoint.init": f"checkpoints/mlp-w{r['hp.width']}-s0-"
                                               "init.safetensors"}) for r in data_rows]
    write_rows(table, with_init)
    out = run(ingest, table, "--models", copy / "models.toml", "--db", db)
    assert out.exit_code == 0 and "2 updated" in out.output, out.output
    out = run(measure_cli, "--measures", "frobenius_distance", "--db", db)
    assert out.exit_code == 0 and "2 models, 2 values computed" in out.output, out.output
    con = connect(db, read_only=True)
    assert con.sql("SELECT measure, status, count(*) FROM measures GROUP BY ALL ORDER BY ALL"
                   ).fetchall() == [("cross_entropy", "ok", 2), ("frobenius_distance", "ok", 2)]
    con.close()
    # other weights under a stored model's id are another model: refused, or replaced
    swapped = [dict(r, **{"checkpoint.init": f"checkpoints/mlp-w{r['hp.width']}-s0-epoch1.pt"})
               for r in with_init]
    write_rows(table, swapped)
    out = run(ingest, table, "--models", copy / "models.toml", "--db", db)
    assert out.exit_code == 1 and "with another init checkpoint" in out.output, out.output
    out = run(ingest, table, "--models", copy / "models.toml", "--db", db, "--replace")
    assert out.exit_code == 0, out.output
    con = connect(db, read_only=True)     # the replaced models' measures went with them
    assert con.sql("SELECT count(*) FROM measures").fetchall() == [(0,)]
    con.close()


def test_the_same_table_twice_changes_nothing(zoo, db):
    args = (zoo / "results.csv", "--models", zoo / "models.toml", "--db", db)
    assert run(ingest, *args).exit_code == 0
    before = dump(db)
    out = run(ingest, *args)
    assert out.exit_code == 0 and "8 unchanged" in out.output, out.output
    assert dump(db) == before


# --------------------------------------------------------------------------- refusals

def _break(copy: Path, case: str) -> tuple[list[str], str]:
    """Change the zoo copy as case says: (extra fgm-ingest arguments, expected error)."""
    table, toml = copy / "results.csv", copy / "models.toml"
    data_rows = rows(table)
    text = toml.read_text()
    if case == "unknown torchvision name":
        toml.write_text(text + '\n[arch.tv]\nsource = "torchvision:resnet_18"\n')
        write_rows(table, [dict(data_rows[0], **{"hp.arch": "tv"})] + data_rows[1:])
        return [], "torchvision has no model 'resnet_18'; did you mean resnet18"
    if case == "python file missing":
        toml.write_text(text.replace("python:zoo.py:MLP", "python:zoo2.py:MLP"))
        return [], "zoo2.py: no such file"
    if case == "python file raises":
        (copy / "zoo.py").write_text((copy / "zoo.py").read_text()
                                     + "\nraise RuntimeError('broken on purpose')\n")
        return [], "running it raised RuntimeError: broken on purpose"
    if case == "kwargs rejected":
        toml.write_text(text.replace('kwargs = { width = "hp.width" }',
                                     'kwargs = { width = "hp.width", depth = 3 }'))
        return [], "unexpected keyword argument 'depth'"
    if case == "checkpoint of another architecture":
        data_rows[0]["checkpoint.final"] = data_rows[-1]["checkpoint.final"]  # an MLP's
        write_rows(table, data_rows)
        return [], "does not fit the architecture (missing keys: stem.0.weight"
    if case == "images that do not fit":    # (a VGG's Linear takes one size only)
        write_rows(table, [r for r in data_rows if r["hp.arch"] == "vgg"])
        z = dict(np.load(copy / "digits.npz"))
        z["x_train"] = np.repeat(z["x_train"], 2, axis=1)      # 16x8 images
        z["x_test"] = np.repeat(z["x_test"], 2, axis=1)
        np.savez(copy / "digits.npz", **z)
        return [], "images of shape (1, 16, 8) do not fit the model"
    if case == "labels outside the classes":
        z = dict(np.load(copy / "digits.npz"))
        z["y_train"][5] = 12
        np.savez(copy / "digits.npz", **z)
        return [], "labels must be in [0, 10) for a model of 10 classes"
    if case == "not an image classifier":
        (copy / "zoo.py").write_text((copy / "zoo.py").read_text() + (
            "\n\nclass Embed(MLP):\n    def forward(self, x):\n"
            "        return super().forward(x)[:, :1]\n"))
        toml.write_text(text.replace("python:zoo.py:MLP", "python:zoo.py:Embed"))
        return [], "not an image classifier: its output for 2 images is (2, 1)"
    if case == "a pickled whole model":
        module = user_module(copy)
        torch.save(module.MLP(width=8), copy / "checkpoints" / "whole.pt")
        mlp = next(i for i, r in enumerate(data_rows) if r["hp.arch"] == "mlp")
        data_rows[mlp]["checkpoint.final"] = "checkpoints/whole.pt"
        write_rows(table, data_rows)
        return [], "fgm does not unpickle; save the state dict instead"
    if case == "a path out of the folder":
        data_rows[2]["trace"] = "../../etc/passwd"
        write_rows(table, data_rows)
        return [], "leads out of"
    if case == "an absolute path":
        data_rows[2]["checkpoint.final"] = str(copy / "checkpoints" / "x.safetensors")
        write_rows(table, data_rows)
        return [], "is an absolute path"
    if case == "unknown architecture":
        data_rows[1]["hp.arch"] = "resnett"
        write_rows(table, data_rows)
        return [], "architecture 'resnett' is not in"
    if case == "unknown dataset":
        data_rows[1]["dataset"] = "digits9"
        write_rows(table, data_rows)
        return [], "dataset 'digits9' is neither a [dataset.NAME]"
    if case == "a non-finite weight":
        path = copy / "checkpoints" / "mlp-w8-s0-final.safetensors"
        state = load_file(path)
        state["net.1.weight"][0, 0] = float("nan")
        save_file(state, path)
        return [], "net.1.weight has values that are not finite"
    if case == "another normalisation":      # not what the models were trained on
        toml.write_text("\n".join("std = [0.05]" if line.startswith("std = [") else line
                                   for line in text.splitlines()) + "\n")
        return [], "but train_acc says"
    if case == "a dataset named as fgm's own":
        toml.write_text(text.replace("[dataset.digits8]", "[dataset.digits]"))
        write_rows(table, [dict(r, dataset="digits") for r in data_rows])
        return [], "'digits' is one of fgm's own datasets"
    if case == "sys.exit at import":
        (copy / "zoo.py").write_text("import sys\nsys.exit(0)\n" + (copy / "zoo.py").read_text())
        return [], "called sys.exit(0)"
    if case == "arch as a column, not an axis":
        write_rows(table, [{("arch" if k == "hp.arch" else k): v for k, v in r.items()}
                           for r in data_rows])
        return [], "name the column hp.arch"
    if case == "pretrained weights":
        toml.write_text(text + '\n[arch.tv]\nsource = "torchvision:resnet18"\n'
                        'kwargs = { weights = "DEFAULT" }\n')
        return [], "kwargs weights would download or read weights of their own"
    if case == "an hp axis the table lacks":
        toml.write_text(text.replace('kwargs = { width = "hp.width" }',
                                     'kwargs = { width = "hp.depth" }'))
        return [], "kwargs take hp.depth, which the table"
    raise AssertionError(case)


CASES = ["unknown torchvision name", "python file missing", "python file raises",
         "kwargs rejected", "checkpoint of another architecture", "images that do not fit",
         "labels outside the classes", "not an image classifier", "a pickled whole model",
         "a path out of the folder", "an absolute path", "unknown architecture",
         "unknown dataset", "a non-finite weight", "an hp axis the table lacks",
         "another normalisation", "a dataset named as fgm's own", "sys.exit at import",
         "arch as a column, not an axis", "pretrained weights"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_by_name_and_the_warehouse_is_unchanged(copy, db, case):
    # a warehouse with something in it already: the ingest of the other sweep
    assert run(ingest, copy / "results.csv", "--models", copy / "models.toml", "--db", db,
               "--sweep", "earlier").exit_code == 0
    before = dump(db)
    extra, expected = _break(copy, case)
    out = run(ingest, copy / "results.csv", "--models", copy / "models.toml", "--db", db,
              *extra)
    assert out.exit_code == 1, out.output
    assert expected in " ".join(out.output.split()), out.output
    assert "Traceback" not in out.output
    assert dump(db) == before


def test_a_table_naming_checkpoints_without_models_toml_is_refused(zoo, db):
    out = run(ingest, zoo / "results.csv", "--db", db)
    assert out.exit_code == 1 and "pass --models models.toml" in out.output
    assert not db.exists()


def test_row_and_file_are_named(copy, db):
    data_rows = rows(copy / "results.csv")
    data_rows[3]["checkpoint.final"] = data_rows[0]["checkpoint.final"]  # resnet's weights
    write_rows(copy / "results.csv", data_rows)
    out = run(ingest, copy / "results.csv", "--models", copy / "models.toml", "--db", db)
    assert out.exit_code == 1
    assert "row 4, column 'checkpoint.final'" in out.output
    assert "resnet-w8-s0-final.safetensors" in out.output


def test_a_changed_python_file_or_dataset_is_refused_by_fgm_measure(copy, db):
    assert run(ingest, copy / "results.csv", "--models", copy / "models.toml",
               "--db", db).exit_code == 0
    old = hashlib.sha256((copy / "zoo.py").read_bytes()).hexdigest()
    (copy / "zoo.py").write_text((copy / "zoo.py").read_text() + "\n# edited\n")
    new = hashlib.sha256((copy / "zoo.py").read_bytes()).hexdigest()
    out = run(measure_cli, "--measures", "num_params", "--db", db)
    assert out.exit_code == 0 and "8 models skipped" in out.output, out.output
    assert f"sha256 {old[:16]}… then, {new[:16]}… now" in out.output
    (copy / "zoo.py").write_text((copy / "zoo.py").read_text().replace("\n# edited\n", ""))
    z = dict(np.load(copy / "digits.npz"))
    z["x_train"][0, 0, 0, 0] ^= 1
    np.savez(copy / "digits.npz", **z)
    out = run(measure_cli, "--measures", "num_params", "--db", db)
    assert "changed since it was ingested" in out.output and "dataset 'digits8'" in out.output
    con = connect(db, read_only=True)
    assert con.sql("SELECT count(*) FROM measures").fetchall() == [(0,)]
    con.close()


# --------------------------------------------------------------------------- sources

def _single_model_zoo(folder: Path, source: str, kwargs: str, model) -> Path:
    """A folder with one model of `source`, its weights, a 3x32x32 npz dataset."""
    folder.mkdir()
    gen = np.random.default_rng(0)
    x = gen.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    np.savez(folder / "d.npz", x_train=x[:16], y_train=np.arange(16) % 10, x_test=x[16:],
             y_test=np.arange(8) % 10)
    (folder / "models.toml").write_text(
        f'[arch.a]\nsource = "{source}"\nkwargs = {kwargs}\n\n[dataset.d]\n'
        'source = "npz:d.npz"\nmean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]\n')
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              folder / "final.safetensors")
    (folder / "t.csv").write_text("hp.lr,arch,dataset,gen.gap,checkpoint.final\n"
                                  "0.1,a,d,0.4,final.safetensors\n")
    return folder


def test_torchvision_and_timm_models_are_built_by_name(tmp_path, db):
    import timm
    import torchvision
    tv = _single_model_zoo(tmp_path / "tv", "torchvision:resnet18", "{ num_classes = 10 }",
                           torchvision.models.resnet18(num_classes=10))
    tm = _single_model_zoo(tmp_path / "tm", "timm:test_resnet", "{ num_classes = 10 }",
                           timm.create_model("test_resnet", num_classes=10))
    for folder in (tv, tm):
        out = run(ingest, folder / "t.csv", "--models", folder / "models.toml", "--db", db,
                  "--sweep", folder.name)
        assert out.exit_code == 0, out.output
    out = run(measure_cli, "--measures", "num_params,cross_entropy", "--db", db)
    assert out.exit_code == 0 and "2 models, 4 values computed, 0 failed" in out.output, \
        out.output
    con = connect(db, read_only=True)
    n = dict(con.sql("SELECT a.name || s.name, ms.value FROM measures AS ms JOIN models "
                     "USING (model_id) JOIN sweeps AS s USING (sweep_id) JOIN model_builds "
                     "USING (model_id) JOIN architectures AS a USING (arch_id) "
                     "WHERE measure = 'cross_entropy'").fetchall())
    con.close()
    # the loss of torchvision's own resnet18 on the npz's images, computed here
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(load_file(tv / "final.safetensors"))
    z = np.load(tv / "d.npz")
    x = torch.from_numpy(((z["x_train"] / np.float32(255) - 0.5) / 0.25)
                         .astype(np.float32).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        ce = float(F.cross_entropy(model.eval()(x).double(), torch.as_tensor(z["y_train"])))
    assert n["atv"] == pytest.approx(ce, rel=1e-4)


def test_an_unknown_timm_name_gets_a_did_you_mean(tmp_path, db):
    import timm
    folder = _single_model_zoo(tmp_path / "tm", "timm:test_resnett", "{ num_classes = 10 }",
                               timm.create_model("test_resnet", num_classes=10))
    out = run(ingest, folder / "t.csv", "--models", folder / "models.toml", "--db", db)
    assert out.exit_code == 1 and "timm has no model 'test_resnett'; did you mean" in \
        out.output and "test_resnet" in out.output


def test_user_code_runs_in_its_own_module(zoo):
    """The python: file is imported under a name of its own, once per content."""
    from fgm.ingest.zoo import read_models_toml
    toml = read_models_toml(zoo / "models.toml")
    from fgm.ingest.zoo import build_model
    spec = toml.architectures["mlp"].spec()
    a, b = build_model(spec, {"width": 8}), build_model(spec, {"width": 8})
    assert type(a) is type(b) and type(a).__module__.startswith("fgm_user_")


# --------------------------------------------------------------------------- re-ingest

def test_a_changed_model_is_refused_unless_replaced_and_never_kept_twice(copy, db):
    """Re-ingesting after a change that moves what a model is (its code, its data's
    preprocessing, its trace) would leave measures of the old model, or two models
    where evaluation expects one: refused; --replace drops the stored ones."""
    args = (copy / "results.csv", "--models", copy / "models.toml", "--db", db)
    assert run(ingest, *args).exit_code == 0
    assert run(measure_cli, "--measures", "cross_entropy,path_norm", "--db", db).exit_code == 0
    before = dump(db)
    # an unchanged table again: nothing moves, not even the not_applicable rows
    out = run(ingest, *args)
    assert out.exit_code == 0 and "8 unchanged" in out.output and dump(db) == before
    # the code changed: a new architecture for the same rows
    (copy / "zoo.py").write_text((copy / "zoo.py").read_text() + "\n# edited\n")
    out = run(ingest, *args)
    assert out.exit_code == 1 and "with this row's hyperparameters, dataset and seed" in \
        out.output and dump(db) == before
    out = run(ingest, *args, "--replace")
    assert out.exit_code == 0, out.output
    con = connect(db, read_only=True)
    assert con.sql("SELECT count(*), count(DISTINCT config_hash) FROM models").fetchall() \
        == [(8, 8)]
    assert con.sql("SELECT count(*) FROM measures").fetchall() == [(0,)]   # of the old ones
    con.close()
    # a trace that changed under the same model id
    data_rows = rows(copy / "results.csv")
    ids = [f"m{i}" for i in range(len(data_rows))]
    write_rows(copy / "results.csv", [dict(r, model_id=m) for r, m in zip(data_rows, ids, strict=True)])
    assert run(ingest, *args, "--replace").exit_code == 0
    trace = copy / data_rows[0]["trace"]
    lines = trace.read_text().splitlines()
    trace.write_text("\n".join(lines[:-1]) + "\n")
    out = run(ingest, *args)
    assert out.exit_code == 1 and "model 'm0' is in the warehouse with another trace" in \
        out.output, out.output


def test_a_flag_from_the_table_is_a_boolean_and_neighbour_files_are_checked(tmp_path, db):
    """hp.skip = false reaches the class as False (the text "false" is truthy); a file
    the python: file imports is recorded and a change to it refused by fgm-measure."""
    folder = tmp_path / "z"
    folder.mkdir()
    (folder / "parts.py").write_text("import torch.nn as nn\nACT = nn.ReLU\n")
    (folder / "net.py").write_text(
        "import torch.nn as nn\nfrom parts import ACT\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, skip=False):\n"
        "        super().__init__()\n"
        "        assert isinstance(skip, bool), skip\n"
        "        self.skip = skip\n"
        "        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 12), ACT())\n"
        "        self.fc = nn.Linear(12, 3)\n"
        "    def forward(self, x):\n"
        "        h = self.body(x)\n"
        "        return self.fc(h + x.flatten(1) if self.skip else h)\n")
    gen = np.random.default_rng(0)
    np.savez(folder / "d.npz", x_train=gen.normal(size=(30, 3, 2, 2)).astype(np.float32),
             y_train=np.arange(30) % 3, x_test=gen.normal(size=(9, 3, 2, 2)).astype(np.float32),
             y_test=np.arange(9) % 3)
    (folder / "models.toml").write_text(
        '[arch.net]\nsource = "python:net.py:Net"\nkwargs = { skip = "hp.skip" }\n'
        '[dataset.d]\nsource = "npz:d.npz"\nmean = [0, 0, 0]\nstd = [1, 1, 1]\n'
        'layout = "NCHW"\n')
    sys.path.insert(0, str(folder))
    try:
        import net as user_net
        for flag in (False, True):
            torch.manual_seed(0)
            save_file(user_net.Net(skip=flag).state_dict(), folder / f"{flag}.safetensors")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("net", None)
        sys.modules.pop("parts", None)
    (folder / "t.csv").write_text("hp.arch,hp.skip,dataset,gen.gap,checkpoint.final\n"
                                  "net,false,d,0.1,False.safetensors\n"
                                  "net,true,d,0.2,True.safetensors\n")
    out = run(ingest, folder / "t.csv", "--models", folder / "models.toml", "--db", db)
    assert out.exit_code == 0, out.output
    con = connect(db, read_only=True)
    kwargs = sorted(r[0] for r in con.sql("SELECT kwargs FROM model_builds").fetchall())
    spec = json.loads(con.sql("SELECT spec FROM architectures").fetchall()[0][0])
    con.close()
    assert [json.loads(k) for k in kwargs] == [{"skip": False}, {"skip": True}]
    assert list(spec["imports"]) == [str((folder / "parts.py").resolve())]
    (folder / "parts.py").write_text("import torch.nn as nn\nACT = nn.Tanh\n")
    out = run(measure_cli, "--measures", "num_params", "--db", db)
    assert "parts.py, which net.py imports, changed since it was ingested" in out.output
    assert "2 models skipped" in out.output, out.output
