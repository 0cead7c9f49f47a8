"""Run bundles: one directory per trained model, written atomically.

    <out>/<model_id>/
        manifest.json        hyperparameters with levels, seed, dataset, outcome,
                             versions, device, and the sha256 of every file below
        init.safetensors     weights at initialisation
        epoch1.safetensors   weights after the first epoch
        final.safetensors    weights at the stop
        trace.parquet        step, epoch, estimated cross-entropy, lr, wall time

Everything is written into `.<model_id>.tmp-<pid>@<host>/` and renamed into
place at the end, so a killed run leaves a temp directory (removed by the next
run on that machine, once process <pid> is gone), never a half-written bundle.
<host> is a short hash of the machine's name: on an `--out` that several
machines share (a Ray cluster), a pid says nothing about another machine's
processes, so only the machine that wrote a temp directory removes it.

Several runs may share one output directory. A finished bundle is never replaced:
if another run renamed its bundle of the same model into place first, the rename
of ours fails (a directory is renamed only onto a missing or empty one), ours is
discarded and theirs kept, and both runs ingest that one. Same configuration and
seed train to the same weights, so nothing is lost.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
from pathlib import Path

import polars as pl
import torch
from safetensors.torch import save_file

from fgm.warehouse import FgmError

FORMAT = "fgm-run-bundle"
FORMAT_VERSION = 2   # 2: model_id includes the training settings (warehouse/ids.py)
ROLES = ("init", "epoch1", "final")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(out: Path, model_id: str) -> bool:
    return (out / model_id / "manifest.json").is_file()


_TMP = re.compile(r"\..+\.tmp-(?P<pid>\d+)(?:@(?P<host>[0-9a-f]{8}))?(?:-.*)?")


def host_tag() -> str:
    """This machine, as temp directory names carry it (8 hex digits of its name)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _tmp_suffix() -> str:
    return f"tmp-{os.getpid()}@{host_tag()}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (ours counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # alive, owned by someone else
        return True
    except OverflowError:
        return False
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove temp directories left by killed runs; return what was removed. The
    temp directories of a run still alive (the pid in the name) are left alone, and
    so is anything whose name does not carry a pid, or carries another machine's
    tag (whose pids this machine cannot see)."""
    if not out.is_dir():
        return []
    stale, here = [], host_tag()
    for p in out.glob(".*.tmp-*"):
        m = _TMP.fullmatch(p.name)
        if (m and m["host"] in (None, here) and p.is_dir() and not p.is_symlink()
                and not pid_alive(int(m["pid"]))):
            stale.append(p)
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def write_bundle(out: Path, model_id: str, manifest: dict,
                 states: dict[str, dict[str, torch.Tensor]], trace: list[dict]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    final = out / model_id
    tmp = out / f".{model_id}.{_tmp_suffix()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = {}
    for role in ROLES:
        path = tmp / f"{role}.safetensors"
        save_file(states[role], str(path))   # no metadata: same weights, same bytes
        files[role] = path
    trace_path = tmp / "trace.parquet"
    pl.DataFrame(trace, schema={"step": pl.Int64, "epoch": pl.Float64,
                                "train_loss": pl.Float64, "lr": pl.Float64,
                                "seconds": pl.Float64}).write_parquet(trace_path)
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION, model_id=model_id)
    manifest["checkpoints"] = {role: {"file": p.name, "sha256": sha256_file(p),
                                      "bytes": p.stat().st_size} for role, p in files.items()}
    manifest["trace"] = {"file": trace_path.name, "sha256": sha256_file(trace_path)}
    for p in [*files.values(), trace_path]:
        _fsync(p)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    _fsync(tmp / "manifest.json")
    _move_into_place(tmp, final)
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final` unless a finished bundle is there: then keep that one
    (another run finished the same model first) and drop ours. Something unfinished
    at `final` (no manifest.json: never written by a run, which renames only finished
    bundles) is moved aside and removed."""
    aside = final.parent / f".{final.name}.{_tmp_suffix()}-aside"
    for _ in range(3):
        try:
            os.rename(tmp, final)    # onto a missing or empty directory only
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
        if (final / "manifest.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return
        _remove(aside)
        try:
            os.rename(final, aside)
        except FileNotFoundError:
            continue                 # gone meanwhile: try again
        _remove(aside)
    raise FgmError(f"{final}: could not move the finished bundle into place; "
                   f"it is left in {tmp}")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def manifest_for(grid, config, seed: int, data, result, device, threads: int = 1) -> dict:
    """A run bundle's manifest.json: the model's identity, how it was trained (the
    torch threads too: they shape the float sums, so the weights) and how it ended."""
    from datetime import UTC, datetime

    from fgm.warehouse import code_version

    from .grid import AXES
    return {
        "config_hash": config.hash, "seed": seed,
        "dataset": {"name": data.name, **data.info},
        "sweep": {"name": f"{grid.name}/{data.name}", "config": grid.as_dict()},
        "hyperparameters": [{"axis": a, "value": config.values[a], "level": config.levels[a]}
                            for a in AXES],
        "train": grid.train, "outcome": result.outcome,
        "timing": {**result.timing, "threads": threads},
        "code_version": code_version(), "torch_version": torch.__version__,
        "device": str(device), "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
