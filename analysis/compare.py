"""fgm-query compare --paper: the paper's published figures beside this warehouse's.

For every measure both hold: the paper's Ψ and τ (Table 5, or Table 7 for SVHN)
and K (Table 6), and the warehouse's, computed with the paper's own conventions
(--convention paper), so that like is compared with like. Then: does the sign of
Ψ agree, measure by measure; how well do the two orders of the measures agree
(Spearman's ρ and Kendall's τ across measures); which signs flip. A measure the
warehouse has and the paper lacks is listed as not in the paper; one the paper
has and the warehouse lacks, as missing, with the command that would fill it.
"""

from __future__ import annotations

import dataclasses
import math
import shlex

import duckdb
import numpy as np
import polars as pl
from scipy import stats

from fgm.warehouse import FgmError

from .evaluate import (
    Selection,
    _seeding,
    cmi_result,
    measure_names,
    measure_values,
    psi_result,
    select_models,
    selected_datasets,
    with_seeds,
)
from .paper import paper_figures, paper_table
from .seeds import SUMMARY_KEYS

PSI_TABLES = {"5": "cifar10", "7": "svhn"}   # τ tables and the dataset behind each
CMI_TABLES = {"6": "cifar10"}
DEFAULT_TABLES = ("5", "6")

# Where the paper contradicts itself about a measure it reports: said beside the
# comparison, so that a sign "flip" there is read with the paper's own doubt.
PAPER_CAVEATS = {
    "inverse_margin": "Table 1 prints 1/γ with the opposite signs of Table 5's 1/margin "
                      "(Ψ +0.121 against −0.121), and the paper's text has a larger margin "
                      "generalise better (a positive Ψ for 1/γ): the paper's own sign is in "
                      "doubt",
}


def _paper_rows(tables: tuple[str, ...]) -> tuple[dict, dict, dict]:
    """measure -> (label, Ψ, τ) of the τ table, measure -> (label, K) of Table 6, and
    measure -> label over both. K as Table 1 and 2's "min ∀|S|": the least of Table
    6's |S| = 0, 1 and 2 columns."""
    psi, k = {}, {}
    for t in tables:
        frame = paper_table(t)
        frame = frame.filter((pl.col("kind") == "measure") & pl.col("measure").is_not_null())
        for r in frame.iter_rows(named=True):
            if t in PSI_TABLES:
                psi.setdefault(r["measure"], (r["label"], r["Psi"], r["tau"]))
            else:
                values = [r[c] for c in ("s0", "s1", "s2") if r[c] is not None]
                k.setdefault(r["measure"], (r["label"], min(values) if values else None))
    labels = {m: v[0] for m, v in k.items()} | {m: v[0] for m, v in psi.items()}
    return psi, k, labels


def _paper_psi_std() -> dict[str, float]:
    """measure -> Table 10's std of Ψ across the paper's 5 runs (CIFAR-10)."""
    frame = paper_table("10").filter((pl.col("kind") == "measure")
                                     & pl.col("measure").is_not_null()
                                     & pl.col("Psi").is_not_null())
    return dict(zip(frame["measure"].to_list(), frame["Psi"].to_list(), strict=True))


def _sign(paper: float | None, here: float | None) -> str | None:
    if paper is None or here is None or paper == 0 or here == 0:
        return None
    return "agree" if np.sign(paper) == np.sign(here) else "flip"


def _correlation(paper: list, here: list) -> dict:
    """Spearman's ρ and Kendall's τ (τ_b) across the measures with both figures."""
    pairs = [(p, h) for p, h in zip(paper, here, strict=True)
             if p is not None and h is not None and np.isfinite(p) and np.isfinite(h)]
    out = {"n": len(pairs), "spearman": None, "kendall": None}
    if len(pairs) < 3:
        return out
    p, h = np.array(pairs).T
    # a side whose figures are all equal has no order: the correlation is undefined
    # (scipy would say so with a ConstantInputWarning on stderr, and give nan)
    constant = [side for side, v in (("the paper's", p), ("this warehouse's", h))
                if np.all(v == v[0])]
    if constant:
        out["constant"] = " and ".join(constant)
        return out
    for key, fn in (("spearman", stats.spearmanr), ("kendall", stats.kendalltau)):
        value = float(fn(p, h)[0])
        out[key] = value if np.isfinite(value) else None
    return out


