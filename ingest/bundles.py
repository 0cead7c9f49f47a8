"""Run bundles (train/bundle.py) into the warehouse.

Every file a manifest names is checked against its sha256 before anything is
written; a bundle lands in one transaction, so a corrupt one changes nothing
and the rest of the tree is still ingested.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import duckdb
import polars as pl
from safetensors import safe_open

from fgm.train.bundle import FORMAT, FORMAT_VERSION, ROLES, sha256_file
from fgm.warehouse import InputError, code_version, transaction
from fgm.warehouse.upsert import upsert

from .table import sweep_id_for

REQUIRED = ("model_id", "config_hash", "seed", "dataset", "sweep", "hyperparameters",
            "outcome", "checkpoints", "trace")
TRAINING_MEASURES = {  # measure name -> outcome key (SPEC §4, Eqs. 21, 63, 64)
    "cross_entropy": "train_loss",
    "steps_to_0.1_loss": "steps_to_0.1",
    "steps_0.1_to_0.01_loss": "steps_0.1_to_0.01",
}


@dataclass
class TreeReport:
    root: Path
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.root}: {self.added + self.updated + self.unchanged} bundles "
                 f"({self.added} added, {self.updated} updated, {self.unchanged} unchanged), "
                 f"{len(self.failed)} failed"]
        lines += [f"  FAILED {path}: {why}" for path, why in self.failed]
        return "\n".join(lines)


def read_manifest(bundle: Path) -> dict:
    """The manifest, with every file it names verified. InputError names what is wrong."""
    path = bundle / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "missing: not a finished run bundle") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"truncated or corrupt JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(path, f"not an fgm run bundle manifest (format != {FORMAT!r})")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(path, f"bundle format {manifest['format_version']} is newer than this "
                         f"fgm reads ({FORMAT_VERSION})")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise InputError(path, f"missing keys: {', '.join(missing)}")
    entries = [manifest["checkpoints"].get(r) for r in ROLES] + [manifest["trace"]]
    if any(e is None for e in entries):
        raise InputError(path, f"checkpoints must name {', '.join(ROLES)}")
    for entry in entries:
        file = bundle / entry["file"]
        if not file.is_file():
            raise InputError(file, "missing")
        if sha256_file(file) != entry["sha256"]:
            raise InputError(file, "truncated or corrupt: its sha256 differs from the manifest's")
    for role in ROLES:
        file = bundle / manifest["checkpoints"][role]["file"]
        try:
            with safe_open(str(file), framework="pt") as f:
                list(f.keys())
        except Exception as exc:  # safetensors raises its own error types
            raise InputError(file, f"not a readable safetensors file ({exc})") from None
    return manifest


def _frames(bundle: Path, manifest: dict) -> dict[str, tuple[pl.DataFrame, list[str], tuple]]:
    mid = manifest["model_id"]
    out = manifest["outcome"]
    sweep = manifest["sweep"]
    now = datetime.now().replace(microsecond=0)
    version = manifest.get("code_version") or code_version()
    sid = sweep_id_for(sweep["name"])
    hp = [{"model_id": mid, "axis": h["axis"], "level": int(h["level"]),
           "value_text": str(h["value"]),
           "value_num": None if isinstance(h["value"], str) else float(h["value"])}
          for h in manifest["hyperparameters"]]
    measures = []
    for name, key in TRAINING_MEASURES.items():
        value = out.get(key)
        measures.append({
            "model_id": mid, "measure": name,
            "value": None if value is None else float(value),
            "status": "ok" if value is not None else "missing",
            "error": None if value is not None else "not reached within the step budget",
            "params": json.dumps({"source": "training",
                                  "stop_cross_entropy": manifest.get("train", {}).get(
                                      "stop_cross_entropy")}),
            "computed_at": now, "code_version": version})
    trace = pl.read_parquet(bundle / manifest["trace"]["file"]).with_columns(
        pl.lit(mid).alias("model_id"))
    return {
        "sweeps": (pl.DataFrame([{"sweep_id": sid, "name": sweep["name"],
                                  "dataset": manifest["dataset"]["name"],
                                  "config": json.dumps(sweep.get("config")),
                                  "code_version": version}]), ["sweep_id"],
                   ("code_version", "config")),
        "models": (pl.DataFrame([{"model_id": mid, "sweep_id": sid,
                                  "dataset": manifest["dataset"]["name"],
                                  "seed": int(manifest["seed"]),
                                  "config_hash": manifest["config_hash"], "status": "done"}]),
                   ["model_id"], ()),
        "hyperparameters": (pl.DataFrame(hp, schema_overrides={"value_num": pl.Float64}),
                            ["model_id", "axis"], ()),
        "outcomes": (pl.DataFrame([{
            "model_id": mid, "train_acc": out["train_acc"], "test_acc": out["test_acc"],
            "train_loss": out["train_loss"], "test_loss": out["test_loss"], "gap": out["gap"],
            "converged": bool(out["converged"]), "steps": int(out["steps"]),
            "train_size": manifest["dataset"].get("train_size"),
            "test_size": manifest["dataset"].get("test_size")}]), ["model_id"], ()),
        "checkpoints": (pl.DataFrame([{
            "model_id": mid, "role": role,
            "path": str((bundle / c["file"]).resolve()), "sha256": c["sha256"],
            "bytes": int(c["bytes"])} for role, c in manifest["checkpoints"].items()]),
            ["model_id", "role"], ()),
        "traces": (trace, ["model_id", "step"], ()),
        "measures": (pl.DataFrame(measures, schema_overrides={"value": pl.Float64}),
                     ["model_id", "measure"], ("computed_at", "code_version", "params")),
    }


def ingest_bundle(con: duckdb.DuckDBPyConnection, bundle: Path) -> str:
    """Ingest one bundle in one transaction: 'added', 'updated' or 'unchanged'."""
    manifest = read_manifest(bundle)
    frames = _frames(bundle, manifest)
    with transaction(con):
        results = {table: upsert(con, table, frame, keys, ignore=ignore)
                   for table, (frame, keys, ignore) in frames.items()}
    if results["models"].added.height:
        return "added"
    changed = any(r.added.height or r.updated.height
                  for t, r in results.items() if t != "sweeps")
    return "updated" if changed else "unchanged"


def find_bundles(root: Path) -> list[Path]:
    """Directories holding a manifest.json (temp directories of killed runs are skipped)."""
    return sorted(p.parent for p in root.rglob("manifest.json")
                  if not any(part.startswith(".") for part in p.relative_to(root).parts))


def ingest_tree(con: duckdb.DuckDBPyConnection, root: Path, progress=None) -> TreeReport:
    report = TreeReport(root)
    bundles = find_bundles(root)
    for bundle in bundles:
        try:
            outcome = ingest_bundle(con, bundle)
            setattr(report, outcome, getattr(report, outcome) + 1)
        except InputError as exc:
            report.failed.append((bundle, str(exc)))
        except (duckdb.Error, KeyError, TypeError, ValueError, pl.exceptions.PolarsError) as exc:
            report.failed.append((bundle, f"{type(exc).__name__}: {exc}"))
        if progress:
            progress(bundle)
    # a directory with checkpoints but no manifest: a bundle whose manifest was lost
    orphans = {p.parent for p in root.rglob("*.safetensors")
               if not any(part.startswith(".") for part in p.relative_to(root).parts)}
    for orphan in sorted(orphans - set(bundles)):
        report.failed.append((orphan, "checkpoints without a manifest.json"))
    return report
