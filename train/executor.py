"""Where fgm-train grid trains and fgm-measure measures: here, one model at a time
(`--executor local`, the default), or on a Ray cluster (`--executor ray`).

Either way the process that runs the command is the warehouse's one writer: it
ingests each result as it comes, in its own short transaction. Ray is imported
only for `--executor ray` (train/ray_executor.py), so the local path never needs it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import click
from rich.console import Console

from fgm.warehouse import FgmError

EXECUTORS = ("local", "ray")
DEFAULT_RETRIES = 3


@dataclass(frozen=True)
class ExecutorSettings:
    name: str = "local"
    address: str | None = None       # None: start a local Ray instance
    gpus_per_model: float = 0.0
    cpus_per_model: int = 1
    max_retries: int = DEFAULT_RETRIES

    def use_gpu(self, device: str) -> bool:
        """Whether Ray tasks train on a GPU: --device auto follows --gpus-per-model
        (the driver may well have no GPU of its own)."""
        if device == "cuda" and not self.gpus_per_model:
            raise FgmError("--device cuda with --executor ray: give --gpus-per-model (the "
                           "share of a GPU each model gets, e.g. 1 or 0.25)")
        if device == "cpu" and self.gpus_per_model:
            raise FgmError(f"--device cpu and --gpus-per-model {self.gpus_per_model:g} "
                           "disagree; drop one of them")
        return self.gpus_per_model > 0


def executor_options(func: Callable) -> Callable:
    """--executor and the Ray options, shared by fgm-train grid and fgm-measure."""
    options = [
        click.option("--executor", type=click.Choice(EXECUTORS), default="local",
                     show_default=True,
                     help="local: one model at a time in this process. ray: one Ray task "
                          "per model, this process the warehouse's only writer."),
        click.option("--address", default=None, metavar="ADDR",
                     help="Ray: the cluster to join, 'auto' (the one started on this "
                          "machine with ray start), host:port or ray://host:port "
                          "(default: start a local Ray instance)."),
        click.option("--gpus-per-model", type=float, default=None, metavar="F",
                     help="Ray: GPUs per task; fractions share a GPU (0.25: four models "
                          "on one GPU). Default 0."),
        click.option("--cpus-per-model", type=int, default=None, metavar="N",
                     help="Ray: CPUs per task, also its torch threads. Default 1."),
        click.option("--max-retries", type=int, default=None, metavar="N",
                     help=f"Ray: retries of a task whose worker died (default "
                          f"{DEFAULT_RETRIES}); a model that still fails is stored as "
                          f"failed and the rest go on."),
    ]
    for option in reversed(options):
        func = option(func)

    @functools.wraps(func)
    def wrapper(*args, executor, address, gpus_per_model, cpus_per_model, max_retries,
                **kwargs):
        kwargs["executor"] = executor_settings(executor, address, gpus_per_model,
                                               cpus_per_model, max_retries)
        return func(*args, **kwargs)
    return wrapper


def executor_settings(executor: str, address: str | None, gpus: float | None,
                      cpus: int | None, retries: int | None) -> ExecutorSettings:
    given = {"--address": address, "--gpus-per-model": gpus, "--cpus-per-model": cpus,
             "--max-retries": retries}
    if executor == "local":
        extra = [name for name, value in given.items() if value is not None]
        if extra:
            raise FgmError(f"{extra[0]} is an option of --executor ray (this run is local)")
        return ExecutorSettings()
    if gpus is not None and not (math.isfinite(gpus) and gpus >= 0):
        raise FgmError(f"--gpus-per-model {gpus:g}: expected 0 or more (fractions share a GPU)")
    if gpus is not None and gpus > 1 and gpus != int(gpus):
        raise FgmError(f"--gpus-per-model {gpus:g}: above 1 it must be a whole number of GPUs")
    if cpus is not None and cpus < 1:
        raise FgmError(f"--cpus-per-model {cpus}: expected 1 or more")
    if retries is not None and retries < 0:
        raise FgmError(f"--max-retries {retries}: expected 0 or more")
    if address is not None and not address.strip():
        raise FgmError("--address is empty; expected auto, host:port or ray://host:port")
    return ExecutorSettings("ray", address.strip() if address else None, gpus or 0.0,
                            cpus or 1, DEFAULT_RETRIES if retries is None else retries)


@dataclass
class GridPlan:
    """One fgm-train grid run, as the command line decided it."""
    grid: object                  # train.grid.Grid
    jobs: list[tuple]             # (config, seed, model_id) of every model of the grid
    todo: list[tuple]             # those without a finished bundle
    out: Path
    db: object                    # warehouse.store.Warehouse
    device: str                   # the --device option: cpu, cuda or auto
    data_root: Path | None
    download: bool
    no_ingest: bool
    no_measures: bool
    console: Console
    precision: str | None = None  # --precision: bf16 or fp32 (None: the device's default)
    compile: bool = False         # --compile: torch.compile the training step

    @property
    def finished(self) -> list[str]:
        todo = {j[2] for j in self.todo}
        return [j[2] for j in self.jobs if j[2] not in todo]


class Executor(Protocol):
    def grid(self, plan: GridPlan) -> None:
        """Train plan.todo (ingesting and measuring as plan says), resuming what a
        killed run left: finished bundles the warehouse lacks are ingested first."""

    def measure(self, db, console: Console, **job) -> object:
        """fgm-measure: compute what the warehouse lacks (measure_models's keywords);
        a measures.runner.JobReport."""


class LocalExecutor:
    """Today's loop: one model at a time, in this process."""

    def grid(self, plan: GridPlan) -> None:
        from .cli import grid_local
        grid_local(plan)

    def measure(self, db, console: Console, **job):
        from fgm.measures.runner import measure_models
        return measure_models(db, **job)


def executor_for(settings: ExecutorSettings) -> Executor:
    if settings.name == "ray":
        from .ray_executor import RayExecutor
        return RayExecutor(settings)
    return LocalExecutor()
