"""Repeated experiments (the paper's Tables 9 and 10) and bootstrap intervals.

With several seeds of the same grid in the warehouse, every statistic is
computed per seed and reported as the mean across seeds, with the standard
deviation beside it. `--ci` adds seeded confidence intervals for τ, Ψ and K
from a delete-a-block jackknife over configurations (see `jackknife`).

A `seed` column that gives every model its own seed would make every seed a
group of one model and every figure null: `check_seeds` refuses it, and
`--pool-seeds` evaluates all models together, ignoring seeds.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats

from fgm.warehouse import FgmError

SUMMARY_KEYS = ("tau", "Psi", "K")
RANGES = {"tau": (-1.0, 1.0), "Psi": (-1.0, 1.0), "K": (0.0, 1.0)}   # what each can be


def _numbers(results: list, key_path: tuple = ()) -> object:
    """Mean and std of numbers at the same place in several nested results (a key
    missing from some results counts as None there)."""
    first = next((r for r in results if r is not None), None)
    if isinstance(first, dict):
        means, stds = {}, {}
        keys = list(dict.fromkeys(k for r in results if isinstance(r, dict) for k in r))
        for k in keys:
            m, s = _numbers([r.get(k) if isinstance(r, dict) else None for r in results],
                            key_path + (k,))
            means[k], stds[k] = m, s
        return means, stds
    if first is None or isinstance(first, int | float) and not isinstance(first, bool):
        vals = np.array([np.nan if v is None else v for v in results], dtype=float)
        vals = vals[np.isfinite(vals)]
        if not len(vals):
            return None, None
        return float(vals.mean()), (float(vals.std(ddof=1)) if len(vals) > 1 else None)
    # text, lists (argmin): the most common one
    present = [r for r in results if r is not None]
    as_key = [repr(r) for r in present]
    best = max(set(as_key), key=as_key.count)
    return present[as_key.index(best)], None


def check_seeds(seeds: np.ndarray) -> None:
    """Refuse seeds that leave nothing to rank: several seeds, none with two models."""
    values, counts = np.unique(np.asarray(seeds), return_counts=True)
    alone = int((counts < 2).sum())
    if len(values) >= 2 and counts.max() >= 2 and alone * 2 > len(values):
        # a seed per model but for a collision or two: the few seeds that hold two
        # models would speak for all of them
        raise FgmError(
            f"the `seed` column gives {alone} of its {len(values)} seeds a single model: "
            "per seed, almost nothing can be ranked, and the few seeds with two models "
            "would decide every figure. Pass --pool-seeds to evaluate all models together, "
            "ignoring seeds.")
    if len(values) >= 2 and counts.max() < 2:
        raise FgmError(
            f"the `seed` column gives each of the {int(counts.sum())} models its own seed "
            f"({len(values)} seeds): no seed holds two models, so nothing can be ranked "
            "within a seed and every figure would be null. Pass --pool-seeds to evaluate "
            "all models together, ignoring seeds.")


def per_seed(seeds: np.ndarray, compute: Callable[[np.ndarray], dict]) -> dict:
    """compute(mask) for each seed's models; a single seed is returned as is."""
    values = np.unique(seeds)
    if len(values) < 2:
        return compute(np.ones(len(seeds), dtype=bool))
    results = [compute(seeds == s) for s in values]
    mean, std = _numbers(results)
    mean["n_models"] = int(sum(r["n_models"] for r in results))
    std.pop("n_models", None)
    std.pop("measure", None)
    # each seed's own summary figures, in the order of "values": what a statistic of
    # the summaries across seeds (compare's rank correlations per seed) starts from
    each = [{k: r.get(k) for k in SUMMARY_KEYS if k in r} for r in results]
    mean["seeds"] = {"n": int(len(values)), "values": [int(v) for v in values], "std": std,
                     "each": each}
    return mean


def paper_psi_std(psi_std: dict[str, float | None]) -> float | None:
    """Table 10's std of Ψ: sqrt(Σ_i σ_i²) / k, σ_i the std across seeds of ψ_i over
    the k axes that have one: the std Ψ = mean ψ_i would have if the axes were
    independent (the paper's caption says so). fgm's own is the std of the per-seed
    Ψ, which keeps the correlation between axes within a seed."""
    vals = [v for v in psi_std.values() if v is not None]
    if not vals:
        return None
    return float(np.sqrt(np.sum(np.square(vals))) / len(vals))


def jackknife(configs: np.ndarray, compute: Callable[[np.ndarray], dict], *, level: float,
              blocks: int, seed: int, keys: tuple[str, ...] = SUMMARY_KEYS) -> dict:
    """Normal intervals θ̂ ± z·se from a delete-a-block jackknife over configurations.

    `configs` gives each model's configuration (all seeds of one configuration share
    it). Configurations are dealt at random (seeded) into `blocks` blocks; the
    statistic is recomputed with each block left out, and
    se² = (G − 1)/G · Σ_b (θ̂₋b − θ̄)². Leaving out whole configurations keeps what
    τ, ψ_i and the CMI slices are computed over: the remaining models are real
    models, never copies. (Resampling models with replacement, as a plain bootstrap
    does, puts copies of a model beside each other; their pairs are ties, τ of a
    tie is 0, and the interval of Ψ landed below Ψ itself.)
    """
    unique, config_of = np.unique(configs, axis=0, return_inverse=True)
    config_of = config_of.reshape(-1)
    g = int(min(blocks, len(unique)))
    block_of_config = np.random.default_rng(seed).permutation(len(unique)) % max(g, 1)
    block = block_of_config[config_of]
    estimate = compute(np.arange(len(config_of)))
    left_out: dict[str, list[float]] = {k: [] for k in keys}
    for b in range(g):
        res = compute(np.flatnonzero(block != b))
        for k in keys:
            if res.get(k) is not None:
                left_out[k].append(res[k])
    z = float(stats.norm.ppf(0.5 + level / 2))
    out = {"level": level, "method": "jackknife over configurations", "blocks": g,
           "seed": seed}
    for k, vals in left_out.items():
        est = estimate.get(k)
        if est is None or len(vals) < 2:
            out[k] = None
            continue
        v = np.asarray(vals, dtype=float)
        se = float(np.sqrt((len(v) - 1) / len(v) * ((v - v.mean()) ** 2).sum()))
        low, high = RANGES.get(k, (-np.inf, np.inf))   # never past what the figure can be
        out[k] = [max(low, float(est) - z * se), min(high, float(est) + z * se)]
    return out
