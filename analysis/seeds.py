"""Repeated experiments (the paper's Tables 9 and 10) and bootstrap intervals.

With several seeds of the same grid in the warehouse, every statistic is
computed per seed and reported as the mean across seeds, with the standard
deviation beside it. `--ci` adds seeded bootstrap confidence intervals over
models (resampled with replacement within each seed) for τ, Ψ and K.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SUMMARY_KEYS = ("tau", "Psi", "K")


def _numbers(results: list, key_path: tuple = ()) -> object:
    """Mean and std of numbers at the same place in several nested results."""
    first = results[0]
    if isinstance(first, dict):
        means, stds = {}, {}
        for k in first:
            m, s = _numbers([r[k] for r in results], key_path + (k,))
            means[k], stds[k] = m, s
        return means, stds
    if isinstance(first, int | float) and not isinstance(first, bool) or first is None:
        vals = np.array([np.nan if v is None else v for v in results], dtype=float)
        vals = vals[np.isfinite(vals)]
        if not len(vals):
            return None, None
        return float(vals.mean()), (float(vals.std(ddof=1)) if len(vals) > 1 else None)
    # text, lists (argmin): the most common one
    as_key = [repr(r) for r in results]
    best = max(set(as_key), key=as_key.count)
    return results[as_key.index(best)], None


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
