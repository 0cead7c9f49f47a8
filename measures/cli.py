"""fgm-measure: compute complexity measures for the models in the warehouse."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fgm.train.executor import executor_for, executor_options
from fgm.warehouse import connect
from fgm.warehouse.cli import db_option, emit_frame, format_option, friendly_errors

from .context import BUDGETS, Settings
from .registry import list_measures
from .runner import measure_models


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--measures", "pattern", default="*", show_default=True,
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
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the perturbation searches.")
@click.option("--budget", type=click.Choice(list(BUDGETS)), default="paper", show_default=True,
              help="Budget of the σ, σ', α, α' searches (README: Complexity measures).")
@click.option("--set", "overrides", multiple=True, metavar="NAME=VALUE",
              help="Override one setting of the budget, e.g. --set draws=2048 (repeatable).")
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
    from fgm.train.cli import resolve_device
    try:
        settings = Settings.parse(budget, overrides, seed=seed, spectral=spectral)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--set") from None
    if executor.name == "ray":   # one Ray task per model; this process writes the warehouse
        connect(db, create=False).close()
        report = executor_for(executor).measure(
            db, Console(stderr=True), device=device, pattern=pattern, where=where,
            recompute=recompute, data_root=data_root,
            settings=settings)
        click.echo(str(report))
        return
    dev = resolve_device(device)
    console = Console(stderr=True)
    connect(db, create=False).close()   # measures are of models a warehouse already holds
    columns = [TextColumn("measures"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[model]}")]
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("measures", total=None, model="")

        def progress(model_id, i, n):
            bar.update(task, total=n, completed=i - 1, model=model_id)
        # the warehouse is opened per model, to read its inputs and to write its values
        report = measure_models(db, pattern=pattern, where=where, recompute=recompute,
                                data_root=data_root, device=dev,
                                settings=settings,
                                progress=progress)
    click.echo(str(report))
