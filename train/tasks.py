"""What a Ray worker runs: one model's training, or one model's missing measures.

Plain functions: the driver (train/ray_executor.py) wraps them with `ray.remote`,
so this module imports no Ray and runs as well in a test or a debugger. They never
open the warehouse: a training task writes its run bundle under `--out` (storage
every node sees) and returns the bundle's path; a measure task returns its rows as
data, which the driver checks before it writes them.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .bundle import write_bundle
from .data import Data
from .grid import Config, Grid


@dataclass(frozen=True)
class DataSpec:
    """A dataset as a task receives it from a local pool: loaded once per worker
    process (the arrays themselves never cross a pipe). `spec`: the JSON of a
    dataset of models fgm did not train (warehouse table datasets), checked against
    `sha256` when it is loaded; else `name` is one of fgm's own."""
    name: str
    root: Path | None = None
    download: bool = False
    spec: str | None = None
    sha256: str | None = None
    train_examples: int | None = None     # a grid's [train] train_examples: the first N


_loaded: dict[tuple, Data] = {}


def _signature(data: DataSpec) -> tuple:
    """What says a cached dataset is still the file's: an npz file's size and time
    (a process that lives across runs, fgm-measure's in-process worker or a notebook,
    reads a changed file again, and its sha256 check then speaks)."""
    if data.spec is None:
        return ()
    location = json.loads(data.spec).get("location")
    try:
        st = os.stat(location)
    except (OSError, TypeError):
        return ()
    return (st.st_size, st.st_mtime_ns)


def load_data(data: DataSpec) -> Data:
    if data.spec is not None:
        from fgm.ingest.zoo import load_dataset_spec
        return load_dataset_spec(json.loads(data.spec), data.sha256)
    from .data import first_examples, load_dataset
    loaded = load_dataset(data.name, data.root, data.download)
    return first_examples(loaded, data.train_examples) if data.train_examples else loaded


def _resolve(data: Data | DataSpec) -> Data:
    if isinstance(data, DataSpec):
        key = (data, _signature(data))
        if key not in _loaded:
            _loaded[key] = load_data(data)
        return _loaded[key]
    return data


class OutNotWritable(Exception):
    """A worker cannot write under --out: every model would fail the same way, so the
    driver stops the grid and says so, instead of storing each model as failed."""


def node() -> str:
    return socket.gethostname()


def _device(use_gpu: bool, threads: int) -> torch.device:
    # Intra-op threads shape the float sums, so they shape the weights: a task trains
    # with as many threads as CPUs Ray gave it, and a local run with
    # OMP_NUM_THREADS=<that number> gets the same bytes.
    torch.set_num_threads(max(1, threads))
    return torch.device("cuda" if use_gpu else "cpu")


def train_task(grid: Grid, config: Config, seed: int, model_id: str, data: Data | DataSpec,
               out: str,
               use_gpu: bool, threads: int, precision: str | None = None,
               compile: bool = False) -> dict:
    """Train one model into its run bundle under `out`; return where it is and how
    it went (the driver checks and ingests the bundle itself)."""
    from .bundle import is_complete, manifest_for
    from .loop import train_one
    from .pool import report
    if is_complete(Path(out), model_id):   # a retry of a task whose worker died after
        return finished_bundle(Path(out), model_id)   # writing it: never trained twice
    _check_writable(Path(out))             # before the training, not after it
    device = _device(use_gpu, threads)
    if use_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    data = _resolve(data).to(device)

    def on_step(step: int, estimate: float) -> None:
        if step % 50 == 0:
            report("train", step, estimate)
    start = time.perf_counter()
    result = train_one(config, data, grid.train, seed, device, precision=precision,
                       compile=compile, on_step=on_step)
    manifest = manifest_for(grid, config, seed, data, result, device, threads)
    try:
        bundle = write_bundle(Path(out), model_id, manifest,
                              {"init": result.init_state, "epoch1": result.epoch1_state,
                               "final": result.final_state}, result.trace)
    except OSError as exc:
        raise OutNotWritable(
            f"{out}: node {node()} cannot write a run bundle there "
            f"({exc.strerror or exc}); --out must be a directory that every node of "
            f"the cluster can write") from None
    return {"bundle": str(bundle), "node": node(), "outcome": result.outcome,
            "seconds": time.perf_counter() - start,
            "gpu_memory": torch.cuda.max_memory_allocated(device) if use_gpu else None}


def finished_bundle(out: Path, model_id: str) -> dict:
    """What train_task returns, for a bundle already on disk."""
    manifest = json.loads((out / model_id / "manifest.json").read_text())
    return {"bundle": str(out / model_id), "node": node(),
            "outcome": manifest.get("outcome", {}), "seconds": 0.0, "gpu_memory": None,
            "reused": True}


def _check_writable(out: Path) -> None:
    probe = out / f".write-probe-{node()}-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutNotWritable(
            f"{out}: node {node()} cannot write a run bundle there "
            f"({exc.strerror or exc}); --out must be a directory that every node of "
            f"the cluster can write") from None


def measure_task(model_id: str, inputs, data: Data, names: list[str], settings,
                 use_gpu: bool, threads: int) -> dict:
    """One model's missing measures: {'rows': [...]} (plain rows, see
    measures.runner.compute_model_measures), or {'skipped': why} when the model
    cannot be rebuilt here (its checkpoints not visible on this node, say)."""
    from fgm.measures.context import measure_layout
    from fgm.measures.runner import SKIP_ERRORS, compute_model_measures

    from .pool import report
    device = _device(use_gpu, threads)
    start = time.perf_counter()
    try:
        data = _resolve(data).to(device)
        data.x_train = measure_layout(data.x_train)
        rows = compute_model_measures(model_id, inputs, data, names, settings, device,
                                      progress=lambda name, i, n: report("measure", name, i, n))
    except SKIP_ERRORS as exc:
        return {"skipped": f"{exc} (on node {node()})", "node": node()}
    return {"rows": rows, "node": node(), "seconds": time.perf_counter() - start}
