"""Reports, repeated-seed statistics, bootstrap intervals and robust sign-error."""

import itertools
import json
import math
import re

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from reference import psi_ref, sign, tau_ref
from warehouse_fixture import build_warehouse

from fgm.analysis.cli import main as query
from fgm.analysis.robust import robust_sign_error
from fgm.warehouse import connect

AXES = {"depth": [2, 4, 8], "width": [16, 32]}


def seeded_table(n_seeds=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_seeds):
        for combo in itertools.product(*AXES.values()):
            gap = 0.1 + 0.02 * AXES["depth"].index(combo[0]) + rng.normal(0, 0.02)
            rows.append({"model_id": f"s{s}-{combo[0]}-{combo[1]}", "seed": s,
                         "hp.depth": combo[0], "hp.width": combo[1],
                         "train_acc": 1.0, "test_acc": round(1.0 - gap, 3),
                         "complexity.m": gap + rng.normal(0, 0.02)})
    return pl.DataFrame(rows)


def run(*args):
    out = CliRunner().invoke(query, [str(a) for a in args])
    assert out.exit_code == 0, out.output
    return out.output


@pytest.fixture
def seeded(db):
    table = seeded_table()
    build_warehouse(db, table)
    con = connect(db)   # traces for the training-curve chart
    con.execute("INSERT INTO traces SELECT model_id, s * 10, s, 2.0 / (s + 1), 0.1, s "
                "FROM models, range(1, 6) AS r(s)")
    # and the final cross-entropy that Figure 1's middle panel shows
    con.execute("UPDATE outcomes SET train_loss = 0.005 + 0.001 * length(model_id)")
    con.close()
    return db, table


def test_psi_reports_mean_and_std_across_seeds(seeded):
    db, table = seeded
    res = json.loads(run("psi", "-m", "m", "--db", db, "--format", "json"))
    taus, psis = [], []
    for s in range(3):
        t = table.filter(pl.col("seed") == s).sort("model_id")
        mu, g = t["complexity.m"].to_list(), (t["train_acc"] - t["test_acc"]).to_list()
        levels = [[AXES["depth"].index(d), AXES["width"].index(w)]
                  for d, w in t.select("hp.depth", "hp.width").rows()]
        taus.append(tau_ref(mu, g))
        psis.append(sum(psi_ref(mu, g, levels)) / 2)
    assert res["seeds"]["n"] == 3 and res["n_models"] == 18
    assert res["tau"] == pytest.approx(np.mean(taus), abs=1e-9)
    assert res["seeds"]["std"]["tau"] == pytest.approx(np.std(taus, ddof=1), abs=1e-9)
    assert res["Psi"] == pytest.approx(np.mean(psis), abs=1e-9)
    assert res["seeds"]["std"]["Psi"] == pytest.approx(np.std(psis, ddof=1), abs=1e-9)
    table_rows = json.loads(run("table", "--db", db, "--format", "json"))
    m = next(r for r in table_rows if r["measure"] == "m")
    assert m["seeds"] == 3 and m["tau_std"] == pytest.approx(np.std(taus, ddof=1), abs=1e-9)


def test_interval_contains_estimate_and_narrows_with_more_models(db, tmp_path):
    widths = []
    for n_seeds, path in ((1, db), (6, tmp_path / "more.duckdb")):
        table = seeded_table(n_seeds, seed=1).with_columns(pl.lit(0).alias("seed"),
                                                          pl.Series("model_id", [
                                                              f"m{i}" for i in range(
                                                                  6 * n_seeds)]))
        build_warehouse(path, table)
        res = json.loads(run("psi", "-m", "m", "--ci", "0.9", "--blocks", "20",
                             "--db", path, "--format", "json"))
        lo, hi = res["ci"]["tau"]
        assert lo <= res["tau"] <= hi
        assert res["ci"]["level"] == 0.9 and res["ci"]["blocks"] == 6   # one per configuration
        widths.append(hi - lo)
        k = json.loads(run("cmi", "-m", "m", "--ci", "0.9", "--blocks", "5",
                           "--db", path, "--format", "json"))
        assert k["ci"]["K"][0] <= k["ci"]["K"][1]
    assert widths[1] < widths[0]


