"""Run bundles (train/bundle.py) into the warehouse.

A bundle is checked whole before the warehouse is opened (`prepare_bundle`):
the manifest against its schema (types, ranges, finiteness, the rules of
ingest/validate.py), against itself (its config_hash is the hash of its
hyperparameters, its model_id the id of that hash, dataset and seed), and every
file it names: a plain file inside the bundle directory (no absolute path, no
`..`, no symbolic link anywhere on the way), of the size and sha256 the
manifest gives, readable as safetensors / Parquet. Only then is it written, in
one transaction (`store_bundle`), which also refuses a model_id the warehouse
holds as a different model (another configuration, seed or dataset) unless
asked to replace it. A bad bundle changes nothing; in a tree, it costs that
bundle only and the rest still land.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath

import duckdb
import polars as pl
from safetensors import safe_open

from fgm.train.bundle import FORMAT, FORMAT_VERSION, ROLES, sha256_file
from fgm.warehouse import FgmError, InputError, code_version, transaction
from fgm.warehouse.ids import config_hash, model_id_for, sweep_id_for, training_hash
from fgm.warehouse.levels import sweep_conflict
from fgm.warehouse.store import LOCK_WAIT, Warehouse, writer
from fgm.warehouse.upsert import upsert

from .validate import (
    INT32_MAX,
    axis_name_problem,
    case_clash,
    check_axes_against_warehouse,
    describe_conflict,
    finite_problem,
    identity_conflicts,
)

REQUIRED = ("model_id", "config_hash", "seed", "dataset", "sweep", "hyperparameters",
            "outcome", "checkpoints", "trace")
TRAINING_MEASURES = {  # measure name -> outcome key (SPEC §4, Eqs. 21, 63, 64)
    "cross_entropy": "train_loss",
    "steps_to_0.1_loss": "steps_to_0.1",
    "steps_0.1_to_0.01_loss": "steps_0.1_to_0.01",
}
TRACE_SCHEMA = {"step": pl.Int64, "epoch": pl.Float64, "train_loss": pl.Float64,
                "lr": pl.Float64, "seconds": pl.Float64}
PER_MODEL_TABLES = ("models", "hyperparameters", "outcomes", "checkpoints", "traces",
                    "measures", "model_builds")
INT64_MAX = 2**63 - 1
FLOAT_MAX = 1e300  # a JSON integer beyond this does not become a finite float
GAP_TOLERANCE = 1e-6
_SHA256 = re.compile(r"[0-9a-f]{64}")

Frames = dict[str, tuple[pl.DataFrame, list[str], tuple]]


@dataclass
class TreeReport:
    root: Path
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    replaced: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def __str__(self) -> str:
        done = self.added + self.updated + self.unchanged + self.replaced
        replaced = f", {self.replaced} replaced" if self.replaced else ""
        lines = [f"{self.root}: {done} bundles "
                 f"({self.added} added, {self.updated} updated, {self.unchanged} unchanged"
                 f"{replaced}), {len(self.failed)} failed"]
        lines += [f"  FAILED {path}: {why}" for path, why in self.failed]
        return "\n".join(lines)


@dataclass
class PreparedBundle:
    """A bundle checked whole and turned into warehouse rows; nothing opened yet."""
    path: Path
    manifest_path: Path
    model_id: str
    axes: list[str]
    frames: Frames


# --------------------------------------------------------------------------- the manifest

class _Schema:
    """Checks of one manifest; the first failure raises an InputError naming the
    manifest file, the key (dotted path) and the rule."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, problem: str) -> InputError:
        return InputError(self.path, f"{key}: {problem}")

    def obj(self, value: object, key: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected an object, found {_show(value)}")
        return value

    def text(self, d: dict, key: str, where: str, *, optional: bool = False) -> str | None:
        value = d.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(f"{where}{key}", f"expected a non-empty text, found {_show(value)}")
        return value

    def number(self, d: dict, key: str, where: str, rule: str, *, optional: bool = False,
               **limits) -> int | float | None:
        if key not in d and not optional:
            raise self.fail(f"{where}{key}", f"missing; {rule}")
        value = d.get(key)
        if value is None and optional:
            return None
        problem = finite_problem(value, **limits)
        if problem:
            raise self.fail(f"{where}{key}", f"{rule}: {problem}")
        return value


def _show(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _non_finite(value: object, key: str) -> str | None:
    """The dotted key of the first NaN or infinity anywhere in `value`, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return key
    items = (value.items() if isinstance(value, dict)
             else enumerate(value) if isinstance(value, list) else ())
    for k, v in items:
        found = _non_finite(v, f"{key}.{k}" if key else str(k))
        if found:
            return found
    return None


def load_manifest(bundle: Path) -> dict:
    """manifest.json parsed: a plain file (not a link, not a directory) of JSON."""
    path = bundle / "manifest.json"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise InputError(path, "missing: not a finished run bundle") from None
    except OSError as exc:
        raise InputError(path, f"cannot be read ({exc.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise InputError(path, "is a symbolic link; a bundle's manifest must be a plain file "
                         "inside the bundle directory")
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise InputError(path, f"expected a JSON file, found {kind}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise InputError(path, f"cannot be read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(path, f"truncated or corrupt JSON ({exc})") from None


def check_manifest(manifest: object, path: Path) -> dict:
    """The manifest's schema and its own consistency; returns it unchanged."""
    s = _Schema(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(path, f"not an fgm run bundle manifest (format != {FORMAT!r})")
    version = manifest.get("format_version")
    problem = finite_problem(version, low=1, integer=True)
    if problem:
        raise s.fail("format_version", f"expected a bundle format version 1, 2, ...: {problem}")
    if version > FORMAT_VERSION:
        raise InputError(path, f"bundle format {version} is newer than this fgm reads "
                         f"({FORMAT_VERSION})")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise InputError(path, f"missing keys: {', '.join(missing)}")

    s.text(manifest, "model_id", "")
    s.text(manifest, "config_hash", "")
    s.number(manifest, "seed", "", f"a seed is an integer in [0, {INT32_MAX}]",
             low=0, high=INT32_MAX, integer=True)
    dataset = s.obj(manifest["dataset"], "dataset")
    s.text(dataset, "name", "dataset.")
    for key in ("train_size", "test_size"):
        s.number(dataset, key, "dataset.", "a size is a count of examples",
                 optional=True, low=0, high=INT64_MAX, integer=True)
    sweep = s.obj(manifest["sweep"], "sweep")
    s.text(sweep, "name", "sweep.")
    if manifest.get("code_version") is not None and not isinstance(manifest["code_version"],
                                                                   str):
        raise s.fail("code_version", f"expected a text, found {_show(manifest['code_version'])}")
    if "train" in manifest:
        train = s.obj(manifest["train"], "train")
        s.number(train, "stop_cross_entropy", "train.", "a cross-entropy is >= 0",
                 optional=True, low=0, high=FLOAT_MAX)

    _check_hyperparameters(s, manifest["hyperparameters"])
    _check_outcome(s, s.obj(manifest["outcome"], "outcome"))

    checkpoints = s.obj(manifest["checkpoints"], "checkpoints")
    if sorted(checkpoints) != sorted(ROLES):
        raise s.fail("checkpoints", f"expected exactly the roles {', '.join(ROLES)}, found "
                     f"{', '.join(map(repr, checkpoints)) or 'none'}")
    for role in ROLES:
        entry = s.obj(checkpoints[role], f"checkpoints.{role}")
        _check_file_entry(s, entry, f"checkpoints.{role}.")
        s.number(entry, "bytes", f"checkpoints.{role}.", "a file size in bytes",
                 low=0, high=INT64_MAX, integer=True)
    _check_file_entry(s, s.obj(manifest["trace"], "trace"), "trace.")

    bad = _non_finite(manifest, "")
    if bad:
        raise s.fail(bad, "expected a finite number: NaN and infinities cannot be stored")

    # its own consistency: the ids are derived, so a mismatch means tampering or corruption
    values = {h["axis"]: h["value"] for h in manifest["hyperparameters"]}
    expected_hash = config_hash(values)
    if manifest["config_hash"] != expected_hash:
        raise s.fail("config_hash", f"{manifest['config_hash']!r} is not the hash of the "
                     f"manifest's hyperparameters ({expected_hash!r}): the manifest was "
                     "edited or is corrupt")
    # format 2 on: the id includes the training settings (format 1 bundles predate it)
    training = (training_hash(manifest.get("train") or {})
                if manifest.get("format_version", 1) >= 2 else None)
    expected_id = model_id_for(expected_hash, dataset["name"], int(manifest["seed"]), training)
    if manifest["model_id"] != expected_id:
        raise s.fail("model_id", f"{manifest['model_id']!r} is not the model_id of this "
                     f"configuration, dataset {dataset['name']!r}, seed {manifest['seed']} "
                     f"and training settings ({expected_id!r}): the manifest was edited or "
                     "is corrupt")
    return manifest


def _check_hyperparameters(s: _Schema, hps: object) -> None:
    if not isinstance(hps, list):
        raise s.fail("hyperparameters", f"expected a list of {{axis, value, level}}, found "
                     f"{_show(hps)}")
    axes = []
    for i, h in enumerate(hps):
        where = f"hyperparameters[{i}]"
        h = s.obj(h, where)
        problem = axis_name_problem(h.get("axis"))
        if problem:
            raise s.fail(f"{where}.axis", problem)
        axis = h["axis"]
        where = f"{where} ({axis})"
        if axis in axes:
            raise s.fail(f"{where}.axis", f"axis {axis!r} is given twice")
        axes.append(axis)
        value = h.get("value")
        if isinstance(value, str):
            if not value:
                raise s.fail(f"{where}.value", "expected a number or a non-empty text, found ''")
        else:
            problem = finite_problem(value, low=-FLOAT_MAX, high=FLOAT_MAX)
            if problem:
                raise s.fail(f"{where}.value", f"a hyperparameter value is a finite number "
                             f"or a text: {problem}")
        s.number(h, "level", f"{where}.", f"a level is an integer in [0, {INT32_MAX}] "
                 "(the value's position on its axis)", low=0, high=INT32_MAX, integer=True)
    clash = case_clash(axes)
    if clash:
        raise s.fail("hyperparameters", f"axes {clash[0]!r} and {clash[1]!r} differ only by "
                     "case; SQL cannot tell them apart")


def _check_outcome(s: _Schema, out: dict) -> None:
    w = "outcome."
    acc = "an accuracy is a fraction in [0, 1]"
    train_acc = s.number(out, "train_acc", w, acc, low=0, high=1)
    test_acc = s.number(out, "test_acc", w, acc, low=0, high=1)
    for key in ("train_loss", "test_loss"):
        s.number(out, key, w, "a cross-entropy is a finite number >= 0", low=0,
                 high=FLOAT_MAX)
    gap = s.number(out, "gap", w, "the gap is train_acc - test_acc", low=-1, high=1)
    if abs(gap - (train_acc - test_acc)) > GAP_TOLERANCE:
        raise s.fail("outcome.gap", f"the gap is train_acc - test_acc (within "
                     f"{GAP_TOLERANCE:g}): found {gap!r}, but train_acc - test_acc = "
                     f"{train_acc - test_acc!r}")
    if not isinstance(out.get("converged"), bool):
        raise s.fail("outcome.converged", f"expected true or false, found "
                     f"{_show(out.get('converged'))}")
    steps = "a step count is an integer >= 0"
    s.number(out, "steps", w, steps, low=0, high=INT64_MAX, integer=True)
    for key in ("steps_to_0.1", "steps_0.1_to_0.01"):
        s.number(out, key, w, steps + " (or null: not reached)", optional=True, low=0,
                 high=INT64_MAX, integer=True)


def _check_file_entry(s: _Schema, entry: dict, where: str) -> None:
    name = entry.get("file")
    if not isinstance(name, str) or not name:
        raise s.fail(f"{where}file", f"expected a file name inside the bundle, found "
                     f"{_show(name)}")
    sha = entry.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise s.fail(f"{where}sha256", f"expected 64 lowercase hex digits, found {_show(sha)}")


# --------------------------------------------------------------------------- the files

def confined_file(bundle: Path, name: str, key: str, manifest_path: Path) -> Path:
    """`bundle / name`, where `name` is a relative path that stays inside the bundle
    directory and no component of which is a symbolic link; it must be a plain file."""
    rule = ("a bundle's files must be plain files inside the bundle directory, named by a "
            "relative path without '..' (such as 'final.safetensors')")
    if "\x00" in name:
        raise InputError(manifest_path, f"{key}: {name!r} is not a file name; {rule}")
    parts = PurePosixPath(name)
    if parts.is_absolute() or name.startswith(("/", "\\")):
        raise InputError(manifest_path, f"{key}: {name!r} is an absolute path; {rule}")
    if ".." in parts.parts:
        raise InputError(manifest_path, f"{key}: {name!r} leaves the bundle directory; {rule}")
    current = bundle
    mode = stat.S_IFDIR
    for part in parts.parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            raise InputError(bundle / name, "missing") from None
        except OSError as exc:
            raise InputError(bundle / name, f"cannot be read ({exc.strerror})") from None
        if stat.S_ISLNK(mode):
            raise InputError(manifest_path, f"{key}: {name!r}: {current} is a symbolic link; "
                             f"{rule}, not links")
    if not stat.S_ISREG(mode):
        raise InputError(manifest_path, f"{key}: {name!r} is not a plain file; {rule}")
    return current


def _verified_files(bundle: Path, manifest: dict, manifest_path: Path) -> dict[str, Path]:
    """{checkpoint role or 'trace': the file}, each confined, of the right size and sha256."""
    entries = {role: manifest["checkpoints"][role] for role in ROLES}
    entries["trace"] = manifest["trace"]
    files: dict[str, Path] = {}
    for role, entry in entries.items():
        key = "trace.file" if role == "trace" else f"checkpoints.{role}.file"
        file = confined_file(bundle, entry["file"], key, manifest_path)
        same = [r for r, f in files.items() if f == file]
        if same:
            raise InputError(manifest_path, f"{key}: {entry['file']!r} is also the file of "
                             f"{same[0]}; every checkpoint and the trace have a file of "
                             "their own")
        files[role] = file
    for role, file in files.items():
        entry = entries[role]
        if "bytes" in entry and file.stat().st_size != entry["bytes"]:
            raise InputError(file, f"truncated or corrupt: {file.stat().st_size} bytes, the "
                             f"manifest says {entry['bytes']}")
        if sha256_file(file) != entry["sha256"]:
            raise InputError(file, "truncated or corrupt: its sha256 differs from the manifest's")
    for role in ROLES:
        try:
            with safe_open(str(files[role]), framework="pt") as f:
                list(f.keys())
        except Exception as exc:  # safetensors raises its own error types
            raise InputError(files[role], f"not a readable safetensors file ({exc})") from None
    return files


def _read_trace(file: Path) -> pl.DataFrame:
    try:
        trace = pl.read_parquet(file)
    except Exception as exc:  # polars / arrow errors of many kinds
        raise InputError(file, f"not a readable Parquet trace ({exc})") from None
    if sorted(trace.columns) != sorted(TRACE_SCHEMA):
        raise InputError(file, f"expected the columns {', '.join(TRACE_SCHEMA)}, found "
                         f"{', '.join(trace.columns) or 'none'}")
    try:
        trace = trace.select(pl.col(c).cast(t, strict=True) for c, t in TRACE_SCHEMA.items())
    except pl.exceptions.PolarsError as exc:
        raise InputError(file, f"a column has the wrong type ({exc})") from None
    for col in TRACE_SCHEMA:
        s = trace[col]
        if col in ("step", "epoch") and s.null_count():
            raise InputError(file, "a value is required here",
                             row=s.is_null().arg_true()[0] + 1, column=col)
        if s.dtype == pl.Float64:
            bad = (s.is_nan() | s.is_infinite()).fill_null(False).arg_true()
            if bad.len():
                raise InputError(file, f"expected a finite number, found {s[bad[0]]}",
                                 row=bad[0] + 1, column=col)
    if trace.height == 0:
        raise InputError(file, "the trace has no rows: expected at least the last step")
    neg = (trace["step"] < 0).arg_true()
    if neg.len():
        raise InputError(file, f"expected a step >= 0, found {trace['step'][neg[0]]}",
                         row=neg[0] + 1, column="step")
    dup = trace["step"].is_duplicated().arg_true()
    if dup.len():
        raise InputError(file, f"step {trace['step'][dup[0]]} appears twice",
                         row=dup[0] + 1, column="step")
    return trace


# --------------------------------------------------------------------------- rows

def _frames(bundle: Path, manifest: dict, files: dict[str, Path], trace: pl.DataFrame) -> Frames:
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
    hp_schema = {"model_id": pl.String, "axis": pl.String, "level": pl.Int64,
                 "value_text": pl.String, "value_num": pl.Float64}
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
        "hyperparameters": (pl.DataFrame(hp, schema=hp_schema), ["model_id", "axis"], ()),
        "outcomes": (pl.DataFrame([{
            "model_id": mid, "train_acc": float(out["train_acc"]),
            "test_acc": float(out["test_acc"]), "train_loss": float(out["train_loss"]),
            "test_loss": float(out["test_loss"]), "gap": float(out["gap"]),
            "converged": out["converged"], "steps": int(out["steps"]),
            "train_size": manifest["dataset"].get("train_size"),
            "test_size": manifest["dataset"].get("test_size")}],
            schema_overrides={"train_size": pl.Int64, "test_size": pl.Int64}), ["model_id"], ()),
        "checkpoints": (pl.DataFrame([{
            "model_id": mid, "role": role, "path": str(files[role].resolve()),
            "sha256": manifest["checkpoints"][role]["sha256"],
            "bytes": int(manifest["checkpoints"][role]["bytes"])} for role in ROLES]),
            ["model_id", "role"], ()),
        "traces": (trace.with_columns(pl.lit(mid).alias("model_id")), ["model_id", "step"], ()),
        "measures": (pl.DataFrame(measures, schema_overrides={"value": pl.Float64}),
                     ["model_id", "measure"], ("computed_at", "code_version", "params")),
    }


# --------------------------------------------------------------------------- one bundle

def prepare_bundle(bundle: Path) -> PreparedBundle:
    """Check a bundle whole and build its rows, without the warehouse. InputError
    names the file, the key and the rule of the first problem found."""
    bundle = Path(bundle)
    manifest_path = bundle / "manifest.json"
    manifest = check_manifest(load_manifest(bundle), manifest_path)
    files = _verified_files(bundle, manifest, manifest_path)
    trace = _read_trace(files["trace"])
    return PreparedBundle(bundle, manifest_path, manifest["model_id"],
                          [h["axis"] for h in manifest["hyperparameters"]],
                          _frames(bundle, manifest, files, trace))


def read_manifest(bundle: Path) -> dict:
    """The manifest, checked, with every file it names verified."""
    bundle = Path(bundle)
    manifest = check_manifest(load_manifest(bundle), bundle / "manifest.json")
    _verified_files(bundle, manifest, bundle / "manifest.json")
    return manifest


def store_bundle(con: duckdb.DuckDBPyConnection, prepared: PreparedBundle, *,
                 replace: bool = False) -> str:
    """Write a prepared bundle in one transaction: 'added', 'updated', 'unchanged', or
    'replaced' (its model_id held another model, and `replace` was given).

    Refused (InputError, nothing written): an axis that differs only by case from one
    the warehouse stores, and, unless `replace`, a model_id the warehouse holds with
    another configuration, seed or dataset. Replacing removes every row of the stored
    model (its measures were computed from other weights) before writing this one."""
    mid, frames = prepared.model_id, prepared.frames
    with transaction(con):
        check_axes_against_warehouse(con, prepared.manifest_path, prepared.axes)
        conflicts = identity_conflicts(con, frames["models"][0])
        if conflicts.height:
            if not replace:
                raise InputError(prepared.manifest_path,
                                 describe_conflict(conflicts.row(0, named=True)))
            for table in PER_MODEL_TABLES:
                con.execute(f"DELETE FROM {table} WHERE model_id = ?", [mid])
        if not conflicts.height:
            _check_same_run(con, prepared, replace)
        _check_levels_in_sweep(con, prepared)
        # the bundle is the whole trace of its model: steps it does not have are stale
        stale = con.execute("DELETE FROM traces WHERE model_id = ? AND NOT list_contains(?, "
                            "step)", [mid, frames["traces"][0]["step"].to_list()]).fetchall()
        results = {table: upsert(con, table, frame, keys, ignore=ignore)
                   for table, (frame, keys, ignore) in frames.items()}
    if conflicts.height:
        return "replaced"
    if results["models"].added.height:
        return "added"
    changed = stale[0][0] or any(r.added.height or r.updated.height
                                 for t, r in results.items() if t != "sweeps")
    return "updated" if changed else "unchanged"


def _check_levels_in_sweep(con: duckdb.DuckDBPyConnection, prepared: PreparedBundle) -> None:
    """Within a sweep one level means one value (warehouse/levels.py): a bundle of a
    grid levelled otherwise than the models its sweep holds (a grid narrowed with
    --set, say, trained elsewhere) is refused, so evaluation never mixes them."""
    manifest = prepared.frames["sweeps"][0].row(0, named=True)
    conflict = sweep_conflict(con, manifest["sweep_id"],
                              prepared.frames["hyperparameters"][0])
    if conflict is not None:
        grid = manifest["name"].rsplit("/", 1)[0]
        raise InputError(prepared.manifest_path, f"{conflict.describe()}: within sweep "
                         f"{manifest['name']!r} a level must mean one value. Train a grid "
                         f"levelled otherwise under a name of its own (fgm-train grid "
                         f"--name NAME, not {grid!r})")


def _check_same_run(con: duckdb.DuckDBPyConnection, prepared: PreparedBundle,
                    replace: bool) -> None:
    """A bundle of a model the warehouse has, same identity. Other final weights: the
    model was trained again (another machine, say); the new run is stored and the
    measures computed from the old weights are dropped (fgm-measure fills them
    again). The same weights with another outcome: the manifest does not describe
    those weights; refused unless `replace`."""
    mid, frames = prepared.model_id, prepared.frames
    checkpoints = frames["checkpoints"][0]
    new_final = checkpoints.filter(pl.col("role") == "final")["sha256"].to_list()
    stored = con.execute("SELECT sha256 FROM checkpoints WHERE model_id = ? AND role = "
                         "'final'", [mid]).fetchall()
    if not stored or not new_final:
        return
    if stored[0][0] != new_final[0]:
        con.execute("DELETE FROM measures WHERE model_id = ? AND NOT list_contains(?, measure)",
                    [mid, list(TRAINING_MEASURES)])
        return
    outcome = frames["outcomes"][0].drop("model_id").row(0, named=True)
    keep = con.execute(f"SELECT {', '.join(outcome)} FROM outcomes WHERE model_id = ?",
                       [mid]).fetchall()
    if keep and not replace:
        before = dict(zip(outcome, keep[0], strict=True))
        differs = [k for k, v in outcome.items() if before[k] != v
                   and not (isinstance(v, float) and isinstance(before[k], float)
                            and math.isclose(v, before[k], rel_tol=0, abs_tol=1e-12))]
        if differs:
            k = differs[0]
            raise InputError(prepared.manifest_path,
                             f"model {mid!r} is in the warehouse with these very weights "
                             f"but another outcome ({k}: stored {before[k]!r}, this bundle "
                             f"{outcome[k]!r}): the manifest does not describe its "
                             "checkpoints. Nothing was written; pass --replace to store it "
                             "anyway")


def ingest_bundle(con: duckdb.DuckDBPyConnection, bundle: Path, *,
                  replace: bool = False) -> str:
    """Check, then write one bundle in one transaction: 'added', 'updated', 'unchanged'
    (or 'replaced', see store_bundle)."""
    return store_bundle(con, prepare_bundle(bundle), replace=replace)


# --------------------------------------------------------------------------- a tree

def find_bundles(root: Path) -> list[Path]:
    """Directories holding a manifest.json (temp directories of killed runs are skipped).
    Symbolic links to directories are not followed (see symlinked_bundles)."""
    return sorted(p.parent for p in root.rglob("manifest.json")
                  if not any(part.startswith(".") for part in p.relative_to(root).parts))


SYMLINKED = ("a symbolic link to a directory holding run bundles ({target}); bundles are "
             "read only from real directories inside the tree: move or copy them in, or "
             "give fgm-ingest that directory")
_SEARCH_LIMIT = 10_000   # directories looked into below one symbolic link


def _holds_a_manifest(top: Path) -> bool:
    """Whether a manifest.json lies in `top` or below (links not followed, hidden
    directories skipped, at most _SEARCH_LIMIT directories looked into)."""
    for n, (_, dirs, files) in enumerate(os.walk(top)):
        if "manifest.json" in files:
            return True
        if n >= _SEARCH_LIMIT:
            return False
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return False


def symlinked_bundles(root: Path) -> list[tuple[Path, str]]:
    """Symbolic links inside the tree to directories that hold bundles, each with why
    it is not read. find_bundles does not follow them: a link may lead out of the
    tree, or back into it (a loop). A link whose target lies inside the tree is left
    out here: the bundles there are read, or refused, at their own paths."""
    refused, top = [], root.resolve()
    for here, dirs, _ in os.walk(root):   # links to directories are in dirs, not entered
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in dirs:
            link = Path(here) / name
            if not link.is_symlink():
                continue
            target = link.resolve()
            if target != top and top not in target.parents and _holds_a_manifest(target):
                refused.append((link, SYMLINKED.format(target=target)))
    return sorted(refused, key=lambda f: str(f[0]))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, FgmError):
        return str(exc)
    return f"unexpected error, {type(exc).__name__}: {exc}"


def ingest_tree(db: Warehouse, root: Path, *, replace: bool = False,
                progress: Callable[[Path], None] | None = None,
                lock_wait: float = LOCK_WAIT) -> TreeReport:
    """Ingest every bundle under `root`; a bad bundle costs that bundle only.

    First every bundle is checked whole (prepare_bundle) with the warehouse closed.
    Bundles that share a model_id are all refused, each reported with the paths of
    the others, and none of them is written: which copy is the model cannot be told
    from the tree (a copy of runs/ under runs/ gives two directories of the same
    name), so the user decides by moving the others out. Only bundles that passed
    their checks count here: a corrupt copy beside a good bundle fails on its own
    and the good one lands. Then each remaining bundle is written in its own
    connection and transaction, opened and closed around the write, so readers are
    never locked out for longer than one bundle's write.

    `db` is the warehouse path (None: $FGM_DB, else ./fgm.duckdb), a function that
    opens a writing connection, or an open connection (used as it is, not closed).
    `progress(bundle)` is called once per bundle when it is done with (failed or
    written), never while the warehouse is open. If the warehouse cannot be opened
    (in use for longer than `lock_wait` seconds, newer schema, ...), the bundles not
    yet written fail with that reason."""
    root = Path(root)
    report = TreeReport(root)
    bundles = find_bundles(root)
    for link, why in symlinked_bundles(root):   # refused, not skipped without a word
        report.failed.append((link, why))
        if progress:
            progress(link)
    prepared: list[PreparedBundle] = []
    for bundle in bundles:
        try:
            prepared.append(prepare_bundle(bundle))
        except Exception as exc:  # any failure costs this bundle only
            report.failed.append((bundle, _reason(exc)))
            if progress:
                progress(bundle)

    by_id: dict[str, list[PreparedBundle]] = defaultdict(list)
    for p in prepared:
        by_id[p.model_id].append(p)
    todo = []
    for p in prepared:
        group = by_id[p.model_id]
        if len(group) == 1:
            todo.append(p)
            continue
        others = ", ".join(str(o.path) for o in group if o is not p)
        report.failed.append((p.path, f"model_id {p.model_id!r} is also the model_id of "
                              f"{others}: one model, {len(group)} bundles, and none of them "
                              "was written. Keep one and move the others out of the tree"))
        if progress:
            progress(p.path)

    open_, close = writer(db, lock_wait)
    for i, p in enumerate(todo):
        try:
            con = open_()
        except Exception as exc:  # the warehouse, not the bundle: nothing more can land
            why = f"not written: {_reason(exc)}"
            report.failed += [(q.path, why) for q in todo[i:]]
            break
        try:
            outcome = store_bundle(con, p, replace=replace)
            setattr(report, outcome, getattr(report, outcome) + 1)
        except Exception as exc:
            report.failed.append((p.path, _reason(exc)))
        finally:
            close(con)
        if progress:
            progress(p.path)

    # a directory with checkpoints but no manifest: a bundle whose manifest was lost
    found = set(bundles)
    orphans = {p.parent for p in root.rglob("*.safetensors")
               if not any(part.startswith(".") for part in p.relative_to(root).parts)
               and not found.intersection(p.parents)}  # a bundle's own subdirectory
    for orphan in sorted(orphans):
        report.failed.append((orphan, "checkpoints without a manifest.json"))
    report.failed.sort(key=lambda f: str(f[0]))
    return report
