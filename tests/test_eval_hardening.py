"""Evaluation on awkward inputs: continuous axes (CMI memory), one axis under
--pgdl, a seed per model, and the published robust sign-error rule."""

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
from collections import defaultdict

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from reference import cmi_ref, psi_ref, sign, tau_ref
from scipy.special import ndtr
from warehouse_fixture import build_warehouse

from fgm.analysis.cli import main as query
from fgm.analysis.evaluate import Models, with_seeds
from fgm.analysis.ranking import Conditioning, cmi_by_set, slice_tables
from fgm.analysis.robust import robust_sign_error
from fgm.warehouse import FgmError


def run(*args):
    out = CliRunner().invoke(query, [str(a) for a in args])
    assert out.exit_code == 0, out.output
    return out.output


def fail(*args):
    out = CliRunner().invoke(query, [str(a) for a in args])
    assert out.exit_code == 1, out.output
    return out.output


# --------------------------------------------------------------------------- 1. CMI memory

def cmi_all_pairs(mu, g):
    """Î(∅) straight from the n × n matrix of ordered pairs (a ≠ b): one 2×2 table."""
    vg = (g[:, None] > g[None, :])
    vm = (mu[:, None] > mu[None, :])
    off = ~np.eye(len(g), dtype=bool)
    counts = np.array([[np.sum(off & (vg == a) & (vm == b)) for b in (0, 1)] for a in (0, 1)],
                      dtype=float)
    p = counts / counts.sum()
    pg, pm = p.sum(axis=1), p.sum(axis=0)
    mi = sum(p[a, b] * math.log(p[a, b] / (pg[a] * pm[b]))
             for a in (0, 1) for b in (0, 1) if p[a, b] > 0)
    h = -sum(x * math.log(x) for x in pg if x > 0)
    return mi / h


CONTINUOUS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    limit = 2 * 1024 ** 3
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import numpy as np
    import polars as pl
    from fgm.analysis.evaluate import Models, cmi_result

    def vm_peak():
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                    if line.startswith("VmPeak"))
    after_import = vm_peak()
    assert "torch" not in sys.modules
    n = 2000
    rng = np.random.default_rng(7)
    gap = rng.normal(0.1, 0.03, n)
    mu = gap + rng.normal(0, 0.03, n)
    # two continuous axes: every model its own value, so its own level, on both
    levels = np.stack([rng.permutation(n), rng.permutation(n)], axis=1)
    models = Models(np.array([f"m{i}" for i in range(n)]), gap, levels, ["lr", "wd"],
                    pl.DataFrame(), np.zeros(n, dtype=np.int64), np.full(n, np.nan))
    t0 = time.perf_counter()
    res = cmi_result("m", mu, models)
    pgdl = cmi_result("m", mu, models, pgdl=True)
    print(json.dumps({"res": res, "pgdl": pgdl, "seconds": time.perf_counter() - t0,
                      "vm_after_import": after_import, "vm_peak": vm_peak(),
                      "mu": mu.tolist(), "gap": gap.tolist()}, default=str))