def test_interval_is_seeded(seeded):
    db, _ = seeded
    a = json.loads(run("psi", "-m", "m", "--ci", "0.95", "--blocks", "5", "--db", db,
                       "--format", "json"))
    b = json.loads(run("psi", "-m", "m", "--ci", "0.95", "--blocks", "5", "--db", db,
                       "--format", "json"))
    assert a["ci"] == b["ci"]


def sign_error_ref(mu, gap, levels, axis, n):
    """A direct loop over pairs of models whose configurations differ in `axis` only."""
    envs = {}
    for a in range(len(mu)):
        for b in range(len(mu)):
            la, lb = levels[a], levels[b]
            if la[axis] >= lb[axis] or any(la[j] != lb[j] for j in range(len(la)) if j != axis):
                continue
            dg = gap[b] - gap[a]
            w = max(0.0, 1 - 2 * math.exp(-n * dg * dg / 2))
            err = (1 - sign(mu[b] - mu[a]) * sign(dg)) / 2
            key = (tuple(x for j, x in enumerate(la) if j != axis), la[axis], lb[axis])
            s, t = envs.get(key, (0.0, 0.0))
            envs[key] = (s + w * err, t + w)
    return {k: s / t for k, (s, t) in envs.items() if t > 0}, \
        {k: t for k, (s, t) in envs.items() if t > 0}


def test_sign_error_against_a_direct_loop():
    rng = np.random.default_rng(3)
    levels = np.array([(d, w) for d in range(3) for w in range(2) for _ in range(2)])  # 2 seeds
    gap = 0.1 + 0.05 * levels[:, 0] + rng.normal(0, 0.03, len(levels))
    mu = gap + rng.normal(0, 0.05, len(levels))
    res = robust_sign_error(mu, gap, levels, ["depth", "width"], 1000, weighting="hoeffding")
    for axis, name in enumerate(["depth", "width"]):
        errs, weights = sign_error_ref(mu.tolist(), gap.tolist(), levels.tolist(), axis, 1000)
        e = np.array(list(errs.values()))
        w = np.array([weights[k] for k in errs])
        got = res["per_axis"][name]
        assert got["environments"] == len(e)
        assert got["mean"] == pytest.approx(np.average(e, weights=w), abs=1e-12)
        assert got["p90"] == pytest.approx(np.percentile(e, 90), abs=1e-12)
        assert got["max"] == pytest.approx(e.max(), abs=1e-12)


def test_robust_cli(seeded):
    db, _ = seeded
    out = CliRunner().invoke(query, ["robust", "-m", "m", "--db", str(db)])
    assert out.exit_code == 1 and "--test-size" in out.output   # tables carry no test size
    res = json.loads(run("robust", "-m", "m", "--test-size", "1000", "--weighting", "hoeffding", "--db", db,
                         "--format", "json"))
    assert set(res["per_axis"]) == {"depth", "width"}
    assert 0 <= res["overall"]["mean"] <= 1 and res["overall"]["max"] <= 1
    assert "overall" in run("robust", "-m", "m", "--test-size", "1000", "--db", db)


def test_report_builds_every_chart_offline(seeded, tmp_path):
    db, _ = seeded
    out = tmp_path / "rep"
    text = run("report", "--out", out, "--draws", "3", "--db", db)
    assert "index.html" in text
    page = (out / "index.html").read_text()
    # no address the page could fetch: the only URL strings left are the XML namespace
    # identifiers inside the inlined Vega library
    urls = set(re.findall(r"https?://[^\s\"'<>)\\]+", page))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink",
                    "http://www.w3.org/2000/xmlns/"}
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "vegaEmbed" in page and len(page) > 500_000   # the library is inlined
    names = ["fig1_converged", "fig1_cross_entropy", "fig1_gap", "table5", "table6", "traces"]
    for name in names:
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{name}.svg").read_text().lstrip().startswith("<svg")
    specs = json.loads(re.search(r"const specs = (\{.*?\});\n", page, re.S).group(1))
    assert len(specs) == len(names)
    converged, ce, gap, t5, t6, traces = specs.values()
    assert converged["spec"]["mark"]["type"] == "bar"
    assert converged["spec"]["encoding"]["y"]["field"] == "above_99"
    assert converged["facet"]["field"] == "axis"
    assert ce["encoding"]["x"]["bin"] and gap["encoding"]["x"]["field"] == "gap"
    layer = t5["layer"][0]
    assert layer["mark"]["type"] == "rect" and layer["encoding"]["color"]["field"] == "value"
    assert layer["encoding"]["color"]["scale"]["domain"] == [-1, 1]
    assert set(layer["encoding"]["x"]["sort"]) >= {"depth", "width", "tau", "Psi"}
    # one model per cell and seed: conditioning on both axes leaves no gap variation, so
    # s2 is undefined everywhere and its empty column is left out of the heatmap
    assert set(t6["layer"][0]["encoding"]["x"]["sort"]) >= {"|S| = 0", "min |S| = 1", "K"}
    assert "s2" not in t6["layer"][0]["encoding"]["x"]["sort"]
    assert traces["encoding"]["y"]["scale"]["type"] == "log"
    assert traces["encoding"]["detail"]["field"] == "model_id"


