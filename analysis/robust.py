"""Robust sign-error (Dziugaite, Drouin et al. 2020, "In Search of Robust
Measures of Generalization", NeurIPS; code: github.com/nitarshan/
robust-generalization-measures, experiments/coupled_networks/), vectorised
over the warehouse.

An environment is a pair of configurations that differ in exactly one axis.
For a pair of models (a, b), one from each configuration (all seed
combinations), the sign error is (1 − sign(Δμ)·sign(Δg))/2. Both models are
scored on the same test set of n examples and the per-example difference of
their errors lies in [−1, 1], so Hoeffding gives P(wrong sign of Δg) ≤
2·exp(−n·Δg²/2); c = max(0, 1 − 2·exp(−n·Δg²/2)) is the confidence that the
observed Δg has the right sign.

Two weightings (`weighting=`):

- "published" (default; the paper's and its code's rule): the pair weight is
  w = (c² − 0.5)₊, so a pair counts only when c² > 1/2. An environment's sign
  error is the w-weighted mean over its pairs, and it is kept only when its
  effective sample size (Σw)²/Σw² is at least `min_ess` (default 12). The
  reported mean is the plain mean over kept environments.
- "hoeffding" (fgm before this rule was adopted): w = c, no cut (min_ess
  defaults to 0: every environment with Σw > 0 is kept), and the reported mean
  is weighted by each environment's Σw.

Both report, per axis and overall, the number of environments kept, the mean,
the 90th percentile and the maximum (the robust sign-error) of their sign
errors; when none is kept, a note says why (no environment, all weights 0, or
every effective sample size below min_ess).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .ranking import other_axes_groups

WEIGHTINGS = ("published", "hoeffding")
DEFAULT_MIN_ESS = {"published": 12.0, "hoeffding": 0.0}
PUBLISHED_SHIFT = 0.5   # (c² − 0.5)₊


def hoeffding_weight(dg: np.ndarray, test_size: np.ndarray | float) -> np.ndarray:
    """c = max(0, 1 − 2·exp(−n·Δg²/2)): confidence that Δg has the right sign."""
    return np.maximum(0.0, 1.0 - 2.0 * np.exp(-np.asarray(test_size) * dg ** 2 / 2.0))


def pair_weight(dg: np.ndarray, test_size: np.ndarray | float,
                weighting: str = "published") -> np.ndarray:
    """The weight of a model pair: (c² − 0.5)₊ ("published") or c ("hoeffding")."""
    c = hoeffding_weight(dg, test_size)
    if weighting == "published":
        return np.maximum(c ** 2 - PUBLISHED_SHIFT, 0.0)
    if weighting == "hoeffding":
        return c
    raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, not {weighting!r}")


def min_confident_gap(test_size: float, weighting: str = "published") -> float:
    """The smallest |Δg| whose pair weight is > 0 at n test examples."""
    c_min = math.sqrt(PUBLISHED_SHIFT) if weighting == "published" else 0.0
    return math.sqrt(2.0 * math.log(2.0 / (1.0 - c_min)) / test_size)


@dataclass
class Environments:
    """The environments along one axis: the kept ones and why the others went."""
    errors: np.ndarray        # sign error of each kept environment
    weights: np.ndarray       # its total weight Σw
    candidates: int = 0       # environments with at least one model pair
    zero_weight: int = 0      # left out: Σw = 0
    low_ess: int = 0          # left out: effective sample size below min_ess
    best_ess: float = 0.0     # largest effective sample size seen
    largest_gap: float = 0.0  # largest |Δg| of any model pair


def environment_errors(mu: np.ndarray, gap: np.ndarray, levels: np.ndarray, axis: int,
                       test_size: np.ndarray, weighting: str = "published",
                       min_ess: float | None = None) -> Environments:
    """Every environment along `axis`: the kept ones' sign errors and weights."""
    min_ess = DEFAULT_MIN_ESS[weighting] if min_ess is None else float(min_ess)
    group = other_axes_groups(levels, axis)
    order = np.lexsort((levels[:, axis], group))
    g, lv, mu_s, gap_s, n_s = group[order], levels[order, axis], mu[order], gap[order], \
        test_size[order]
    sizes = np.bincount(g)
    keys, errs, weights, largest = [], [], [], 0.0
    for d in range(1, int(sizes.max(initial=1))):
        a, b = np.arange(len(g) - d), np.arange(d, len(g))
        pair = (g[a] == g[b]) & (lv[a] != lv[b])    # same group, other level: an environment
        a, b = a[pair], b[pair]
        dg = gap_s[b] - gap_s[a]
        largest = max(largest, float(np.abs(dg).max(initial=0.0)))
        errs.append((1.0 - np.sign(mu_s[b] - mu_s[a]) * np.sign(dg)) / 2.0)
        weights.append(pair_weight(dg, np.minimum(n_s[a], n_s[b]), weighting))
        # environment key: the group and the two levels (lv sorted within group: a < b)
        keys.append(np.stack([g[a], lv[a], lv[b]], axis=1))
    if not keys or not sum(len(k) for k in keys):
        return Environments(np.zeros(0), np.zeros(0))
    env = np.unique(np.concatenate(keys), axis=0, return_inverse=True)[1].reshape(-1)
    w = np.concatenate(weights)
    total = np.bincount(env, w)
    squares = np.bincount(env, w * w)
    weighted = np.bincount(env, w * np.concatenate(errs))
    positive = total > 0
    ess = np.zeros_like(total)
    ess[positive] = total[positive] ** 2 / squares[positive]
    enough = ess >= min_ess * (1.0 - 1e-9)       # equal weights give ESS = count, to rounding
    keep = positive & enough
    return Environments(weighted[keep] / total[keep], total[keep], candidates=len(total),
                        zero_weight=int((~positive).sum()),
                        low_ess=int((positive & ~enough).sum()),
                        best_ess=float(ess.max(initial=0.0)), largest_gap=largest)


