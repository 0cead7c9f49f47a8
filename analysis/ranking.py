"""The paper's statistics on arrays: τ (Eq. 2), ψ_i (Eq. 4), Ψ (Eq. 5) and the
conditional mutual information of Appendix B. SPEC §2 gives the definitions.

Inputs: `mu` and `gap` (n,) float arrays, `levels` (n, k) int array with the
level of each model on each axis. No function here loops over pairs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

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

# Most (model × column) entries one counting pass holds: the memory of the CMI
# is this times a small constant, whatever the number of cells.
BLOCK_ENTRIES = 1 << 20


@dataclass
class Conditioning:
    """All sets S of axes with |S| ≤ max_size, and each model's cell in each.

    Cells are numbered densely over the occupied ones only: with two continuous
    axes (every model its own level) a set has at most n cells, not n².
    """
    sets: list[tuple[int, ...]]
    cells: list[np.ndarray]       # per set: (n,) cell id of each model, 0 .. n_cells − 1
    n_cells: list[int]            # per set: number of occupied cells

    @classmethod
    def build(cls, levels: np.ndarray, max_size: int = 2,
              sizes: tuple[int, ...] | None = None) -> Conditioning:
        n, k = levels.shape
        ranks = [dense_rank(levels[:, i]) if n else np.zeros(0, np.int64) for i in range(k)]
        sets = [s for size in range(min(max_size, k) + 1)
                for s in itertools.combinations(range(k), size)]
        if sizes is not None:
            sets = [s for s in sets if len(s) in sizes]
        cells, n_cells = [], []
        for s in sets:
            cell = np.zeros(n, dtype=np.int64)
            for i in s:  # mixed radix, re-ranked after each axis: codes stay below n²
                cell = dense_rank(cell * (int(ranks[i].max(initial=0)) + 1) + ranks[i])
            cells.append(cell)
            n_cells.append(int(cell.max()) + 1 if n else 0)
        return cls(sets, cells, n_cells)


def _column_chunks(cond: Conditioning, width: int):
    """Split the columns (set k, cell B) of all sets into chunks of at most `width`
    columns: [(k, first cell, last cell + 1), ...] per chunk. Small sets share a
    chunk (one counting pass for the whole paper grid); a set with more cells
    than `width` is cut across chunks."""
    chunk, used = [], 0
    for k, c in enumerate(cond.n_cells):
        c0 = 0
        while c0 < c:
            take = min(c - c0, width - used)
            chunk.append((k, c0, c0 + take))
            used += take
            c0 += take
            if used == width:
                yield chunk
                chunk, used = [], 0
    if chunk:
        yield chunk


def slice_blocks(mu: np.ndarray, gap: np.ndarray, cond: Conditioning,
                 self_pairs: bool = False, block_entries: int | None = None):
    """Yield (set index, table) where table is an array (cells_a, cells_b in a
    range, 2, 2) of ordered-pair counts by (V_g, V_μ), V = 1 when the first
    model's value is strictly larger; over all yields, every pair of occupied
    cells of every set appears once. Memory: O(block_entries), never cells²."""
    n = len(gap)
    if n == 0:
        return
    width = max(1, (block_entries or BLOCK_ENTRIES) // n)
    orders = [np.argsort(cell, kind="stable") for cell in cond.cells]
    sizes = [np.bincount(cell, minlength=c).astype(np.float64)
             for cell, c in zip(cond.cells, cond.n_cells, strict=True)]
    rows = np.arange(n)
    for chunk in _column_chunks(cond, width):
        # one-hot of each model's cell B, for the cells of this chunk only
        w = np.zeros((n, sum(c1 - c0 for _, c0, c1 in chunk)))
        col = 0
        for k, c0, c1 in chunk:
            cell = cond.cells[k]
            inside = (cell >= c0) & (cell < c1)
            w[rows[inside], col + cell[inside] - c0] = 1.0
            col += c1 - c0
        both = dominance_counts(gap, mu, w)     # V_g = 1, V_μ = 1
        g_up = lower_counts(gap, w)             # V_g = 1
        m_up = lower_counts(mu, w)              # V_μ = 1
        col = 0
        for k, c0, c1 in chunk:
            cols = slice(col, col + c1 - c0)
            col += c1 - c0
            size = sizes[k]
            starts = np.concatenate([[0], np.cumsum(size[:-1])]).astype(np.int64)

            def by_cell_a(per_model, order=orders[k], starts=starts, cols=cols):
                return np.add.reduceat(per_model[order, cols], starts, axis=0)
            p11, pg, pm = by_cell_a(both), by_cell_a(g_up), by_cell_a(m_up)
            pairs = np.outer(size, size[c0:c1])
            if not self_pairs:
                diag = np.arange(c0, c1)
                pairs[diag, diag - c0] -= size[c0:c1]
            t = np.empty((len(size), c1 - c0, 2, 2))
            t[..., 1, 1] = p11
            t[..., 1, 0] = pg - p11
            t[..., 0, 1] = pm - p11
            t[..., 0, 0] = pairs - pg - pm + p11
            yield k, t


def slice_tables(mu: np.ndarray, gap: np.ndarray, cond: Conditioning,
                 self_pairs: bool = False) -> list[np.ndarray]:
    """Per set S: the whole (cells_a, cells_b, 2, 2) table over occupied cells.
    For tests and small inputs: its size is cells², use slice_blocks otherwise."""
    parts: list[list[np.ndarray]] = [[] for _ in cond.sets]
    for k, t in slice_blocks(mu, gap, cond, self_pairs):
        parts[k].append(t)
    return [np.concatenate(p, axis=1) if p else np.zeros((c, c, 2, 2))
            for p, c in zip(parts, cond.n_cells, strict=True)]


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


# the PGDL scorer's entropy −Σ p log2(p + 1e-12) of a constant V_g, p = (1, 0)
_PGDL_CONSTANT_H = float(-(np.log2(1.0 + 1e-12) + 0.0 * np.log2(1e-12)))


def _cmi_sums(mu, gap, cond: Conditioning, pgdl: bool, equal_slices: bool,
              block_entries: int | None):
    """Per set: Σ w·I, Σ w·H over its slices and Σ w, with w the slice's pairs
    (SPEC) or 1 for every slice that holds a pair (equal_slices, and the PGDL
    scorer, which also takes self-pairs and log2)."""
    num = np.zeros(len(cond.sets))
    den = np.zeros(len(cond.sets))
    weight = np.zeros(len(cond.sets))
    for k, t in slice_blocks(mu, gap, cond, self_pairs=pgdl, block_entries=block_entries):
        t = t.reshape(-1, 2, 2)
        up, down = t[:, 1, :].sum(axis=1), t[:, 0, :].sum(axis=1)
        # A slice where V_g is constant has I = 0 and H = 0 (the paper's H; the
        # PGDL scorer's is −log2(1 + 1e-12)): only the others need logarithms.
        # With continuous axes that is nearly every slice (one pair each).
        varies = (up > 0) & (down > 0)
        mi, h, total = _mi_and_h(t[varies], pgdl)
        if pgdl:
            constant = np.count_nonzero(~varies & (up + down > 0))
            num[k] += mi.sum()
            den[k] += h.sum() + constant * _PGDL_CONSTANT_H
            weight[k] += np.count_nonzero(up + down > 0)
        elif equal_slices:
            num[k] += mi.sum()
            den[k] += h.sum()
            weight[k] += np.count_nonzero(up + down > 0)
        else:
            num[k] += (total * mi).sum()
            den[k] += (total * h).sum()
            weight[k] += (up + down).sum()
    return num, den, weight


def cmi_by_set(mu: np.ndarray, gap: np.ndarray, cond: Conditioning,
               pgdl: bool = False, block_entries: int | None = None,
               equal_slices: bool = False) -> np.ndarray:
    """Normalised conditional mutual information Î(S) for every set in `cond`.

    SPEC (App. B): Σ_s p(s)·I_s / Σ_s p(s)·H_s, p(s) the share of ordered
    pairs (a ≠ b) in slice s. `equal_slices`: the paper's own App. B.1, "each
    configuration occurs with equal probability": p(s) the same for every slice
    that holds a pair. PGDL scorer: self-pairs included and slices weighted
    equally, mean I / mean H (empty slices skipped). Slices are built block by
    block over occupied cells only (see slice_blocks): memory stays
    O(block_entries) (default BLOCK_ENTRIES) whatever the number of levels.
    """
    num, den, _ = _cmi_sums(mu, gap, cond, pgdl, equal_slices, block_entries)
    out = np.full(len(cond.sets), np.nan)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return out


def information_by_set(mu: np.ndarray, gap: np.ndarray, cond: Conditioning,
                       equal_slices: bool = False, block_entries: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per set, in bits: the unnormalised I(V_μ; V_g | U_S) and H(V_g | U_S)
    (Table 6's "conditional entropy" row), slices weighted as in cmi_by_set.
    NaN for a set with no pair."""
    num, den, weight = _cmi_sums(mu, gap, cond, False, equal_slices, block_entries)
    info = np.full(len(cond.sets), np.nan)
    entropy = np.full(len(cond.sets), np.nan)
    ok = weight > 0
    info[ok] = num[ok] / weight[ok] / np.log(2.0)
    entropy[ok] = den[ok] / weight[ok] / np.log(2.0)
    return info, entropy
