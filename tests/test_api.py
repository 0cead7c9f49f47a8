"""fgm as a library (`import fgm`): the warehouse's answers equal fgm-query's to the
last bit, errors are FgmError with the command line's messages, and fgm.measure
computes the measures of a model held in memory."""

import json

import duckdb
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn
from warehouse_fixture import build_warehouse

import fgm
from fgm.analysis.cli import main as query
from fgm.ingest.synthetic import synthetic_table
from fgm.train.nin import NiN

AXES = {"depth": [2, 4, 8], "width": [192, 384, 768], "dropout": [0.0, 0.25, 0.5]}
NAMES = ["path_norm", "sum_of_fro", "pacbayes_flatness", "vc_dim"]


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """27 configurations x 2 seeds, four measures named as the paper's."""
    table = synthetic_table(54, 4, axes=AXES, seed=3, converged_share=0.9)
    table = table.rename({f"complexity.measure_{i:02d}": f"complexity.{n}"
                          for i, n in enumerate(NAMES)})
    path = tmp_path_factory.mktemp("api") / "w.duckdb"
    return build_warehouse(path, table, sweep="grid", dataset="cifar10")


def cli_json(db, *args):
    out = CliRunner().invoke(query, [*args, "--db", str(db), "--format", "json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.output)


def cli_error(db, *args) -> str:
    out = CliRunner().invoke(query, [*args, "--db", str(db)])
    assert out.exit_code != 0
    return out.output


# --------------------------------------------------------------------------- the package

def test_the_package_has_its_interface():
    assert fgm.__version__ and fgm.__version__ != "0+unknown"
    for name in fgm.__all__:
        assert getattr(fgm, name) is not None, name
    assert issubclass(fgm.NotAWarehouse, fgm.FgmError)
    assert issubclass(fgm.ReadOnlyError, fgm.FgmError)
    assert issubclass(fgm.UnsupportedModel, fgm.FgmError)
    assert "open" not in fgm.__all__ and callable(fgm.open)   # no shadowed builtin on *
    with pytest.raises(AttributeError):
        fgm.no_such_thing  # noqa: B018


# --------------------------------------------------------------------------- equal to the CLI

def test_psi_cmi_oracle_equal_the_cli_to_the_last_bit(db):
    with fgm.open(db) as wh:
        for name in NAMES:
            res = wh.psi(name)
            cli = cli_json(db, "psi", "--measure", name, "--no-store")
            assert res.raw == cli
            assert res.tau == cli["tau"] and res.Psi == cli["Psi"] and res.psi == cli["psi"]
            assert res.n_models == cli["n_models"] > 0
        c = wh.cmi("path_norm", convention="paper")
        assert c.raw == cli_json(db, "cmi", "--measure", "path_norm", "--convention", "paper",
                                 "--no-store")
        o = wh.oracle(0.02, draws=5)
        assert o.raw == cli_json(db, "oracle", "--eps", "0.02", "--draws", "5", "--no-store")
        assert o.K == o.raw["cmi"]["K"]
        r = wh.robust("path_norm", test_size=10_000)
        assert r.raw == cli_json(db, "robust", "--measure", "path_norm", "--test-size", "10000",
                                 "--no-store")


def test_selection_options_and_ci_under_the_cli_names(db):
    with fgm.open(db) as wh:
        res = wh.psi("sum_of_fro", where="width > 192", all_models=True, pool_seeds=True,
                     ci=0.9, blocks=5, seed=2)
        cli = cli_json(db, "psi", "-m", "sum_of_fro", "--where", "width > 192", "--all-models",
                       "--pool-seeds", "--ci", "0.9", "--blocks", "5", "--seed", "2",
                       "--no-store")
        assert res.raw == cli and "ci" in res.raw
        one = wh.psi("sum_of_fro", seeds=[1], all_models=True)
        cli = cli_json(db, "psi", "-m", "sum_of_fro", "--seeds", "1", "--all-models",
                       "--no-store")
        assert one.raw == cli and one.n_models == 27
        frame = res.to_frame()
        assert frame.columns == ["quantity", "value"]
        assert frame.filter(pl.col("quantity") == "Psi")["value"][0] == res.Psi
        pd = res.to_pandas()     # the pandas extra (installed with dev)
        assert list(pd.columns) == ["quantity", "value"]
        assert pd.set_index("quantity").loc["Psi", "value"] == res.Psi


def test_tables_models_and_measures_equal_the_cli(db):
    with fgm.open(db) as wh:
        t5 = wh.table()
        assert t5.to_dicts() == cli_json(db, "table", "--no-store")
        assert {"measure", "kind", "tau", "Psi", *AXES} <= set(t5.columns)
        assert set(t5["kind"]) >= {"measure", "oracle", "random"}
        t6 = wh.table_cmi(draws=3)
        assert t6.to_dicts() == cli_json(db, "table", "--kind", "cmi", "--draws", "3",
                                         "--no-store")
        models = wh.models()
        assert models.to_dicts() == cli_json(db, "models")
        assert models.height == 54
        assert wh.models(all_models=False).height == int(models["converged"].sum())
        measures = wh.measures()
        cli = cli_json(db, "measures")
        assert measures.drop("reasons").to_dicts() == [
            {k: v for k, v in row.items() if k != "reasons"} for row in cli]
        compared = wh.compare_paper(table=5)
        cli = cli_json(db, "compare", "--paper", "--table", "5")
        assert compared["measure"].to_list() == [r["measure"] for r in cli["measures"]]
        assert compared["Psi"].to_list() == [r["Psi"] for r in cli["measures"]]
        assert wh.compare_summary(table=5) == cli


def test_sql_is_read_only_and_bounded_as_the_cli(db):
    with fgm.open(db) as wh:
        frame = wh.sql("SELECT model_id, depth, width FROM hp_wide ORDER BY model_id")
        assert frame.height == 54 and frame.columns == ["model_id", "depth", "width"]
        for bad in ("DELETE FROM models", "COPY models TO 'x.csv'",
                    "SELECT * FROM read_csv('/etc/passwd')"):
            with pytest.raises(fgm.FgmError) as exc:
                wh.sql(bad)
            assert str(exc.value).split(":")[0] in cli_error(db, "sql", bad)
        with pytest.raises(fgm.FgmError, match="memory-limit"):
            wh.sql("SELECT 1", memory_limit="-1GB")
        empty = wh.sql("SELECT model_id FROM models WHERE false")
        assert empty.height == 0 and empty.columns == ["model_id"]


def test_charts_render_one_at_a_time(db):
    with fgm.open(db) as wh:
        for kind in ("converged", "gap", "table5", "table6", "paper"):
            spec = wh.chart(kind, draws=2).to_dict()
            assert spec["$schema"].startswith("https://vega.github.io/schema/vega-lite/")
        spec = wh.chart("measure", measure="path_norm", color="depth").to_dict()
        assert "path_norm" in json.dumps(spec)
        with pytest.raises(fgm.FgmError, match="unknown axis 'dept'.*Did you mean 'depth'"):
            wh.chart("measure", measure="path_norm", color="dept")
        with pytest.raises(fgm.FgmError, match="chart kind 'heatmap'"):
            wh.chart("heatmap")


# --------------------------------------------------------------------------- errors

def test_errors_are_fgm_errors_with_the_cli_messages(db, tmp_path):
    with pytest.raises(fgm.FgmError, match="no warehouse here"):
        fgm.open(tmp_path / "missing.duckdb")
    other = tmp_path / "other.duckdb"
    con = duckdb.connect(str(other))
    con.execute("CREATE TABLE t (x INTEGER)")
    con.close()
    with pytest.raises(fgm.NotAWarehouse, match="not an fgm warehouse"):
        fgm.open(other)
    with fgm.open(db) as wh:
        with pytest.raises(fgm.FgmError) as exc:
            wh.psi("path_nrom")
        assert "path_norm" in str(exc.value)
        assert str(exc.value) in cli_error(db, "psi", "-m", "path_nrom", "--no-store")
        with pytest.raises(fgm.FgmError) as exc:
            wh.psi("path_norm", where="width >")
        printed = cli_error(db, "psi", "-m", "path_norm", "--where", "width >", "--no-store")
        assert "where" in str(exc.value).lower()
        assert " ".join(str(exc.value).split()) in " ".join(printed.split())
        with pytest.raises(fgm.FgmError, match="unknown dataset 'svhn'"):
            wh.psi("path_norm", dataset="svhn")
        with pytest.raises(fgm.ReadOnlyError, match="read-only"):
            wh.psi("path_norm", store=True)
        with pytest.raises(TypeError, match="did you mean 'all_models'"):
            wh.psi("path_norm", all_model=True)
        with pytest.raises(fgm.FgmError, match="seeds"):
            wh.psi("path_norm", seeds=[-1])
    with pytest.raises(fgm.FgmError, match="closed"):
        wh.models()


def test_options_are_checked_as_the_cli_checks_them(db):
    """The CLI's ranges hold for the API: no silent answer to a value out of range."""
    with fgm.open(db) as wh:
        for call in (lambda: wh.psi("path_norm", ci=1.5), lambda: wh.psi("path_norm", ci=0.0),
                     lambda: wh.psi("path_norm", ci=0.9, blocks=1),
                     lambda: wh.psi("path_norm", ci=0.9, seed=-1),
                     lambda: wh.oracle(0.02, draws=0), lambda: wh.oracle(True),
                     lambda: wh.oracle(2.0), lambda: wh.robust("path_norm", test_size=-5),
                     lambda: wh.robust("path_norm", test_size=0),
                     lambda: wh.robust("path_norm", test_size=100, min_ess=-1.0),
                     lambda: wh.psi("path_norm", all_models="no"), lambda: wh.psi(3),
                     lambda: wh.table(draws=10, ci=2.0), lambda: wh.table_cmi(draws=1),
                     lambda: wh.sql("SELECT 1", timeout=-1), lambda: wh.psi("path_norm",
                                                                             store="yes")):
            with pytest.raises(fgm.FgmError):
                call()
        with pytest.raises(fgm.FgmError, match="more than once"):
            wh.sql("SELECT 1 AS a, 2 AS a")


def test_a_plain_connection_in_the_same_process_is_not_locked_down(db, tmp_path):
    """DuckDB shares a file's database between the connections of a process: fgm's
    lock-down must not reach a user's own connection (it is refused instead)."""
    csv = tmp_path / "t.csv"
    csv.write_text("x\n1\n")
    mine = duckdb.connect(str(db), read_only=True)
    try:
        with pytest.raises(fgm.FgmError, match="another DuckDB connection"):
            fgm.open(db)
        assert mine.sql(f"SELECT x FROM read_csv('{csv}')").fetchall() == [(1,)]
    finally:
        mine.close()
    with fgm.open(db) as wh:
        assert wh.models().height == 54
        assert wh.models().height == 54     # a second call: nothing left locked


def test_a_store_that_fails_returns_the_answer_with_a_warning(db, tmp_path, monkeypatch):
    import shutil

    from fgm.analysis import stored
    copy = tmp_path / "copy.duckdb"
    shutil.copy(db, copy)

    def full_disk(*args, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(stored, "store_evaluation", full_disk)
    with fgm.open(copy, read_only=False) as wh, pytest.warns(fgm.NotStoredWarning,
                                                            match="No space left"):
        frame = wh.table(store=True)
    assert frame.height > 0 and "path_norm" in frame["measure"].to_list()


def test_a_read_write_handle_stores_what_the_cli_stores(db, tmp_path):
    import shutil
    copy = tmp_path / "copy.duckdb"
    shutil.copy(db, copy)
    with fgm.open(copy, read_only=False) as wh:
        res = wh.psi("path_norm", store=True)
    con = duckdb.connect(str(copy), read_only=True)
    stored = con.sql("SELECT e.command, v.value FROM evaluations e JOIN evaluation_values v "
                     "USING (evaluation_id) WHERE v.quantity = 'Psi' AND v.axis = 'all'"
                     ).fetchall()
    con.close()
    assert stored == [("psi", res.Psi)]


def test_hp_wide_comes_to_an_older_file_and_spares_a_table_of_that_name(db, tmp_path):
    import shutil

    from fgm.warehouse import connect
    old = tmp_path / "old.duckdb"
    shutil.copy(db, old)
    con = duckdb.connect(str(old))
    con.execute("DROP VIEW hp_wide")          # as a file written before fgm kept it
    con.close()
    connect(old).close()                      # the first writer adds it
    con = duckdb.connect(str(old), read_only=True)
    assert con.sql("SELECT count(*) FROM hp_wide").fetchall() == [(54,)]
    con.close()
    mine = tmp_path / "mine.duckdb"
    shutil.copy(db, mine)
    con = duckdb.connect(str(mine))
    con.execute("DROP VIEW hp_wide")
    con.execute("CREATE TABLE hp_wide AS SELECT 42 AS answer")   # a user's own table
    con.close()
    table = synthetic_table(3, 4, axes=AXES, seed=9).with_columns(
        pl.Series("model_id", ["x1", "x2", "x3"]))
    table.write_csv(tmp_path / "more.csv")
    from fgm.ingest.cli import main as ingest
    out = CliRunner().invoke(ingest, [str(tmp_path / "more.csv"), "--db", str(mine),
                                      "--sweep", "grid", "--dataset", "cifar10"])
    assert out.exit_code == 0, out.output
    con = duckdb.connect(str(mine), read_only=True)
    assert con.sql("SELECT * FROM hp_wide").fetchall() == [(42,)]     # theirs, untouched
    con.close()
    with fgm.open(mine) as wh:                 # fgm reads through its own view
        assert wh.sql("SELECT count(*) AS n FROM hp_wide")["n"][0] == 57


def test_hp_wide_exists_for_plain_duckdb_readers(db):
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.sql("SELECT model_id, depth, depth_level, width FROM hp_wide "
                       "ORDER BY model_id").fetchall()
    finally:
        con.close()
    assert len(rows) == 54
    with fgm.open(db) as wh:
        same = wh.sql("SELECT model_id, depth, depth_level, width FROM hp_wide "
                      "ORDER BY model_id").rows()
    assert rows == same


# --------------------------------------------------------------------------- fgm.measure

@pytest.fixture(scope="module")
def small():
    """A small NiN trained briefly on random 8x8 images, and its initial weights."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=gen)
    y = torch.randint(0, 4, (96,), generator=gen)
    torch.manual_seed(0)
    net = NiN(1, 4, 8, 1)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net, init, x, y


def test_measure_of_a_model_in_memory(small):
    net, init, x, y = small
    before = {k: v.clone() for k, v in net.state_dict().items()}
    values = fgm.measure(net, (x, y), measures="cross_entropy,num_params,frobenius_distance,"
                         "path_norm,steps_to_0.1_loss,grad_noise_epoch1")
    assert set(values) == {"cross_entropy", "num_params", "frobenius_distance", "path_norm",
                           "steps_to_0.1_loss", "grad_noise_epoch1"}
    net.eval()
    with torch.no_grad():
        assert values["cross_entropy"] == pytest.approx(float(F.cross_entropy(net(x), y)),
                                                        rel=1e-5)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    # Eq. 20: Σ k_i² c_{i−1} (c_i + 1) over the folded layers
    assert values["num_params"] == sum(c.kernel_size[0] ** 2 * c.in_channels
                                       * (c.out_channels + 1) for c in convs)
    assert values["path_norm"] > 0
    for name in ("frobenius_distance", "steps_to_0.1_loss", "grad_noise_epoch1"):
        assert values[name] is None
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    details = fgm.measure_details(net, (x, y), measures=["frobenius_distance"])
    assert details["frobenius_distance"].status == "not_applicable"
    assert "init" in details["frobenius_distance"].reason
    same = fgm.measure(net, (x, y), init=net, measures="frobenius_distance")
    assert same["frobenius_distance"] == pytest.approx(0.0, abs=1e-12)
    moved = fgm.measure(net, (x, y), init=init, measures="frobenius_distance")
    assert moved["frobenius_distance"] > 0


def test_measure_of_any_network_a_vgg_with_bn_and_an_mlp(small):
    """Networks other than the NiN: the values a plain computation gives."""
    _, _, x, y = small
    torch.manual_seed(1)
    vgg = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
    for model in (vgg, mlp):
        for _ in range(3):       # BN statistics that are not the defaults
            model.train()(x)
        values = fgm.measure(model, (x, y), measures="cross_entropy,num_params,param_norm")
        model.eval()
        with torch.no_grad():
            ce = float(F.cross_entropy(model(x), y))
        assert values["cross_entropy"] == pytest.approx(ce, rel=1e-5)
        layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        k2 = [m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) else 1
              for m in layers]
        c_in = [m.in_channels if isinstance(m, nn.Conv2d) else m.in_features for m in layers]
        c_out = [m.out_channels if isinstance(m, nn.Conv2d) else m.out_features for m in layers]
        # Eq. 20: Σ k_i² c_{i−1} (c_i + 1)
        assert values["num_params"] == sum(a * b * (c + 1) for a, b, c in zip(k2, c_in, c_out, strict=True))
        assert values["param_norm"] > 0


def test_measure_of_a_double_model(small):
    net, init, x, y = small
    double = NiN(1, 4, 8, 1).double()
    double.load_state_dict({k: v.double() if v.is_floating_point() else v
                            for k, v in net.state_dict().items()})
    a = fgm.measure(net, (x, y), measures="cross_entropy,path_norm")
    b = fgm.measure(double, (x.double(), y), measures="cross_entropy,path_norm")
    assert b["cross_entropy"] == pytest.approx(a["cross_entropy"], rel=1e-5)
    assert b["path_norm"] == pytest.approx(a["path_norm"], rel=1e-5)


def test_measure_searches_and_a_dataset(small):
    net, init, x, y = small
    dataset = torch.utils.data.TensorDataset(x, y)
    a = fgm.measure_details(net, dataset, measures="pacbayes_flatness", seed=1)
    b = fgm.measure_details(net, (x, y), measures="pacbayes_flatness", seed=1)
    assert a == b and a["pacbayes_flatness"].status == "ok"
    assert a["pacbayes_flatness"].params["budget"] == "fast"
    assert a["pacbayes_flatness"].value == pytest.approx(1 / a["pacbayes_flatness"]
                                                         .params["sigma"] ** 2)


def test_measure_refuses_what_it_cannot_read(small):
    net, init, x, y = small
    normed = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.LayerNorm(16), nn.ReLU(),
                           nn.Linear(16, 4))
    with pytest.raises(fgm.UnsupportedModel, match="LayerNorm"):
        fgm.measure(normed, (x, y), measures="path_norm")
    segmenter = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1))
    with pytest.raises(fgm.UnsupportedModel, match="not an image classifier"):
        fgm.measure(segmenter, (x, y), measures="path_norm")
    with pytest.raises(fgm.FgmError, match=r"labels must be in \[0, 4\)"):
        fgm.measure(net, (x, y + 4))
    with pytest.raises(fgm.FgmError, match="do not fit the model"):
        fgm.measure(net, (torch.randn(8, 3, 8, 8), y[:8]))
    with pytest.raises(fgm.FgmError, match="images must be"):
        fgm.measure(net, (x[:, 0], y))
    with pytest.raises(fgm.FgmError, match="unknown measure 'path_nrom'.*'path_norm'"):
        fgm.measure(net, (x, y), measures="path_nrom")
    with pytest.raises(fgm.FgmError, match="init: these weights do not fit"):
        fgm.measure(net, (x, y), init=NiN(1, 4, 16, 1).state_dict(), measures="frobenius_distance")
    with pytest.raises(fgm.FgmError, match="unknown budget"):
        fgm.measure(net, (x, y), budget="quick", measures="path_norm")
    if not torch.cuda.is_available():
        with pytest.raises(fgm.FgmError, match="device 'cuda'"):
            fgm.measure(net, (x, y), device="cuda", measures="path_norm")
    with pytest.raises(fgm.FgmError, match="measures None"):
        fgm.measure(net, (x, y), measures=None)
    with pytest.raises(fgm.FgmError, match="seed"):
        fgm.measure(net, (x, y), measures="path_norm", seed=1.5)

    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"image": x[i], "label": y[i]}
    with pytest.raises(fgm.FgmError, match="items must be"):
        fgm.measure(net, Dicts(), measures="path_norm")
    fractional = torch.utils.data.TensorDataset(x, y.double() + 0.7)
    with pytest.raises(fgm.FgmError, match="whole class numbers"):
        fgm.measure(net, fractional, measures="cross_entropy")
    with pytest.raises(fgm.FgmError, match="pattern None"):
        fgm.list_measures(None)
    with pytest.raises(fgm.FgmError, match="'path_norm'"):
        fgm.list_measures("path_nrom")
    assert fgm.list_measures("nosuch*").height == 0
    listed = fgm.list_measures("pac*")
    assert listed.height > 0 and all(m.startswith("pac") for m in listed["measure"])
    every = fgm.list_measures()
    assert every.height == len(set(every["measure"])) >= 41
    assert "path_norm" in every["measure"].to_list()
