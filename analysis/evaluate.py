"""Evaluation over the warehouse: which models, which values, and the paper's
quantities as the JSON objects of SPEC §5 and the Table 5 / Table 6 frames."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import duckdb
import numpy as np
import polars as pl

from fgm.warehouse import FgmError
from fgm.warehouse.levels import level_conflicts
from fgm.warehouse.names import axis_name_problem

from .predicate import model_ids_where
from .ranking import (
    Conditioning,
    big_psi,
    cmi_by_set,
    information_by_set,
    kendall_tau,
    oracle_psi,
    oracle_tau,
    psi_per_axis,
)
from .seeds import check_seeds, jackknife, paper_psi_std, per_seed

ORACLE_EPS = (0.01, 0.02, 0.05, 0.1)
# App. C.4: the level order believed to predict the gap, per axis (+1: larger
# value → larger gap), and the optimizer order SGD < Adam < RMSProp.
CANONICAL_DIRECTION = {"batch_size": 1.0, "depth": -1.0, "width": -1.0, "dropout": -1.0,
                       "weight_decay": -1.0, "learning_rate": -1.0}
CANONICAL_OPTIMIZERS = ("sgd", "adam", "rmsprop")
# "spec": SPEC §2 as written. "paper": the conventions behind the paper's own
# numbers (README: Evaluation), each checked against its tables in the tests.
CONVENTIONS = ("spec", "paper")


@dataclass(frozen=True)
class Selection:
    """Which models are evaluated (SPEC §1: converged only unless all_models), and
    whether seeds are pooled (all models evaluated together, ignoring seeds)."""
    where: str | None = None
    dataset: str | None = None
    sweep: str | None = None
    all_models: bool = False
    pool_seeds: bool = False
    relevel: bool = False
    converged_searches_only: bool = False   # leave out values of unconverged σ/α searches
    seeds: tuple[int, ...] | None = None    # only models of these seeds (None: every seed)


@dataclass
class Models:
    """The evaluated models: ids, gaps, levels (n, k), hyperparameter values, seeds."""
    ids: np.ndarray
    gap: np.ndarray
    levels: np.ndarray
    axes: list[str]
    values: pl.DataFrame   # model_id, axis, value_text, value_num
    seeds: np.ndarray
    test_size: np.ndarray  # test-set size per model (NaN where unknown)
    constant: dict[str, str] = field(default_factory=dict)  # axis -> its one value here
    converged_searches_only: bool = False   # measure_values leaves unconverged searches out
    unconverged_searches: int = 0           # values of unconverged searches of the models:
                                            # behind a figure, or left out (measure_values)

    def id_frame(self) -> pl.DataFrame:
        return pl.DataFrame({"model_id": pl.Series(self.ids.tolist(), dtype=pl.String)})

    def subset(self, keep: np.ndarray) -> Models:
        """The models at a boolean mask or an index array (repeats allowed: bootstrap)."""
        ids = self.ids[keep]
        return Models(ids, self.gap[keep], self.levels[keep], self.axes,
                      self.values.filter(pl.col("model_id").is_in(ids.tolist())),
                      self.seeds[keep], self.test_size[keep], self.constant,
                      self.converged_searches_only)


def _names(con: duckdb.DuckDBPyConnection, sql: str) -> list[str]:
    return [r[0] for r in con.sql(sql).fetchall()]


def selected_datasets(con: duckdb.DuckDBPyConnection, sel: Selection) -> list[str]:
    """The datasets of the models a selection picks (none of select_models' checks)."""
    conditions, params = _conditions(con, sel)
    sql = "SELECT DISTINCT dataset FROM model_outcomes"
    if conditions:
        sql += " WHERE " + " AND ".join(conditions)
    return sorted(r[0] for r in con.execute(sql, params).fetchall() if r[0] is not None)


def selected_model_ids(con: duckdb.DuckDBPyConnection, sel: Selection) -> list[str]:
    """The ids of the models a selection's filters pick (none of select_models' checks
    of levels: a listing, not an evaluation)."""
    conditions, params = _conditions(con, sel)
    sql = "SELECT model_id FROM model_outcomes"
    if conditions:
        sql += " WHERE " + " AND ".join(conditions)
    return [r[0] for r in con.execute(sql + " ORDER BY model_id", params).fetchall()]


def _conditions(con: duckdb.DuckDBPyConnection, sel: Selection) -> tuple[list[str], list]:
    """The selection as conditions on model_outcomes, every value bound."""
    conditions, params = [], []
    if not sel.all_models:
        conditions.append("included")
    if sel.dataset:
        conditions.append("dataset = ?")
        params.append(sel.dataset)
    if sel.sweep:
        conditions.append("(sweep = ? OR sweep_id = ?)")
        params += [sel.sweep, sel.sweep]
    if sel.seeds is not None:
        conditions.append("list_contains(?::BIGINT[], seed)")
        params.append(list(sel.seeds))
    if sel.where is not None:
        # checked to be one expression over hp_wide's columns, run on its own; only
        # its result (model ids) reaches this query, as a bound parameter
        conditions.append("list_contains(?::VARCHAR[], model_id)")
        params.append(model_ids_where(con, sel.where))
    return conditions, params


def select_models(con: duckdb.DuckDBPyConnection, sel: Selection = Selection()) -> Models:
    conditions, params = _conditions(con, sel)
    sql = "SELECT model_id, gap, seed, test_size FROM model_outcomes"
    if conditions:
        sql += " WHERE " + " AND ".join(conditions)
    models = con.sql(sql + " ORDER BY model_id", params=params).pl()
    for name, value in (("dataset", sel.dataset), ("sweep", sel.sweep)):
        if value and models.height == 0:
            column = "name" if name == "sweep" else "dataset"
            table = "sweeps" if name == "sweep" else "models"
            known = _names(con, f"SELECT DISTINCT {column} FROM {table} ORDER BY 1")
            if value not in known and not (name == "sweep" and value in _names(
                    con, "SELECT sweep_id FROM sweeps")):
                raise FgmError(f"unknown {name} {value!r}; the warehouse has: {', '.join(known)}")
    if models.height == 0:
        raise _empty_selection(con, sel)
    hp = con.sql("SELECT h.model_id, h.axis, h.level, h.value_text, h.value_num, "
                 "coalesce(o.sweep, o.sweep_id) AS sweep "
                 "FROM hyperparameters AS h JOIN model_outcomes AS o USING (model_id) "
                 + ("WHERE " + " AND ".join(conditions) if conditions else ""),
                 params=params).pl()
    # axes whose names break the rules (stored by an older fgm) take no part
    # (and of two names equal but for case, the one most models have)
    counts = hp.group_by("axis").len().sort(["len", "axis"], descending=[True, False])
    seen: dict[str, str] = {}
    for a in counts["axis"].to_list():
        if not axis_name_problem(a):
            seen.setdefault(a.lower(), a)
    axes = sorted(seen.values())
    hp = hp.filter(pl.col("axis").is_in(axes))
    ids = models["model_id"]
    hp = _consistent_levels(con, hp, sel)
    # an axis with one level in this selection ranks nothing: it takes no part in
    # ψ, the CMI sets or the tables, and is reported once as constant
    spread = hp.group_by("axis").agg(pl.col("level").n_unique().alias("k"),
                                     pl.col("value_text").first().alias("value"))
    constant = {r["axis"]: r["value"] for r in spread.filter(pl.col("k") < 2).iter_rows(named=True)
                if r["axis"] in axes and hp.filter(pl.col("axis") == r["axis"]).height
                == models.height}
    axes = [a for a in axes if a not in constant]
    hp = hp.filter(pl.col("axis").is_in(axes))
    if axes:
        wide = hp.pivot(on="axis", index="model_id", values="level")
        wide = pl.DataFrame({"model_id": ids}).join(wide, on="model_id", how="left")
        levels = wide.select(axes).fill_null(-1).to_numpy().astype(np.int64)
    else:
        levels = np.zeros((models.height, 0), dtype=np.int64)
    return Models(ids.to_numpy(), models["gap"].to_numpy().astype(np.float64), levels, axes,
                  hp.drop("level", "sweep"), models["seed"].to_numpy().astype(np.int64),
                  models["test_size"].cast(pl.Float64).fill_null(float("nan")).to_numpy(),
                  dict(sorted(constant.items())), sel.converged_searches_only)


def _consistent_levels(con: duckdb.DuckDBPyConnection, hp: pl.DataFrame,
                       sel: Selection) -> pl.DataFrame:
    """Levels must mean the same thing across everything evaluated together. Two grids
    in one warehouse may give one value different levels (depth 4 is level 2 of
    [2, 3, 4] and level 0 of [4, 8]); pooled blindly, ψ would compare unlike with
    unlike. That is an error naming the axis and the sweeps, unless sel.relevel: then
    each such axis is ranked afresh by value across the selection."""
    clash = (hp.group_by("axis", "value_text").agg(pl.col("level").unique().sort())
             .filter(pl.col("level").list.len() > 1).sort("axis", "value_text"))
    # and one level that stands for values with nothing in common in two sweeps
    # (depth level 0 is 2 in one table and 8 in another)
    per_sweep = hp.group_by("axis", "level", "sweep").agg(pl.col("value_text").unique())
    apart = (per_sweep.join(per_sweep, on=["axis", "level"], suffix="_b")
             .filter(pl.col("sweep") < pl.col("sweep_b"))
             .filter(pl.col("value_text").list.set_intersection("value_text_b").list.len() == 0)
             .sort("axis", "level", "sweep", "sweep_b"))
    if clash.height == 0 and apart.height == 0:
        return _one_level_one_value(hp, sel)
    if sel.relevel:
        axes = set(clash["axis"].to_list()) | set(apart["axis"].to_list())
        return _one_level_one_value(_relevel(hp, axes), sel)
    if clash.height == 0:
        r = apart.row(0, named=True)
        raise FgmError(
            f"the selected models disagree on what the levels of {r['axis']!r} mean: level "
            f"{r['level']} is {' / '.join(sorted(r['value_text']))} in sweep {r['sweep']!r} "
            f"but {' / '.join(sorted(r['value_text_b']))} in sweep {r['sweep_b']!r}. "
            "Evaluate one sweep at a time (--sweep NAME), or pass --relevel to rank each "
            "such axis afresh by value across the selection")
    r = clash.row(0, named=True)
    con.register("_clash", hp.filter((pl.col("axis") == r["axis"])
                                     & (pl.col("value_text") == r["value_text"])))
    try:
        sweeps = [s for (s,) in con.execute(
            "SELECT DISTINCT coalesce(o.sweep, o.sweep_id) FROM _clash AS c "
            "JOIN model_outcomes AS o USING (model_id) ORDER BY 1").fetchall()]
    finally:
        con.unregister("_clash")
    return_levels = ", ".join(str(v) for v in r["level"])
    raise FgmError(
        f"the selected models disagree on what the levels of {r['axis']!r} mean: "
        f"{r['axis']} = {r['value_text']} has levels {return_levels} in sweeps "
        f"{', '.join(map(repr, sweeps))}. Evaluate one sweep at a time (--sweep NAME), or "
        "pass --relevel to rank each such axis afresh by value across the selection")


def _relevel(hp: pl.DataFrame, axes: set[str]) -> pl.DataFrame:
    """Each of `axes` ranked afresh by value across `hp` (numbers ascending, names in
    order): --relevel."""
    # numbers ascending, then names in order: one rank over both (an axis whose values
    # are numbers in one table and names in another gets no level twice)
    named = pl.col("value_num").is_null()
    fresh = hp.filter(pl.col("axis").is_in(axes)).with_columns(
        named.alias("_named"),
        pl.when(named).then(None).otherwise(pl.col("value_num")).alias("_num"),
        pl.when(named).then(pl.col("value_text")).otherwise(None).alias("_text"))
    keys = ["axis", "_named", "_num", "_text"]
    order = (fresh.select(keys).unique().sort(keys)
             .with_columns(pl.int_range(pl.len()).over("axis")
                           .cast(hp.schema["level"]).alias("level")))
    fresh = fresh.drop("level").join(order, on=keys, how="left", nulls_equal=True)
    return pl.concat([hp.filter(~pl.col("axis").is_in(axes)), fresh.select(hp.columns)])


def _one_level_one_value(hp: pl.DataFrame, sel: Selection) -> pl.DataFrame:
    """Models that agree on the level of every axis must agree on every value
    (warehouse/levels.py): width 16 and width 24 both level 0 beside the same levels
    of every other axis (a narrowed grid in its parent's sweep) would be ranked as one
    configuration. An error naming the two models and their sweeps, unless
    sel.relevel: then each such axis is ranked afresh by value, until none is left."""
    relevelled: set[str] = set()
    while conflicts := level_conflicts(hp, limit=None):
        if not sel.relevel:
            c = conflicts[0]
            sweeps = sorted(set(hp.filter(pl.col("model_id").is_in([c.model, c.other_model]))
                                ["sweep"].to_list()))
            where = (f"in sweep {sweeps[0]!r}" if len(sweeps) == 1 else
                     f"in sweeps {', '.join(map(repr, sweeps))}")
            fix = ("Evaluate models of one levelling at a time (--where)" if len(sweeps) == 1
                   else "Evaluate one sweep at a time (--sweep NAME)")
            raise FgmError(
                f"the selected models disagree on what the levels of {c.axis!r} mean: "
                f"{c.describe()} ({where}). {fix}, or pass --relevel to rank each such "
                "axis afresh by value across the selection")
        axes = {c.axis for c in conflicts} - relevelled
        if not axes:   # pragma: no cover - relevelled axes map values to levels 1:1
            raise RuntimeError(f"levels still disagree after --relevel: {conflicts[0]}")
        hp = _relevel(hp, axes)
        relevelled |= axes
    return hp


def _empty_selection(con: duckdb.DuckDBPyConnection, sel: Selection) -> FgmError:
    """Why no model is selected, in words: an empty warehouse, no converged model,
    or filters that match nothing."""
    total, included = con.sql("SELECT count(*), count(*) FILTER (WHERE included) "
                              "FROM model_outcomes").fetchall()[0]
    if total == 0:
        return FgmError("the warehouse holds no models yet: ingest a results table "
                        "(fgm-ingest) or train a grid (fgm-train grid) first")
    filters = [f"{k} {v!r}" for k, v in (("--where", sel.where), ("--dataset", sel.dataset),
                                          ("--sweep", sel.sweep)) if v is not None]
    if sel.seeds is not None:
        filters.append("--seeds " + ",".join(map(str, sel.seeds)))
    if not filters and not sel.all_models and included == 0:
        return FgmError(f"none of the warehouse's {total} models converged; evaluation uses "
                        "converged models only: pass --all-models to include the others")
    hint = "" if sel.all_models else " (converged models only; --all-models includes the rest)"
    return FgmError(f"no model matches {' and '.join(filters)}{hint}; the warehouse holds "
                    f"{total} models")


def measure_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    return _names(con, "SELECT DISTINCT measure FROM measures ORDER BY measure")


# A value from a σ or α search that did not converge: its params say so, or (stored
# before fgm recorded `converged`) the deviation it reached lies outside its tolerance.
UNCONVERGED = ("coalesce(json_extract_string(params, '$.converged') = 'false', "
               "abs(TRY_CAST(json_extract_string(params, '$.reached_deviation') AS DOUBLE) "
               "- TRY_CAST(json_extract_string(params, '$.target_deviation') AS DOUBLE)) "
               "> TRY_CAST(json_extract_string(params, '$.tolerance') AS DOUBLE) + 1e-12, "
               "false)")


def measure_values(con: duckdb.DuckDBPyConnection, measure: str, models: Models,
                   known: list[str] | None = None):
    """(μ, models restricted to those with a value). Values from unconverged searches
    are counted in the models' unconverged_searches, and left out when
    models.converged_searches_only. Unknown measure → error listing them."""
    known = known if known is not None else measure_names(con)
    if measure not in known:
        close = difflib.get_close_matches(measure, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise FgmError(f"unknown measure {measure!r}.{hint} The warehouse has: "
                       f"{', '.join(known) if known else '(none)'}")
    vals = con.sql(f"SELECT model_id, value, {UNCONVERGED} AS unconverged FROM measures "
                   "WHERE measure = ? AND value IS NOT NULL", params=[measure]).pl()
    frame = models.id_frame().join(vals, on="model_id", how="left")
    mu = frame["value"].to_numpy().astype(np.float64)
    unconverged = frame["unconverged"].fill_null(False).to_numpy()
    if models.converged_searches_only:
        mu[unconverged] = np.nan
    keep = ~np.isnan(mu)
    sub = models.subset(keep)
    sub.unconverged_searches = int(unconverged.sum())
    return mu[keep], sub


# --------------------------------------------------------------------------- results

def _num(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def psi_result(name: str, mu: np.ndarray, models: Models) -> dict:
    psi = psi_per_axis(mu, models.gap, models.levels)
    return {"measure": name, "n_models": int(len(mu)),
            "tau": _num(kendall_tau(mu, models.gap)),
            "psi": {a: _num(p) for a, p in zip(models.axes, psi, strict=True)},
            "Psi": _num(big_psi(psi))}


def _summarise_cmi(values: np.ndarray, cond: Conditioning, axes: list[str]) -> dict:
    def best(size):
        idx = [i for i, s in enumerate(cond.sets) if len(s) == size and np.isfinite(values[i])]
        return min(idx, key=lambda i: values[i]) if idx else None
    per_axis = {a: None for a in axes}
    for i, s in enumerate(cond.sets):
        if len(s) == 1:
            per_axis[axes[s[0]]] = _num(values[i])
    picks = {size: best(size) for size in (0, 1, 2)}
    finite = [i for i in range(len(values)) if np.isfinite(values[i])]
    k = min(finite, key=lambda i: values[i]) if finite else None
    return {"per_axis": per_axis,
            **{f"s{size}": (_num(values[i]) if i is not None else None)
               for size, i in picks.items()},
            "K": _num(values[k]) if k is not None else None,
            "argmin": [axes[j] for j in cond.sets[k]] if k is not None else None}


def _cmi_summary(mu: np.ndarray, gap: np.ndarray, cond: Conditioning, axes: list[str],
                 convention: str = "spec") -> dict:
    """_summarise_cmi under a convention. "paper": slices weighted equally (App.
    B.1), and the |S| = 1 column the minimum over axes of the unnormalised
    information Î(axis)·H(V_g | axis) in bits, as in Table 6 (its "conditional
    entropy" row, given here as "conditional_entropy"); K the least of |S| = 0,
    min |S| = 1 and min |S| = 2 so taken."""
    if convention == "spec":
        return _summarise_cmi(cmi_by_set(mu, gap, cond), cond, axes)
    values = cmi_by_set(mu, gap, cond, equal_slices=True)
    info, entropy = information_by_set(mu, gap, cond, equal_slices=True)
    singles = [i for i, s in enumerate(cond.sets) if len(s) == 1]
    mixed = values.copy()
    mixed[singles] = info[singles]
    out = _summarise_cmi(mixed, cond, axes)
    out["per_axis"] = {axes[cond.sets[i][0]]: _num(values[i]) for i in singles}
    out["conditional_entropy"] = {axes[cond.sets[i][0]]: _num(entropy[i]) for i in singles}
    return out


def cmi_result(name: str, mu: np.ndarray, models: Models, pgdl: bool = False,
               convention: str = "spec") -> dict:
    """SPEC §5's cmi object; with a "note" saying why when K is null. `convention`
    "paper": see _cmi_summary (not with pgdl, which is its own convention)."""
    if pgdl and convention != "spec":
        raise FgmError("--pgdl is the PGDL scorer's own convention: it does not combine "
                       "with --convention paper")
    cond = Conditioning.build(models.levels, sizes=(2,) if pgdl else None)
    if pgdl:
        summary = _summarise_cmi(cmi_by_set(mu, models.gap, cond, pgdl=True), cond,
                                 models.axes)
        summary.update(per_axis={a: None for a in models.axes}, s0=None, s1=None)
    else:
        summary = _cmi_summary(mu, models.gap, cond, models.axes, convention)
    out = {"measure": name, "n_models": int(len(mu)), **summary}
    if convention != "spec":
        out["convention"] = convention
    if out["K"] is None:
        out["note"] = _why_no_k(mu, models, pgdl)
    return out


def _why_no_k(mu: np.ndarray, models: Models, pgdl: bool) -> str:
    k = len(models.axes)
    if pgdl and k < 2:
        have = f"{k} axis ({', '.join(models.axes)})" if k else "no axis"
        return (f"--pgdl conditions on pairs of axes (|S| = 2) only and this selection has "
                f"{have}: K is undefined; without --pgdl, cmi evaluates |S| ≤ 1")
    if len(mu) < 2:
        return f"K is undefined: {len(mu)} model(s), a pair needs 2"
    return ("K is undefined: no conditioning set has a slice whose pairs differ in the gap "
            "(H(V_g) = 0 everywhere)")


def oracle_cmi(models: Models, eps: float, draws: int = 10, seed: int = 0,
               convention: str = "spec") -> dict:
    """The noisy oracle's CMI: mean over seeded Monte Carlo draws, with standard errors."""
    cond = Conditioning.build(models.levels)
    rng = np.random.default_rng(seed)
    runs = [_cmi_summary(models.gap + rng.normal(0.0, eps, len(models.gap)), models.gap,
                         cond, models.axes, convention)
            for _ in range(draws)]
    return {"measure": f"oracle_{eps:g}", "n_models": int(len(models.gap)),
            **_mean_and_stderr(runs, models.axes), "draws": draws}


def oracle_result(models: Models, eps: float, draws: int = 10, seed: int = 0) -> dict:
    """Noisy oracle g + N(0, ε²): τ and ψ exact in closed form; CMI by seeded Monte Carlo."""
    psi = oracle_psi(models.gap, models.levels, eps)
    return {"eps": float(eps), "n_models": int(len(models.gap)),
            "tau": _num(oracle_tau(models.gap, eps)),
            "psi": {a: _num(p) for a, p in zip(models.axes, psi, strict=True)},
            "Psi": _num(big_psi(psi)), "cmi": oracle_cmi(models, eps, draws, seed)}


def with_seeds(models: Models, mu: np.ndarray, compute, *, ci: float | None = None,
               blocks: int = 20, seed: int = 0, keys: tuple[str, ...] = ("tau", "Psi"),
               pool_seeds: bool = False, check: bool = True, convention: str = "spec") -> dict:
    """compute(mu, models) per seed (mean ± std across seeds when there are several),
    plus seeded jackknife intervals over configurations when `ci` is given. `pool_seeds`:
    all models at once, ignoring seeds. Unless pooled (or `check` is off), seeds that
    give no seed two models are an error (check_seeds), not a table of nulls.
    `convention` "paper": the std of Ψ as in Table 10 (seeds.paper_psi_std)."""
    seeds = np.zeros(len(mu), dtype=np.int64) if pool_seeds else models.seeds
    if check and not pool_seeds:
        check_seeds(seeds)

    def at(idx):
        return per_seed(seeds[idx], lambda m: compute(mu[idx][m], models.subset(idx[m])))
    everything = np.arange(len(mu))
    result = at(everything)
    if convention == "paper" and "seeds" in result and "psi" in result["seeds"]["std"]:
        result["seeds"]["std"]["Psi"] = paper_psi_std(result["seeds"]["std"]["psi"])
    if ci:
        result["ci"] = jackknife(models.levels, at, level=ci, blocks=blocks, seed=seed,
                                 keys=keys)
    return result


def _mean_and_stderr(runs: list[dict], axes: list[str]) -> dict:
    def stats(values):
        v = np.array([np.nan if x is None else x for x in values], dtype=float)
        v = v[np.isfinite(v)]
        if not len(v):
            return None, None
        se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None
        return float(v.mean()), se
    out, err = {"per_axis": {}}, {"per_axis": {}}
    for a in axes:
        out["per_axis"][a], err["per_axis"][a] = stats([r["per_axis"][a] for r in runs])
    for key in ("s0", "s1", "s2", "K"):
        out[key], err[key] = stats([r[key] for r in runs])
    argmins = [tuple(r["argmin"]) for r in runs if r["argmin"] is not None]
    out["argmin"] = list(max(set(argmins), key=argmins.count)) if argmins else None
    out["stderr"] = err
    return out


def canonical_measure(models: Models, axis: str) -> np.ndarray | None:
    """App. C.4's canonical ordering for one axis as a measure, or None if unknown."""
    vals = models.values.filter(pl.col("axis") == axis)
    frame = models.id_frame().join(vals, on="model_id", how="left")
    if axis == "optimizer":
        names = frame["value_text"].str.to_lowercase().to_list()
        if any(n not in CANONICAL_OPTIMIZERS for n in names):
            return None
        return np.array([CANONICAL_OPTIMIZERS.index(n) for n in names], dtype=float)
    if axis in CANONICAL_DIRECTION and frame["value_num"].null_count() == 0:
        return CANONICAL_DIRECTION[axis] * frame["value_num"].to_numpy().astype(float)
    return None


def random_measure(models: Models, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=len(models.gap))


# --------------------------------------------------------------------------- tables

def _psi_baselines(models: Models, eps_list, seed: int) -> list[tuple[str, str, object]]:
    """(kind, name, compute(mu, models)) for the oracle, canonical and random rows."""
    def oracle(eps):
        def compute(_, m):
            psi = oracle_psi(m.gap, m.levels, eps)
            return {"measure": f"oracle_{eps:g}", "n_models": len(m.gap),
                    "tau": _num(oracle_tau(m.gap, eps)),
                    "psi": {a: _num(p) for a, p in zip(m.axes, psi, strict=True)},
                    "Psi": _num(big_psi(psi))}
        return compute

    def canonical(j, axis):
        def compute(_, m):
            mu = canonical_measure(m, axis)
            own = psi_per_axis(mu, m.gap, m.levels, only=[j])[j]
            return {"measure": f"canonical_{axis}", "n_models": len(m.gap), "tau": None,
                    "psi": {axis: _num(own)}, "Psi": None}
        return compute

    rows = [("oracle", f"oracle_{e:g}", oracle(e)) for e in eps_list]
    rows += [("canonical", f"canonical_{a}", canonical(j, a)) for j, a in enumerate(models.axes)
             if canonical_measure(models, a) is not None]
    rows.append(("random", "random",
                 lambda _, m: psi_result("random", random_measure(m, seed), m)))
    return rows


def _seeding(models: Models, sel: Selection, pool_seeds: bool | None) -> dict:
    """with_seeds keywords for a table: pooled as asked (else as `sel` says); the
    seeds of all selected models checked once, not per measure's subset."""
    pool = sel.pool_seeds if pool_seeds is None else pool_seeds
    if not pool:
        check_seeds(models.seeds)
    return {"pool_seeds": pool, "check": False}


def table5(con, sel: Selection, *, measures: list[str] | None = None,
           eps_list=ORACLE_EPS, seed: int = 0, ci: float | None = None, blocks: int = 20,
           progress=None, pool_seeds: bool | None = None,
           convention: str = "spec") -> pl.DataFrame:
    """Table 5's shape: one row per measure (ψ per axis, τ, Ψ), then the oracles,
    the canonical orderings and the random baseline; with several seeds, means
    across seeds and their std (Table 9); with `ci`, jackknife intervals.
    `pool_seeds` (default: sel.pool_seeds): all models together, ignoring seeds.
    `convention` "paper": Ψ's std across seeds as in Table 10."""
    models = select_models(con, sel)
    seeding = {**_seeding(models, sel, pool_seeds), "convention": convention}
    rows = _per_measure(con, models, measures, progress, lambda name, mu, sub: _flat(
        with_seeds(sub, mu, lambda m, s: psi_result(name, m, s), ci=ci, blocks=blocks,
                   seed=seed, **seeding), models.axes))
    zeros = np.zeros(len(models.gap))
    for kind, _, compute in _psi_baselines(models, eps_list, seed):
        rows.append({"kind": kind, **_flat(with_seeds(models, zeros, compute, **seeding),
                                           models.axes)})
    return _frame(rows, ["kind", "measure", "n_models", *models.axes, "tau", "Psi",
                         "tau_std", "Psi_std", "tau_lo", "tau_hi", "Psi_lo", "Psi_hi", "seeds",
                         "unconverged_searches", "failed", "not_applicable"])


def table6(con, sel: Selection, *, measures: list[str] | None = None,
           eps_list=ORACLE_EPS, draws: int = 10, seed: int = 0, ci: float | None = None,
           blocks: int = 20, progress=None,
           pool_seeds: bool | None = None, convention: str = "spec",
           pgdl: bool = False) -> pl.DataFrame:
    """Table 6's shape: per-axis CMI, |S| = 0, min |S| = 1, min |S| = 2, K, argmin
    (Table 10 with several seeds; jackknife intervals of K with `ci`).
    `pool_seeds` (default: sel.pool_seeds): all models together, ignoring seeds.
    `convention` "paper": see _cmi_summary."""
    models = select_models(con, sel)
    seeding = _seeding(models, sel, pool_seeds)
    rows = _per_measure(con, models, measures, progress, lambda name, mu, sub: _flat_cmi(
        with_seeds(sub, mu, lambda m, s: cmi_result(name, m, s, pgdl=pgdl,
                                                    convention=convention), ci=ci,
                   blocks=blocks, seed=seed, keys=("K",), **seeding), models.axes))
    zeros = np.zeros(len(models.gap))
    # (the PGDL scorer, `pgdl`, scores measures: no noisy oracle is part of it)
    for eps in ([] if pgdl else eps_list):
        res = with_seeds(models, zeros,
                         lambda _, m, e=eps: oracle_cmi(m, e, draws, seed, convention),
                         **seeding)
        rows.append({"kind": "oracle", **_flat_cmi(res, models.axes),
                     "K_stderr": res["stderr"]["K"], "draws": draws})
    res = with_seeds(models, zeros, lambda _, m: cmi_result(
        "random", random_measure(m, seed), m, pgdl=pgdl, convention=convention), **seeding)
    rows.append({"kind": "random", **_flat_cmi(res, models.axes)})
    return _frame(rows, ["kind", "measure", "n_models", *models.axes, "s0", "s1", "s2", "K",
                         "argmin", "K_std", "K_lo", "K_hi", "K_stderr", "draws", "seeds",
                         "unconverged_searches", "failed", "not_applicable"])


def _per_measure(con, models: Models, measures: list[str] | None, progress, row) -> list[dict]:
    """One table row per measure: row(name, μ, models with a value)."""
    rows = []
    known = measure_names(con)
    # the selected models without a value: failed, or not applicable (an input they
    # lack, an architecture the measure is not defined for), counted apart
    counts = {m: (f, n) for m, f, n in con.execute(
        "SELECT measure, count(*) FILTER (WHERE status = 'failed'), "
        "count(*) FILTER (WHERE status = 'not_applicable') FROM measures "
        "WHERE value IS NULL AND list_contains(?::VARCHAR[], model_id) GROUP BY measure",
        [models.id_frame()["model_id"].to_list()]).fetchall()}
    for name in measures or known:
        mu, sub = measure_values(con, name, models, known)
        failed, not_applicable = counts.get(name, (0, 0))
        rows.append({"kind": "measure", **row(name, mu, sub),
                     "unconverged_searches": sub.unconverged_searches,
                     "failed": failed, "not_applicable": not_applicable})
        if progress:
            progress()
    return rows


def _spread(res: dict, keys: tuple[str, ...]) -> dict:
    """std across seeds and bootstrap bounds as flat columns."""
    out = {}
    if "seeds" in res:
        out["seeds"] = res["seeds"]["n"]
        out.update({f"{k}_std": res["seeds"]["std"].get(k) for k in keys})
    if "ci" in res:
        for k in keys:
            bounds = res["ci"].get(k)
            out[f"{k}_lo"], out[f"{k}_hi"] = bounds if bounds else (None, None)
    return out


def _flat(res: dict, axes: list[str]) -> dict:
    return {"measure": res["measure"], "n_models": res["n_models"],
            **{a: res["psi"].get(a) for a in axes}, "tau": res["tau"], "Psi": res["Psi"],
            **_spread(res, ("tau", "Psi"))}


def _flat_cmi(res: dict, axes: list[str]) -> dict:
    return {"measure": res["measure"], "n_models": res["n_models"],
            **{a: res["per_axis"].get(a) for a in axes},
            **{k: res[k] for k in ("s0", "s1", "s2", "K")},
            "argmin": "+".join(res["argmin"]) if res["argmin"] is not None else None,
            **_spread(res, ("K",))}


def _frame(rows: list[dict], columns: list[str]) -> pl.DataFrame:
    present = [c for c in columns if any(c in r for r in rows)]
    schema = {c: (pl.String if c in ("kind", "measure", "argmin") else
                  pl.Int64 if c in ("n_models", "draws", "seeds", "unconverged_searches",
                                    "failed", "not_applicable")
                  else pl.Float64)
              for c in present}
    return pl.DataFrame([{c: r.get(c) for c in present} for r in rows], schema=schema)