def test_plot_measure_against_gap(seeded, tmp_path):
    db, _ = seeded
    out = tmp_path / "p"
    run("plot", "-m", "m", "--color", "depth", "--out", out, "--db", db)
    html = (out / "m_vs_gap_by_depth.html").read_text()
    spec = json.loads(re.search(r"vegaEmbed\('#c', (\{.*\}), \{mode", html, re.S).group(1))
    assert spec["mark"]["type"] == "circle"
    assert spec["encoding"]["x"]["field"] == "value" and spec["encoding"]["y"]["field"] == "gap"
    assert spec["encoding"]["color"]["field"] == "depth"
    assert spec["encoding"]["color"]["sort"] == ["2", "4", "8"]
    assert (out / "m_vs_gap_by_depth.png").exists()
    bad = CliRunner().invoke(query, ["plot", "-m", "m", "--color", "colour", "--db", str(db),
                                     "--out", str(out)])
    assert bad.exit_code == 1 and "unknown axis 'colour'" in bad.output


# Report polish (#22): the header's count of models, float noise in the tables, the
# training curves' colours.

def test_report_header_counts_models_by_convergence_in_plain_words(seeded, tmp_path):
    db, _ = seeded
    con = connect(db)   # 6 models converged, 6 not, 6 of unknown convergence
    con.execute("UPDATE outcomes SET converged = CASE WHEN model_id LIKE 's0-%' THEN true "
                "WHEN model_id LIKE 's1-%' THEN false END")
    con.close()
    out = tmp_path / "rep"
    run("report", "--out", out, "--draws", "3", "--db", db)
    page = (out / "index.html").read_text()
    assert "<p>18 models (6 converged, 6 of unknown convergence and 6 not converged) on" in page


@pytest.mark.parametrize("converged, text", [
    ([True] * 27, "27 models (all converged)"),
    ([None] * 27, "27 models (all of unknown convergence)"),
    ([False] * 2, "2 models (none converged)"),
    ([True], "1 model (converged)"),
    ([False], "1 model (not converged)"),
    ([True] * 25 + [None] * 2, "27 models (25 converged and 2 of unknown convergence)"),
    ([True] * 25 + [False] * 2, "27 models (25 converged and 2 not converged)"),
    ([None] * 25 + [False], "26 models (25 of unknown convergence and 1 not converged)"),
    ([True] * 27 + [None] * 2 + [False],
     "30 models (27 converged, 2 of unknown convergence and 1 not converged)"),
    ([], "0 models"),
])
def test_model_counts_say_each_count_once(converged, text):
    from fgm.analysis.report import model_counts
    said = model_counts(converged)
    assert said == text
    assert not re.search(r"\b(\w+) \1\b", said)          # no "or or", no word twice in a row


