"""fgm-ingest: results tables and run-bundle trees into the warehouse.

Input is checked whole before the warehouse is opened, and the warehouse is held
open only while writing (a tree: one bundle at a time), so readers are not
locked out while files are parsed and checksummed.
"""

from __future__ import annotations

from pathlib import Path

import click

from fgm.warehouse import FgmError
from fgm.warehouse.cli import db_option, friendly_errors
from fgm.warehouse.store import briefly

from .table import prepare_table, write_table


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("paths", nargs=-1, required=True, metavar="PATH | pgdl TASK_DIR")
@db_option
@click.option("--sweep", default=None, help="Sweep name for a results table (default: file name).")
@click.option("--dataset", default=None, help="Dataset of a table without a dataset column.")
@click.option("--replace", is_flag=True,
              help="Overwrite a stored model whose model_id an incoming model reuses with "
                   "another configuration, seed or dataset; all rows of the stored model "
                   "go, its measures included. Without it such a model is refused and "
                   "nothing of it is written.")
@click.option("--models", "models_toml", type=click.Path(path_type=Path), default=None,
              help="models.toml: the architectures and datasets of a table of models fgm "
                   "did not train (columns arch, checkpoint.final, optional checkpoint.init, "
                   "checkpoint.epoch1, trace). Its python: files are run to build the models. "
                   "README: Bring your own models.")
@click.option("--checkpoint-root", type=click.Path(path_type=Path), default=None,
              help="With --models: the folder the table's checkpoint and trace paths are "
                   "relative to, and stay inside (default: the table's folder).")
@click.option("--data-root", type=click.Path(path_type=Path), default=None,
              help="With --models: where fgm's own datasets (cifar10, svhn, fashion_mnist) "
                   "are, for a table whose dataset column names one (default: ./data).")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="With pgdl: the task's model_configs.json (the competition's "
                   "reference_data/<task>/), with each model's hyperparameters and "
                   "accuracies.")
@friendly_errors
def main(paths: tuple[str, ...], db: str | None, sweep: str | None, dataset: str | None,
         replace: bool, models_toml: Path | None, checkpoint_root: Path | None,
         data_root: Path | None, reference: Path | None) -> None:
    """Ingest PATH: a results table (.csv / .parquet, one row per model) or a
    directory tree of run bundles written by fgm-train (on this or any machine).
    With --models, the table's rows are models of your own: each is built from
    models.toml, its checkpoints loaded and checked, and fgm-measure measures them.

    `fgm-ingest pgdl TASK_DIR --reference model_configs.json` imports a task of the
    PGDL competition (NeurIPS 2020): its Keras models converted to PyTorch, their
    weights, the task's training shards (README: The PGDL model zoo).

    A bad bundle is reported by path and the rest still land; the exit status
    is 1 when any bundle failed."""
    if len(paths) == 2 and paths[0] == "pgdl":
        given = [name for name, value in (("--models", models_toml), ("--dataset", dataset),
                                          ("--checkpoint-root", checkpoint_root),
                                          ("--data-root", data_root)) if value is not None]
        if given:
            raise FgmError(f"{', '.join(given)}: not options of fgm-ingest pgdl (the task "
                           "folder holds the models, their weights and the data)")
        _pgdl(Path(paths[1]), reference, db, sweep, replace)
        return
    if len(paths) != 1:
        raise click.UsageError("expected one PATH, or pgdl TASK_DIR --reference FILE")
    if reference is not None:
        raise FgmError("--reference goes with pgdl TASK_DIR")
    path = Path(paths[0])
    if not path.exists():
        raise FgmError(f"{path}: no such file or directory")
    if models_toml is not None:
        if path.is_dir():
            raise FgmError(f"{path}: --models goes with a results table (.csv / .parquet) "
                           "whose rows name the checkpoints, not a directory")
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        from .foreign import prepare_foreign  # imports torch: only for models
        console = Console(stderr=True)
        # each row's model is built, its checkpoints loaded and run: seconds a model
        with Progress(TextColumn("checking models"), BarColumn(), MofNCompleteColumn(),
                      console=console, disable=not console.is_terminal) as bar:
            task = bar.add_task("models", total=None)
            prepared = prepare_foreign(
                path, models_toml, sweep=sweep, dataset=dataset,
                checkpoint_root=checkpoint_root, data_root=data_root,
                progress=lambda done, total: bar.update(task, completed=done, total=total))
        with briefly(db) as con:
            summary = write_table(con, prepared, replace=replace)
        click.echo(f"{summary}\n{prepared.foreign.checkpoints.height} checkpoints of "
                   f"{prepared.parsed.models.height} models checked and recorded; "
                   "fgm-measure computes their measures")
        return
    if checkpoint_root is not None or data_root is not None:
        raise FgmError("--checkpoint-root and --data-root go with --models")
    if path.is_dir():
        from .bundles import ingest_tree  # imports torch: only when there are bundles
        report = ingest_tree(db, path, replace=replace)
        if not report.failed and report.added + report.updated + report.unchanged \
                + report.replaced == 0:
            raise FgmError(f"{path}: no run bundles here (directories with a manifest.json "
                           "written by fgm-train)")
        click.echo(str(report))
        if report.failed:
            raise SystemExit(1)
        return
    prepared = prepare_table(path, sweep=sweep, dataset=dataset)
    with briefly(db) as con:    # waits for another writer as a bundle tree's ingest does
        summary = write_table(con, prepared, replace=replace)
    click.echo(str(summary))


def _pgdl(task_dir: Path, reference: Path | None, db, sweep, replace) -> None:
    if reference is None:
        raise FgmError("fgm-ingest pgdl TASK_DIR needs --reference "
                       "REFERENCE_TASK_DIR/model_configs.json")
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .pgdl import prepare_pgdl  # imports torch: only for models
    console = Console(stderr=True)
    with Progress(TextColumn("checking models"), BarColumn(), MofNCompleteColumn(),
                  console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("models", total=None)
        imported = prepare_pgdl(task_dir, reference, sweep=sweep, progress=lambda done, total:
                                bar.update(task, completed=done, total=total))
    with briefly(db) as con:
        summary = write_table(con, imported.prepared, replace=replace)
    click.echo(f"{summary}\n{imported.prepared.parsed.models.height} models of task "
               f"{task_dir.name} converted and checked; fgm-measure computes their measures")
    for why in imported.skipped:
        click.echo(f"  SKIPPED {why}", err=True)
    if imported.skipped:        # the others are stored; as a bundle tree's failures
        raise SystemExit(1)
