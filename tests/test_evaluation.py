"""fgm-query psi / cmi / oracle / table on fixture warehouses, against references."""

import itertools
import json
import math

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from reference import cmi_ref, pgdl_ref, psi_ref, tau_ref
from scipy.special import ndtr
from warehouse_fixture import build_warehouse

from fgm.analysis.cli import main as query

AXES = {"depth": [2, 4, 8], "optimizer": ["sgd", "adam"], "width": [16, 32, 64]}


def grid_table(seed=0, drop=(), null=(), unconverged=()):
    rng = np.random.default_rng(seed)
    rows = []
    for i, combo in enumerate(itertools.product(*AXES.values())):
        if i in drop:
            continue
        gap = round(float(0.05 * AXES["depth"].index(combo[0]) + rng.normal(0, 0.05)), 2)
        rows.append({"model_id": f"m{i:02d}", **{f"hp.{a}": v for a, v in zip(AXES, combo, strict=True)},
                     "gen.gap": gap, "is.converged": i not in unconverged,
                     "complexity.good": None if i in null else gap + rng.normal(0, 0.02),
                     "complexity.noise": float(rng.integers(0, 4))})
    return pl.DataFrame(rows)


def run(*args):
    out = CliRunner().invoke(query, [str(a) for a in args])
    assert out.exit_code == 0, out.output
    return out.output


def refs_for(table: pl.DataFrame, measure: str, *, all_models=False):
    t = table.filter(pl.col(f"complexity.{measure}").is_not_null())
    if not all_models:
        t = t.filter(pl.col("is.converged"))
    t = t.sort("model_id")
    levels = [[AXES[a].index(v) if a != "optimizer" else sorted(AXES[a]).index(v)
               for a, v in zip(AXES, row, strict=True)] for row in t.select([f"hp.{a}" for a in AXES]).rows()]
    return t[f"complexity.{measure}"].to_list(), t["gen.gap"].to_list(), levels


@pytest.fixture
def incomplete(db):
    table = grid_table(drop={3, 7, 11}, null={0, 5}, unconverged={1, 9, 12})
    build_warehouse(db, table)
    return db, table


@pytest.mark.parametrize("all_models", [False, True])
def test_psi_json_agrees_with_references(incomplete, all_models):
    db, table = incomplete
    extra = ["--all-models"] if all_models else []
    res = json.loads(run("psi", "--measure", "good", "--db", db, "--format", "json", *extra))
    mu, g, levels = refs_for(table, "good", all_models=all_models)
    assert res["measure"] == "good" and res["n_models"] == len(mu)
    assert res["n_models"] == 18 - 3 - 2 - (0 if all_models else 3)
    assert abs(res["tau"] - tau_ref(mu, g)) < 1e-9
    psi = psi_ref(mu, g, levels)
    for axis, ref in zip(sorted(AXES), psi, strict=True):
        assert abs(res["psi"][axis] - ref) < 1e-9
    assert abs(res["Psi"] - sum(psi) / 3) < 1e-9


def test_cmi_json_agrees_with_references(incomplete):
    db, table = incomplete
    res = json.loads(run("cmi", "--measure", "noise", "--db", db, "--format", "json"))
    mu, g, levels = refs_for(table, "noise")
    sets = {(): None, **{(i,): None for i in range(3)},
            **{s: None for s in itertools.combinations(range(3), 2)}}
    for s in sets:
        sets[s] = cmi_ref(mu, g, levels, s)
    names = sorted(AXES)
    for i, axis in enumerate(names):
        assert abs(res["per_axis"][axis] - sets[(i,)]) < 1e-9
    assert abs(res["s0"] - sets[()]) < 1e-9
    assert abs(res["s1"] - min(sets[(i,)] for i in range(3))) < 1e-9
    assert abs(res["s2"] - min(v for s, v in sets.items() if len(s) == 2)) < 1e-9
    k_set = min(sets, key=sets.get)
    assert abs(res["K"] - sets[k_set]) < 1e-9
    assert res["argmin"] == [names[i] for i in k_set]


def test_pgdl_mode_reproduces_the_competition_scorer(db):
    rng = np.random.default_rng(5)
    table = grid_table(seed=5).with_columns(
        pl.Series("complexity.noise", rng.normal(size=18)))
    build_warehouse(db, table)
    models = {r["model_id"]: {"gap": r["gen.gap"],
                              "hp": {a: r[f"hp.{a}"] for a in AXES}} for r in table.to_dicts()}
    for measure in ("good", "noise"):
        prediction = dict(zip(table["model_id"], table[f"complexity.{measure}"], strict=True))
        res = json.loads(run("cmi", "--measure", measure, "--pgdl", "--db", db,
                             "--format", "json"))
        assert abs(res["K"] - pgdl_ref(prediction, models)) < 1e-9
        assert res["s0"] is None and res["s1"] is None
        assert all(v is None for v in res["per_axis"].values())


