"""Pair counting without pairs: the primitive under τ, ψ and the CMI tables.

For n models there are n(n-1) ordered pairs; a grid of 10,000 models has
10^8 of them. Everything evaluation needs is a count of pairs (a, b) with
x_b < x_a (and y_b < y_a), split by a category of b. These functions compute
such counts per model a in O(n log n · C) numpy work for C categories.
"""

from __future__ import annotations

import numpy as np


def dense_rank(values: np.ndarray) -> np.ndarray:
    """0-based dense rank: equal values share a rank."""
    return np.unique(values, return_inverse=True)[1].reshape(-1)


def _weights(n: int, weights: np.ndarray | None) -> np.ndarray:
    if weights is None:
        return np.ones((n, 1))
    w = np.asarray(weights, dtype=np.float64)
    return w[:, None] if w.ndim == 1 else w


def lower_counts(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """L[a, c] = Σ_{b : x_b < x_a} W[b, c]  (strict: ties count nothing). Shape (n, C)."""
    x = np.asarray(x)
    n = len(x)
    w = _weights(n, weights)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    excl = np.cumsum(w[order], axis=0) - w[order]          # before position p
    first = np.searchsorted(xs, xs, side="left")            # start of each tie group
    out = np.empty_like(excl)
    out[order] = excl[first]
    return out


def dominance_counts(x: np.ndarray, y: np.ndarray,
                     weights: np.ndarray | None = None) -> np.ndarray:
    """D[a, c] = Σ_{b : x_b < x_a and y_b < y_a} W[b, c]  (strict in both). Shape (n, C).

    Sort by x ascending and, within ties of x, by y descending: then every b
    counted precedes a, and a tie in x can never pass the strict test on y.
    What is left is counting, for each position, the earlier positions with a
    smaller y: done by divide and conquer over the positions, one vectorised
    pass per level (log2 n passes), each pass a sort and a cumulative sum.
    """
    x = np.asarray(x)
    n = len(x)
    w = _weights(n, weights)
    if n < 2:
        return np.zeros_like(w)
    y_rank = dense_rank(np.asarray(y))
    order = np.lexsort((-y_rank, x))
    yv = y_rank[order]
    # float32 counts are exact below 2^24 and halve the memory traffic.
    exact = w.dtype if n * float(w.max(initial=0)) >= 2**24 else np.float32
    wv = np.ascontiguousarray(w[order], dtype=exact)
    result = np.zeros_like(wv)
    pos = np.arange(n)
    zero = np.zeros((1, wv.shape[1]), dtype=wv.dtype)
    size = 1
    while size < n:
        parent = pos // (2 * size)
        is_right = (pos // size) % 2 == 1
        # Within each parent block, sort by y; on equal y put right-half
        # elements first so that an equal y on the left is not counted.
        o = np.lexsort((~is_right, yv, parent))
        right = is_right[o]
        n_left_before = np.cumsum(~right) - ~right                # exclusive, per sorted slot
        starts = np.searchsorted(parent[o], parent[o], side="left")
        cum = np.concatenate([zero, np.cumsum(wv[o[~right]], axis=0)])
        idx = np.flatnonzero(right)
        result[o[idx]] += cum[n_left_before[idx]] - cum[n_left_before[starts[idx]]]
        size *= 2
    out = np.empty_like(result, dtype=w.dtype)
    out[order] = result
    return out
