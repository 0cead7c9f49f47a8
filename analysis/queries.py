"""The evaluation questions of fgm-query as library functions over an open (read-only,
locked-down) connection: each returns the result object fgm-query prints (its JSON),
so the command line and the Python API (`fgm.open`) give the same answers to the
last bit. Nothing here prints, exits or writes; errors are FgmError."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import duckdb
import numpy as np
import polars as pl

from fgm.warehouse import FgmError, connect
from fgm.warehouse.store import when_free

from .evaluate import (
    CONVENTIONS,
    Models,
    Selection,
    cmi_result,
    measure_values,
    oracle_result,
    psi_result,
    select_models,
    with_seeds,
)
from .robust import WEIGHTINGS, robust_sign_error
from .sql import create_hp_wide, lock_down

# How long a query waits for a process that holds the warehouse for writing (DuckDB
# lets no reader in meanwhile): fgm's writers hold it for one short transaction at a
# time (fgm-query storing an evaluation, a grid storing a model); a holder that keeps
# it longer is named in the error.
READ_WAIT = 5.0


@contextmanager
def readonly(db: str | os.PathLike | None,
             memory_limit: str | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """The warehouse opened read-only, with the per-axis view hp_wide, and locked
    down: no file access beyond the warehouse, no setting changed after this."""
    con = when_free(lambda: connect(db, read_only=True), READ_WAIT)
    try:
        create_hp_wide(con)
        lock_down(con, memory_limit=memory_limit)
        yield con
    finally:
        con.close()


def memory_limit(value: str) -> str:
    """A memory limit: a positive size, e.g. 512MB or 4GB (DuckDB reads a negative one
    as no limit at all)."""
    if not isinstance(value, str) or not re.fullmatch(
            r"\s*\d+(\.\d+)?\s*([KMGT]i?B|B|bytes)?\s*", value, flags=re.I) \
            or not float(re.match(r"\s*([\d.]+)", value).group(1)) > 0:
        raise FgmError(f"--memory-limit {str(value)[:40]!r}: expected a positive size "
                       "such as 512MB or 4GB")
    return value


# --------------------------------------------------------------------------- option ranges
# The ranges of the evaluation options, the same for fgm-query (click checks them before
# any query runs) and the Python API (checked here). Each leave-one-block-out and each
# oracle draw is one more evaluation of every model, so the caps keep a typo from asking
# for days.
MAX_BLOCKS = 10_000      # --blocks: at most one block per configuration is used anyway
MIN_BLOCKS = 5
# --draws: the oracle's Monte Carlo CMI; its standard error falls as 1/sqrt(draws), so
# 10,000 draws already make it 1% of one draw's, at 10,000 CMI computations per oracle
MAX_DRAWS = 10_000
MAX_EPS = 1.0            # --eps: the oracle's noise std, on gaps that are fractions
MAX_TEST_SIZE = 10**9    # --test-size
MAX_MIN_ESS = 1e6        # --min-ess: more than any environment's pairs
MAX_SEED = 2**31 - 1     # --seed of the jackknife blocks, the oracle and the random baseline
MAX_MODEL_SEED = 2**63 - 1   # a model's training seed
MAX_TIMEOUT = 86_400     # --timeout of fgm-query sql, seconds


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, int | float | np.integer | np.floating)
            and not isinstance(value, bool) and math.isfinite(float(value)))


def check_int(name: str, value: object, low: int, high: int) -> int:
    if not _is_int(value) or not low <= int(value) <= high:
        raise FgmError(f"{name} {value!r}: expected a whole number from {low:,} to {high:,}")
    return int(value)


def check_number(name: str, value: object, low: float, high: float, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    ok = _is_number(value) and (low < value if low_open else low <= value) \
        and (value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise FgmError(f"{name} {value!r}: expected a number in {left}{low:g}, {high:g}{right}")
    return float(value)


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise FgmError(f"{name} {value!r}: expected True or False")
    return bool(value)


def check_name(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise FgmError(f"{name} {value!r}: expected a name (a non-empty string)")
    return value


def check_interval(ci: object, blocks: object, seed: object) -> None:
    """ci in (0, 1) or None, blocks in [5, MAX_BLOCKS], seed in [0, MAX_SEED]."""
    if ci is not None:
        check_number("ci", ci, 0, 1, low_open=True, high_open=True)
    check_int("blocks", blocks, MIN_BLOCKS, MAX_BLOCKS)
    check_int("seed", seed, 0, MAX_SEED)


def selection(*, where: str | None = None, dataset: str | None = None,
              sweep: str | None = None, all_models: bool = False, relevel: bool = False,
              pool_seeds: bool = False, converged_searches_only: bool = False,
              seeds: Sequence[int] | None = None) -> Selection:
    """The selection options of fgm-query (and of fgm.open's methods), checked."""
    for name, value in (("where", where), ("dataset", dataset), ("sweep", sweep)):
        if value is not None and not isinstance(value, str):
            raise FgmError(f"{name} {value!r}: expected a string")
    for name, value in (("all_models", all_models), ("relevel", relevel),
                        ("pool_seeds", pool_seeds),
                        ("converged_searches_only", converged_searches_only)):
        check_flag(name, value)
    if seeds is not None:
        if isinstance(seeds, str | bytes) or not isinstance(seeds, Sequence) or not seeds:
            raise FgmError(f"seeds {seeds!r}: expected a non-empty list of seeds, e.g. [0, 1]")
        bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int | np.integer)
               or not 0 <= int(s) <= MAX_MODEL_SEED]
        if bad:
            raise FgmError(f"seeds: {bad[0]!r} is not a seed (a whole number from 0)")
        seeds = tuple(sorted({int(s) for s in seeds}))
    return Selection(where=where, dataset=dataset, sweep=sweep, all_models=bool(all_models),
                     pool_seeds=bool(pool_seeds), relevel=bool(relevel),
                     converged_searches_only=bool(converged_searches_only), seeds=seeds)


