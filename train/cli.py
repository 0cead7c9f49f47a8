"""fgm-train grid: train a grid of NiNs into run bundles and the warehouse."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fgm.warehouse import FgmError, InputError, code_version
from fgm.warehouse.cli import db_option, friendly_errors
from fgm.warehouse.ids import model_id_for, training_hash
from fgm.warehouse.store import briefly

from .bundle import clean_stale, is_complete, write_bundle
from .data import load_dataset
from .executor import GridPlan, executor_for, executor_options
from .grid import AXES, MAX_MODELS, Config, load_grid, override, preset_names
from .loop import train_one


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FgmError("--device cuda: no CUDA device is available here (try --device auto)")
    return torch.device(name)


def _short(config: Config) -> str:
    v = config.values
    return (f"w={v['width']} d={v['depth']} p={v['dropout']} bs={v['batch_size']} "
            f"{v['optimizer']} lr={v['learning_rate']:g} wd={v['weight_decay']:g}")


def manifest_for(grid, config: Config, seed: int, data, result, device) -> dict:
    return {
        "config_hash": config.hash, "seed": seed,
        "dataset": {"name": data.name, **data.info},
        "sweep": {"name": f"{grid.name}/{data.name}", "config": grid.as_dict()},
        "hyperparameters": [{"axis": a, "value": config.values[a], "level": config.levels[a]}
                            for a in AXES],
        "train": grid.train, "outcome": result.outcome, "timing": result.timing,
        "code_version": code_version(), "torch_version": torch.__version__,
        "device": str(device), "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train Network-in-Network grids (Jiang et al. 2020, Section 3)."""


@main.command()
@click.option("--preset", default=None, help=f"A grid that ships with fgm: "
              f"{', '.join(preset_names())} (default: demo).")
@click.option("--grid", "grid_file", type=click.Path(path_type=Path), default=None,
              help="Your own grid TOML (see train/grids/paper.toml).")
@click.option("--set", "settings", multiple=True, metavar="AXIS=V1,V2",
              help="Override an axis's values, e.g. --set width=32,64 (repeatable).")
@click.option("--dataset", default=None, help="cifar10, svhn, fashion_mnist or digits.")
@click.option("--data-root", type=click.Path(path_type=Path), default=None,
              help="Where the dataset lies in torchvision's layout (default ./data).")
@click.option("--download", is_flag=True, help="Download the dataset if it is not there.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs"), show_default=True,
              help="Where run bundles go (with --executor ray: storage every node sees).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto",
              show_default=True)
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default=None,
              help="The training step's arithmetic: bf16 autocast (the default on CUDA) or "
                   "fp32 (the default on a CPU). Stored accuracies and losses are fp32.")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the training step (pays only on long runs on a GPU).")
@click.option("--no-ingest", is_flag=True, help="Write bundles only; ingest them later.")
@click.option("--no-measures", is_flag=True,
              help="Do not compute the complexity measures of each finished model.")
@click.option("--yes", is_flag=True,
              help=f"Train a grid of more than {MAX_MODELS:,} models (configurations "
                   f"times seeds); without it such a grid is refused.")
@db_option
@friendly_errors
@executor_options
def grid(preset, grid_file, settings, dataset, data_root, download, seeds, out, device,
         precision, compile_, no_ingest, no_measures, yes, db, executor):
    """Train every configuration of a grid that is not finished yet."""
    if preset and grid_file:
        raise FgmError("give --preset or --grid, not both")
    g = load_grid(preset, grid_file)
    if settings:
        g = override(g, list(settings))
    if dataset:
        g.dataset = dataset
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"{seeds!r}: expected integers like 0,1,2",
                                 param_hint="--seeds") from None
    g.check_size(len(seed_list), None if yes else MAX_MODELS)
    if executor.name == "local":
        resolve_device(device)
    else:
        executor.use_gpu(device)
        out = out.resolve()     # workers do not share this process's working directory
    console = Console(stderr=True)
    stale = clean_stale(out)
    if stale:
        console.print(f"removed {len(stale)} unfinished bundle(s) left by an interrupted run")
    configs = g.configs(limit=None)
    training = training_hash(g.train)
    jobs = [(c, s, model_id_for(c.hash, g.dataset, s, training))
            for s in seed_list for c in configs]
    todo = [j for j in jobs if not is_complete(out, j[2])]
    executor_for(executor).grid(GridPlan(g, jobs, todo, out, db, device, data_root, download,
                                         no_ingest, no_measures, console, precision, compile_))


def grid_local(plan: GridPlan) -> None:
    """--executor local: one model at a time, in this process."""
    g, jobs, todo, out, db = plan.grid, plan.jobs, plan.todo, plan.out, plan.db
    no_ingest, no_measures, console = plan.no_ingest, plan.no_measures, plan.console
    data_root, dev = plan.data_root, resolve_device(plan.device)
    console.print(f"grid {g.name!r} on {g.dataset}: {len(jobs)} models, "
                  f"{len(jobs) - len(todo)} already finished, {len(todo)} to train on {dev}")
    if not no_ingest:
        finished = plan.finished
        _ingest_finished(out, finished, db, console)
        if finished and not no_measures:  # a run killed between ingest and its measures
            _measure_finished(finished, db, data_root, dev, console)
    if not todo:
        return
    data = load_dataset(g.dataset, data_root, plan.download).to(dev)
    _run(g, todo, data, dev, out, db, no_ingest, no_measures, console, data_root,
         plan.precision, plan.compile)


