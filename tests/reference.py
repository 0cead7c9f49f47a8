"""Obvious, slow reference implementations for the evaluation tests: loops over
ordered pairs, written straight from SPEC §2, sharing no code with fgm."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict


def sign(x: float) -> int:
    return (x > 0) - (x < 0)


def tau_ref(mu, g) -> float:
    n = len(mu)
    total = sum(sign(mu[i] - mu[j]) * sign(g[i] - g[j])
                for i in range(n) for j in range(n) if i != j)
    return total / (n * (n - 1))


def psi_ref(mu, g, levels) -> list[float]:
    k = len(levels[0])
    out = []
    for axis in range(k):
        groups = defaultdict(list)
        for i, lv in enumerate(levels):
            groups[tuple(x for j, x in enumerate(lv) if j != axis)].append(i)
        taus = [tau_ref([mu[i] for i in idx], [g[i] for i in idx])
                for idx in groups.values() if len(idx) >= 2]
        out.append(sum(taus) / len(taus) if taus else math.nan)
    return out


def _mi_h(table):
    total = sum(table.values())
    pg = {v: sum(c for (a, _), c in table.items() if a == v) / total for v in (0, 1)}
    pm = {v: sum(c for (_, b), c in table.items() if b == v) / total for v in (0, 1)}
    mi = sum((c / total) * math.log((c / total) / (pg[a] * pm[b]))
             for (a, b), c in table.items() if c)
    h = -sum(p * math.log(p) for p in pg.values() if p)
    return mi, h, total


def _slices(mu, g, levels, axes_set) -> dict:
    """{the pair's levels on axes_set: {(gap up, measure up): count}} over ordered
    pairs a != b."""
    slices = defaultdict(lambda: defaultdict(int))
    n = len(mu)
    for a in range(n):
        for b in range(n):
            if a == b:
                continue
            key = tuple((levels[a][s], levels[b][s]) for s in axes_set)
            slices[key][(int(g[a] > g[b]), int(mu[a] > mu[b]))] += 1
    return slices


def cmi_ref(mu, g, levels, axes_set) -> float:
    """Paper weighting: Σ p(slice) I / Σ p(slice) H over ordered pairs a != b."""
    slices = _slices(mu, g, levels, axes_set)
    num = den = 0.0
    for table in slices.values():
        mi, h, total = _mi_h(table)
        num += total * mi
        den += total * h
    return num / den if den > 0 else math.nan


def pgdl_ref(prediction: dict, models: dict) -> float:
    """The PGDL 2020 scorer's algorithm: every ordered pair of models (self-pairs
    included), a slice key made of the two models' values of two hyperparameters,
    a 2x2x(slices) table, log2 and H = -Σ p log2(p + 1e-12), the mean of I over
    all value combinations divided by the mean of H, the minimum over pairs of
    hyperparameters."""
    names = list(next(iter(models.values()))["hp"])
    possible = {h: sorted({m["hp"][h] for m in models.values()}, key=str) for h in names}
    best = math.inf
    for h1, h2 in itertools.permutations(names, 2):
        keys = [(v1, w1, v2, w2) for v1 in possible[h1] for w1 in possible[h1]
                for v2 in possible[h2] for w2 in possible[h2]]
        tables = {key: [[0, 0], [0, 0]] for key in keys}
        for m1, s1 in models.items():
            for m2, s2 in models.items():
                gap_up = 0 if s1["gap"] > s2["gap"] else 1
                pred_up = 0 if prediction[m1] > prediction[m2] else 1
                key = (s1["hp"][h1], s2["hp"][h1], s1["hp"][h2], s2["hp"][h2])
                tables[key][gap_up][pred_up] += 1
        mis, hs = [], []
        for t in tables.values():
            total = sum(map(sum, t))
            rows = [sum(t[0]), sum(t[1])]
            cols = [t[0][0] + t[1][0], t[0][1] + t[1][1]]
            mi = 0.0
            for i in range(2):
                for j in range(2):
                    joint = t[i][j] / total
                    if joint:
                        mi += joint * math.log2(joint / ((rows[i] / total) * (cols[j] / total)))
            h = -sum((r / total) * math.log2(r / total + 1e-12) for r in rows)
            mis.append(mi)
            hs.append(h)
        best = min(best, (sum(mis) / len(mis)) / (sum(hs) / len(hs)))
    return best


def cmi_equal_ref(mu, g, levels, axes_set) -> tuple[float, float, float]:
    """The paper's App. B.1: every slice (with a pair) weighs the same. Returns
    (mean I / mean H, mean I in bits, mean H in bits) over ordered pairs a != b."""
    slices = _slices(mu, g, levels, axes_set)
    if not slices:
        return math.nan, math.nan, math.nan
    parts = [_mi_h(table)[:2] for table in slices.values()]
    mi = sum(p[0] for p in parts) / len(parts) / math.log(2)
    h = sum(p[1] for p in parts) / len(parts) / math.log(2)
    return (mi / h if h > 0 else math.nan), mi, h
