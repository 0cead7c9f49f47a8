"""The paper's figures shipped as data (analysis/paper_figures.csv), and the paper's
own conventions (--convention paper) checked against those figures.

Expected cells below were read by hand from the paper's text, not from the CSV."""

import math

import numpy as np
import pytest
from reference import cmi_equal_ref

from fgm.analysis.evaluate import Models, cmi_result
from fgm.analysis.paper import PAPER_AXES, paper_figures, paper_table
from fgm.analysis.seeds import paper_psi_std

# SPEC §4's names, copied from SPEC.md, and the appendix's input-gradient norm
SPEC_NAMES = set("""vc_dim num_params cross_entropy inverse_margin neg_entropy spectral_init
spectral_orig spectral_init_main spectral_orig_main prod_of_spec_over_margin prod_of_spec
fro_over_spec sum_of_spec_over_margin sum_of_spec prod_of_fro_over_margin prod_of_fro
sum_of_fro_over_margin sum_of_fro frobenius_distance dist_spec_init param_norm
path_norm_over_margin path_norm fisher_rao pacbayes_init pacbayes_orig sharpness_init
sharpness_orig pacbayes_flatness sharpness_flatness pacbayes_mag_init pacbayes_mag_orig
pac_sharpness_mag_init pac_sharpness_mag_orig pacbayes_mag_flatness sharpness_mag_flatness
steps_to_0.1_loss steps_0.1_to_0.01_loss grad_noise_epoch1 grad_noise_final
input_grad_norm""".split())


def cell(table, label, column, quantity=None):
    frame = paper_table(table, quantity)
    rows = frame.filter(frame["label"] == label)
    assert rows.height == 1, (table, label, rows)
    return rows[column][0]


def test_row_and_column_counts():
    figures = paper_figures()
    counts = {(t, q): n for t, q, n in figures.group_by("table", "quantity").len().iter_rows()}
    # rows as printed: Table 5 has 39 measures, 4 oracles and 2 canonical orderings;
    # Table 6 43 rows and the conditional entropy; Tables 7, 9 and 10 55 rows each
    assert counts == {("1", "psi"): 8, ("1", "cmi"): 8, ("2", "psi"): 6, ("2", "cmi"): 6,
                      ("5", "psi"): 45, ("6", "cmi"): 44, ("7", "psi"): 55,
                      ("9", "psi"): 55, ("10", "psi"): 55}
    assert paper_table(5).columns[-9:] == [*PAPER_AXES, "tau", "Psi"]
    assert paper_table(6).columns[-10:] == [*PAPER_AXES, "s0", "s1", "s2"]
    assert paper_table(1, "cmi").columns[-9:] == [*PAPER_AXES, "s2", "K"]
    # every number of a measure row of Tables 5, 6, 9 and 10 is there
    for t in ("5", "6", "9", "10"):
        frame = paper_table(t).filter(paper_table(t)["kind"] == "measure")
        numbers = [c for c in frame.columns if c in (*PAPER_AXES, "tau", "Psi", "s0", "s1", "s2")]
        assert frame.select(numbers).null_count().sum_horizontal()[0] == 0, t


def test_cells_read_by_hand():
    assert cell(5, "sharpness-orig", "batch_size") == 0.542
    assert cell(5, "sharpness-orig", "tau") == 0.400
    assert cell(5, "sharpness-orig", "Psi") == 0.398
    assert cell(5, "spectral-init", "depth") == -0.908
    assert cell(5, "spectral-init", "Psi") == -0.508
    assert cell(5, "VC dim", "tau") == -0.251          # printed "-0.251-" in a highlight box
    assert cell(5, "path-norm", "Psi") == 0.280
    assert cell(5, "oracle 0.01", "tau") == 0.851
    assert cell(6, "1-over-sigma-sharpness-mag", "dropout") == 0.2572
    assert cell(6, "1-over-sigma-sharpness-mag", "s2") == 0.0544
    assert cell(6, "#-Param", "depth") == 0.0044         # printed "-0.0044-"
    assert cell(6, "conditional entropy", "depth") == 0.8308
    assert cell(7, "spectral complexity", "depth") == -0.9989
    assert cell(7, "spectral complexity", "Psi") == -0.4567
    assert cell(9, "1/alpha sharpness mag", "Psi") == 0.5122   # as Table 9 prints it
    assert cell(10, "grad-noise-epoch-1", "Psi") == 0.0186
    assert cell(1, "oracle 0.02", "K", "cmi") == 0.1637
    assert cell(2, "Frob distance", "Psi", "psi") == -0.341   # printed "-0341"


def test_rows_keyed_to_spec_names():
    figures = paper_figures()
    named = figures.filter(figures["kind"] == "measure")["measure"].drop_nulls().unique()
    assert set(named.to_list()) <= SPEC_NAMES
    t5 = paper_table(5).filter(paper_table(5)["kind"] == "measure")
    assert t5["measure"].null_count() == 0 and t5["measure"].n_unique() == t5.height == 39
    assert cell(5, "1/α' sharpness mag", "measure") == "sharpness_mag_flatness"
    assert cell(5, "spec-dist", "measure") == "dist_spec_init"
    assert cell(6, "margin", "measure") == "inverse_margin"
    assert cell(7, "spectral product dd/2 om", "measure") == "sum_of_spec_over_margin"
    # a measure fgm does not compute keeps its label and no name
    assert cell(7, "median margin", "measure") is None


