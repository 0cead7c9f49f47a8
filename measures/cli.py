"""fgm-measure: compute complexity measures for the models in the warehouse."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from fgm.train.driver import measure_run
from fgm.train.executor import backend_for, executor_options
from fgm.train.loop import resolve_device
from fgm.warehouse import FgmError, connect
from fgm.warehouse.cli import db_option, emit_frame, format_option, friendly_errors
from fgm.warehouse.store import LOCK_WAIT, when_free

from .context import BUDGETS, MAX_SEED, Settings
from .registry import list_measures


def _pattern(ctx, param, value: str) -> str:
    if not any(p.strip() for p in value.split(",")):   # '' is no measure, not every one
        raise click.BadParameter(f"no measure named {value!r}; give names or glob patterns, "
                                 f"e.g. '*spec*,path_norm' (--list lists the measures)",
                                 param=param)
    return value


def _check_where(db, where: str) -> None:
    """--where checked, and run once, on a read-only connection before anything is
    started or written: a refused predicate leaves the warehouse as it was."""
    from fgm.analysis.predicate import model_ids_where
    from fgm.analysis.sql import create_hp_wide
    con = when_free(lambda: connect(db, read_only=True), LOCK_WAIT)
    try:
        create_hp_wide(con)
        model_ids_where(con, where)
    finally:
        con.close()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--measures", "pattern", default="*", show_default=True, callback=_pattern,
              help="Glob pattern(s), comma-separated, e.g. '*spec*,path_norm'.")
@click.option("--where", default=None, help="SQL predicate on hyperparameters (hp_wide).")
@click.option("--recompute", is_flag=True, help="Compute again what is already stored.")
@click.option("--data-root", type=click.Path(path_type=Path), default=None,
              help="Where the models' datasets lie (digits needs none).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto",
              show_default=True)
@click.option("--spectral", type=click.Choice(["fft", "exact"]), default="fft",
              show_default=True, help="Convolution spectral norms: Sedghi et al.'s FFT, or "
                                      "power iteration on the true strided operator.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED - 1), default=0, show_default=True,
              help=f"Seed of the perturbation searches, 0 to {MAX_SEED - 1:,}.")
@click.option("--budget", type=click.Choice(list(BUDGETS)), default="paper", show_default=True,
              help="Budget of the σ, σ', α, α' searches (docs/measures.md).")
@click.option("--set", "overrides", multiple=True, metavar="NAME=VALUE",
              help="Override one setting of the budget, e.g. --set draws=2048 (repeatable; "
                   "docs/measures.md has each one's range).")
@click.option("--list", "list_only", is_flag=True, help="List the registered measures and exit.")
@db_option
@format_option
@friendly_errors
@executor_options
def main(pattern, where, recompute, data_root, device, spectral, seed, budget, overrides,
         list_only, db, fmt, executor):
    """Compute the measures of Appendix D that the warehouse lacks."""
    if list_only:
        import polars as pl
        specs = list_measures(pattern)
        emit_frame(pl.DataFrame({"measure": [s.name for s in specs],
                                 "equation": [s.eq for s in specs],
                                 "family": [s.family for s in specs],
                                 "needs": [",".join(s.needs) for s in specs],
                                 "description": [s.description for s in specs]}), fmt)
        return
    try:
        settings = Settings.parse(budget, overrides, seed=seed, spectral=spectral)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--set") from None
    # every input checked before anything starts or is written
    if not list_measures(pattern):
        names = ", ".join(s.name for s in list_measures())
        raise FgmError(f"no measure matches {pattern!r}; measures: {names}")
    if where is not None:
        _check_where(db, where)
    if executor.name == "local":
        resolve_device(device)
    else:
        executor.use_gpu(device)
    # measures are of models a warehouse already holds
    when_free(lambda: connect(db, create=False), LOCK_WAIT).close()
    # one task per model, on worker processes or Ray; this process writes the warehouse
    with backend_for(executor, device) as backend:
        report = measure_run(db, Console(stderr=True), backend, pattern=pattern, where=where,
                             recompute=recompute, data_root=data_root, settings=settings)
    click.echo(str(report))
