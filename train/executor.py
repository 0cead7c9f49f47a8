"""Where fgm-train grid trains and fgm-measure measures: worker processes on this
machine (`--executor local`, the default: as many as it has cores, one torch
thread each; train/pool.py), or a Ray cluster (`--executor ray`;
train/ray_executor.py). Both are Backends of the one driver loop (train/driver.py):
the process that runs the command is the warehouse's one writer either way. Ray
is imported only for `--executor ray`, so the local path never needs it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import click

from fgm.warehouse import FgmError

EXECUTORS = ("local", "ray")
DEFAULT_RETRIES = 3
# Ranges of the Ray options: more than a node has only leaves every task waiting
MAX_GPUS, MAX_CPUS, MAX_RETRIES = 64, 1024, 100


@dataclass(frozen=True)
class ExecutorSettings:
    name: str = "local"
    address: str | None = None       # None: start a local Ray instance
    gpus_per_model: float = 0.0
    cpus_per_model: int = 1
    max_retries: int = DEFAULT_RETRIES
    workers: int | None = None       # local: worker processes (None: one per core)

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
                     help="local: worker processes on this machine. ray: one Ray task "
                          "per model. Either way this process is the warehouse's only "
                          "writer."),
        click.option("--workers", type=int, default=None, metavar="N", envvar="FGM_WORKERS",
                     help="Local: worker processes, one model each, one torch thread each "
                          "(default: $FGM_WORKERS, else one per core on a CPU, 1 on a GPU; 1 "
                          "runs in this process)."),
        click.option("--address", default=None, metavar="ADDR",
                     help="Ray: the cluster to join, 'auto' (the one started on this "
                          "machine with ray start), host:port or ray://host:port "
                          "(default: start a local Ray instance)."),
        click.option("--gpus-per-model", type=float, default=None, metavar="F",
                     help=f"Ray: GPUs per task, 0 to {MAX_GPUS}; fractions (up to 1) share "
                          f"a GPU (0.25: four models on one GPU). Default 0."),
        click.option("--cpus-per-model", type=int, default=None, metavar="N",
                     help=f"Ray: CPUs per task, also its torch threads, 1 to {MAX_CPUS}. "
                          f"Default 1."),
        click.option("--max-retries", type=int, default=None, metavar="N",
                     help=f"Retries of a task whose worker died, 0 to {MAX_RETRIES} "
                          f"(default {DEFAULT_RETRIES}); a model that still fails is stored "
                          f"as failed and the rest go on."),
    ]
    for option in reversed(options):
        func = option(func)

    @functools.wraps(func)
    def wrapper(*args, executor, workers, address, gpus_per_model, cpus_per_model,
                max_retries, **kwargs):
        source = click.get_current_context().get_parameter_source("workers")
        if executor == "ray" and source == click.core.ParameterSource.ENVIRONMENT:
            workers = None     # $FGM_WORKERS is the local executor's
        kwargs["executor"] = executor_settings(executor, address, gpus_per_model,
                                               cpus_per_model, max_retries, workers)
        return func(*args, **kwargs)
    return wrapper


def executor_settings(executor: str, address: str | None, gpus: float | None,
                      cpus: int | None, retries: int | None,
                      workers: int | None = None) -> ExecutorSettings:
    given = {"--address": address, "--gpus-per-model": gpus, "--cpus-per-model": cpus}
    if retries is not None and not 0 <= retries <= MAX_RETRIES:
        raise FgmError(f"--max-retries {retries}: expected an integer in [0, {MAX_RETRIES}]")
    retries = DEFAULT_RETRIES if retries is None else retries
    if executor == "local":
        extra = [name for name, value in given.items() if value is not None]
        if extra:
            raise FgmError(f"{extra[0]} is an option of --executor ray (this run is local)")
        if workers is not None:
            from .pool import default_workers
            top = 4 * default_workers()
            if not 1 <= workers <= top:
                raise FgmError(f"--workers {workers}: expected an integer in [1, {top}] (up "
                               f"to 4 per core of this machine)")
        return ExecutorSettings(max_retries=retries, workers=workers)
    if workers is not None:
        raise FgmError("--workers is an option of --executor local (Ray runs as many "
                       "tasks as the cluster has room for)")
    if gpus is not None and not (math.isfinite(gpus) and 0 <= gpus <= MAX_GPUS):
        raise FgmError(f"--gpus-per-model {gpus:g}: expected a number in [0, {MAX_GPUS}] "
                       f"(fractions share a GPU)")
    if gpus is not None and gpus > 1 and gpus != int(gpus):
        raise FgmError(f"--gpus-per-model {gpus:g}: above 1 it must be a whole number of GPUs")
    if cpus is not None and not 1 <= cpus <= MAX_CPUS:
        raise FgmError(f"--cpus-per-model {cpus}: expected an integer in [1, {MAX_CPUS}]")
    if address is not None:
        check_address(address)
    return ExecutorSettings("ray", address.strip() if address else None, gpus or 0.0,
                            cpus or 1, retries)


MAX_ADDRESS = 300    # characters: a host name has at most 253, then :port, and ray://


def check_address(address: str) -> None:
    """--address's form, checked before anything starts (ray_executor.probe_address
    then asks whether a Ray cluster answers there)."""
    text = address.strip()
    if not text:
        raise FgmError("--address is empty; expected auto, host:port or ray://host:port")
    if text == "auto":
        return
    shown = text if len(text) <= 60 else f"{text[:40]}... ({len(text):,} characters)"
    if len(text) > MAX_ADDRESS:
        raise FgmError(f"--address {shown!r}: longer than {MAX_ADDRESS} characters; expected "
                       f"auto, host:port or ray://host:port")
    host, sep, port = text.removeprefix("ray://").rpartition(":")
    if (not sep or not host.strip("[]") or not port.isascii() or not port.isdigit()
            or not 0 < int(port) < 65536):
        raise FgmError(f"--address {shown!r}: expected auto, host:port or ray://host:port "
                       f"(a port in 1-65535)")
    try:
        host.strip("[]").encode("idna")
    except UnicodeError:
        raise FgmError(f"--address {shown!r}: the host is not a host name (dot-separated "
                       f"labels of 1 to 63 characters) or an IP address") from None


def backend_for(settings: ExecutorSettings, device: str):
    """The driver loop's Backend for these settings, to use as a context manager."""
    if settings.name == "ray":
        from .ray_executor import RayBackend
        return RayBackend(settings, device)
    from .pool import LocalBackend
    return LocalBackend(settings, device)
