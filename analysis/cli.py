"""fgm-query: ask the warehouse. Read-only, every command with --format table|csv|json."""

from __future__ import annotations

import click
import polars as pl

from fgm.warehouse import connect
from fgm.warehouse.cli import db_option, emit_frame, format_option, friendly_errors, to_json

from .evaluate import (
    Selection,
    cmi_result,
    measure_values,
    oracle_result,
    psi_result,
    select_models,
    table5,
    table6,
)
from .sql import create_hp_wide, lock_down, run_readonly


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Query the fgm warehouse (read-only)."""


class _readonly:
    """The warehouse opened read-only, with the per-axis view hp_wide."""

    def __init__(self, db: str | None):
        self.db = db

    def __enter__(self):
        self.con = connect(self.db, read_only=True)
        create_hp_wide(self.con)
        return self.con

    def __exit__(self, *exc):
        self.con.close()


@main.command()
@click.argument("query")
@db_option
@format_option
@friendly_errors
def sql(query: str, db: str | None, fmt: str) -> None:
    """Run a SELECT on the warehouse. Tables: models, hyperparameters, outcomes,
    measures, traces, checkpoints, sweeps; views: model_measures, model_outcomes,
    model_levels, measure_summary, hp_wide (a column per axis)."""
    with _readonly(db) as con:
        lock_down(con)
        emit_frame(run_readonly(con, query), fmt)


@main.command()
@db_option
@format_option
@friendly_errors
def models(db: str | None, fmt: str) -> None:
    """List the models: hyperparameters, gap, convergence."""
    with _readonly(db) as con:
        frame = con.sql("SELECT w.*, o.train_acc, o.test_acc, o.gap, o.converged "
                        "FROM hp_wide AS w JOIN model_outcomes AS o USING (model_id) "
                        "ORDER BY w.model_id").pl()
    frame = frame.drop([c for c in frame.columns if c.endswith("_level")] + ["sweep_id"])
    emit_frame(frame, fmt)


@main.command()
@db_option
@format_option
@friendly_errors
def measures(db: str | None, fmt: str) -> None:
    """List the measures: how many models have a value, failed, or miss one."""
    with _readonly(db) as con:
        frame = con.sql("SELECT * FROM measure_summary").pl()
    emit_frame(frame, fmt)


# --------------------------------------------------------------------------- evaluation

def selection_options(func):
    """--where, --dataset, --sweep, --all-models: which models are evaluated."""
    options = [
        click.option("--where", default=None,
                     help="SQL predicate on hyperparameters, e.g. \"weight_decay = 0\" "
                          "(columns: each axis's value, and <axis>_level)."),
        click.option("--dataset", default=None, help="Only models of this dataset."),
        click.option("--sweep", default=None, help="Only models of this sweep (name or id)."),
        click.option("--all-models", is_flag=True,
                     help="Include models that did not converge."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _selection(where, dataset, sweep, all_models) -> Selection:
    return Selection(where=where, dataset=dataset, sweep=sweep, all_models=all_models)


def _emit_object(obj: dict, fmt: str, rows: list[tuple[str, object]]) -> None:
    """JSON: the object itself (SPEC §5). Table / CSV: quantity, value rows."""
    if fmt == "json":
        click.echo(to_json(obj))
        return
    frame = pl.DataFrame({"quantity": [r[0] for r in rows],
                          "value": [None if r[1] is None else float(r[1]) for r in rows]},
                         schema={"quantity": pl.String, "value": pl.Float64})
    title = ", ".join(f"{k} {obj[k]}" for k in ("measure", "eps", "n_models") if k in obj)
    emit_frame(frame, fmt, title=title)


@main.command()
@click.option("--measure", "-m", required=True, help="The measure to evaluate.")
@selection_options
@db_option
@format_option
@friendly_errors
def psi(measure, where, dataset, sweep, all_models, db, fmt):
    """Kendall's τ over all models, ψ_i per axis and their mean Ψ (Eqs. 2, 4, 5)."""
    with _readonly(db) as con:
        models = select_models(con, _selection(where, dataset, sweep, all_models))
        mu, sub = measure_values(con, measure, models)
        res = psi_result(measure, mu, sub)
    _emit_object(res, fmt, [("tau", res["tau"]), *((f"psi[{a}]", v) for a, v in
                                                  res["psi"].items()), ("Psi", res["Psi"])])


def _cmi_rows(res: dict) -> list[tuple[str, object]]:
    return [*((f"cmi[{a}]", v) for a, v in res["per_axis"].items()),
            ("|S|=0", res["s0"]), ("min |S|=1", res["s1"]), ("min |S|=2", res["s2"]),
            (f"K (S = {{{', '.join(res['argmin'] or [])}}})", res["K"])]


@main.command()
@click.option("--measure", "-m", required=True, help="The measure to evaluate.")
@click.option("--pgdl", is_flag=True,
              help="Reproduce the NeurIPS 2020 PGDL scorer (self-pairs, equal-weight slices, "
                   "|S| = 2 only).")
@selection_options
@db_option
@format_option
@friendly_errors
def cmi(measure, pgdl, where, dataset, sweep, all_models, db, fmt):
    """Conditional mutual information Î(S) for |S| ≤ 2 and K = its minimum (App. B)."""
    with _readonly(db) as con:
        models = select_models(con, _selection(where, dataset, sweep, all_models))
        mu, sub = measure_values(con, measure, models)
        res = cmi_result(measure, mu, sub, pgdl=pgdl)
    _emit_object(res, fmt, _cmi_rows(res))


@main.command()
@click.option("--eps", type=float, required=True, help="Noise std ε, e.g. 0.01, 0.02, 0.05, 0.1.")
@click.option("--draws", type=click.IntRange(2), default=20, show_default=True,
              help="Monte Carlo draws for the CMI.")
@click.option("--seed", type=int, default=0, show_default=True)
@selection_options
@db_option
@format_option
@friendly_errors
def oracle(eps, draws, seed, where, dataset, sweep, all_models, db, fmt):
    """The noisy oracle g + N(0, ε²): exact expected τ and ψ, Monte Carlo CMI."""
    if eps <= 0:
        raise click.BadParameter("must be > 0", param_hint="--eps")
    with _readonly(db) as con:
        models = select_models(con, _selection(where, dataset, sweep, all_models))
        res = oracle_result(models, eps, draws=draws, seed=seed)
    rows = [("tau", res["tau"]), *((f"psi[{a}]", v) for a, v in res["psi"].items()),
            ("Psi", res["Psi"]), *_cmi_rows(res["cmi"]), ("K stderr", res["cmi"]["stderr"]["K"])]
    _emit_object(res, fmt, rows)


@main.command()
@click.option("--kind", type=click.Choice(["psi", "cmi"]), default="psi", show_default=True,
              help="psi: Table 5's shape (ψ_i, τ, Ψ); cmi: Table 6's (CMI per axis, K).")
@click.option("--draws", type=click.IntRange(2), default=10, show_default=True,
              help="Monte Carlo draws for the oracles' CMI.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random baseline and the oracle draws.")
@selection_options
@db_option
@format_option
@friendly_errors
def table(kind, draws, seed, where, dataset, sweep, all_models, db, fmt):
    """Every measure, one row each, with the oracle, canonical and random baselines."""
    sel = _selection(where, dataset, sweep, all_models)
    with _readonly(db) as con:
        if kind == "psi":
            frame = table5(con, sel, seed=seed)
        else:
            frame = table6(con, sel, draws=draws, seed=seed)
    emit_frame(frame, fmt)