def convention_option(convention: str) -> dict:
    """The stored evaluation's options: the paper's convention is another question
    (another key), SPEC's the default that older evaluations were computed with."""
    return {} if convention == "spec" else {"convention": convention}


def models_frame(con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    """fgm-query models: hyperparameters, accuracies, gap, convergence, in the order
    of the grid (dataset, each axis by level, then seed)."""
    frame = con.sql("SELECT w.*, o.train_acc, o.test_acc, o.gap, o.converged "
                    "FROM hp_wide AS w JOIN model_outcomes AS o USING (model_id)").pl()
    levels = [c for c in frame.columns if c.endswith("_level")]
    frame = frame.sort(["dataset", *levels, "seed", "model_id"], nulls_last=True)
    return frame.drop(levels + ["sweep_id"])


def measures_frame(con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    """fgm-query measures: per measure, how many models have a value, failed, or miss
    one; `reasons`: a list of {status, reason, n_models}."""
    frame = con.sql("SELECT * FROM measure_summary").pl()
    reasons = con.sql("SELECT * FROM measure_reasons").pl()
    why: dict[str, list[dict]] = {}
    for r in reasons.iter_rows(named=True):
        why.setdefault(r["measure"], []).append(
            {"status": r["status"], "reason": r["reason"], "n_models": r["n_models"]})
    kind = pl.List(pl.Struct({"status": pl.String, "reason": pl.String,
                              "n_models": pl.Int64}))
    return frame.with_columns(pl.Series("reasons", [why.get(m, []) for m in frame["measure"]],
                                        dtype=kind))


def measure_reasons(con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    return con.sql("SELECT * FROM measure_reasons").pl()


@dataclass
class Answer:
    """A result object (`res`, as fgm-query's JSON), the models it was computed on,
    and the notes printed below it."""
    res: dict
    models: Models
    values: Models | None = None     # the models that have a value of the measure


def with_constant(res: dict, models: Models) -> dict:
    """The axes that take no part (one level in the selection), said once."""
    if models.constant:
        res["constant_axes"] = dict(models.constant)
    return res


def constant_note(constant: dict | None) -> str | None:
    if not constant:
        return None
    return ("left out, constant in this selection: "
            + ", ".join(f"{a} = {v}" for a, v in constant.items()))


def searches_note(n: int, filtered: bool, what: str = "the values") -> str | None:
    if not n:
        return None
    if filtered:
        return f"{n} value(s) from searches that did not converge left out"
    return (f"{n} of {what} come from searches that did not converge "
            "(--converged-searches-only leaves them out)")


def check_convention(convention: str) -> None:
    if not isinstance(convention, str) or convention not in CONVENTIONS:
        raise FgmError(f"convention {convention!r}: expected one of {', '.join(CONVENTIONS)}")


def psi(con: duckdb.DuckDBPyConnection, sel: Selection, measure: str, *,
        ci: float | None = None, blocks: int = 20, seed: int = 0,
        convention: str = "spec") -> Answer:
    """Kendall's τ, ψ_i per axis and Ψ (Eqs. 2, 4, 5): fgm-query psi."""
    check_name("measure", measure)
    check_interval(ci, blocks, seed)
    check_convention(convention)
    models = select_models(con, sel)
    mu, sub = measure_values(con, measure, models)
    res = with_constant(with_seeds(sub, mu, lambda m, s: psi_result(measure, m, s), ci=ci,
                                   blocks=blocks, seed=seed, pool_seeds=sel.pool_seeds,
                                   convention=convention), models)
    res["unconverged_searches"] = sub.unconverged_searches
    note = searches_note(sub.unconverged_searches, sel.converged_searches_only,
                         f"the {len(mu)} values")
    if note:
        res["note"] = note if "note" not in res else f"{res['note']}; {note}"
    return Answer(res, models, sub)


def cmi(con: duckdb.DuckDBPyConnection, sel: Selection, measure: str, *,
        pgdl: bool = False, ci: float | None = None, blocks: int = 20, seed: int = 0,
        convention: str = "spec") -> Answer:
    """Î(S) for |S| ≤ 2 and K, its minimum (App. B): fgm-query cmi."""
    check_name("measure", measure)
    check_interval(ci, blocks, seed)
    check_flag("pgdl", pgdl)
    check_convention(convention)
    if pgdl and convention != "spec":
        raise FgmError("pgdl is the PGDL scorer's own convention; leave out "
                       "convention='paper' (--convention paper)")
    models = select_models(con, sel)
    mu, sub = measure_values(con, measure, models)
    res = with_constant(with_seeds(sub, mu, lambda m, s: cmi_result(
        measure, m, s, pgdl=pgdl, convention=convention), ci=ci, blocks=blocks, seed=seed,
        keys=("K",), pool_seeds=sel.pool_seeds), models)
    return Answer(res, models, sub)


def oracle(con: duckdb.DuckDBPyConnection, sel: Selection, eps: float, *,
           draws: int = 20, seed: int = 0) -> Answer:
    """The noisy oracle g + N(0, ε²): fgm-query oracle."""
    check_number("eps", eps, 0, MAX_EPS, low_open=True)
    check_int("draws", draws, 2, MAX_DRAWS)
    check_int("seed", seed, 0, MAX_SEED)
    models = select_models(con, sel)
    res = with_constant(with_seeds(models, models.gap,
                                   lambda _, m: oracle_result(m, eps, draws=draws, seed=seed),
                                   pool_seeds=sel.pool_seeds), models)
    return Answer(res, models)


def robust(con: duckdb.DuckDBPyConnection, sel: Selection, measure: str, *,
           test_size: int | None = None, weighting: str = "published",
           min_ess: float | None = None) -> Answer:
    """Robust sign-error over environments (Dziugaite et al. 2020): fgm-query robust."""
    check_name("measure", measure)
    if weighting not in WEIGHTINGS:
        raise FgmError(f"weighting {weighting!r}: expected one of {', '.join(WEIGHTINGS)}")
    if test_size is not None:
        check_int("test_size", test_size, 1, MAX_TEST_SIZE)
    if min_ess is not None:
        check_number("min_ess", min_ess, 0, MAX_MIN_ESS)
    models = select_models(con, sel)
    mu, sub = measure_values(con, measure, models)
    sizes = np.full(len(mu), float(test_size)) if test_size else sub.test_size
    if np.isnan(sizes).any():
        raise FgmError("the warehouse does not know the test-set size of some models "
                       "(results tables do not carry it): pass --test-size N")
    res = {"measure": measure, "n_models": int(len(mu)),
           "test_size": float(np.median(sizes)) if len(sizes) else None,
           **robust_sign_error(mu, sub.gap, sub.levels, sub.axes, sizes, weighting=weighting,
                               min_ess=min_ess)}
    return Answer(with_constant(res, models), models, sub)


# --------------------------------------------------------------------------- as tables
# The rows fgm-query's table format prints for a result object; the Python API's
# to_frame() gives the same.

def quantity_frame(rows: list[tuple[str, object]]) -> pl.DataFrame:
    """(quantity, value) rows as a frame of those two columns."""
    return pl.DataFrame({"quantity": [r[0] for r in rows],
                         "value": [None if r[1] is None else float(r[1]) for r in rows]},
                        schema={"quantity": pl.String, "value": pl.Float64})


def spread_quantities(res: dict, keys: tuple[str, ...]) -> list[tuple[str, object]]:
    """Std over seeds and interval bounds of the overall figures."""
    rows: list[tuple[str, object]] = []
    if "seeds" in res:
        n = res["seeds"]["n"]
        rows += [(f"{k} std over {n} seeds", res["seeds"]["std"].get(k)) for k in keys]
    if "ci" in res:
        pct = f"{100 * res['ci']['level']:g}%"
        for k in keys:
            lo, hi = res["ci"].get(k) or (None, None)
            rows += [(f"{k} {pct} CI low", lo), (f"{k} {pct} CI high", hi)]
    return rows


def psi_quantities(res: dict, left_out: bool = False) -> list[tuple[str, object]]:
    """τ, ψ per axis, Ψ, their spread, and the values of unconverged searches (left
    out of the figures with --converged-searches-only)."""
    rows = [("tau", res["tau"]), *((f"psi[{a}]", v) for a, v in res["psi"].items()),
            ("Psi", res["Psi"]), *spread_quantities(res, ("tau", "Psi"))]
    if "unconverged_searches" in res:
        rows.append(("values from unconverged searches" + (" (left out)" if left_out else ""),
                     res["unconverged_searches"]))
    return rows


def cmi_quantities(res: dict) -> list[tuple[str, object]]:
    """Î per axis, the least over |S| = 0, 1, 2, K with its set."""
    return [*((f"cmi[{a}]", v) for a, v in res["per_axis"].items()),
            ("|S|=0", res["s0"]), ("min |S|=1", res["s1"]), ("min |S|=2", res["s2"]),
            (f"K (S = {{{', '.join(res['argmin'])}}})" if res["argmin"] is not None
             else "K", res["K"])]


def cmi_result_quantities(res: dict) -> list[tuple[str, object]]:
    """fgm-query cmi: the CMI rows, H(V_g | axis) with --convention paper, the spread."""
    entropy = [(f"H(V_g | {a}) bits", v) for a, v in res.get("conditional_entropy", {}).items()]
    return cmi_quantities(res) + entropy + spread_quantities(res, ("K",))


def oracle_quantities(res: dict) -> list[tuple[str, object]]:
    return [("tau", res["tau"]), *((f"psi[{a}]", v) for a, v in res["psi"].items()),
            ("Psi", res["Psi"]), *cmi_quantities(res["cmi"]),
            ("K stderr", res["cmi"]["stderr"]["K"])]


def robust_frame(res: dict) -> pl.DataFrame:
    """One row per axis and one overall: environments, mean, p90, max, note."""
    rows = [{"axis": a, **v} for a, v in res["per_axis"].items()]
    rows.append({"axis": "overall", **res["overall"]})
    schema = {"axis": pl.String, "environments": pl.Int64, "mean": pl.Float64,
              "p90": pl.Float64, "max": pl.Float64, "note": pl.String}
    return pl.DataFrame([{k: r.get(k) for k in schema} for r in rows], schema=schema)
