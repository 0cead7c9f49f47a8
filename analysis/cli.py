"""fgm-query: ask the warehouse. Read-only, every command with --format table|csv|json;
psi, cmi, oracle, table and robust then keep what they computed (analysis/stored.py)."""

from __future__ import annotations

from pathlib import Path

import click
import polars as pl

from fgm.warehouse import FgmError
from fgm.warehouse.cli import (
    SEED,
    FiniteRange,
    db_option,
    emit_frame,
    emit_stream,
    format_option,
    friendly_errors,
    to_json,
)

from . import queries
from .evaluate import Selection, select_models, table5, table6
from .queries import (  # noqa: F401  (READ_WAIT: the wait a reader gets)
    MAX_BLOCKS,
    MAX_DRAWS,
    MAX_EPS,
    MAX_MIN_ESS,
    MAX_TEST_SIZE,
    READ_WAIT,
    readonly,
)
from .queries import constant_note as _constant_note
from .queries import convention_option as _convention
from .queries import searches_note as _searches_note
from .robust import WEIGHTINGS
from .sql import alarm, readonly_batches
from .stored import cmi_rows, keep, oracle_rows, psi_rows, robust_rows, snapshot, table_rows


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Query the fgm warehouse (read-only; evaluations are stored unless --no-store)."""


def _a_number(value: float, param) -> float:
    if value != value:   # NaN passes every range check
        raise click.BadParameter("expected a number of seconds, not nan", param=param)
    return value


def _memory_limit(value: str, param) -> str:
    """--memory-limit: a positive size, e.g. 512MB or 4GB (DuckDB reads a negative one
    as no limit at all)."""
    try:
        return queries.memory_limit(value)
    except FgmError as exc:
        raise click.BadParameter(str(exc), param=param) from None


# Ranges of the evaluation options (analysis/queries.py: the Python API checks the
# same), checked by click before any query runs.
DRAWS = click.IntRange(2, MAX_DRAWS)
DRAWS_HELP = (f"Monte Carlo draws for the oracles' CMI, 2 to {MAX_DRAWS:,} (the standard "
              f"error falls as 1/sqrt(draws); the cost grows with them).")
# The most rows `fgm-query sql --format table` prints unless --max-rows says otherwise:
# an aligned table holds every row it shows in memory at once.
TABLE_ROWS = 1000
MAX_ROWS = 10**12         # --max-rows: more than any result prints


@main.command()
@click.argument("query")
@click.option("--timeout", type=click.FloatRange(min=0, max=86_400), default=60.0,
              callback=lambda ctx, param, v: _a_number(v, param),
              show_default=True, metavar="SECONDS",
              help="Stop the query after this many seconds (0: no limit).")
@click.option("--memory-limit", default="4GB", show_default=True, callback=lambda c, p, v:
              _memory_limit(v, p),
              metavar="SIZE", help="DuckDB's memory_limit for the query, e.g. 512MB, 16GB.")
@click.option("--max-rows", type=click.IntRange(0, MAX_ROWS), default=None, metavar="N",
              help=f"Print at most N rows and count the rest (0: all). Default: "
                   f"{TABLE_ROWS:,} for --format table, all for csv and json, which "
                   "stream in batches.")
@db_option
@format_option
@friendly_errors
def sql(query: str, timeout: float, memory_limit: str, max_rows: int | None, db: str | None,
        fmt: str) -> None:
    """Run a SELECT on the warehouse. Tables: models, hyperparameters, outcomes,
    measures, traces, checkpoints, sweeps, evaluations, evaluation_values; views:
    model_measures, model_outcomes, model_levels, measure_summary, measure_reasons, hp_wide (a
    column per axis), latest_evaluation, evaluation_status, evaluation_families.

    Rows stream out in batches, so memory stays bounded whatever the size of the
    answer; --timeout covers the whole command, printing included."""
    if max_rows is None:
        max_rows = TABLE_ROWS if fmt == "table" else 0
    with readonly(db, memory_limit=memory_limit) as con, \
            readonly_batches(con, query, timeout=timeout or None) as frames, \
            alarm(timeout):
        shown, left, counted = emit_stream(frames, fmt, max_rows or None)
    if left:
        more = f"{left:,}" if counted else f"at least {left:,}"
        why = "" if counted else " (counting stopped at the timeout)"
        click.echo(f"note: {more} more row{'s' * (left != 1)} not shown ({shown:,} printed)"
                   f"{why}; --max-rows N prints more (0: all), --format csv streams every row",
                   err=True)


@main.command()
@db_option
@format_option
@friendly_errors
def models(db: str | None, fmt: str) -> None:
    """List the models: hyperparameters, gap, convergence."""
    with readonly(db) as con:
        frame = queries.models_frame(con)
    emit_frame(frame, fmt)


@main.command()
@db_option
@format_option
@friendly_errors
def measures(db: str | None, fmt: str) -> None:
    """List the measures: how many models have a value, failed, or miss one, and why:
    each reason stored with a failed or missing value (its error), with how many
    models it holds for. Table: a second table below; JSON and CSV: a column
    `reasons`, a list of {status, reason, n_models} (CSV: as JSON text)."""
    with readonly(db) as con:
        frame = con.sql("SELECT * FROM measure_summary").pl()
        reasons = con.sql("SELECT * FROM measure_reasons").pl()
    if fmt == "table":
        emit_frame(frame, fmt)
        if not reasons.is_empty():
            click.echo()
            emit_frame(reasons.select(
                "measure", "status", "n_models",
                pl.col("reason").map_elements(lambda r: " ".join(r.split()),
                                              return_dtype=pl.String)),
                fmt, title="why values failed or are missing:")
        return
    why: dict[str, list[dict]] = {}
    for r in reasons.iter_rows(named=True):
        why.setdefault(r["measure"], []).append(
            {"status": r["status"], "reason": r["reason"], "n_models": r["n_models"]})
    if fmt == "json":
        click.echo(to_json([dict(row, reasons=why.get(row["measure"], []))
                            for row in frame.to_dicts()]))
        return
    emit_frame(frame.with_columns(pl.Series(
        "reasons", [to_json(why.get(m, [])) for m in frame["measure"]], dtype=pl.String)), fmt)


# --------------------------------------------------------------------------- evaluation

def selection_options(func):
    """--where, --dataset, --sweep, --all-models, --relevel: which models are evaluated."""
    options = [
        click.option("--where", default=None,
                     help="SQL predicate on hyperparameters, e.g. \"weight_decay = 0\" "
                          "(columns: each axis's value, and <axis>_level)."),
        click.option("--dataset", default=None, help="Only models of this dataset."),
        click.option("--sweep", default=None, help="Only models of this sweep (name or id)."),
        click.option("--all-models", is_flag=True,
                     help="Include models that did not converge."),
        click.option("--seeds", default=None, callback=_seeds, metavar="S[,S...]",
                     help="Only models of these seeds, e.g. 0,1."),
        click.option("--relevel", is_flag=True,
                     help="Models of several grids whose levels disagree (depth 4 is level 2 "
                          "in one, 0 in another): rank those axes afresh by value across "
                          "the selection. Without it, such a mix is an error."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _seeds(ctx, param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        seeds = [int(v) for v in value.split(",") if v.strip()]
        return queries.selection(seeds=seeds).seeds
    except (ValueError, FgmError):
        raise click.BadParameter(f"{value[:40]!r}: expected seeds as whole numbers from 0, "
                                 "e.g. 0,1", param=param) from None


def _selection(where, dataset, sweep, all_models, relevel=False,
               pool_seeds=False, converged_searches_only=False, seeds=None) -> Selection:
    return queries.selection(where=where, dataset=dataset, sweep=sweep, all_models=all_models,
                             pool_seeds=pool_seeds, relevel=relevel,
                             converged_searches_only=converged_searches_only, seeds=seeds)


searches_option = click.option(
    "--converged-searches-only", is_flag=True,
    help="Leave out values whose σ, σ', α or α' search did not converge (their params "
         "say converged: false); by default they count, and how many is reported.")


convention_option = click.option(
    "--convention", type=click.Choice(["spec", "paper"]), default="spec", show_default=True,
    help="spec: the definitions of docs/evaluation.md. paper: the paper's own, as its "
         "tables show them: CMI slices weighted equally (App. B.1), Table 6's |S| = 1 as "
         "the least unnormalised information (bits), Table 10's std of Ψ as "
         "sqrt(Σ σ_i²)/k (docs/evaluation.md).")


pool_option = click.option(
    "--pool-seeds", is_flag=True,
    help="Evaluate all models together, ignoring the seed column (default: per seed, "
         "mean and std across seeds). Needed when every model has its own seed.")


def ci_options(func):
    """--ci LEVEL, --blocks N, --seed S: seeded jackknife intervals over configurations."""
    options = [
        click.option("--ci", type=FiniteRange(0, 1, min_open=True, max_open=True),
                     default=None, help="Add confidence intervals of τ, Ψ and K, e.g. --ci 0.95 "
                     "(a jackknife that leaves out blocks of whole configurations)."),
        click.option("--blocks", "boot", type=click.IntRange(5, MAX_BLOCKS), default=20,
                     show_default=True,
                     help=f"Jackknife blocks for --ci (configurations are dealt into this "
                          f"many), 5 to {MAX_BLOCKS:,}."),
        click.option("--seed", type=SEED, default=0, show_default=True,
                     help="Seed of the jackknife blocks (and of the random baseline), "
                          "0 to 2^31 - 1."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


store_option = click.option(
    "--no-store", is_flag=True,
    help="Do not keep this evaluation in the warehouse (tables evaluations and "
         "evaluation_values). Kept by default; skipped with a note when the file cannot "
         "be written (read-only, or held by another process).")


def _emit_object(obj: dict, fmt: str, rows: list[tuple[str, object]]) -> None:
    """JSON: the object itself (SPEC §5). Table / CSV: quantity, value rows."""
    if fmt == "json":
        click.echo(to_json(obj))
        return
    frame = queries.quantity_frame(rows)
    title = ", ".join(f"{k} {obj[k]}" for k in ("measure", "eps", "n_models") if k in obj)
    emit_frame(frame, fmt, title=title)
    _emit_notes([obj.get("note"), (obj.get("cmi") or {}).get("note"),
                 _constant_note(obj.get("constant_axes"))], fmt)


def _emit_notes(notes, fmt: str) -> None:
    """Notes below a table; on stderr with CSV, so that the CSV stays parseable; none
    with JSON, whose objects carry them (a JSON list of rows stays just that)."""
    if fmt == "json":
        return
    for note in dict.fromkeys(n for n in notes if n):
        click.echo(f"note: {note}", err=fmt == "csv")


@main.command()
@click.option("--measure", "-m", required=True, help="The measure to evaluate.")
@ci_options
@pool_option
@convention_option
@searches_option
@selection_options
@store_option
@db_option
@format_option
@friendly_errors
def psi(measure, ci, boot, seed, pool_seeds, convention, converged_searches_only,
        where, dataset, sweep, all_models, seeds, relevel, no_store, db, fmt):
    """Kendall's τ over all models, ψ_i per axis and their mean Ψ (Eqs 2, 4 and 5).
    With several seeds: the mean across seeds and its std (Table 9). Says how many
    values come from searches that did not converge (JSON: "unconverged_searches")."""
    sel = _selection(where, dataset, sweep, all_models, relevel, pool_seeds,
                     converged_searches_only, seeds)
    with readonly(db) as con:
        answer = queries.psi(con, sel, measure, ci=ci, blocks=boot, seed=seed,
                             convention=convention)
        snap = None if no_store else snapshot(con, sel, answer.models.ids, measure)
    res = answer.res
    _emit_object(res, fmt, queries.psi_quantities(res, left_out=converged_searches_only))
    keep(db, snap, "psi", sel, {"measure": measure, **_convention(convention)}, psi_rows(res),
         ci=ci, blocks=boot,
         seed=seed if ci else None)


@main.command()
@click.option("--measure", "-m", required=True, help="The measure to evaluate.")
@click.option("--pgdl", is_flag=True,
              help="Reproduce the NeurIPS 2020 PGDL scorer (self-pairs, equal-weight slices, "
                   "|S| = 2 only).")
@ci_options
@pool_option
@convention_option
@selection_options
@store_option
@db_option
@format_option
@friendly_errors
def cmi(measure, pgdl, ci, boot, seed, pool_seeds, convention,
        where, dataset, sweep, all_models, seeds, relevel, no_store, db, fmt):
    """Conditional mutual information Î(S) for |S| ≤ 2 and K = its minimum (App. B).
    With several seeds: the mean across seeds and its std (Table 10). When K is
    null, a note says why (JSON: "note"). --convention paper adds the conditional
    entropy H(V_g | axis) per axis, in bits (Table 6's last row)."""
    if pgdl and convention != "spec":
        raise click.BadParameter("--pgdl is the PGDL scorer's own convention; leave out "
                                 "--convention paper", param_hint="--convention")
    sel = _selection(where, dataset, sweep, all_models, relevel, pool_seeds, seeds=seeds)
    with readonly(db) as con:
        answer = queries.cmi(con, sel, measure, pgdl=pgdl, ci=ci, blocks=boot, seed=seed,
                             convention=convention)
        snap = None if no_store else snapshot(con, sel, answer.models.ids, measure)
    res = answer.res
    _emit_object(res, fmt, queries.cmi_result_quantities(res))
    keep(db, snap, "cmi", sel, {"measure": measure, **_convention(convention)}, cmi_rows(res),
         pgdl=pgdl, ci=ci, blocks=boot, seed=seed if ci else None)


@main.command()
@click.option("--eps", type=FiniteRange(0, MAX_EPS, min_open=True), required=True,
              help=f"Noise std ε, e.g. 0.01, 0.02, 0.05, 0.1; in (0, {MAX_EPS:g}] (gaps "
                   f"are fractions: larger noise drowns them).")
@click.option("--draws", type=DRAWS, default=20, show_default=True, help=DRAWS_HELP)
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the oracle's noise draws for the CMI, 0 to 2^31 - 1.")
@pool_option
@selection_options
@store_option
@db_option
@format_option
@friendly_errors
def oracle(eps, draws, seed, pool_seeds,
           where, dataset, sweep, all_models, seeds, relevel, no_store, db, fmt):
    """The noisy oracle g + N(0, ε²): exact expected τ and ψ, Monte Carlo CMI."""
    sel = _selection(where, dataset, sweep, all_models, relevel, pool_seeds, seeds=seeds)
    with readonly(db) as con:
        answer = queries.oracle(con, sel, eps, draws=draws, seed=seed)
        snap = None if no_store else snapshot(con, sel, answer.models.ids, None)
    res = answer.res
    _emit_object(res, fmt, queries.oracle_quantities(res))
    keep(db, snap, "oracle", sel, {"eps": eps, "draws": draws}, oracle_rows(res), seed=seed)


@main.command()
@click.option("--kind", type=click.Choice(["psi", "cmi"]), default=None,
              help="psi: Table 5's shape (ψ_i, τ, Ψ; the default); cmi: Table 6's (CMI per "
                   "axis, K).")
@click.option("--pgdl", is_flag=True,
              help="Score every measure as the NeurIPS 2020 PGDL scorer did (Table 6's "
                   "shape, the competition's CMI: |S| = 2, self-pairs, equal-weight "
                   "slices); implies --kind cmi; no oracle rows.")
@click.option("--draws", type=DRAWS, default=10, show_default=True, help=DRAWS_HELP)
@ci_options
@pool_option
@convention_option
@searches_option
@selection_options
@store_option
@db_option
@format_option
@friendly_errors
def table(kind, pgdl, draws, ci, boot, seed, pool_seeds, convention, converged_searches_only,
          where, dataset, sweep, all_models, seeds, relevel, no_store, db, fmt):
    """Every measure, one row each, with the oracle, canonical and random baselines.
    Several seeds: means with *_std columns (Tables 9, 10); --ci: *_lo/*_hi columns.
    unconverged_searches: how many of a measure's values come from searches that did
    not converge (with --converged-searches-only: how many were left out)."""
    if pgdl:
        if convention != "spec":
            raise click.BadParameter("--pgdl is the PGDL scorer's own convention; leave out "
                                     "--convention", param_hint="--convention")
        if kind == "psi":
            raise click.BadParameter("--pgdl scores CMI (Table 6's shape): leave out --kind "
                                     "psi", param_hint="--kind")
        kind = "cmi"
    kind = kind or "psi"
    sel = _selection(where, dataset, sweep, all_models, relevel,
                     converged_searches_only=converged_searches_only, seeds=seeds)
    with readonly(db) as con:
        if kind == "psi":
            frame = table5(con, sel, seed=seed, ci=ci, blocks=boot, pool_seeds=pool_seeds,
                           convention=convention)
        else:
            frame = table6(con, sel, draws=draws, seed=seed, ci=ci, blocks=boot,
                           pool_seeds=pool_seeds, convention=convention, pgdl=pgdl)
        models = select_models(con, sel)
        constant = models.constant
        snap = None if no_store else snapshot(con, sel, models.ids, "*")
    emit_frame(frame, fmt)
    unconverged = int(frame["unconverged_searches"].fill_null(0).sum())
    _emit_notes([_constant_note(constant),
                 _searches_note(unconverged, converged_searches_only, "the measures' values")],
                fmt)
    keep(db, snap, f"table {kind}", _selection(where, dataset, sweep, all_models, relevel,
                                               pool_seeds, converged_searches_only, seeds),
         {**({"draws": draws} if kind == "cmi" else {}), **_convention(convention)},
         table_rows(frame, kind, models.axes),
         ci=ci, blocks=boot, seed=seed, pgdl=pgdl)


@main.command()
@click.option("--paper", is_flag=True,
              help="Compare with the paper's published figures (the one reference so far).")
@click.option("--pgdl-scores", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="A CSV of published PGDL scores (measure, task, score): "
              "each beside fgm's own score of that measure on that task's models.")
@click.option("--scores-unit", type=click.Choice(["fraction", "percent"]), default=None,
              help="With --pgdl-scores: the unit its scores are in (the scorer's fraction, "
                   "or x100 as leaderboards print them).")
@click.option("--table", "paper_table_", type=click.Choice(["5", "6", "7"]), default=None,
              help="The paper's table: 5 (CIFAR-10 τ, Ψ), 6 (CIFAR-10 CMI, K) or 7 (SVHN "
                   "τ, Ψ). Default: 5 and 6.")
@pool_option
@selection_options
@db_option
@format_option
@friendly_errors
def compare(paper, paper_table_, pgdl_scores, scores_unit, pool_seeds, where, dataset, sweep,
            all_models, seeds, relevel, db, fmt):
    """The paper's figures beside this warehouse's, measure by measure, computed with
    --convention paper: Ψ and τ (and K), whether the sign of Ψ agrees, and the rank
    correlation (Spearman, Kendall) of Ψ and of K across measures. Lists the measures
    not in the paper, and the paper's measures missing here with the fgm-measure
    command that would fill them."""
    from .compare import (
        DEFAULT_TABLES,
        compare_paper,
        comparison_frame,
        summary_lines,
        summary_rows,
    )
    if pgdl_scores is not None:
        from .compare import compare_pgdl_scores, read_pgdl_scores
        if paper:
            raise click.UsageError("give --paper or --pgdl-scores, not both")
        if scores_unit is None:
            raise click.UsageError("--pgdl-scores needs --scores-unit fraction|percent: the "
                                   "PGDL scorer returns a fraction, leaderboards print it "
                                   "x100, and a score below 1 could be either")
        if where or dataset or sweep or seeds or relevel or pool_seeds:
            raise click.UsageError("--pgdl-scores selects each task's models by the task "
                                   "(its sweep); only --all-models applies")
        scores = read_pgdl_scores(pgdl_scores)
        with readonly(db) as con:
            frame = compare_pgdl_scores(con, scores, scores_unit, all_models=all_models)
        emit_frame(frame, fmt, title=f"published PGDL scores ({scores_unit}) and fgm's "
                                     "(cmi --pgdl, K) on each task's models")
        return
    if not paper:
        raise click.UsageError("compare needs --paper (the paper's published figures) or "
                               "--pgdl-scores FILE (published PGDL scores)")
    tables = (paper_table_,) if paper_table_ else DEFAULT_TABLES
    with readonly(db) as con:
        res = compare_paper(con, _selection(where, dataset, sweep, all_models, relevel,
                                            seeds=seeds),
                            tables, pool_seeds=pool_seeds or None, db=db)
    if fmt == "json":
        click.echo(to_json(res))
        return
    emit_frame(comparison_frame(res), fmt,
               title=f"the paper (Table {' and '.join(tables)}) and this warehouse "
                     f"({res['n_models']} models), --convention paper")
    rows = summary_rows(res)
    if fmt == "csv":
        _emit_notes([f"{q}: {'' if v is None else f'{v:.4g}'}" for q, v in rows]
                    + summary_lines(res), fmt)
        return
    if rows:
        emit_frame(queries.quantity_frame(rows), fmt)
    for line in summary_lines(res):
        click.echo(line)


@main.command()
@click.option("--measure", "-m", required=True, help="The measure to evaluate.")
@click.option("--test-size", type=click.IntRange(1, MAX_TEST_SIZE), default=None,
              help=f"Test-set size for the Hoeffding weights, 1 to {MAX_TEST_SIZE:,} "
                   f"(default: the warehouse's).")
@click.option("--weighting", type=click.Choice(WEIGHTINGS), default="published",
              show_default=True,
              help="published: pair weight (c² − 0.5)₊ with c the Hoeffding confidence, "
                   "environments kept when their effective sample size ≥ --min-ess, plain "
                   "mean over environments (Dziugaite et al. 2020 and their code). "
                   "hoeffding: weight c, no cut, mean weighted by each environment's Σw.")
@click.option("--min-ess", type=FiniteRange(0, MAX_MIN_ESS), default=None,
              help=f"Minimum effective sample size (Σw)²/Σw² of an environment, 0 to "
                   f"{MAX_MIN_ESS:g} [default: 12 with published, 0 with hoeffding].")
@selection_options
@store_option
@db_option
@format_option
@friendly_errors
def robust(measure, test_size, weighting, min_ess,
           where, dataset, sweep, all_models, seeds, relevel, no_store, db, fmt):
    """Robust sign-error over environments: configurations one axis apart.

    As in Dziugaite, Drouin et al. (2020), "In Search of Robust Measures of
    Generalization"; see analysis/robust.py for the weights. Every seed
    combination of two configurations is a pair of the environment, so seeds are
    never split (no --pool-seeds). When no environment is kept, a note says why."""
    sel = _selection(where, dataset, sweep, all_models, relevel, seeds=seeds)
    with readonly(db) as con:
        answer = queries.robust(con, sel, measure, test_size=test_size, weighting=weighting,
                                min_ess=min_ess)
        snap = None if no_store else snapshot(con, sel, answer.models.ids, measure)
    res = answer.res
    options = {"measure": measure, "test_size": test_size, "weighting": weighting,
               "min_ess": min_ess}
    if fmt == "json":
        click.echo(to_json(res))
        keep(db, snap, "robust", sel, options, robust_rows(res))
        return
    full = queries.robust_frame(res)
    frame = full
    if fmt != "csv":   # the table prints its notes below it; CSV keeps them as a column
        frame = frame.drop("note")
    emit_frame(frame, fmt, title=f"robust sign-error of {measure}, {res['n_models']} models, "
                                 f"{weighting} weighting, min_ess {res['min_ess']:g}")
    if fmt != "csv":
        for r in full.iter_rows(named=True):
            if r["note"]:
                click.echo(f"note [{r['axis']}]: {r['note']}")
    _emit_notes([_constant_note(res.get("constant_axes"))], fmt)
    keep(db, snap, "robust", sel, options, robust_rows(res))


def _out_folder(ctx, param, value: str) -> Path:
    """--out: a folder, made if missing; checked before any query runs."""
    if not value.strip():
        raise click.BadParameter("'' is empty; --out must be a directory (e.g. --out report)",
                                 param=param)
    path = Path(value)
    for p in (path, *path.parents):   # the nearest part that exists must be a folder
        if p.exists():
            if not p.is_dir():
                what = "it" if p == path else repr(str(p))
                raise click.BadParameter(f"{value!r}: --out must be a directory; {what} "
                                         f"exists and is not one", param=param)
            break
    return path


def _made(out: Path) -> Path:
    """--out made (once the warehouse has been opened): a folder that cannot be made
    is one line, not a traceback."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FgmError(f"--out {str(out)[:80]!r}: cannot make the folder "
                       f"({exc.strerror or exc})") from None
    return out


@main.command()
@click.option("--out", default="report", show_default=True, callback=_out_folder,
              help="Folder for index.html and the charts' PNG/SVG files (made if missing).")
@click.option("--draws", type=DRAWS, default=10, show_default=True, help=DRAWS_HELP)
@click.option("--color", default=None, help="Axis that colours the training curves.")
@pool_option
@selection_options
@db_option
@format_option
@friendly_errors
def report(out, draws, color, pool_seeds, where, dataset, sweep, all_models, seeds, relevel,
           db, fmt):
    """Write an offline HTML report: Figure 1's panels, Tables 5 and 6 as heatmaps,
    training curves; plus a PNG and an SVG of every chart. --format: how the list of
    files written is printed."""
    from .report import build_report
    with readonly(db) as con:
        page = build_report(con, _made(out), _selection(where, dataset, sweep, all_models, relevel,
                                                        pool_seeds=pool_seeds, seeds=seeds),
                            draws=draws, color=color)
    _emit_files([page, *sorted(out.glob("*.png")), *sorted(out.glob("*.svg"))], fmt)


def _emit_files(files: list[Path], fmt: str) -> None:
    emit_frame(pl.DataFrame({"file": [str(f) for f in files],
                             "kind": [f.suffix.lstrip(".") for f in files]}), fmt,
               title="written")


@main.command()
@click.option("--measure", "-m", required=True, help="The measure to draw (x axis).")
@click.option("--color", required=True, help="The axis that colours the points.")
@click.option("--out", default="report", show_default=True, callback=_out_folder,
              help="Folder for the chart's PNG, SVG and HTML files (made if missing).")
@click.option("--log/--linear", default=None, help="Log-scale the measure (default: auto).")
@selection_options
@db_option
@format_option
@friendly_errors
def plot(measure, color, out, log, where, dataset, sweep, all_models, seeds, relevel, db, fmt):
    """Draw a measure against the generalization gap, coloured by an axis. --format:
    how the list of files written is printed."""
    from .report import plot_measure
    with readonly(db) as con:
        files = plot_measure(con, measure, color, _made(out),
                             _selection(where, dataset, sweep, all_models, relevel,
                                        seeds=seeds), log)
    _emit_files(files, fmt)
