"""--ci intervals cover what they claim: a planted τ, Ψ and K lies inside its 95%
interval in at least 90% of seeded replicates of a grid.

The grid is 3⁴ configurations with a planted effect per axis; each replicate
draws new training noise for the gap and new noise for the measure. The planted
value of a statistic is its mean over many replicates. A plain bootstrap over
models put copies of a model side by side (pairs of copies are ties, τ of a tie
is 0) and covered Ψ in 0 of 30 replicates here."""

import itertools

import numpy as np
import polars as pl
import pytest

from fgm.analysis.evaluate import Models, cmi_result, psi_result, with_seeds

LEVELS = np.array(list(itertools.product(range(3), repeat=4)))
EFFECT = np.array([0.03, -0.02, 0.01, 0.0])


def grid(rng, seeds=1):
    levels = np.repeat(LEVELS, seeds, axis=0)
    n = len(levels)
    gap = 0.1 + levels @ EFFECT + rng.normal(0, 0.02, n)
    mu = gap + rng.normal(0, 0.02, n)
    values = pl.DataFrame(schema={"model_id": pl.String, "axis": pl.String,
                                  "value_text": pl.String, "value_num": pl.Float64})
    models = Models(np.array([f"m{i}" for i in range(n)]), gap, levels,
                    ["a", "b", "c", "d"], values, np.tile(np.arange(seeds), len(LEVELS)),
                    np.full(n, np.nan))
    return mu, models


def both(mu, m):
    psi = psi_result("x", mu, m)
    return {"measure": "x", "n_models": len(mu), "tau": psi["tau"], "Psi": psi["Psi"],
            "K": cmi_result("x", mu, m)["K"]}


@pytest.mark.parametrize("seeds, replicates", [(1, 60), (3, 30)])
def test_planted_values_are_covered(seeds, replicates):
    rng = np.random.default_rng(11)
    runs = [with_seeds(m, mu, both) for mu, m in (grid(rng, seeds) for _ in range(200))]
    planted = {k: np.mean([r[k] for r in runs]) for k in ("tau", "Psi", "K")}
    hits = dict.fromkeys(planted, 0)
    for r in range(replicates):
        mu, m = grid(rng, seeds)
        res = with_seeds(m, mu, both, ci=0.95, blocks=20, seed=r, keys=("tau", "Psi", "K"))
        for k, value in planted.items():
            lo, hi = res["ci"][k]
            assert lo <= res[k] <= hi           # the estimate sits inside its own interval
            hits[k] += lo <= value <= hi
    coverage = {k: h / replicates for k, h in hits.items()}
    assert all(c >= 0.9 for c in coverage.values()), coverage