def test_per_optimizer_learning_rates_group_by_level(db):
    # SPEC §1: SGD and Adam use different lr values; "same lr" means same level.
    lrs = {"sgd": [0.01, 0.032, 0.1], "adam": [1e-4, 3.2e-4, 1e-3]}
    rng = np.random.default_rng(2)
    rows = []
    for opt, seed in itertools.product(["sgd", "adam"], range(2)):
        for level, lr in enumerate(lrs[opt]):
            gap = float(rng.normal(0.2, 0.05))
            rows.append({"model_id": f"{opt}{lr}s{seed}", "hp.optimizer": opt,
                         "level.optimizer": ["sgd", "adam"].index(opt),
                         "hp.learning_rate": lr, "level.learning_rate": level,
                         "hp.seed_axis": seed, "gen.gap": gap,
                         "complexity.m": gap + float(rng.normal(0, 0.05))})
    table = pl.DataFrame(rows)
    build_warehouse(db, table)
    res = json.loads(run("psi", "--measure", "m", "--db", db, "--format", "json"))
    t = table.sort("model_id")
    levels = t.select("level.learning_rate", "level.optimizer", "hp.seed_axis").rows()
    ref = psi_ref(t["complexity.m"].to_list(), t["gen.gap"].to_list(), levels)
    assert abs(res["psi"]["learning_rate"] - ref[0]) < 1e-9
    assert abs(res["psi"]["optimizer"] - ref[1]) < 1e-9
    # grouped by raw values instead, no two optimizers would ever share an lr: ψ undefined
    by_value = psi_ref(t["complexity.m"].to_list(), t["gen.gap"].to_list(),
                       t.select("hp.learning_rate", "hp.optimizer", "hp.seed_axis").rows())
    assert math.isnan(by_value[1]) and res["psi"]["optimizer"] is not None


def test_where_filter_matches_reference_subset(incomplete):
    db, table = incomplete
    res = json.loads(run("psi", "-m", "good", "--where", "optimizer = 'sgd' AND width > 16",
                         "--db", db, "--format", "json"))
    sub = table.filter((pl.col("hp.optimizer") == "sgd") & (pl.col("hp.width") > 16))
    mu, g, levels = refs_for(sub, "good")
    assert res["n_models"] == len(mu) and abs(res["tau"] - tau_ref(mu, g)) < 1e-9
    # a single optimizer: the axis takes no part, and is reported once as constant
    assert "optimizer" not in res["psi"] and res["constant_axes"]["optimizer"] == "sgd"
    assert "NaN" not in json.dumps(res)


def test_oracle_json_closed_form_and_monte_carlo(incomplete):
    db, table = incomplete
    res = json.loads(run("oracle", "--eps", "0.05", "--draws", "5", "--db", db,
                         "--format", "json"))
    t = table.filter(pl.col("is.converged"))
    g = np.array(t["gen.gap"].to_list())
    terms = 2 * ndtr(np.abs(g[:, None] - g[None, :]) / (np.sqrt(2) * 0.05)) - 1
    n = len(g)
    assert res["eps"] == 0.05 and res["n_models"] == n
    assert abs(res["tau"] - terms.sum() / (n * (n - 1))) < 1e-9
    assert set(res["psi"]) == set(AXES) and res["Psi"] is not None
    assert res["cmi"]["draws"] == 5 and res["cmi"]["stderr"]["K"] > 0
    assert 0 <= res["cmi"]["K"] <= 1


def test_table_has_every_measure_and_the_baselines(incomplete):
    db, table = incomplete
    rows = json.loads(run("table", "--db", db, "--format", "json"))
    by_name = {r["measure"]: r for r in rows}
    assert {"good", "noise", "random"} <= set(by_name)
    assert {f"oracle_{e}" for e in ("0.01", "0.02", "0.05", "0.1")} <= set(by_name)
    psi = json.loads(run("psi", "-m", "good", "--db", db, "--format", "json"))
    assert by_name["good"]["Psi"] == pytest.approx(psi["Psi"], abs=1e-12)
    assert by_name["good"]["depth"] == pytest.approx(psi["psi"]["depth"], abs=1e-12)
    # canonical ordering: deeper → smaller gap, i.e. the measure −depth; own axis only
    canon = by_name["canonical_depth"]
    t = table.filter(pl.col("is.converged")).sort("model_id")
    mu = [-d for d in t["hp.depth"].to_list()]
    _, g, levels = refs_for(t.with_columns(pl.lit(1.0).alias("complexity.good")), "good")
    assert canon["depth"] == pytest.approx(psi_ref(mu, g, levels)[0], abs=1e-9)
    assert canon["width"] is None and canon["Psi"] is None
    cmi_rows = json.loads(run("table", "--kind", "cmi", "--draws", "3", "--db", db,
                              "--format", "json"))
    cmi = json.loads(run("cmi", "-m", "noise", "--db", db, "--format", "json"))
    noise = next(r for r in cmi_rows if r["measure"] == "noise")
    assert noise["K"] == pytest.approx(cmi["K"], abs=1e-12)
    assert next(r for r in cmi_rows if r["measure"] == "oracle_0.01")["draws"] == 3


def test_unknown_measure_and_bad_where_list_what_exists(incomplete):
    db, _ = incomplete
    out = CliRunner().invoke(query, ["psi", "-m", "nope", "--db", str(db)])
    assert out.exit_code == 1 and "unknown measure 'nope'" in out.output
    assert "good, noise" in out.output
    out = CliRunner().invoke(query, ["psi", "-m", "good", "--where", "colour = 1",
                                     "--db", str(db)])
    assert out.exit_code == 1 and "colour" in out.output and "depth_level" in out.output
    out = CliRunner().invoke(query, ["psi", "-m", "good", "--dataset", "mnist",
                                     "--db", str(db)])
    assert out.exit_code == 1 and "unknown dataset 'mnist'" in out.output


def test_readable_table_output(incomplete):
    db, _ = incomplete
    text = run("psi", "-m", "good", "--db", db)
    assert "psi[depth]" in text and "Psi" in text and "tau" in text
    text = run("cmi", "-m", "good", "--db", db)
    assert "K (S = {" in text
