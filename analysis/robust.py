"""Robust sign-error (Dziugaite et al. 2020, "In Search of Robust Measures of
Generalization"), vectorised over the warehouse.

An environment is a pair of configurations that differ in exactly one axis.
For a pair of models (a, b), one from each configuration, the sign error is
(1 − sign(Δμ)·sign(Δg))/2, and its weight is the Hoeffding confidence that
the observed Δg has the right sign: both models are scored on the same test
set of n examples, the per-example difference of their errors lies in
[−1, 1], so P(wrong sign) ≤ 2·exp(−n·Δg²/2) and the weight is
max(0, 1 − 2·exp(−n·Δg²/2)). An environment's sign error is the weighted
mean over its model pairs (all seed combinations); environments whose
weights are all 0 are left out. Reported per axis and overall: the weighted
mean, the 90th percentile and the maximum (the robust sign-error) over
environments.
"""

from __future__ import annotations

import numpy as np

from .ranking import other_axes_groups


def hoeffding_weight(dg: np.ndarray, test_size: np.ndarray | float) -> np.ndarray:
    return np.maximum(0.0, 1.0 - 2.0 * np.exp(-np.asarray(test_size) * dg ** 2 / 2.0))


def environment_errors(mu: np.ndarray, gap: np.ndarray, levels: np.ndarray, axis: int,
                       test_size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sign error, total weight) of every environment along `axis` with weight > 0."""
    group = other_axes_groups(levels, axis)
    order = np.lexsort((levels[:, axis], group))
    g, lv, mu_s, gap_s, n_s = group[order], levels[order, axis], mu[order], gap[order], \
        test_size[order]
    sizes = np.bincount(g)
    keys, errs, weights = [], [], []
    for d in range(1, int(sizes.max(initial=1))):
        a, b = np.arange(len(g) - d), np.arange(d, len(g))
        pair = (g[a] == g[b]) & (lv[a] != lv[b])    # same group, other level: an environment
        a, b = a[pair], b[pair]
        dg = gap_s[b] - gap_s[a]
        err = (1.0 - np.sign(mu_s[b] - mu_s[a]) * np.sign(dg)) / 2.0
        w = hoeffding_weight(dg, np.minimum(n_s[a], n_s[b]))
        # environment key: the group and the two levels (lv sorted within group: a < b)
        keys.append(np.stack([g[a], lv[a], lv[b]], axis=1))
        errs.append(err)
        weights.append(w)
    if not keys:
        return np.zeros(0), np.zeros(0)
    keys_all = np.concatenate(keys)
    env = np.unique(keys_all, axis=0, return_inverse=True)[1].reshape(-1)
    w = np.concatenate(weights)
    total = np.bincount(env, w)
    weighted = np.bincount(env, w * np.concatenate(errs))
    keep = total > 0
    return weighted[keep] / total[keep], total[keep]


def summarise(errors: np.ndarray, weights: np.ndarray) -> dict:
    if not len(errors):
        return {"environments": 0, "mean": None, "p90": None, "max": None}
    return {"environments": int(len(errors)),
            "mean": float(np.average(errors, weights=weights)),
            "p90": float(np.percentile(errors, 90)),
            "max": float(errors.max())}


def robust_sign_error(mu, gap, levels, axes: list[str], test_size) -> dict:
    test_size = np.broadcast_to(np.asarray(test_size, dtype=float), gap.shape)
    per_axis, all_e, all_w = {}, [], []
    for i, axis in enumerate(axes):
        e, w = environment_errors(mu, gap, levels, i, test_size)
        per_axis[axis] = summarise(e, w)
        all_e.append(e)
        all_w.append(w)
    overall = summarise(np.concatenate(all_e) if all_e else np.zeros(0),
                        np.concatenate(all_w) if all_w else np.zeros(0))
    return {"per_axis": per_axis, "overall": overall}
