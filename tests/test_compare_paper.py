"""fgm-query compare --paper on fixture warehouses whose measures are built to give
known signs; references from the pair-loop implementations in reference.py and
the paper's numbers read by hand."""

import csv
import io
import itertools
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from reference import cmi_equal_ref, psi_ref
from scipy import stats
from warehouse_fixture import build_warehouse, ingest_file

from fgm.analysis.cli import main as query

AXES = {"depth": [2, 4, 8], "width": [16, 32, 64], "batch_size": [32, 128]}
# the paper's Ψ (Table 5), read by hand: path-norm 0.280, spectral-orig -0.434,
# 1/σ sharpness (Eq. 54) 0.406, VC dim -0.154
PAPER_PSI = {"path_norm": 0.280, "spectral_orig": -0.434, "sharpness_flatness": 0.406,
             "vc_dim": -0.154}


def grid(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i, combo in enumerate(itertools.product(*AXES.values())):
        gap = 0.05 * AXES["depth"].index(combo[0]) + float(rng.normal(0, 0.05))
        rows.append({"model_id": f"m{i:02d}",
                     **{f"hp.{a}": v for a, v in zip(AXES, combo, strict=True)},
                     "gen.gap": gap,
                     # agrees with the paper's positive Ψ
                     "complexity.path_norm": gap + float(rng.normal(0, 0.03)),
                     # agrees with the paper's negative Ψ
                     "complexity.spectral_orig": -gap + float(rng.normal(0, 0.06)),
                     # the paper's Ψ is positive: a flip
                     "complexity.sharpness_flatness": -gap + float(rng.normal(0, 0.1)),
                     # the paper's Ψ is negative: agrees, weakly
                     "complexity.vc_dim": -gap + float(rng.normal(0, 0.2)),
                     # a measure of this warehouse only
                     "complexity.my_measure": float(rng.normal())})
    return pl.DataFrame(rows)


def run(*args):
    out = CliRunner().invoke(query, [str(a) for a in args])
    assert out.exit_code == 0, out.output
    return out.output


@pytest.fixture
def warehouse(db):
    table = grid()
    build_warehouse(db, table)
    return db, table.sort("model_id")


def _levels(table):
    return [[AXES[a].index(v) for a, v in zip(AXES, row, strict=True)]
            for row in table.select([f"hp.{a}" for a in AXES]).rows()]


def test_compare_json_against_references(warehouse):
    db, table = warehouse
    res = json.loads(run("compare", "--paper", "--db", db, "--format", "json"))
    rows = {r["measure"]: r for r in res["measures"]}
    assert sorted(rows) == sorted(PAPER_PSI)
    levels, gap = _levels(table), table["gen.gap"].to_list()
    here = {}
    for name, paper in PAPER_PSI.items():
        psi = psi_ref(table[f"complexity.{name}"].to_list(), gap, levels)
        here[name] = float(np.mean(psi))
        assert rows[name]["paper_Psi"] == paper
        assert rows[name]["Psi"] == pytest.approx(here[name], abs=1e-12)
    assert rows["path_norm"]["paper_label"] == "path-norm"
    # signs as built
    assert {n: r["Psi_sign"] for n, r in rows.items()} == {
        "path_norm": "agree", "spectral_orig": "agree", "sharpness_flatness": "flip",
        "vc_dim": "agree"}
    assert res["sign_flips"] == ["sharpness_flatness"]
    assert res["agreement"] == {"Psi_sign_agree": 3, "Psi_sign_flip": 1,
                                "Psi_sign_compared": 4}
    names = sorted(PAPER_PSI)
    rho = stats.spearmanr([PAPER_PSI[n] for n in names], [here[n] for n in names])[0]
    kt = stats.kendalltau([PAPER_PSI[n] for n in names], [here[n] for n in names])[0]
    assert res["rank_correlation"]["Psi"]["spearman"] == pytest.approx(rho, abs=1e-12)
    assert res["rank_correlation"]["Psi"]["kendall"] == pytest.approx(kt, abs=1e-12)
    assert res["rank_correlation"]["Psi"]["n"] == 4
    # K beside Table 6's: path-norm's least of |S| = 0, 1, 2 is 0.0240 (Table 2: 0.0240)
    assert rows["path_norm"]["paper_K"] == 0.0240
    mu = table["complexity.path_norm"].to_list()
    sets = [()] + [(j,) for j in range(3)] + list(itertools.combinations(range(3), 2))
    refs = {s: cmi_equal_ref(mu, gap, levels, s) for s in sets}
    k = min([refs[()][0]] + [refs[s][1] for s in sets if len(s) == 1]
            + [refs[s][0] for s in sets if len(s) == 2])
    assert rows["path_norm"]["K"] == pytest.approx(k, abs=1e-12)
    # VC dim's least in Table 6 is its |S| = 2 column, 0.0000 (Table 1 prints 0.00)
    assert rows["vc_dim"]["paper_K"] == 0.0
    assert res["convention"] == "paper"
    # one seed: no std across seeds to show
    assert not {"Psi_std", "K_std", "paper_Psi_std"} & set(rows["path_norm"])
    assert "by_seed" not in res["rank_correlation"]["Psi"]


def _k_ref(mu, gap, levels):
    sets = [()] + [(j,) for j in range(3)] + list(itertools.combinations(range(3), 2))
    refs = {s: cmi_equal_ref(mu, gap, levels, s) for s in sets}
    return min([refs[()][0]] + [refs[s][1] for s in sets if len(s) == 1]
               + [refs[s][0] for s in sets if len(s) == 2])


def test_compare_with_seeds_gives_the_std_across_seeds(db):
    """Several seeds: each measure's std of Ψ (Table 10's convention) beside Table 10's,
    the std of K, and the rank correlations of each seed's Ψ and K with the paper's,
    with their std across seeds; every figure recomputed here seed by seed."""
    table = pl.concat([grid(seed=s).with_columns(pl.lit(s).alias("seed"),
                                                 pl.col("model_id") + f"s{s}")
                       for s in range(3)])
    build_warehouse(db, table)
    res = json.loads(run("compare", "--paper", "--db", db, "--format", "json"))
    rows = {r["measure"]: r for r in res["measures"]}
    psi_seed, k_seed = {n: [] for n in PAPER_PSI}, {n: [] for n in PAPER_PSI}
    sigma = {}
    for name in PAPER_PSI:
        per_axis = []
        for s in range(3):
            t = table.filter(pl.col("seed") == s).sort("model_id")
            mu, gap, levels = t[f"complexity.{name}"].to_list(), t["gen.gap"].to_list(), \
                _levels(t)
            psi = psi_ref(mu, gap, levels)
            per_axis.append(psi)
            psi_seed[name].append(float(np.mean(psi)))
            k_seed[name].append(_k_ref(mu, gap, levels))
        sigma[name] = np.std(per_axis, axis=0, ddof=1)
        table10 = float(np.sqrt(np.sum(np.square(sigma[name]))) / len(AXES))
        assert rows[name]["Psi"] == pytest.approx(np.mean(psi_seed[name]), abs=1e-12)
        assert rows[name]["Psi_std"] == pytest.approx(table10, abs=1e-12)
        assert rows[name]["K_std"] == pytest.approx(np.std(k_seed[name], ddof=1), abs=1e-12)
    # Table 10, read by hand: path-norm's std of Ψ over 5 runs is 0.0044
    assert rows["path_norm"]["paper_Psi_std"] == 0.0044
    names = sorted(PAPER_PSI)
    corr = res["rank_correlation"]["Psi"]
    rhos = [stats.spearmanr([PAPER_PSI[n] for n in names], [psi_seed[n][s] for n in names])[0]
            for s in range(3)]
    assert [c["seed"] for c in corr["by_seed"]] == [0, 1, 2]
    np.testing.assert_allclose([c["spearman"] for c in corr["by_seed"]], rhos, atol=1e-12)
    assert corr["spearman_seed_std"] == pytest.approx(np.std(rhos, ddof=1), abs=1e-12)
    assert corr["spearman_seed_mean"] == pytest.approx(np.mean(rhos), abs=1e-12)
    paper_k = {r["measure"]: r["paper_K"] for r in res["measures"]}
    taus = [stats.kendalltau([paper_k[n] for n in names], [k_seed[n][s] for n in names])[0]
            for s in range(3)]
    np.testing.assert_allclose([c["kendall"] for c in res["rank_correlation"]["K"]["by_seed"]],
                               taus, atol=1e-12)
    out = CliRunner().invoke(query, ["compare", "--paper", "--db", str(db)])
    assert out.exit_code == 0
    assert "Spearman ρ of Ψ, per seed: std over 3 seeds" in out.output
    assert "Psi_std" in out.output and "paper_Psi_std" in out.output


def test_not_in_paper_and_missing(warehouse):
    db, _ = warehouse
    res = json.loads(run("compare", "--paper", "--db", db, "--format", "json"))
    assert res["not_in_paper"] == ["my_measure"]
    missing = {m["measure"]: m for m in res["missing"]}
    assert "path_norm" not in missing
    assert missing["sum_of_fro"]["paper_label"] == "sum-of-fro"
    assert missing["sum_of_fro"]["command"] == f"fgm-measure --measures sum_of_fro --db {db}"
    # the text output says it in words, and exits 0
    out = run("compare", "--paper", "--db", db)
    assert "not in the paper: my_measure" in out
    assert f"missing here: sum_of_fro (the paper's 'sum-of-fro'); fill with: fgm-measure " \
           f"--measures sum_of_fro --db {db}" in out
    assert "the sign of Ψ flips for: sharpness_flatness" in out


def test_a_warehouse_without_the_papers_measures(db):
    table = grid().select("model_id", "hp.depth", "hp.width", "hp.batch_size", "gen.gap",
                          "complexity.my_measure")
    build_warehouse(db, table)
    res = json.loads(run("compare", "--paper", "--db", db, "--format", "json"))
    assert res["measures"] == [] and res["not_in_paper"] == ["my_measure"]
    assert res["rank_correlation"] == {}
    assert len(res["missing"]) == len({m["measure"] for m in res["missing"]}) >= 39
    run("compare", "--paper", "--db", db)          # and the table prints


def test_table7_and_csv(warehouse):
    db, _ = warehouse
    res = json.loads(run("compare", "--paper", "--table", "7", "--db", db, "--format", "json"))
    rows = {r["measure"]: r for r in res["measures"]}
    assert rows["path_norm"]["paper_Psi"] == 0.2936      # Table 7, "path norm"
    assert rows["spectral_orig"]["paper_label"] == "spectral complexity 0ref"
    assert "paper_K" not in rows["path_norm"]
    assert res["paper_datasets"] == ["svhn"]
    out = CliRunner().invoke(query, ["compare", "--paper", "--table", "6", "--db", str(db),
                                     "--format", "csv"])
    assert out.exit_code == 0
    parsed = list(csv.DictReader(io.StringIO(out.stdout)))
    assert {r["measure"] for r in parsed} == {"path_norm", "spectral_orig",
                                              "sharpness_flatness", "vc_dim"}
    assert "paper_Psi" not in parsed[0] and "paper_K" in parsed[0]
    assert "Spearman ρ of K" in out.stderr


def test_compare_needs_paper(warehouse):
    db, _ = warehouse
    out = CliRunner().invoke(query, ["compare", "--db", str(db)])
    assert out.exit_code != 0 and "--paper" in out.output
    out = CliRunner().invoke(query, ["compare", "--paper", "--table", "9", "--db", str(db)])
    assert out.exit_code != 0 and "'9' is not one of" in out.output


def test_convention_paper_seed_statistics(db):
    """psi / table --convention paper: Ψ's std across seeds as Table 10's,
    sqrt(Σ σ_i²)/k over the k axes; the means are the same as SPEC's."""
    table = pl.concat([grid(seed=s).with_columns(pl.lit(s).alias("seed"),
                                                 pl.col("model_id") + f"s{s}")
                       for s in range(3)])
    build_warehouse(db, table)
    spec = json.loads(run("psi", "-m", "path_norm", "--db", db, "--format", "json"))
    paper = json.loads(run("psi", "-m", "path_norm", "--convention", "paper", "--db", db,
                           "--format", "json"))
    sigma = [spec["seeds"]["std"]["psi"][a] for a in AXES]
    # the per-seed ψ_i, recomputed from scratch: their std matches, then Table 10's formula
    levels = {}
    per_seed_psi = []
    for s in range(3):
        t = table.filter(pl.col("seed") == s).sort("model_id")
        levels = _levels(t)
        per_seed_psi.append(psi_ref(t["complexity.path_norm"].to_list(),
                                    t["gen.gap"].to_list(), levels))
    np.testing.assert_allclose(sigma, np.std(per_seed_psi, axis=0, ddof=1), atol=1e-12)
    expected = float(np.sqrt(np.sum(np.square(sigma))) / len(AXES))
    assert paper["seeds"]["std"]["Psi"] == pytest.approx(expected, abs=1e-12)
    per_seed_big = np.mean(per_seed_psi, axis=1)
    assert spec["seeds"]["std"]["Psi"] == pytest.approx(np.std(per_seed_big, ddof=1), abs=1e-12)
    assert paper["Psi"] == pytest.approx(spec["Psi"], abs=1e-15)
    frame = pl.read_csv(io.StringIO(run("table", "--convention", "paper", "--db", db,
                                        "--format", "csv")))
    row = frame.filter(pl.col("measure") == "path_norm").row(0, named=True)
    assert row["Psi_std"] == pytest.approx(expected, abs=1e-12)


def test_convention_paper_refuses_pgdl(warehouse):
    db, _ = warehouse
    out = CliRunner().invoke(query, ["cmi", "-m", "path_norm", "--pgdl", "--convention",
                                     "paper", "--db", str(db)])
    assert out.exit_code != 0 and "--convention" in out.output


def test_report_section_paper_vs_here(warehouse, tmp_path):
    import re
    db, _ = warehouse
    out = tmp_path / "rep"
    run("report", "--out", out, "--draws", "2", "--db", db)
    page = (out / "index.html").read_text()
    words = page.split("<script>")[0]
    assert "The paper and this warehouse: Ψ (Table 5) and K (Table 6)" in words
    assert "The sign of Ψ agrees for 3 of 4 measures (it flips for sharpness_flatness)" in words
    assert "Not in the paper: my_measure." in words
    assert (out / "paper_vs_here.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    specs = json.loads(re.search(r"const specs = (\{.*?\});\n", page, re.S).group(1))
    chart = next(s for s in specs.values() if "hconcat" in s)
    psi_panel, k_panel = chart["hconcat"]
    diagonal, dots = psi_panel["layer"]
    assert diagonal["mark"]["type"] == "line"
    assert dots["mark"]["type"] == "circle"
    assert dots["encoding"]["x"]["field"] == "paper" and dots["encoding"]["y"]["field"] == "here"
    data = chart["datasets"]
    line = data[diagonal["data"]["name"]]
    assert [(p["paper"], p["here"]) for p in line] == [(-1.0, -1.0), (1.0, 1.0)]
    points = data[dots["data"]["name"]]
    assert sorted(p["measure"] for p in points) == sorted(PAPER_PSI)
    assert k_panel["layer"][1]["encoding"]["x"]["title"] == "K in the paper"
    # the K panel's points are coloured by the measure's sign of Ψ, as the shared
    # legend says: sharpness_flatness, whose Ψ flips, is red there too
    k_dots = k_panel["layer"][1]
    assert k_dots["encoding"]["color"]["field"] == "sign"
    k_points = {p["measure"]: p["sign"] for p in data[k_dots["data"]["name"]]}
    assert k_points["sharpness_flatness"] == "flip" and k_points["path_norm"] == "agree"


def test_report_section_without_the_papers_measures(db, tmp_path):
    table = grid().select("model_id", "hp.depth", "hp.width", "hp.batch_size", "gen.gap",
                          "complexity.my_measure")
    build_warehouse(db, table)
    out = tmp_path / "rep"
    run("report", "--out", out, "--draws", "2", "--db", db)
    page = (out / "index.html").read_text().split("<script>")[0]
    assert "No panel: this warehouse holds none of the paper's measures." in page
    assert not (out / "paper_vs_here.png").exists()


def _two_datasets(db, second="svhn", first="cifar10"):
    """One grid on `first` (the paper's measures as built by grid()) and another on
    `second` whose gaps rank the measures the other way, plus sum_of_fro there only."""
    a = grid(0).with_columns(("a" + pl.col("model_id")).alias("model_id"))
    b = grid(1).with_columns(("b" + pl.col("model_id")).alias("model_id"),
                             (-pl.col("gen.gap")).alias("gen.gap"),
                             pl.col("complexity.vc_dim").alias("complexity.sum_of_fro"))
    build_warehouse(db, a, sweep="first", dataset=first)
    ingest_file(db, Path("second.csv"), frame=b, sweep="second", dataset=second)
    return a.sort("model_id"), b.sort("model_id")


def test_compare_ranks_the_papers_dataset_alone(db, tmp_path):
    """Models on CIFAR-10 and SVHN: Tables 5 and 6 are compared with the CIFAR-10
    models only, Table 7 with the SVHN ones; never one ranking over both."""
    a, b = _two_datasets(db)
    res = json.loads(run("compare", "--paper", "--db", db, "--format", "json"))
    rows = {r["measure"]: r for r in res["measures"]}
    assert res["n_models"] == a.height and res["datasets"] == ["cifar10"]
    assert "svhn" in res["note"] and "--dataset" in res["note"]
    for name in PAPER_PSI:
        ref = float(np.mean(psi_ref(a[f"complexity.{name}"].to_list(), a["gen.gap"].to_list(),
                                    _levels(a))))
        assert rows[name]["Psi"] == pytest.approx(ref, abs=1e-12)
    # sum_of_fro has values on the SVHN models only: missing for this comparison
    missing = {m["measure"]: m for m in res["missing"]}
    assert missing["sum_of_fro"]["reason"] == "no value on the selected models"
    assert "sum_of_fro" not in rows
    out = run("compare", "--paper", "--db", db)
    assert "no value on the selected models: sum_of_fro (the paper's 'sum-of-fro')" in out

    svhn = json.loads(run("compare", "--paper", "--table", "7", "--db", db, "--format", "json"))
    assert svhn["n_models"] == b.height and svhn["datasets"] == ["svhn"]
    ref = float(np.mean(psi_ref(b["complexity.path_norm"].to_list(), b["gen.gap"].to_list(),
                                _levels(b))))
    assert {r["measure"]: r for r in svhn["measures"]}["path_norm"]["Psi"] == \
        pytest.approx(ref, abs=1e-12)
    # --dataset still chooses
    chosen = json.loads(run("compare", "--paper", "--dataset", "svhn", "--db", db,
                            "--format", "json"))
    assert chosen["n_models"] == b.height and "note" in chosen    # not the paper's dataset


def test_compare_refuses_to_pool_datasets_none_the_papers(db, tmp_path):
    _two_datasets(db, first="digits", second="fashion_mnist")
    out = CliRunner().invoke(query, ["compare", "--paper", "--db", str(db)])
    assert out.exit_code != 0
    assert "digits, fashion_mnist" in out.output and "--dataset" in out.output
    one = json.loads(run("compare", "--paper", "--dataset", "digits", "--db", db,
                         "--format", "json"))
    assert one["datasets"] == ["digits"]
    # the report says so in its paper section and renders the rest
    rep = tmp_path / "rep"
    run("report", "--out", rep, "--draws", "2", "--db", db)
    page = (rep / "index.html").read_text().split("<script>")[0]
    assert "No panel: the selected models are on 2 datasets" in page


def test_paper_measures_outside_the_table_and_the_papers_own_doubt(db):
    """Table 7 lacks 1/margin, which Tables 1, 5 and 6 have: "not in Table 7", not "not
    in the paper". Tables 1 and 5 print its sign both ways: said beside the result."""
    table = grid().with_columns(pl.col("complexity.path_norm").alias("complexity.inverse_margin"))
    build_warehouse(db, table)
    res = json.loads(run("compare", "--paper", "--table", "7", "--db", db, "--format", "json"))
    assert "inverse_margin" in res["not_in_tables"]
    assert "inverse_margin" not in res["not_in_paper"] and "my_measure" in res["not_in_paper"]
    out = run("compare", "--paper", "--table", "7", "--db", db)
    assert "in the paper, not in Table 7: inverse_margin" in out
    res = json.loads(run("compare", "--paper", "--db", db, "--format", "json"))
    assert "Table 1" in res["caveats"]["inverse_margin"]
    assert "caveat on inverse_margin: Table 1 prints 1/γ" in run("compare", "--paper",
                                                                 "--db", db)


def test_too_few_measures_for_a_rank_correlation_says_why(db):
    table = grid().select("model_id", "hp.depth", "hp.width", "hp.batch_size", "gen.gap",
                          "complexity.path_norm", "complexity.vc_dim")
    build_warehouse(db, table)
    res = json.loads(run("compare", "--paper", "--db", db, "--format", "json"))
    assert res["rank_correlation"]["Psi"] == {"n": 2, "spearman": None, "kendall": None}
    out = run("compare", "--paper", "--db", db)
    assert "no rank correlation of Ψ: 2 measures with both figures, it takes 3" in out
    assert "Spearman ρ of Ψ" not in out


def test_the_dataset_default_does_not_trip_on_the_other_datasets_levels(db):
    """A CIFAR-10 grid at depths 2, 4, 8 beside an SVHN grid at depths 16, 32, 64 (each
    numbers its levels its own way): compared on CIFAR-10 without a word about levels."""
    a, _ = _two_datasets(db)
    deeper = grid(2).with_columns(("c" + pl.col("model_id")).alias("model_id"),
                                  (pl.col("hp.depth") * 8).alias("hp.depth"))
    ingest_file(db, Path("third.csv"), frame=deeper, sweep="third", dataset="svhn")
    res = json.loads(run("compare", "--paper", "--db", db, "--format", "json"))
    assert res["datasets"] == ["cifar10"] and res["n_models"] == a.height


def test_a_measure_whose_values_failed_is_filled_with_recompute(db):
    """fgm-measure counts a failed value as done: the command to fill it recomputes."""
    from fgm.warehouse import connect
    a, _ = _two_datasets(db)
    con = connect(db)
    con.execute("UPDATE measures SET value = NULL, status = 'failed', error = 'diverged' "
                "WHERE measure = 'vc_dim' AND model_id LIKE 'a%'")
    con.close()
    res = json.loads(run("compare", "--paper", "--db", db, "--format", "json"))
    missing = {m["measure"]: m for m in res["missing"]}
    assert missing["vc_dim"]["failed"] == a.height
    assert missing["vc_dim"]["command"] == f"fgm-measure --measures vc_dim --recompute --db {db}"
    assert missing["sum_of_fro"]["failed"] == 0 and "--recompute" not in \
        missing["sum_of_fro"]["command"]
    out = run("compare", "--paper", "--db", db)
    assert f"no value on the selected models: vc_dim (the paper's 'VC dim'); its {a.height} " \
           "values failed (fgm-query measures says why); fill with: fgm-measure --measures " \
           f"vc_dim --recompute --db {db}" in out


def test_per_seed_correlations_match_figures_by_seed_not_position(db):
    """vc_dim has no values on seed 2 (a measure run that failed there): seed 2's rank
    correlation is over the other three measures, seeds 0 and 1 over all four, and
    no figure of one seed is read as another's."""
    table = pl.concat([grid(seed=s).with_columns(pl.lit(s).alias("seed"),
                                                 pl.col("model_id") + f"s{s}")
                       for s in range(3)])
    table = table.with_columns(
        pl.when(pl.col("seed") == 2).then(None).otherwise(pl.col("complexity.vc_dim"))
        .alias("complexity.vc_dim"))
    build_warehouse(db, table)
    res = json.loads(run("compare", "--paper", "--db", db, "--format", "json"))
    by_seed = {c["seed"]: c for c in res["rank_correlation"]["Psi"]["by_seed"]}
    assert sorted(by_seed) == [0, 1, 2]
    assert [by_seed[s]["n"] for s in range(3)] == [4, 4, 3]
    for s in range(3):
        t = table.filter(pl.col("seed") == s).sort("model_id")
        names = sorted(n for n in PAPER_PSI if t[f"complexity.{n}"].null_count() == 0)
        here = [float(np.mean(psi_ref(t[f"complexity.{n}"].to_list(), t["gen.gap"].to_list(),
                                      _levels(t)))) for n in names]
        rho = stats.spearmanr([PAPER_PSI[n] for n in names], here)[0]
        assert by_seed[s]["spearman"] == pytest.approx(rho, abs=1e-12)
