"""fgm-train grid: train a grid of NiNs into run bundles and the warehouse."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from fgm.warehouse import FgmError
from fgm.warehouse.cli import SEED_MAX, db_option, friendly_errors
from fgm.warehouse.ids import model_id_for, training_hash

from .bundle import clean_stale, is_complete
from .driver import GridPlan, GridRun
from .executor import backend_for, executor_options
from .grid import (
    MAX_MODELS,
    check_grid_name,
    check_levels_against_sweep,
    load_grid,
    override,
    preset_names,
)
from .loop import resolve_device


def parse_seeds(text: str) -> list[int]:
    """--seeds 0,1,2: at least one, each an integer in [0, 2^31 - 1] (the warehouse
    stores seeds as 32-bit integers; ingest refuses others), none twice."""
    def bad(why: str) -> click.BadParameter:
        shown = text if len(text) <= 60 else text[:57] + "..."
        return click.BadParameter(f"{shown!r}: {why}; expected integers in [0, {SEED_MAX}] "
                                  f"like 0,1,2", param_hint="--seeds")
    parts = [s.strip() for s in text.split(",")]
    if not any(parts):
        raise bad("no seed given")
    seeds = []
    for part in parts:
        if not part:
            raise bad("an empty seed between commas")
        try:
            seed = int(part)
        except ValueError:
            raise bad(f"{part[:30]!r} is not an integer") from None
        if not 0 <= seed <= SEED_MAX:
            raise bad(f"{seed} is out of range")
        if seed in seeds:
            raise bad(f"{seed} is listed twice")
        seeds.append(seed)
    return seeds


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
@click.option("--name", default=None, metavar="NAME",
              help="The grid's name (default: the preset's or the file's); its models "
                   "form sweep NAME/<dataset>. A grid whose levels differ from those of "
                   "a sweep the warehouse holds under its name needs a name of its own.")
@click.option("--dataset", default=None, help="cifar10, svhn, fashion_mnist or digits.")
@click.option("--data-root", type=click.Path(path_type=Path), default=None,
              help="Where the dataset lies in torchvision's layout (default ./data).")
@click.option("--download", is_flag=True, help="Download the dataset if it is not there.")
@click.option("--seeds", default=None,
              help=f"Comma-separated seeds, each an integer in [0, {SEED_MAX}] (default: "
                   "the grid's seeds = [...], else 0).")
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
def grid(preset, grid_file, settings, name, dataset, data_root, download, seeds, out, device,
         precision, compile_, no_ingest, no_measures, yes, db, executor):
    """Train every configuration of a grid that is not finished yet."""
    if preset and grid_file:
        raise FgmError("give --preset or --grid, not both")
    g = load_grid(preset, grid_file)
    if settings:
        g = override(g, list(settings))
    if dataset:
        g.dataset = dataset
    if name is not None:
        g.name = check_grid_name(name)
    seed_list = parse_seeds(seeds) if seeds is not None else (g.seeds or [0])
    g.check_size(len(seed_list), None if yes else MAX_MODELS)
    if executor.name == "local":
        resolve_device(device)
    else:
        executor.use_gpu(device)
    out = out.resolve()     # workers do not share this process's working directory
    check_levels_against_sweep(db, g)
    console = Console(stderr=True)
    stale = clean_stale(out)
    if stale:
        console.print(f"removed {len(stale)} unfinished bundle(s) left by an interrupted run")
    configs = g.configs(limit=None)
    training = training_hash(g.train)
    jobs = [(c, s, model_id_for(c.hash, g.dataset, s, training))
            for s in seed_list for c in configs]
    todo = [j for j in jobs if not is_complete(out, j[2])]
    plan = GridPlan(g, jobs, todo, out, db, device, data_root, download, no_ingest,
                    no_measures, console, precision, compile_)
    with backend_for(executor, device) as backend:
        GridRun(plan, backend).run()


if __name__ == "__main__":
    main()