def _ingest_finished(out: Path, model_ids: list[str], db, console: Console) -> None:
    """Bundles finished earlier but not in the warehouse (a run killed between the two)."""
    if not model_ids:
        return
    from fgm.ingest.bundles import prepare_bundle, store_bundle
    with briefly(db) as con:
        known = {r[0] for r in con.sql("SELECT DISTINCT model_id FROM checkpoints").fetchall()}
    missing = [m for m in model_ids if m not in known]
    refused = []
    for m in missing:
        try:
            prepared = prepare_bundle(out / m)      # checked with the warehouse closed
        except InputError as exc:    # the bundle stays on disk, the grid goes on
            refused.append(m)
            console.print(f"refused the finished bundle {out / m}: {exc}", soft_wrap=True)
            continue
        with briefly(db) as con:
            store_bundle(con, prepared)
    if len(missing) > len(refused):
        console.print(f"ingested {len(missing) - len(refused)} finished bundle(s) the "
                      f"warehouse lacked")


def _measure_finished(model_ids: list[str], db, data_root, dev, console: Console) -> None:
    from fgm.measures.runner import measure_models
    # the missing ones only: values fgm-measure computed with another budget stay
    job = measure_models(db, model_ids=model_ids, data_root=data_root, device=dev,
                         refresh_stale=False)
    if job.models:
        console.print(f"computed {job.values} missing measures of {job.models} finished models")


def _measure_summary(db, model_id: str) -> str:
    """', 38 of 40 measures (steps_0.1_to_0.01_loss, ...: not available)': every
    registered measure counted, whichever step stored it (ingest or fgm-measure)."""
    from fgm.measures import list_measures
    with briefly(db) as con:
        rows = con.execute("SELECT measure, status FROM measures WHERE model_id = ?",
                           [model_id]).fetchall()
    registered = {s.name for s in list_measures()}
    ok = sorted(m for m, status in rows if status == "ok" and m in registered)
    missing = sorted(registered - set(ok))
    text = f", {len(ok)} of {len(registered)} measures"
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        text += f" ({shown}: not available; fgm-query measures says why)"
    return text


def _run(g, todo, data, dev, out, db, no_ingest, no_measures, console: Console,
         data_root, precision: str | None = None, compile: bool = False) -> None:
    from fgm.ingest.bundles import prepare_bundle, store_bundle
    from fgm.measures.runner import measure_models
    failures = 0
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task(f"{g.name}", total=len(todo), status="")
        for i, (config, seed, mid) in enumerate(todo, 1):
            def on_step(step, estimate, _c=config):
                if step % 20 == 0:
                    bar.update(task, status=f"{_short(_c)}  step {step}  ce {estimate:.4f}")
            start = time.perf_counter()
            try:
                result = train_one(config, data, g.train, seed, dev, on_step=on_step,
                                   precision=precision, compile=compile)
            except torch.OutOfMemoryError as exc:   # after evaluate's retry: this model fails
                _failed(g, config, seed, mid, data, db, no_ingest, exc, bar, console)
                bar.advance(task)
                continue
            manifest = manifest_for(g, config, seed, data, result, dev)
            bundle = write_bundle(out, mid, manifest, {"init": result.init_state,
                                                       "epoch1": result.epoch1_state,
                                                       "final": result.final_state},
                                  result.trace)
            measured = ""
            if not no_ingest:
                # the warehouse is open only while a write runs, so readers get in between
                prepared = prepare_bundle(bundle)
                with briefly(db) as con:
                    store_bundle(con, prepared)
                if not no_measures:
                    bar.update(task, status=f"{_short(config)}  measures")
                    measure_models(db, model_ids=[mid], data_root=data_root, device=dev)
                    measured = _measure_summary(db, mid)
            o = result.outcome
            failures += not o["converged"]
            line = (f"[{i}/{len(todo)}] {_short(config)} seed {seed}: "
                    f"{'converged' if o['converged'] else 'NOT converged'} in {o['steps']} steps "
                    f"({time.perf_counter() - start:.1f} s), train ce {o['train_loss']:.4f}, "
                    f"gap {o['gap']:.4f}{measured}")
            if console.is_terminal:
                bar.console.print(line)
            else:
                click.echo(line)
            bar.advance(task)
    click.echo(f"done: {len(todo)} models trained into {out}"
               + (f", {failures} not converged (kept, flagged)" if failures else ""))


def _failed(g, config, seed, mid, data, db, no_ingest, exc, bar, console: Console) -> None:
    """A model the device had no memory for: stored as failed with why; the grid goes on."""
    why = f"out of device memory: {str(exc).splitlines()[0] if str(exc) else exc!r}"
    stored = ""
    if not no_ingest:
        from fgm.ingest.failed import store_failed_model
        with briefly(db) as con:
            store_failed_model(
                con, model_id=mid, sweep=f"{g.name}/{data.name}", dataset=data.name,
                sweep_config=g.as_dict(), seed=seed, config_hash=config.hash, error=why,
                hyperparameters=[{"axis": a, "value": config.values[a],
                                  "level": config.levels[a]} for a in AXES])
        stored = " (stored as failed)"
    line = f"FAILED {_short(config)} seed {seed}: {why}{stored}"
    if console.is_terminal:
        bar.console.print(line)
    else:
        click.echo(line)


if __name__ == "__main__":
    main()