def summarise(envs: Environments, weighting: str = "published") -> dict:
    """Kept environments, mean (plain for "published", Σw-weighted for "hoeffding"),
    90th percentile and maximum of the sign error; None and a note when none is kept."""
    e = envs.errors
    if not len(e):
        return {"environments": 0, "mean": None, "p90": None, "max": None}
    mean = np.average(e, weights=envs.weights) if weighting == "hoeffding" else e.mean()
    return {"environments": int(len(e)), "mean": float(mean),
            "p90": float(np.percentile(e, 90)), "max": float(e.max())}


def _why_none(envs: Environments, weighting: str, min_ess: float, test_size: float) -> str:
    if not envs.candidates:
        return "no environment: no two configurations differ in this axis alone"
    parts = []
    if envs.zero_weight:
        needed = ""
        if envs.largest_gap > 0:
            n = math.floor(test_size * (min_confident_gap(test_size, weighting)
                                       / envs.largest_gap) ** 2)
            needed = (f"; the largest here, |Δg| = {envs.largest_gap:.3g}, would count with "
                      f"a test set of more than {n:,} examples")
        parts.append(f"{envs.zero_weight} with all weights 0 (no pair's |Δg| exceeds "
                     f"{min_confident_gap(test_size, weighting):.3g} at n = {test_size:g} "
                     f"test examples{needed})")
    if envs.low_ess:
        parts.append(f"{envs.low_ess} with effective sample size (Σw)²/Σw² below "
                     f"min_ess = {min_ess:g} (largest {envs.best_ess:.3g}; at most the "
                     "number of model pairs, seeds × seeds)")
    return f"none of {envs.candidates} environments kept: " + "; ".join(parts)


def robust_sign_error(mu, gap, levels, axes: list[str], test_size, *,
                      weighting: str = "published", min_ess: float | None = None) -> dict:
    """Per axis and overall: environments kept, mean, p90 and max of the sign error."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, not {weighting!r}")
    min_ess = DEFAULT_MIN_ESS[weighting] if min_ess is None else float(min_ess)
    test_size = np.broadcast_to(np.asarray(test_size, dtype=float), gap.shape)
    n_test = float(np.median(test_size)) if len(test_size) else float("nan")
    per_axis, found = {}, []
    for i, axis in enumerate(axes):
        envs = environment_errors(mu, gap, levels, i, test_size, weighting, min_ess)
        per_axis[axis] = summarise(envs, weighting)
        per_axis[axis]["note"] = (None if len(envs.errors)
                                  else _why_none(envs, weighting, min_ess, n_test))
        found.append(envs)
    every = Environments(np.concatenate([e.errors for e in found] or [np.zeros(0)]),
                         np.concatenate([e.weights for e in found] or [np.zeros(0)]),
                         candidates=sum(e.candidates for e in found),
                         zero_weight=sum(e.zero_weight for e in found),
                         low_ess=sum(e.low_ess for e in found),
                         best_ess=max((e.best_ess for e in found), default=0.0),
                         largest_gap=max((e.largest_gap for e in found), default=0.0))
    overall = summarise(every, weighting)
    overall["note"] = None if len(every.errors) else _why_none(every, weighting, min_ess, n_test)
    return {"weighting": weighting, "min_ess": min_ess, "per_axis": per_axis,
            "overall": overall}
