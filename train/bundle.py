"""Run bundles: one directory per trained model, written atomically.

    <out>/<model_id>/
        manifest.json        hyperparameters with levels, seed, dataset, outcome,
                             versions, device, and the sha256 of every file below
        init.safetensors     weights at initialisation
        epoch1.safetensors   weights after the first epoch
        final.safetensors    weights at the stop
        trace.parquet        step, epoch, estimated cross-entropy, lr, wall time

Everything is written into `.<model_id>.tmp-<pid>/` and renamed into place
at the end, so a killed run leaves a temp directory (removed on the next run),
never a half-written bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import polars as pl
import torch
from safetensors.torch import save_file

FORMAT = "fgm-run-bundle"
FORMAT_VERSION = 1
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


def clean_stale(out: Path) -> list[Path]:
    """Remove temp directories left by killed runs; return what was removed."""
    stale = [p for p in out.glob(".*.tmp-*") if p.is_dir()] if out.exists() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def write_bundle(out: Path, model_id: str, manifest: dict,
                 states: dict[str, dict[str, torch.Tensor]], trace: list[dict]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    final = out / model_id
    tmp = out / f".{model_id}.tmp-{os.getpid()}"
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
    if final.exists():  # an older bundle of the same model: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