def test_main_text_rows_repeat_the_appendix():
    # Table 2's CMI half prints Table 6's numbers for the same measures
    for label2, label6 in (("Frob distance", "frob-distance"), ("Path norm", "path-norm"),
                           ("Spectral orig", "spec-orig")):
        for axis in PAPER_AXES:
            assert cell(2, label2, axis, "cmi") == cell(6, label6, axis)
    # Tables 9 and 10 list the same rows in the same order (their labels differ in
    # print: "#Params" and "# params")
    assert paper_table(9)["measure"].to_list() == paper_table(10)["measure"].to_list()
    assert paper_table(9)["label"].to_list()[1] == "#Params"
    assert paper_table(10)["label"].to_list()[1] == "# params"


def test_table6_s1_is_min_of_unnormalised_information():
    """|S| = 1 column = min over axes of (normalised per-axis value × conditional
    entropy), in every row to 8.5e-5; the minimum of the normalised values is not."""
    t6 = paper_table(6)
    entropy = t6.filter(t6["kind"] == "entropy").row(0, named=True)
    rows = t6.filter(t6["kind"] != "entropy").iter_rows(named=True)
    worst_unnormalised = worst_normalised = 0.0
    n = 0
    for r in rows:
        n += 1
        unnormalised = min(r[a] * entropy[a] for a in PAPER_AXES)
        normalised = min(r[a] for a in PAPER_AXES)
        worst_unnormalised = max(worst_unnormalised, abs(unnormalised - r["s1"]))
        worst_normalised = max(worst_normalised, abs(normalised - r["s1"]))
    assert n == 43
    assert worst_unnormalised <= 8.5e-5
    assert worst_normalised > 5e-3


def test_table10_psi_std_assumes_independent_axes():
    """Table 10's Ψ std is sqrt(Σ σ_i²)/7 in every row, to the printed precision."""
    t10 = paper_table(10).filter(paper_table(10)["Psi"].is_not_null())
    assert t10.height == 55
    for r in t10.iter_rows(named=True):
        ours = paper_psi_std({a: r[a] for a in PAPER_AXES})
        assert ours == pytest.approx(r["Psi"], abs=6e-5), r["label"]
    # and not the plain mean of the σ_i (what a std of Ψ per seed would be at most)
    vc = t10.row(0, named=True)
    assert np.mean([vc[a] for a in PAPER_AXES]) == pytest.approx(0.00310, abs=1e-5)
    assert vc["Psi"] == 0.0026


def test_table9_psi_is_mean_of_psi_i():
    t9 = paper_table(9).filter(paper_table(9)["Psi"].is_not_null())
    for r in t9.iter_rows(named=True):
        assert np.mean([r[a] for a in PAPER_AXES]) == pytest.approx(r["Psi"], abs=1.5e-4), \
            r["label"]


def _models(levels, gap, axes):
    levels = np.asarray(levels)
    n = len(gap)
    return Models(np.array([f"m{i}" for i in range(n)]), np.asarray(gap, float), levels,
                  axes, None, np.zeros(n, dtype=np.int64), np.full(n, np.nan))


def test_paper_convention_cmi_against_pair_loop():
    rng = np.random.default_rng(3)
    levels = np.array([(a, b, c) for a in range(3) for b in range(2) for c in range(2)] * 2)
    levels = levels[rng.permutation(len(levels))[:20]]       # an incomplete grid
    gap = rng.integers(0, 6, len(levels)).astype(float)
    mu = gap + rng.integers(0, 4, len(levels))
    axes = ["x", "y", "z"]
    res = cmi_result("m", mu, _models(levels, gap, axes), convention="paper")
    singles = {}
    for j, a in enumerate(axes):
        norm, info, h = cmi_equal_ref(mu.tolist(), gap.tolist(), levels.tolist(), (j,))
        assert res["per_axis"][a] == pytest.approx(norm, abs=1e-12)
        assert res["conditional_entropy"][a] == pytest.approx(h, abs=1e-12)
        singles[a] = info
    assert res["s1"] == pytest.approx(min(singles.values()), abs=1e-12)
    s0 = cmi_equal_ref(mu.tolist(), gap.tolist(), levels.tolist(), ())[0]
    s2 = min(cmi_equal_ref(mu.tolist(), gap.tolist(), levels.tolist(), s)[0]
             for s in ((0, 1), (0, 2), (1, 2)))
    assert res["s0"] == pytest.approx(s0, abs=1e-12)
    assert res["s2"] == pytest.approx(s2, abs=1e-12)
    assert res["K"] == pytest.approx(min(s0, min(singles.values()), s2), abs=1e-12)
    assert res["convention"] == "paper"
    # SPEC's weighting differs on this incomplete grid
    spec = cmi_result("m", mu, _models(levels, gap, axes))
    assert "conditional_entropy" not in spec
    assert any(abs(spec["per_axis"][a] - res["per_axis"][a]) > 1e-6 for a in axes)


def test_equal_slices_move_k_little_on_a_complete_grid():
    """App. B.1's equal weights against SPEC's pair weights on a complete grid (three
    models in every cell): only the diagonal slices (a cell with itself: c(c-1)
    pairs, not c²) weigh differently, and every figure moves by less than 1e-3."""
    rng = np.random.default_rng(0)
    levels = np.array([(a, b, c) for a in range(3) for b in range(3) for c in range(3)] * 3)
    gap = rng.normal(size=len(levels))
    mu = gap + rng.normal(size=len(levels))
    axes = ["x", "y", "z"]
    m = _models(levels, gap, axes)
    spec, paper = cmi_result("m", mu, m), cmi_result("m", mu, m, convention="paper")
    for a in axes:
        assert abs(spec["per_axis"][a] - paper["per_axis"][a]) < 1e-3
        assert spec["per_axis"][a] != paper["per_axis"][a]
    assert abs(spec["s2"] - paper["s2"]) < 1e-3
    assert math.isclose(spec["s0"], paper["s0"], abs_tol=1e-12)   # one slice: no weights
