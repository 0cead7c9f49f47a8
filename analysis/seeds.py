"""Repeated experiments (the paper's Tables 9 and 10) and bootstrap intervals.

With several seeds of the same grid in the warehouse, every statistic is
computed per seed and reported as the mean across seeds, with the standard
deviation beside it. `--ci` adds seeded bootstrap confidence intervals over
models (resampled with replacement within each seed) for τ, Ψ and K.

A `seed` column that gives every model its own seed would make every seed a
group of one model and every figure null: `check_seeds` refuses it, and
`--pool-seeds` evaluates all models together, ignoring seeds.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fgm.warehouse import FgmError

SUMMARY_KEYS = ("tau", "Psi", "K")


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
    mean["seeds"] = {"n": int(len(values)), "values": [int(v) for v in values], "std": std}
    return mean


def bootstrap(seeds: np.ndarray, compute: Callable[[np.ndarray], dict], *, level: float,
              draws: int, seed: int, keys: tuple[str, ...] = SUMMARY_KEYS) -> dict:
    """Percentile intervals of compute(index array) over resampled models."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(seeds == s) for s in np.unique(seeds)]
    samples: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(draws):
        idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        res = compute(idx)
        for k in keys:
            if res.get(k) is not None:
                samples[k].append(res[k])
    alpha = (1 - level) / 2
    out = {"level": level, "draws": draws, "seed": seed}
    for k, vals in samples.items():
        out[k] = ([float(np.quantile(vals, alpha)), float(np.quantile(vals, 1 - alpha))]
                  if len(vals) >= 2 else None)
    return out