def _each_seed(res: dict, seeds: np.ndarray) -> dict[int, dict]:
    """seed -> that seed's own summary figures of one measure. A measure with values
    on a single seed has no per-seed breakdown: its figures are that seed's."""
    if "seeds" in res:
        return dict(zip(res["seeds"]["values"], res["seeds"]["each"], strict=True))
    values = np.unique(seeds)
    if len(values) == 1:
        return {int(values[0]): {k: res[k] for k in SUMMARY_KEYS if k in res}}
    return {}


def _per_seed_correlation(key: str, have: list[dict], by_seed: list, seeds: list) -> dict:
    """The rank correlation of each seed's figures with the paper's, and the mean and
    std (ddof 1) of those correlations across seeds: how much the agreement itself
    moves from one seed to the next. Figures are matched by seed, never by position:
    a measure with no value on a seed is left out of that seed's correlation (its `n`
    says over how many measures each was taken)."""
    figures: dict[str, dict[int, dict]] = {}
    for name, each in by_seed:       # a measure's Ψ, τ row and its K row: merged
        merged = figures.setdefault(name, {})
        for s, e in each.items():
            merged.setdefault(s, {}).update(e)
    paper = [r[f"paper_{key}"] for r in have]
    each = []
    for s in seeds:
        c = _correlation(paper, [figures.get(r["measure"], {}).get(s, {}).get(key)
                                 for r in have])
        each.append({"seed": s, "n": c["n"], "spearman": c["spearman"],
                     "kendall": c["kendall"]})
    out: dict = {"by_seed": each}
    for stat in ("spearman", "kendall"):
        v = [e[stat] for e in each if e[stat] is not None]
        out[f"{stat}_seed_mean"] = float(np.mean(v)) if v else None
        out[f"{stat}_seed_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else None
    return out


def _fill_command(name: str, registered: set[str], db: str | None,
                  again: bool = False) -> str | None:
    """The fgm-measure command that computes `name`; again: its stored values failed
    (fgm-measure counts a failure as done), so --recompute."""
    if name not in registered:
        return None
    words = ["fgm-measure", "--measures", name] + (["--recompute"] if again else []) \
        + (["--db", db] if db else [])
    return shlex.join(words)


def _registered() -> set[str]:
    from fgm.measures.registry import list_measures
    return {m.name for m in list_measures()}


def _on_paper_dataset(con: duckdb.DuckDBPyConnection, sel: Selection,
                      paper_sets: list[str]) -> tuple[Selection, str | None]:
    """The selection to compare: without --dataset, the paper's table's dataset where
    the warehouse has models on it (never CIFAR-10 and SVHN models pooled into one
    ranking), else the one dataset the models are on; several others: an error."""
    if sel.dataset is not None:
        return sel, None
    datasets = selected_datasets(con, sel)   # not select_models: its check of the levels
    if len(datasets) <= 1:                    # spans the datasets this may set apart
        return sel, None
    on_paper = [d for d in paper_sets if d in datasets]
    if len(on_paper) == 1:
        others = ", ".join(d for d in datasets if d != on_paper[0])
        return (dataclasses.replace(sel, dataset=on_paper[0]),
                f"compared on the {on_paper[0]} models, the paper's dataset for these "
                f"tables; the warehouse also has {others} (--dataset to choose)")
    raise FgmError(f"the selected models are on {len(datasets)} datasets "
                   f"({', '.join(datasets)}), none of them the paper's "
                   f"({', '.join(paper_sets)}) for these tables; one ranking over all of "
                   f"them would mix datasets: choose one with --dataset")


def compare_paper(con: duckdb.DuckDBPyConnection, sel: Selection,
                  tables: tuple[str, ...] = DEFAULT_TABLES, *, pool_seeds: bool | None = None,
                  db: str | None = None, registered: set[str] | None = None) -> dict:
    """The comparison as one object: "measures" (rows, one per measure both hold),
    "agreement", "rank_correlation", "sign_flips", "not_in_paper", "not_in_tables"
    (in the paper, not in these tables), "missing" (with no values here), "caveats"."""
    paper_psi, paper_k, labels = _paper_rows(tables)
    paper_sets = sorted({(PSI_TABLES | CMI_TABLES)[t] for t in tables})
    sel, dataset_note = _on_paper_dataset(con, sel, paper_sets)
    known = measure_names(con)
    models = select_models(con, sel)
    seeding = _seeding(models, sel, pool_seeds)
    # with several seeds: each measure's figures per seed too, for the std across seeds
    # of the rank correlations (each seed's figures against the paper's)
    table10 = _paper_psi_std() if "5" in tables else {}
    rows, empty, by_seed, seed_values = [], [], [], set()
    for name in sorted(set(known) & set(labels)):
        mu, sub = measure_values(con, name, models, known)
        if len(mu) == 0:    # stored, but no value on these models: as good as missing
            empty.append(name)
            continue
        row = {"measure": name, "paper_label": labels[name], "n_models": int(len(mu))}
        if name in paper_psi:
            res = with_seeds(sub, mu, lambda m, s, n=name: psi_result(n, m, s),
                             convention="paper", **seeding)
            _, p_psi, p_tau = paper_psi[name]
            row.update(paper_tau=p_tau, tau=res["tau"], paper_Psi=p_psi, Psi=res["Psi"],
                       Psi_sign=_sign(p_psi, res["Psi"]))
            if "seeds" in res:   # Table 10's std of Ψ (convention paper) beside the paper's
                row.update(tau_std=res["seeds"]["std"].get("tau"),
                           Psi_std=res["seeds"]["std"].get("Psi"),
                           paper_Psi_std=table10.get(name))
                seed_values.update(res["seeds"]["values"])
            by_seed.append((name, _each_seed(res, sub.seeds)))
        if name in paper_k:
            res = with_seeds(sub, mu, lambda m, s, n=name: cmi_result(n, m, s,
                                                                      convention="paper"),
                             keys=("K",), **seeding)
            row.update(paper_K=paper_k[name][1], K=res["K"])
            if "seeds" in res:
                row["K_std"] = res["seeds"]["std"].get("K")
                seed_values.update(res["seeds"]["values"])
            by_seed.append((name, _each_seed(res, sub.seeds)))
        rows.append(row)
    signs = [r.get("Psi_sign") for r in rows]
    registered = _registered() if registered is None else registered
    failed = dict(con.execute(
        "SELECT measure, count(*) FROM measures WHERE status = 'failed' "
        "AND list_contains(?::VARCHAR[], measure) AND list_contains(?::VARCHAR[], model_id) "
        "GROUP BY measure", [empty, models.ids.tolist()]).fetchall()) if empty else {}
    missing = [{"measure": m, "paper_label": labels[m],
                "command": _fill_command(m, registered, db, again=m in failed),
                "reason": "no value on the selected models" if m in empty else "not stored",
                "failed": failed.get(m, 0)}
               for m in sorted((set(labels) - set(known)) | set(empty))]
    datasets = selected_datasets(con, sel)
    everywhere = set(paper_figures()["measure"].drop_nulls().to_list())
    out = {"tables": list(tables), "convention": "paper", "paper_datasets": paper_sets,
           "datasets": datasets, "n_models": int(len(models.ids)), "measures": rows,
           "agreement": {"Psi_sign_agree": signs.count("agree"),
                         "Psi_sign_flip": signs.count("flip"),
                         "Psi_sign_compared": signs.count("agree") + signs.count("flip")},
           "rank_correlation": {}, "sign_flips": [r["measure"] for r in rows
                                                 if r.get("Psi_sign") == "flip"],
           "not_in_paper": sorted(set(known) - everywhere),
           "not_in_tables": sorted((set(known) & everywhere) - set(labels)),
           "missing": missing,
           "caveats": {r["measure"]: PAPER_CAVEATS[r["measure"]] for r in rows
                       if r["measure"] in PAPER_CAVEATS}}
    for key in ("Psi", "tau", "K"):
        have = [r for r in rows if f"paper_{key}" in r]
        if have:
            out["rank_correlation"][key] = _correlation([r[f"paper_{key}"] for r in have],
                                                        [r[key] for r in have])
            if seed_values and not seeding["pool_seeds"]:
                out["rank_correlation"][key].update(
                    _per_seed_correlation(key, have, by_seed, sorted(seed_values)))
    if dataset_note:
        out["note"] = dataset_note
    elif not set(datasets) & set(paper_sets):
        out["note"] = (f"the paper's figures here are on {', '.join(paper_sets)}; these models "
                       f"are on {', '.join(datasets) or 'no known dataset'}")
    return out


COLUMNS = ["measure", "paper_label", "n_models", "paper_tau", "tau", "tau_std", "paper_Psi",
           "paper_Psi_std", "Psi", "Psi_std", "Psi_sign", "paper_K", "K", "K_std"]


def comparison_frame(result: dict) -> pl.DataFrame:
    rows = result["measures"]
    present = [c for c in COLUMNS if any(c in r for r in rows)] or ["measure", "paper_label"]
    schema = {c: (pl.String if c in ("measure", "paper_label", "Psi_sign") else
                  pl.Int64 if c == "n_models" else pl.Float64) for c in present}
    return pl.DataFrame([{c: r.get(c) for c in present} for r in rows], schema=schema)


def summary_rows(result: dict) -> list[tuple[str, float | None]]:
    a = result["agreement"]
    rows: list[tuple[str, float | None]] = []
    if a["Psi_sign_compared"]:
        rows += [("Ψ sign agrees (measures)", a["Psi_sign_agree"]),
                 ("Ψ sign flips (measures)", a["Psi_sign_flip"])]
    for key, name in (("Psi", "Ψ"), ("tau", "τ"), ("K", "K")):
        c = result["rank_correlation"].get(key)
        if c and c["spearman"] is not None:
            rows += [(f"Spearman ρ of {name} across {c['n']} measures", c["spearman"]),
                     (f"Kendall τ of {name} across {c['n']} measures", c["kendall"])]
            if c.get("by_seed"):   # each seed's figures against the paper's
                n = len(c["by_seed"])
                for stat, word in (("spearman", "Spearman ρ"), ("kendall", "Kendall τ")):
                    rows += [(f"{word} of {name}, per seed: mean over {n} seeds",
                              c[f"{stat}_seed_mean"]),
                             (f"{word} of {name}, per seed: std over {n} seeds",
                              c[f"{stat}_seed_std"])]
    return rows


def summary_lines(result: dict) -> list[str]:
    lines = []
    if result["sign_flips"]:
        lines.append("the sign of Ψ flips for: " + ", ".join(result["sign_flips"]))
    for measure, text in result.get("caveats", {}).items():
        lines.append(f"caveat on {measure}: {text}")
    for key, name in (("Psi", "Ψ"), ("tau", "τ"), ("K", "K")):
        c = result["rank_correlation"].get(key)
        if c and c["spearman"] is None:
            lines.append(f"no rank correlation of {name}: "
                         + (f"{c['n']} measure{'s' * (c['n'] != 1)} with both figures, "
                            "it takes 3" if c["n"] < 3 else
                            f"undefined, as {c.get('constant', 'one side')} {name} is the "
                            f"same for all {c['n']} measures"))
    if result["not_in_paper"]:
        lines.append("not in the paper: " + ", ".join(result["not_in_paper"]))
    if result.get("not_in_tables"):
        lines.append(f"in the paper, not in Table {' or '.join(result['tables'])}: "
                     + ", ".join(result["not_in_tables"]))
    for m in result["missing"]:
        how = (f"fill with: {m['command']}" if m["command"]
               else "fgm does not compute this measure")
        why = "missing here" if m["reason"] == "not stored" else m["reason"]
        if m.get("failed"):
            how = (f"its {m['failed']} value{'s' * (m['failed'] != 1)} failed (fgm-query "
                   f"measures says why); {how}")
        lines.append(f"{why}: {m['measure']} (the paper's {m['paper_label']!r}); {how}")
    if result.get("note"):
        lines.append(result["note"])
    return lines


# --------------------------------------------------------------------------- PGDL scores

SCORE_UNITS = ("fraction", "percent")


def read_pgdl_scores(path) -> pl.DataFrame:
    """A user's CSV of published PGDL scores: measure, task, score (one row each; a
    task is a sweep of the warehouse, as fgm-ingest pgdl names it). InputError names
    the file, the row and the column."""
    from pathlib import Path

    from fgm.warehouse import InputError
    path = Path(path)
    try:
        frame = pl.read_csv(path, infer_schema=False)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise InputError(path, f"not a readable CSV ({' '.join(str(exc).split())[:200]})"
                         ) from None
    missing = [c for c in ("measure", "task", "score") if c not in frame.columns]
    if missing:
        raise InputError(path, f"no {', '.join(missing)} column (expected measure, task, "
                         f"score; found {', '.join(frame.columns)})")
    rows, seen = [], {}
    for i, r in enumerate(frame.iter_rows(named=True), start=1):
        for column in ("measure", "task"):
            if not (r[column] or "").strip():
                raise InputError(path, "a value is required", row=i, column=column)
        try:
            score = float(r["score"])
        except (TypeError, ValueError):
            raise InputError(path, f"expected a number, found {r['score']!r}", row=i,
                             column="score") from None
        if not math.isfinite(score):
            raise InputError(path, f"expected a finite number, found {r['score']!r}", row=i,
                             column="score")
        key = (r["measure"].strip(), r["task"].strip())
        if key in seen:
            raise InputError(path, f"{key[0]} on {key[1]} is also in row {seen[key]}", row=i)
        seen[key] = i
        rows.append({"measure": key[0], "task": key[1], "published": score})
    if not rows:
        raise InputError(path, "no rows")
    return pl.DataFrame(rows)


def compare_pgdl_scores(con, scores: pl.DataFrame, unit: str, *,
                        all_models: bool = False) -> pl.DataFrame:
    """Each published score beside fgm's own on the task's models: the PGDL scorer's
    conditional mutual information (fgm-query cmi --pgdl, K), in the unit the
    published scores are given in (`unit`: "fraction" as the scorer returns it, or
    "percent", x100, as leaderboards print it). A task or measure the warehouse does
    not hold gets a note, not a number."""
    from . import queries
    if unit not in SCORE_UNITS:
        raise FgmError(f"unit {unit!r}: expected one of {', '.join(SCORE_UNITS)}")
    scale = 100.0 if unit == "percent" else 1.0
    sweeps = {r[0] for r in con.execute("SELECT name FROM sweeps").fetchall()}
    known = {r[0] for r in con.execute("SELECT DISTINCT measure FROM measures "
                                       "WHERE value IS NOT NULL").fetchall()}
    out = []
    for r in scores.iter_rows(named=True):
        row = {**r, "fgm": None, "difference": None, "n_models": None, "note": None}
        if r["task"] not in sweeps:
            row["note"] = "no sweep of this name in the warehouse (fgm-ingest pgdl names it "\
                          "after the task's folder)"
        elif r["measure"] not in known:
            row["note"] = "no values of this measure (fgm-measure computes it)"
        else:
            answer = queries.cmi(con, queries.selection(sweep=r["task"],
                                                        all_models=all_models),
                                 r["measure"], pgdl=True)
            k = answer.res.get("K")
            row["n_models"] = answer.res.get("n_models")
            if k is None:
                row["note"] = answer.res.get("note") or "K is undefined here"
            else:
                row["fgm"] = k * scale
                row["difference"] = row["fgm"] - r["published"]
        out.append(row)
    return pl.DataFrame(out, schema={"measure": pl.String, "task": pl.String,
                                     "published": pl.Float64, "fgm": pl.Float64,
                                     "difference": pl.Float64, "n_models": pl.Int64,
                                     "note": pl.String})