""")


def test_cmi_of_2000_models_on_two_continuous_axes_fits_in_2_gib():
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "POLARS_MAX_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", CONTINUOUS_SCRIPT], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    # the imports alone must leave most of the 2 GiB to the computation
    assert out["vm_after_import"] < 1.25 * 1024 ** 3, out["vm_after_import"]
    assert out["vm_peak"] <= 2 * 1024 ** 3
    res = out["res"]
    assert res["n_models"] == 2000
    mu, g = np.array(out["mu"]), np.array(out["gap"])
    # |S| = 0: one slice holding all 2000·1999 pairs
    assert res["s0"] == pytest.approx(cmi_all_pairs(mu, g), abs=1e-12)
    # conditioning on a continuous axis leaves one pair per slice: H(V_g) = 0 everywhere
    assert res["per_axis"] == {"lr": None, "wd": None}
    assert res["s1"] is None and res["s2"] is None
    assert res["K"] == res["s0"] and res["argmin"] == []
    # PGDL (|S| = 2 only): one pair or one self-pair per slice, V_g constant in each
    assert out["pgdl"]["K"] is None and "H(V_g) = 0" in out["pgdl"]["note"]
    print(f"2,000 continuous models: {out['seconds']:.1f} s, VmPeak "
          f"{out['vm_peak'] / 2**20:.0f} MiB (imports {out['vm_after_import'] / 2**20:.0f} MiB)")


@pytest.mark.parametrize("block", [None, 7, 50])
def test_cmi_on_many_level_axes_against_pair_loop(block):
    rng = np.random.default_rng(11)
    n = 36
    levels = np.stack([rng.permutation(n),                 # continuous: one model per level
                       rng.integers(0, 14, n),             # many levels, some ties
                       rng.integers(0, 3, n)], axis=1)     # an ordinary axis
    g = np.round(rng.normal(0.1, 0.04, n), 2)
    mu = np.round(g + rng.normal(0, 0.03, n), 2)
    cond = Conditioning.build(levels)
    assert cond.n_cells[1] == n                            # occupied cells only
    assert cond.n_cells[cond.sets.index((0, 1))] == n      # not 36 · 14
    ours = cmi_by_set(mu, g, cond, block_entries=block)
    finite = 0
    for k, s in enumerate(cond.sets):
        ref = cmi_ref(mu.tolist(), g.tolist(), levels.tolist(), s)
        if math.isnan(ref):
            assert math.isnan(ours[k]), s
        else:
            finite += 1
            assert ours[k] == pytest.approx(ref, abs=1e-12), s
    assert finite >= 4   # (), the tied axis, the grid axis and their pair are defined


def test_slice_tables_count_every_ordered_pair_once():
    rng = np.random.default_rng(4)
    n = 25
    levels = np.stack([rng.integers(0, 9, n), rng.integers(0, 2, n)], axis=1)
    g, mu = rng.integers(0, 4, n).astype(float), rng.integers(0, 4, n).astype(float)
    cond = Conditioning.build(levels)
    for self_pairs in (False, True):
        tables = slice_tables(mu, g, cond, self_pairs=self_pairs)
        for k, s in enumerate(cond.sets):
            # cells: the occupied level tuples of S, in sorted order
            keys = [tuple(levels[i, list(s)]) for i in range(n)]
            occupied = sorted(set(keys))
            cell = [occupied.index(key) for key in keys]
            ref = np.zeros((len(occupied), len(occupied), 2, 2))
            assert tables[k].shape == ref.shape
            for a, b in itertools.product(range(n), repeat=2):
                if a != b or self_pairs:
                    ref[cell[a], cell[b], int(g[a] > g[b]), int(mu[a] > mu[b])] += 1
            np.testing.assert_array_equal(tables[k], ref)


# --------------------------------------------------------------------------- 2. --pgdl, one axis

def test_pgdl_on_a_one_axis_table_gives_null_k_and_a_note(db):
    rng = np.random.default_rng(1)
    depth = [2, 4, 8] * 4
    gap = rng.normal(0.1, 0.03, len(depth))
    build_warehouse(db, pl.DataFrame({"model_id": [f"m{i:02d}" for i in range(len(depth))],
                                      "hp.depth": depth, "gen.gap": gap,
                                      "complexity.m": gap + rng.normal(0, 0.03, len(depth))}))
    res = json.loads(run("cmi", "-m", "m", "--pgdl", "--db", db, "--format", "json"))
    assert res["K"] is None and res["argmin"] is None and res["n_models"] == 12
    assert "--pgdl" in res["note"] and "1 axis (depth)" in res["note"]
    text = run("cmi", "-m", "m", "--pgdl", "--db", db)
    assert "note:" in text and "|S| = 2" in text
    plain = json.loads(run("cmi", "-m", "m", "--db", db, "--format", "json"))
    assert plain["K"] is not None and "note" not in plain


# --------------------------------------------------------------------------- 3. a seed per model

GRID = {"depth": [2, 4, 8], "width": [16, 32]}


def seed_per_model_table(copies=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(copies):
        for d, w in itertools.product(*GRID.values()):
            gap = 0.1 + 0.02 * GRID["depth"].index(d) + rng.normal(0, 0.02)
            rows.append({"model_id": f"c{c}-{d}-{w}", "hp.depth": d, "hp.width": w,
                         "gen.gap": round(gap, 4), "complexity.m": gap + rng.normal(0, 0.02)})
    return pl.DataFrame(rows).with_columns(pl.Series("seed", range(6 * copies)))


@pytest.fixture
def seed_per_model(db):
    table = seed_per_model_table()
    build_warehouse(db, table)
    return db, table


def pooled_refs(table):
    t = table.sort("model_id")
    levels = [[GRID["depth"].index(d), GRID["width"].index(w)]
              for d, w in t.select("hp.depth", "hp.width").rows()]
    return t["complexity.m"].to_list(), t["gen.gap"].to_list(), levels


@pytest.mark.parametrize("command", [["psi", "-m", "m"], ["cmi", "-m", "m"],
                                     ["oracle", "--eps", "0.05", "--draws", "3"],
                                     ["table"], ["table", "--kind", "cmi", "--draws", "2"]])
def test_a_seed_per_model_is_an_error_that_offers_pool_seeds(seed_per_model, command):
    db, _ = seed_per_model
    text = fail(*command, "--db", db)
    assert "`seed`" in text and "no seed holds two models" in text and "--pool-seeds" in text


def test_pool_seeds_evaluates_all_models_together(seed_per_model):
    db, table = seed_per_model
    mu, g, levels = pooled_refs(table)
    res = json.loads(run("psi", "-m", "m", "--pool-seeds", "--db", db, "--format", "json"))
    assert res["n_models"] == 18 and "seeds" not in res
    assert res["tau"] == pytest.approx(tau_ref(mu, g), abs=1e-12)
    psi = psi_ref(mu, g, levels)
    assert res["psi"]["depth"] == pytest.approx(psi[0], abs=1e-12)
    assert res["Psi"] == pytest.approx(sum(psi) / 2, abs=1e-12)
    cmi = json.loads(run("cmi", "-m", "m", "--pool-seeds", "--db", db, "--format", "json"))
    sets = [(), (0,), (1,), (0, 1)]
    refs = {s: cmi_ref(mu, g, levels, s) for s in sets}
    assert cmi["K"] == pytest.approx(min(refs.values()), abs=1e-12)
    oracle = json.loads(run("oracle", "--eps", "0.05", "--draws", "3", "--pool-seeds",
                            "--db", db, "--format", "json"))
    ga = np.array(g)
    terms = 2 * ndtr(np.abs(ga[:, None] - ga[None, :]) / (np.sqrt(2) * 0.05)) - 1
    assert oracle["tau"] == pytest.approx(terms.sum() / (18 * 17), abs=1e-12)
    rows = {r["measure"]: r for r in json.loads(run("table", "--pool-seeds", "--db", db,
                                                     "--format", "json"))}
    assert rows["m"]["tau"] == pytest.approx(res["tau"], abs=1e-12)
    assert rows["m"]["depth"] == pytest.approx(psi[0], abs=1e-12)
    rows6 = {r["measure"]: r for r in json.loads(run("table", "--kind", "cmi", "--draws", "2",
                                                      "--pool-seeds", "--db", db,
                                                      "--format", "json"))}
    assert rows6["m"]["K"] == pytest.approx(cmi["K"], abs=1e-12)


def test_report_refuses_a_seed_per_model_unless_pooled(seed_per_model, tmp_path):
    db, _ = seed_per_model
    assert "--pool-seeds" in fail("report", "--db", db, "--out", tmp_path / "r")
    run("report", "--pool-seeds", "--draws", "2", "--db", db, "--out", tmp_path / "r")
    page = (tmp_path / "r" / "index.html").read_text()
    assert "Table 5" in page and "Table 6" in page


def test_with_seeds_pool_keyword_and_check():
    rng = np.random.default_rng(2)
    n = 8
    levels = np.array([(i % 2, i // 2 % 2) for i in range(n)])
    models = Models(np.array([f"m{i}" for i in range(n)]), rng.normal(size=n), levels,
                    ["a", "b"], pl.DataFrame({"model_id": [f"m{i}" for i in range(n)]}),
                    np.arange(n), np.full(n, np.nan))
    mu = rng.normal(size=n)

    def compute(m, sub):
        return {"measure": "x", "n_models": len(m), "tau": tau_ref(m.tolist(), sub.gap.tolist())}
    with pytest.raises(FgmError, match="no seed holds two models"):
        with_seeds(models, mu, compute)
    pooled = with_seeds(models, mu, compute, pool_seeds=True, ci=0.9, blocks=20)
    assert pooled["tau"] == pytest.approx(tau_ref(mu.tolist(), models.gap.tolist()), abs=1e-12)
    assert pooled["ci"]["tau"][0] <= pooled["ci"]["tau"][1]
    # two seeds of four models each are fine: evaluated per seed, as before
    models.seeds = np.repeat([0, 1], 4)
    per = with_seeds(models, mu, compute)
    assert per["seeds"]["n"] == 2
    assert per["tau"] == pytest.approx(np.mean([tau_ref(mu[s].tolist(), models.gap[s].tolist())
                                                for s in (slice(0, 4), slice(4, 8))]))


# --------------------------------------------------------------------------- 4. robust sign-error

def robust_ref(mu, gap, levels, n_test, weighting, min_ess):
    """Straight from Dziugaite et al. 2020: every pair of configurations differing in
    exactly one axis is an environment, every pair of their models a sample."""
    configs = defaultdict(list)
    for i, lv in enumerate(levels):
        configs[tuple(lv)].append(i)
    per_axis = {}
    for axis in range(len(levels[0])):
        errors, totals = [], []
        for c1, c2 in itertools.combinations(sorted(configs), 2):
            differ = [j for j in range(len(c1)) if c1[j] != c2[j]]
            if differ != [axis]:
                continue
            sw = sw2 = swe = 0.0
            for a in configs[c1]:
                for b in configs[c2]:
                    dg = gap[b] - gap[a]
                    c = max(0.0, 1.0 - 2.0 * math.exp(-n_test * dg * dg / 2.0))
                    w = max(c * c - 0.5, 0.0) if weighting == "published" else c
                    err = (1 - sign(mu[b] - mu[a]) * sign(dg)) / 2
                    sw, sw2, swe = sw + w, sw2 + w * w, swe + w * err
            if sw > 0 and sw * sw / sw2 >= min_ess - 1e-9:
                errors.append(swe / sw)
                totals.append(sw)
        per_axis[axis] = (errors, totals)
    return per_axis


def check_against_ref(res, ref, names, weighting):
    all_e, all_w = [], []
    for axis, name in enumerate(names):
        e, w = ref[axis]
        got = res["per_axis"][name]
        assert got["environments"] == len(e), name
        all_e += e
        all_w += w
        if not e:
            assert got["mean"] is None and got["note"], name
            continue
        mean = np.average(e, weights=w) if weighting == "hoeffding" else np.mean(e)
        assert got["mean"] == pytest.approx(mean, abs=1e-12)
        assert got["p90"] == pytest.approx(np.percentile(e, 90), abs=1e-12)
        assert got["max"] == pytest.approx(max(e), abs=1e-12)
        assert got["note"] is None
    assert res["overall"]["environments"] == len(all_e)
    if not all_e:
        assert res["overall"]["mean"] is None and res["overall"]["note"]
        return 0
    mean = np.average(all_e, weights=all_w) if weighting == "hoeffding" else np.mean(all_e)
    assert res["overall"]["mean"] == pytest.approx(mean, abs=1e-12)
    return len(all_e)


def robust_data(seeds=5, seed=3):
    rng = np.random.default_rng(seed)
    levels = np.array([(d, w, o) for d in range(3) for w in range(2) for o in range(2)
                       for _ in range(seeds)])
    gap = 0.1 + 0.03 * levels[:, 0] - 0.01 * levels[:, 2] + rng.normal(0, 0.03, len(levels))
    mu = gap + rng.normal(0, 0.04, len(levels))
    return mu, gap, levels


@pytest.mark.parametrize("min_ess", [None, 5.0, 0.0, 20.0])
def test_published_sign_error_against_a_direct_loop(min_ess):
    mu, gap, levels = robust_data()
    names = ["depth", "width", "opt"]
    kwargs = {} if min_ess is None else {"min_ess": min_ess}
    res = robust_sign_error(mu, gap, levels, names, 1000, **kwargs)   # published by default
    assert res["weighting"] == "published"
    assert res["min_ess"] == (12.0 if min_ess is None else min_ess)
    ref = robust_ref(mu.tolist(), gap.tolist(), levels.tolist(), 1000, "published",
                     12.0 if min_ess is None else min_ess)
    kept = check_against_ref(res, ref, names, "published")
    if min_ess in (None, 5.0):
        # the cut bites: some environments kept, some left out for their ESS
        everything = robust_ref(mu.tolist(), gap.tolist(), levels.tolist(), 1000,
                                "published", 0.0)
        assert 0 < kept < sum(len(everything[a][0]) for a in range(3))


@pytest.mark.parametrize("min_ess", [None, 12.0])
def test_hoeffding_sign_error_against_a_direct_loop(min_ess):
    mu, gap, levels = robust_data(seeds=2, seed=8)
    names = ["depth", "width", "opt"]
    res = robust_sign_error(mu, gap, levels, names, 1000, weighting="hoeffding",
                            min_ess=min_ess)
    ref = robust_ref(mu.tolist(), gap.tolist(), levels.tolist(), 1000, "hoeffding",
                     0.0 if min_ess is None else min_ess)
    kept = check_against_ref(res, ref, names, "hoeffding")
    assert (kept > 0) == (min_ess is None)    # 2 seeds: at most 4 pairs, ESS ≤ 4 < 12


def test_published_weight_is_the_squared_confidence_shifted():
    # one environment, one model pair: Δg = 0.1 at n = 1000
    mu, gap = np.array([0.0, 1.0]), np.array([0.2, 0.1])   # discordant: sign error 1
    levels = np.array([[0], [1]])
    res = robust_sign_error(mu, gap, levels, ["a"], 1000, min_ess=1)
    assert res["per_axis"]["a"]["mean"] == 1.0
    # |Δg| = 0.05 at n = 1000: c = 1 − 2e^{−1.25} = 0.4270, c² = 0.182 < 0.5 → weight 0
    res = robust_sign_error(mu, np.array([0.15, 0.1]), levels, ["a"], 1000, min_ess=1)
    assert res["per_axis"]["a"]["environments"] == 0
    assert "weights 0" in res["per_axis"]["a"]["note"]
    # ... while the unsquared Hoeffding weight keeps it
    res = robust_sign_error(mu, np.array([0.15, 0.1]), levels, ["a"], 1000,
                            weighting="hoeffding")
    assert res["per_axis"]["a"]["environments"] == 1


def robust_table(seeds):
    rng = np.random.default_rng(5)
    rows = []
    for s in range(seeds):
        for d, w in itertools.product(*GRID.values()):
            gap = 0.05 + 0.08 * GRID["depth"].index(d) + rng.normal(0, 0.02)
            rows.append({"model_id": f"s{s}-{d}-{w}", "seed": s, "hp.depth": d, "hp.width": w,
                         "gen.gap": gap, "complexity.m": gap + rng.normal(0, 0.03)})
    return pl.DataFrame(rows)


def test_robust_cli_weighting_min_ess_and_notes(db, tmp_path):
    table = robust_table(seeds=3)            # 3 seeds: at most 9 model pairs per environment
    build_warehouse(db, table)
    t = table.sort("model_id")
    mu, gap = t["complexity.m"].to_list(), t["gen.gap"].to_list()
    levels = [[GRID["depth"].index(d), GRID["width"].index(w)]
              for d, w in t.select("hp.depth", "hp.width").rows()]
    base = ["robust", "-m", "m", "--test-size", "1000", "--db", db]
    res = json.loads(run(*base, "--format", "json"))
    assert res["weighting"] == "published" and res["min_ess"] == 12
    assert res["overall"]["environments"] == 0 and res["overall"]["mean"] is None
    # depth moves the gap by 0.08: confident pairs, but 9 of them at most (ESS ≤ 9 < 12)
    assert "effective sample size" in res["per_axis"]["depth"]["note"]
    assert "min_ess = 12" in res["per_axis"]["depth"]["note"]
    # width does not move the gap: no pair is confident
    assert "all weights 0" in res["per_axis"]["width"]["note"]
    text = run(*base)
    assert "note [depth]:" in text and "note [overall]:" in text
    for weighting, min_ess in (("published", 4), ("hoeffding", None), ("hoeffding", 3)):
        extra = ["--weighting", weighting] + ([] if min_ess is None else ["--min-ess", min_ess])
        res = json.loads(run(*base, *extra, "--format", "json"))
        ref = robust_ref(mu, gap, levels, 1000, weighting,
                         min_ess if min_ess is not None else 0.0)
        assert check_against_ref(res, ref, ["depth", "width"], weighting) > 0
    # a test set too small for any pair to be confident: all weights are 0
    res = json.loads(run("robust", "-m", "m", "--test-size", "20", "--min-ess", "1",
                         "--db", db, "--format", "json"))
    assert res["overall"]["environments"] == 0
    assert "all weights 0" in res["per_axis"]["width"]["note"]
    assert "n = 20" in res["per_axis"]["width"]["note"]
    csv = run(*base, "--format", "csv")
    assert csv.splitlines()[0] == "axis,environments,mean,p90,max,note"
