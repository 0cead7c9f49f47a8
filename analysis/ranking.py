"""The paper's statistics on arrays: τ (Eq. 2), ψ_i (Eq. 4), Ψ (Eq. 5) and the
conditional mutual information of Appendix B. SPEC §2 gives the definitions.

Inputs: `mu` and `gap` (n,) float arrays, `levels` (n, k) int array with the
level of each model on each axis. No function here loops over pairs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.special import ndtr

from .counting import dense_rank, dominance_counts, lower_counts

# --------------------------------------------------------------------------- τ, ψ, Ψ


def _concordance(x: np.ndarray, y: np.ndarray, group: np.ndarray | None = None):
    """Per group: (#pairs with x,y both larger) − (#pairs with x larger, y smaller),
    over unordered pairs inside the group; and the group sizes."""
    n = len(x)
    if group is None:
        group = np.zeros(n, dtype=np.int64)
    g_ids, group = np.unique(group, return_inverse=True)
    sizes = np.bincount(group)
    if n < 2:
        return np.zeros(len(g_ids)), sizes
    # Offset ranks by group so pairs in different groups always look concordant
    # (both keys larger in the larger group); subtract those afterwards.
    span = n + 1
    rx = group * span + dense_rank(x)
    ry = dense_rank(y)
    up = group * span + ry
    down = group * span + (ry.max() - ry)
    cross = np.concatenate([[0], np.cumsum(sizes)])[group]     # members of lower groups
    conc = dominance_counts(rx, up)[:, 0] - cross
    disc = dominance_counts(rx, down)[:, 0] - cross
    return np.bincount(group, conc - disc, minlength=len(g_ids)), sizes


def kendall_tau(mu: np.ndarray, gap: np.ndarray) -> float:
    """τ_a = 1/(n(n−1)) Σ_{i≠j} sign(μ_i−μ_j) sign(g_i−g_j) (Eq. 2). NaN for n < 2."""
    n = len(mu)
    if n < 2:
        return float("nan")
    diff, _ = _concordance(np.asarray(gap), np.asarray(mu))
    return float(2.0 * diff[0] / (n * (n - 1)))


def other_axes_groups(levels: np.ndarray, axis: int) -> np.ndarray:
    """Group id per model: models that share the level of every axis but `axis`."""
    key = np.zeros(len(levels), dtype=np.int64)
    for j in range(levels.shape[1]):
        if j != axis:  # mixed-radix code of the other levels: one 1-D unique, not a row unique
            column = dense_rank(levels[:, j])
            key = key * (int(column.max(initial=0)) + 1) + column
    return dense_rank(key)


def psi_per_axis(mu: np.ndarray, gap: np.ndarray, levels: np.ndarray,
                 only: list[int] | None = None) -> list[float]:
    """ψ_i (Eq. 4): mean τ over groups (≥ 2 models) that vary only axis i. NaN if none
    (and for axes not in `only`, when given)."""
    out = []
    for i in range(levels.shape[1]):
        if only is not None and i not in only:
            out.append(float("nan"))
            continue
        diff, sizes = _concordance(gap, mu, other_axes_groups(levels, i))
        ok = sizes >= 2
        taus = 2.0 * diff[ok] / (sizes[ok] * (sizes[ok] - 1.0))
        out.append(float(taus.mean()) if ok.any() else float("nan"))
    return out


def big_psi(psi: list[float]) -> float:
    """Ψ (Eq. 5): mean of ψ_i over the axes that have a group."""
    vals = [p for p in psi if not np.isnan(p)]
    return float(np.mean(vals)) if vals else float("nan")


# --------------------------------------------------------------------------- oracle

def oracle_pair_terms(dg: np.ndarray, eps: float) -> np.ndarray:
    """E[sign(Δμ) sign(Δg)] for μ = g + N(0, ε²): 2Φ(|Δg|/(√2 ε)) − 1 (0 when Δg = 0)."""
    return 2.0 * ndtr(np.abs(dg) / (np.sqrt(2.0) * eps)) - 1.0


def oracle_tau(gap: np.ndarray, eps: float, block: int = 2048) -> float:
    """Closed-form expected τ of the noisy oracle, summed over pairs in row blocks.
    Pairs farther apart than 9√2ε contribute exactly 1 to double precision."""
    g = np.sort(np.asarray(gap, dtype=np.float64))
    n = len(g)
    if n < 2:
        return float("nan")
    far = 9.0 * np.sqrt(2.0) * eps
    total = 0.0
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        hi = int(np.searchsorted(g, g[i1 - 1] + far, side="right"))
        rows = g[i0:i1, None]
        cols = g[None, i0:hi]
        j = np.arange(i0, hi)[None, :]
        i = np.arange(i0, i1)[:, None]
        terms = np.where(j > i, oracle_pair_terms(cols - rows, eps), 0.0)
        total += terms.sum()
        # pairs (i, j) with j ≥ hi are all farther than `far`: each contributes 1
        total += float((n - hi) * (i1 - i0))
    return 2.0 * total / (n * (n - 1))


def oracle_psi(gap: np.ndarray, levels: np.ndarray, eps: float) -> list[float]:
    """Closed-form expected ψ_i of the noisy oracle: the pair terms inside each group."""
    out = []
    for i in range(levels.shape[1]):
        group = other_axes_groups(levels, i)
        order = np.argsort(group, kind="stable")
        gs, gg = group[order], gap[order]
        sizes = np.bincount(group)
        sums = np.zeros(len(sizes))
        for d in range(1, int(sizes.max())):
            same = gs[d:] == gs[:-d]
            terms = oracle_pair_terms(gg[d:] - gg[:-d], eps)
            sums += np.bincount(gs[d:][same], terms[same], minlength=len(sizes))
        ok = sizes >= 2
        taus = 2.0 * sums[ok] / (sizes[ok] * (sizes[ok] - 1.0))
        out.append(float(taus.mean()) if ok.any() else float("nan"))
    return out


# --------------------------------------------------------------------------- CMI

@dataclass
class Conditioning:
    """All sets S of axes with |S| ≤ max_size, and each model's cell in each."""
    sets: list[tuple[int, ...]]
    cells: list[np.ndarray]       # per set: (n,) cell id of each model
    n_cells: list[int]

    @classmethod
    def build(cls, levels: np.ndarray, max_size: int = 2,
              sizes: tuple[int, ...] | None = None) -> Conditioning:
        n, k = levels.shape
        ranks = [dense_rank(levels[:, i]) if n else np.zeros(0, int) for i in range(k)]
        n_levels = [int(r.max()) + 1 if n else 1 for r in ranks]
        sets = [s for size in range(min(max_size, k) + 1)
                for s in itertools.combinations(range(k), size)]
        if sizes is not None:
            sets = [s for s in sets if len(s) in sizes]
        cells, n_cells = [], []
        for s in sets:
            cell = np.zeros(n, dtype=np.int64)
            count = 1
            for i in s:
                cell = cell * n_levels[i] + ranks[i]
                count *= n_levels[i]
            cells.append(cell)
            n_cells.append(count)
        return cls(sets, cells, n_cells)

    @cached_property
    def onehot(self) -> np.ndarray:
        """(n, Σ cells) indicator of each model's cell in each set, block by block."""
        n = len(self.cells[0]) if self.cells else 0
        blocks = [np.eye(c, dtype=np.float64)[cell] for cell, c in zip(self.cells, self.n_cells,
                                                                       strict=True)]
        return np.hstack(blocks) if blocks else np.zeros((n, 0))


def _aggregate(cond: Conditioning, per_model: np.ndarray) -> list[np.ndarray]:
    """Per set S: T[A, B] = Σ_{a in cell A} per_model[a, column of cell B in S's block]."""
    out, col = [], 0
    for c in cond.n_cells:
        block = slice(col, col + c)
        out.append(cond.onehot[:, block].T @ per_model[:, block])
        col += c
    return out


def slice_tables(mu: np.ndarray, gap: np.ndarray, cond: Conditioning,
                 self_pairs: bool = False) -> list[np.ndarray]:
    """Per set S: array (cells_a, cells_b, 2, 2) of ordered-pair counts by
    (V_g, V_μ), V = 1 when the first model's value is strictly larger."""
    onehot = cond.onehot
    both = _aggregate(cond, dominance_counts(gap, mu, onehot))      # V_g = 1, V_μ = 1
    g_up = _aggregate(cond, lower_counts(gap, onehot))              # V_g = 1
    m_up = _aggregate(cond, lower_counts(mu, onehot))               # V_μ = 1
    tables = []
    for cell, c, p11, pg, pm in zip(cond.cells, cond.n_cells, both, g_up, m_up, strict=True):
        size = np.bincount(cell, minlength=c).astype(np.float64)
        pairs = np.outer(size, size)
        if not self_pairs:
            pairs -= np.diag(size)
        t = np.empty((c, c, 2, 2))
        t[..., 1, 1] = p11
        t[..., 1, 0] = pg - p11
        t[..., 0, 1] = pm - p11
        t[..., 0, 0] = pairs - pg - pm + p11
        tables.append(t)
    return tables


def _mi_and_h(t: np.ndarray, pgdl: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per slice: I(V_μ; V_g), H(V_g) and the number of pairs. t: (..., 2, 2)."""
    t = t.reshape(-1, 2, 2)
    total = t.sum(axis=(1, 2))
    safe = np.where(total > 0, total, 1.0)
    p = t / safe[:, None, None]
    pg = p.sum(axis=2)                  # V_g marginal
    pm = p.sum(axis=1)                  # V_μ marginal
    log = np.log2 if pgdl else np.log
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = p / (pg[:, :, None] * pm[:, None, :])
        mi = np.where(p > 0, p * log(np.where(p > 0, ratio, 1.0)), 0.0).sum(axis=(1, 2))
        if pgdl:  # the competition scorer's entropy: -Σ p log2(p + 1e-12)
            h = -(pg * np.log2(pg + 1e-12)).sum(axis=1)
        else:
            h = -np.where(pg > 0, pg * log(np.where(pg > 0, pg, 1.0)), 0.0).sum(axis=1)
    return mi, h, total


def cmi_by_set(mu: np.ndarray, gap: np.ndarray, cond: Conditioning,
               pgdl: bool = False) -> np.ndarray:
    """Normalised conditional mutual information Î(S) for every set in `cond`.

    Paper (App. B): Σ_s p(s)·I_s / Σ_s p(s)·H_s, p(s) the share of ordered
    pairs (a ≠ b) in slice s. PGDL scorer: self-pairs included and slices
    weighted equally, mean I / mean H (empty slices skipped).
    """
    out = np.full(len(cond.sets), np.nan)
    for k, t in enumerate(slice_tables(mu, gap, cond, self_pairs=pgdl)):
        mi, h, total = _mi_and_h(t, pgdl)
        if pgdl:
            keep = total > 0
            num, den = mi[keep].sum(), h[keep].sum()
        else:
            num, den = (total * mi).sum(), (total * h).sum()
        if den > 0:
            out[k] = num / den
    return out