def test_report_tables_print_no_negative_zero_or_float_noise():
    from fgm.analysis.charts import heatmap
    from fgm.analysis.report import _table_html
    t5 = pl.DataFrame({"kind": ["measure"] * 4, "measure": ["a", "b", "c", "d"],
                       "tau": [-0.0004, -1.85037e-17, 0.1234, -0.0006],
                       "Psi": [-0.0, 1e-19, None, 0.5]})
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", _table_html(t5))
    assert [c for i, c in enumerate(cells) if i % 4 >= 2] == [   # tau and Psi, row by row
        "0.000", "0.000", "0.000", "0.000", "0.123", "", "-0.001", "0.500"]
    # the heatmap's labels (2 decimals) and tooltips (3): no -0.00, no 1.85e-17
    data = heatmap(t5, ["tau", "Psi"], "τ", diverging=True).to_dict()["datasets"]
    rows = {(r["measure"], r["column"]): r for r in next(iter(data.values()))}
    for key in [("a", "tau"), ("b", "tau"), ("a", "Psi"), ("b", "Psi")]:
        assert rows[key]["value"] == 0 and rows[key]["label"] == 0
        assert math.copysign(1, rows[key]["value"]) == math.copysign(1, rows[key]["label"]) == 1
    assert rows[("d", "tau")]["value"] == -0.001 and rows[("d", "tau")]["label"] == 0
    assert rows[("c", "tau")]["value"] == 0.123 and rows[("c", "tau")]["label"] == 0.12
    assert "e-1" not in json.dumps(data) and "-0.0," not in json.dumps(data)


def lab(colour):
    """CIE L*a*b* of an sRGB '#rrggbb' (D65)."""
    rgb = [int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    m = [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]
    xyz = [sum(m[i][j] * lin[j] for j in range(3)) / n
           for i, n in enumerate((0.95047, 1.0, 1.08883))]
    fx, fy, fz = (t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29
                  for t in xyz)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def test_training_curves_colour_each_value_distinctly(seeded, tmp_path):
    """Batch sizes 32, 64 and 128 were drawn in tableau10's orange and salmon red, which
    look alike on thin lines: the curves' colours are categorical and far apart."""
    db, _ = seeded
    out = tmp_path / "rep"
    run("report", "--out", out, "--draws", "3", "--color", "depth", "--db", db)
    page = (out / "index.html").read_text()
    traces = list(json.loads(re.search(r"const specs = (\{.*?\});\n", page, re.S)
                             .group(1)).values())[-1]
    scale = traces["encoding"]["color"]["scale"]
    assert scale["domain"] == ["2", "4", "8"]              # in level order
    colours = scale["range"]
    assert len(colours) == 3
    tableau = ["#4c78a8", "#f58518", "#e45756"]           # the old default's first three
    assert min(math.dist(lab(a), lab(b)) for a, b in itertools.combinations(tableau, 2)) < 60
    assert min(math.dist(lab(a), lab(b)) for a, b in itertools.combinations(colours, 2)) > 60
    # and so for up to ten values: every pair still apart
    from fgm.analysis.charts import category_scale
    ten = category_scale([str(i) for i in range(10)]).to_dict()["range"]
    assert len(set(ten)) == 10
    assert min(math.dist(lab(a), lab(b)) for a, b in itertools.combinations(ten, 2)) > 25


def test_report_of_a_large_grid_with_long_curves(db, tmp_path):
    """252 models with 300-point training curves: the report is written (altair's
    5,000-row guard used to end it with a traceback), at most TRACE_MODELS curves are
    drawn, thinned to TRACE_POINTS points in all, each keeping its first and last."""
    from fgm.analysis.report import TRACE_MODELS, TRACE_POINTS
    table = seeded_table(n_seeds=42)
    build_warehouse(db, table)
    con = connect(db)
    con.execute("INSERT INTO traces SELECT model_id, s * 10, s, 2.0 / (s + 1), 0.1, s "
                "FROM models, range(1, 301) AS r(s)")
    con.close()
    out = tmp_path / "rep"
    run("report", "--out", out, "--draws", "2", "--db", db)
    assert (out / "traces.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "index.html").read_text()
    traces = list(json.loads(re.search(r"const specs = (\{.*?\});\n", page, re.S)
                             .group(1)).values())[-1]
    rows = [r for values in traces["datasets"].values() for r in values]
    models = {r["model_id"] for r in rows}
    assert 100 < len(models) <= TRACE_MODELS < 252
    assert len(rows) <= TRACE_POINTS
    for m in models:
        steps = sorted(r["step"] for r in rows if r["model_id"] == m)
        assert steps[0] == 10 and steps[-1] == 3000 and len(steps) >= 10
    # every point drawn is a real point of its curve
    assert all(r["train_loss"] == pytest.approx(2.0 / (r["step"] / 10 + 1)) for r in rows)
    assert f"{len(models)} of 252 models shown" in page
