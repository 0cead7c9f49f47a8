"""The statistics on arrays, against references that loop over pairs."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import cmi_ref, psi_ref, tau_ref
from scipy.special import ndtr

from fgm.analysis.counting import dominance_counts, lower_counts
from fgm.analysis.ranking import (
    Conditioning,
    big_psi,
    cmi_by_set,
    kendall_tau,
    oracle_psi,
    oracle_tau,
    psi_per_axis,
)

small_ints = st.lists(st.integers(-3, 3), min_size=2, max_size=25)


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_dominance_counts_against_brute_force(data):
    n = data.draw(st.integers(0, 30))
    x = np.array(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), dtype=float)
    y = np.array(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), dtype=float)
    w = np.arange(n * 2, dtype=float).reshape(n, 2) % 3
    d_ours = dominance_counts(x, y, w)
    d_ref = np.array([[sum(w[b, c] for b in range(n) if x[b] < x[a] and y[b] < y[a])
                       for c in range(2)] for a in range(n)]).reshape(n, 2)
    l_ref = np.array([[sum(w[b, c] for b in range(n) if x[b] < x[a]) for c in range(2)]
                      for a in range(n)]).reshape(n, 2)
    np.testing.assert_array_equal(d_ours, d_ref)
    np.testing.assert_array_equal(lower_counts(x, w), l_ref)


@given(st.data())
@settings(max_examples=80, deadline=None)
def test_tau_against_double_loop(data):
    mu = data.draw(small_ints)
    g = data.draw(st.lists(st.integers(-3, 3), min_size=len(mu), max_size=len(mu)))
    tau_ours = kendall_tau(np.array(mu, float), np.array(g, float))
    assert tau_ours == pytest.approx(tau_ref(mu, g), abs=1e-12)


@given(small_ints, st.randoms(use_true_random=False))
@settings(max_examples=60, deadline=None)
def test_tau_properties(mu, rnd):
    mu = np.array(mu, float)
    g = np.array([rnd.randint(-3, 3) for _ in mu], float)
    t = kendall_tau(mu, g)
    assert t == pytest.approx(kendall_tau(g, mu), abs=1e-12)             # symmetric
    assert kendall_tau(-mu, g) == pytest.approx(-t, abs=1e-12)           # antisymmetric
    assert kendall_tau(np.exp(mu) * 3 + 1, g) == pytest.approx(t, abs=1e-12)  # monotone
    assert kendall_tau(np.zeros_like(mu), g) == 0.0                      # ties count 0


def test_tau_is_tau_a_not_scipy_tau_b():
    mu = np.array([1.0, 1.0, 2.0, 3.0])
    g = np.array([1.0, 2.0, 3.0, 4.0])
    # 6 unordered pairs, 5 concordant, 1 tied in μ: τ_a = 5/6 (τ_b would be 5/√30)
    assert kendall_tau(mu, g) == pytest.approx(5 / 6)
    assert math.isnan(kendall_tau(np.array([1.0]), np.array([2.0])))


def test_psi_on_a_hand_worked_two_axis_grid():
    #            (A, B)    gap  μ
    grid = [((0, 0), 0.1, 1), ((1, 0), 0.2, 3),
            ((0, 1), 0.3, 2), ((1, 1), 0.4, 1),
            ((0, 2), 0.5, 5), ((1, 2), 0.6, 5)]
    levels = np.array([lv for lv, _, _ in grid])
    g = np.array([x for _, x, _ in grid])
    mu = np.array([m for _, _, m in grid], float)
    # ψ_A: groups by B: concordant (+1), discordant (−1), tied in μ (0) → 0
    # ψ_B: groups by A: all concordant (+1); 2 of 3 pairs concordant (1/3) → 2/3
    psi = psi_per_axis(mu, g, levels)
    assert psi == pytest.approx([0.0, 2 / 3])
    assert big_psi(psi) == pytest.approx(1 / 3)


@given(st.data())
@settings(max_examples=30, deadline=None)
def test_psi_against_reference_on_random_incomplete_grids(data):
    n = data.draw(st.integers(2, 30))
    levels = np.array(data.draw(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1),
                                                   st.integers(0, 2)), min_size=n, max_size=n)))
    mu = np.array(data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)), float)
    g = np.array(data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)), float)
    ours = psi_per_axis(mu, g, levels)
    ref = psi_ref(mu.tolist(), g.tolist(), levels.tolist())
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_cmi_on_hand_counted_tables():
    # axis A: level 0 holds m1, m2; level 1 holds m3, m4.
    g = np.array([0.1, 0.2, 0.3, 0.4])
    mu = np.array([1.0, 2.0, 0.5, 3.0])
    levels = np.array([[0], [0], [1], [1]])
    cond = Conditioning.build(levels)
    assert cond.sets == [(), (0,)]
    ours = cmi_by_set(mu, g, cond)
    # |S| = 0, all 12 ordered pairs, counted by hand: (V_g, V_μ) = (0,0): 4, (1,1): 4,
    # (0,1): 2, (1,0): 2. Marginals are 1/2 each.
    p = {(0, 0): 4 / 12, (1, 1): 4 / 12, (0, 1): 2 / 12, (1, 0): 2 / 12}
    mi = sum(v * math.log(v / 0.25) for v in p.values())
    assert ours[0] == pytest.approx(mi / math.log(2), abs=1e-12)
    # S = {A}: slices (0,0) and (1,1) are [[1, 0], [0, 1]] (I = H = ln 2, 2 pairs each);
    # slices (0,1) and (1,0) have V_g constant (H = 0, I = 0): Î = 1.
    assert ours[1] == pytest.approx(1.0, abs=1e-12)


@given(st.data())
@settings(max_examples=25, deadline=None)
def test_cmi_against_pair_loop(data):
    n = data.draw(st.integers(3, 16))
    levels = np.array(data.draw(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1),
                                                   st.integers(0, 1)), min_size=n, max_size=n)))
    mu = np.array(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), float)
    g = np.array(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), float)
    cond = Conditioning.build(levels)
    assert len(cond.sets) == 1 + 3 + 3
    ours = cmi_by_set(mu, g, cond)
    for k, s in enumerate(cond.sets):
        ref = cmi_ref(mu.tolist(), g.tolist(), levels.tolist(), s)
        if math.isnan(ref):
            assert math.isnan(ours[k])
        else:
            assert ours[k] == pytest.approx(ref, abs=1e-12)


def test_oracle_closed_form_against_monte_carlo():
    rng = np.random.default_rng(3)
    levels = np.array([(a, b) for a in range(3) for b in range(3) for _ in range(4)])
    g = 0.1 + 0.03 * levels[:, 0] - 0.02 * levels[:, 1] + rng.normal(0, 0.02, len(levels))
    g = np.round(g, 2)  # ties in the gap, as a finite test set gives
    for eps in (0.01, 0.05):
        draws = [g + rng.normal(0, eps, len(g)) for _ in range(400)]
        taus = np.array([kendall_tau(mu, g) for mu in draws])
        psis = np.array([psi_per_axis(mu, g, levels) for mu in draws])
        se_tau = taus.std(ddof=1) / np.sqrt(len(taus))
        assert abs(oracle_tau(g, eps) - taus.mean()) < 3 * se_tau + 1e-12
        se_psi = psis.std(ddof=1, axis=0) / np.sqrt(len(psis))
        assert np.all(np.abs(np.array(oracle_psi(g, levels, eps)) - psis.mean(axis=0))
                      < 3 * se_psi + 1e-12)


def test_oracle_tau_far_pairs_shortcut_is_exact():
    g = np.linspace(0, 1, 300)
    dg = g[:, None] - g[None, :]
    ref = (2 * ndtr(np.abs(dg) / (np.sqrt(2) * 0.01)) - 1).sum() / (300 * 299)
    assert oracle_tau(g, 0.01, block=37) == pytest.approx(ref, abs=1e-12)
