"""Measure jobs: compute what the warehouse lacks, from the models' checkpoints.

A measure that fails on a model is stored as NULL with status 'failed' and
its error; the job goes on. Each model's values land in one transaction.
"""

from __future__ import annotations

import dataclasses
import json
import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import duckdb
import polars as pl
import torch
from safetensors.torch import load_file

from fgm.train.bundle import sha256_file
from fgm.train.data import Data
from fgm.train.nin import NiN
from fgm.warehouse import FgmError, code_version, transaction
from fgm.warehouse.store import Warehouse, briefly
from fgm.warehouse.upsert import upsert

from .context import Context, Settings
from .network import NotDefined
from .registry import MeasureSpec, list_measures


@dataclass
class JobReport:
    models: int = 0
    values: int = 0
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # model, measure, error
    skipped: list[tuple[str, str]] = field(default_factory=list)      # model, reason
    seconds: float = 0.0
    not_applicable: int = 0     # values a model's missing inputs (init, trace) rule out

    def __str__(self) -> str:
        na = f"{self.not_applicable} not applicable, " if self.not_applicable else ""
        lines = [f"{self.models} models, {self.values} values computed, "
                 f"{len(self.failed)} failed, {na}{len(self.skipped)} models skipped "
                 f"({self.seconds:.1f} s)"]
        lines += [f"  FAILED {m} {name}: {err}" for m, name, err in self.failed[:20]]
        lines += [f"  SKIPPED {m}: {why}" for m, why in self.skipped[:20]]
        return "\n".join(lines)


def _stale(params: str | None, settings: Settings) -> bool:
    """A stored value computed with another setting than this run's (another
    --spectral method, search seed or budget): computing it again is what was asked."""
    try:
        stored = json.loads(params) if params else {}
    except json.JSONDecodeError:
        return False
    if not isinstance(stored, dict):
        return False
    if "alpha_mag_start" in stored and "alpha_mag_box" not in stored:
        # α' searched before the box had a setting: eq. 58's ε-box, the only one then
        stored = {**stored, "alpha_mag_box": "eps"}
    current = dataclasses.asdict(settings)
    return any(key in current and value is not None and value != current[key]
               for key, value in stored.items())


def models_to_measure(con: duckdb.DuckDBPyConnection, specs: list[MeasureSpec],
                      where: str | None, recompute: bool,
                      model_ids: list[str] | None = None,
                      settings: Settings | None = None) -> pl.DataFrame:
    """model_id, dataset, and the list of measures to compute for each: those
    missing, and those stored with settings that differ from `settings` (None: the
    missing ones only, whatever settings the stored ones had)."""
    from fgm.analysis.predicate import model_ids_where
    from fgm.analysis.sql import create_hp_wide
    # a foreign model's dataset comes with its spec (ingest/zoo.py); fgm's own by name
    sql = ("SELECT m.model_id, m.dataset, coalesce(b.dataset_id, m.dataset) AS data_key, "
           "CAST(d.spec AS VARCHAR) AS dataset_spec, d.sha256 AS dataset_sha256 "
           "FROM models AS m LEFT JOIN model_builds AS b USING (model_id) "
           "LEFT JOIN datasets AS d ON d.dataset_id = b.dataset_id WHERE model_id IN "
           "(SELECT model_id FROM checkpoints WHERE role = 'final')")
    params: list = []
    if where is not None:
        # one checked expression over hp_wide's columns, run on its own (see
        # analysis/predicate.py); only the ids it selects reach this query
        create_hp_wide(con)
        sql += " AND list_contains(?::VARCHAR[], model_id)"
        params.append(model_ids_where(con, where))
    models = con.sql(sql + " ORDER BY model_id", params=params).pl()
    if model_ids is not None:
        models = models.filter(pl.col("model_id").is_in(model_ids))
    # only these models' rows: the stale check parses each row's params, and on a
    # paper-size warehouse all of them would cost seconds per model of a grid
    done = con.sql("SELECT model_id, measure, params FROM measures WHERE status <> 'missing' "
                   "AND list_contains(?::VARCHAR[], model_id)",
                   params=[models["model_id"].to_list()]).pl()
    if settings is not None and done.height:
        fresh = [not _stale(p, settings) for p in done["params"].to_list()]
        done = done.filter(pl.Series(fresh, dtype=pl.Boolean))
    done = done.select("model_id", "measure")
    names = [s.name for s in specs]
    todo = models.join(pl.DataFrame({"measure": names}), how="cross")
    if not recompute:
        todo = todo.join(done, on=["model_id", "measure"], how="anti")
    return todo.group_by("model_id", "dataset", "data_key", "dataset_spec", "dataset_sha256",
                         maintain_order=True).agg(pl.col("measure"))


def _load_net(path: str, sha: str, hp: dict, data: Data, build: dict | None = None):
    """The checkpoint in its network: a NiN of the model's hyperparameters (fgm's
    own models), or the architecture it was ingested with (`build`: ingest/zoo.py)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: checkpoint not found (moved? ingest its bundle "
                                "or table again)")
    if sha256_file(file) != sha:
        raise ValueError(f"{file}: checkpoint differs from the warehouse's sha256")
    if build is not None:
        from fgm.ingest.zoo import build_model, load_weights
        model = build_model(build["spec"], build["kwargs"])
        load_weights(model, file)
        return model
    model = NiN(data.shape[0], data.num_classes, int(float(hp["width"])), int(float(hp["depth"])),
                float(hp["dropout"]))
    model.load_state_dict(load_file(str(file)))
    return model


@dataclass
class ModelInputs:
    """What the warehouse says about one model: enough to rebuild it without it.
    `build`: a model fgm did not train: {spec, kwargs, num_classes} (ingest/zoo.py)."""
    hp: dict[str, str]
    checkpoints: dict[str, tuple[str, str]]   # role -> (path, sha256)
    trace: pl.DataFrame
    build: dict | None = None


def model_inputs(con: duckdb.DuckDBPyConnection, model_id: str) -> ModelInputs:
    hp = dict(con.sql("SELECT axis, coalesce(CAST(value_num AS VARCHAR), value_text) "
                      "FROM hyperparameters WHERE model_id = ?", params=[model_id]).fetchall())
    ck = {r: (p, s) for r, p, s in con.sql(
        "SELECT role, path, sha256 FROM checkpoints WHERE model_id = ?",
        params=[model_id]).fetchall()}
    trace = con.sql("SELECT step, train_loss FROM traces WHERE model_id = ? ORDER BY step",
                    params=[model_id]).pl()
    build = con.sql("SELECT CAST(a.spec AS VARCHAR), CAST(b.kwargs AS VARCHAR), b.num_classes "
                    "FROM model_builds AS b JOIN architectures AS a USING (arch_id) "
                    "WHERE b.model_id = ?", params=[model_id]).fetchall()
    return ModelInputs(hp, ck, trace, {"spec": json.loads(build[0][0]),
                                       "kwargs": json.loads(build[0][1]),
                                       "num_classes": int(build[0][2])} if build else None)


def build_context(inputs: ModelInputs, data: Data, settings: Settings,
                  device: torch.device) -> Context:
    ck = inputs.checkpoints
    nets = {role: _load_net(*ck[role], inputs.hp, data, inputs.build).to(device) for role in ck}
    outcome = {}
    if inputs.build is None:    # fgm's own: the run bundle's outcome (steps to 0.1, ...)
        manifest = Path(ck["final"][0]).parent / "manifest.json"
        run = json.loads(manifest.read_text()) if manifest.is_file() else {}
        outcome = run.get("outcome", {})
        n = (run.get("train") or {}).get("train_examples")
        if n and len(data.x_train) != n:   # trained on the first n images: measured on them
            from fgm.train.data import first_examples

            from .context import measure_layout
            data = first_examples(data, int(n)).to(data.x_train.device)
            data.x_train = measure_layout(data.x_train)
    classes = inputs.build["num_classes"] if inputs.build is not None else data.num_classes
    return Context.from_models(nets["final"], data.x_train, data.y_train, classes,
                               init=nets.get("init"), epoch1=nets.get("epoch1"),
                               trace=inputs.trace if inputs.trace.height else None,
                               outcome=outcome, settings=settings)


# why a measure does not apply to a model that lacks one of its inputs
LACKING = {"init": "no initial weights (checkpoint.init) were given for this model",
           "epoch1": "no weights after epoch 1 (checkpoint.epoch1) were given for this model",
           "trace": "no training trace was given for this model"}


def lacking_inputs(spec: MeasureSpec, given: set[str]) -> list[str]:
    """The inputs `spec` needs that a model lacks (`given`: final, init, epoch1, data,
    trace as the model has them)."""
    return [n for n in spec.needs if n not in given]


def run_one(spec: MeasureSpec, ctx: Context) -> tuple[float | None, str, str | None, dict]:
    """(value, status, error, params) for one measure on one model; never raises.
    Out of device memory: once more with a quarter of the evaluation batch (kept for
    the model's other measures); out of memory again, the measure fails."""
    try:
        try:
            out = spec.fn(ctx)
        except torch.OutOfMemoryError:
            if ctx.settings.batch <= 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            ctx.settings = dataclasses.replace(ctx.settings, batch=max(1, ctx.settings.batch // 4))
            out = spec.fn(ctx)
        value, params = out if isinstance(out, tuple) else (out, {})
        value = float(value)
        if not math.isfinite(value):
            return None, "failed", f"not finite ({value})", params
        return value, "ok", None, params
    except NotDefined as exc:   # the architecture's, not a failure: nothing to retry
        return None, "not_applicable", str(exc), {}
    except Exception as exc:  # a measure's failure is data, not a crash
        where = traceback.extract_tb(exc.__traceback__)[-1]
        # the settings it failed with: a run with others (a bigger budget) tries again
        return None, "failed", f"{type(exc).__name__}: {exc} ({Path(where.filename).name}:" \
                               f"{where.lineno})", dataclasses.asdict(ctx.settings)


# What makes a model unmeasurable as a whole (its checkpoints moved or changed, its
# dataset missing): the model is skipped and reported, nothing is stored for it.
SKIP_ERRORS = (FgmError, OSError, ValueError, KeyError, RuntimeError)
ROW_KEYS = ("model_id", "measure", "value", "status", "error", "params")


def compute_model_measures(model_id: str, inputs: ModelInputs, data: Data, names: list[str],
                           settings: Settings, device: torch.device,
                           specs: dict[str, MeasureSpec] | None = None,
                           progress: Callable[[str, int, int], None] | None = None
                           ) -> list[dict]:
    """Rebuild one model and compute `names` on it: one plain row per measure
    (ROW_KEYS; params as JSON text). Needs no warehouse, so a Ray worker runs it as
    it is. Raises one of SKIP_ERRORS when the model itself cannot be rebuilt."""
    specs = specs or {s.name: s for s in list_measures()}
    given = {"final", "data", *(r for r in ("init", "epoch1") if r in inputs.checkpoints),
             *(("trace",) if inputs.trace.height or inputs.build is None else ())}
    ctx = build_context(inputs, data, settings, device)
    rows = []
    for i, name in enumerate(names, 1):
        if progress:
            progress(name, i, len(names))
        lacking = lacking_inputs(specs[name], given)
        if lacking:   # not a failure: the model was given without that input
            rows.append({"model_id": model_id, "measure": name, "value": None,
                         "status": "not_applicable",
                         "error": "; ".join(LACKING[n] for n in lacking), "params": "{}"})
            continue
        value, status, error, params = run_one(specs[name], ctx)
        rows.append({"model_id": model_id, "measure": name, "value": value, "status": status,
                     "error": error, "params": json.dumps(params, default=str)})
    return rows


def check_measure_rows(rows: object, model_id: str, names: list[str]) -> list[dict]:
    """Rows that came back from elsewhere (a Ray worker), checked before they are
    stored: one per asked measure of this model, a finite number with status 'ok' or
    NULL with status 'failed' and an error, params a JSON object. ValueError names
    the first problem."""
    if not isinstance(rows, list):
        raise ValueError(f"expected a list of rows, got {type(rows).__name__}")
    seen = []
    for r in rows:
        if not isinstance(r, dict) or set(r) != set(ROW_KEYS):
            raise ValueError(f"a row must have exactly the keys {', '.join(ROW_KEYS)}: {r!r:.200}")
        where = f"{r['measure']!r}"
        if r["model_id"] != model_id:
            raise ValueError(f"{where}: a row of model {r['model_id']!r}, not {model_id!r}")
        if r["measure"] not in names:
            raise ValueError(f"{where}: not a measure that was asked for")
        value, status, error = r["value"], r["status"], r["error"]
        if status == "ok":
            try:
                finite = (not isinstance(value, bool) and isinstance(value, int | float)
                          and math.isfinite(float(value)))
            except OverflowError:    # an int too large for a float
                finite = False
            if not finite or error is not None:
                raise ValueError(f"{where}: status 'ok' needs a finite number and no error, "
                                 f"got {value!r}")
        elif status in ("failed", "not_applicable"):
            if value is not None or not isinstance(error, str) or not error:
                raise ValueError(f"{where}: status {status!r} needs no value and an error")
        else:
            raise ValueError(f"{where}: status {status!r}; expected 'ok', 'failed' or "
                             "'not_applicable'")
        try:   # strict JSON: NaN and Infinity are Python's, not JSON's
            params = (json.loads(r["params"], parse_constant=_not_json)
                      if isinstance(r["params"], str) else None)
        except ValueError:   # JSONDecodeError is one
            params = None
        if not isinstance(params, dict):
            raise ValueError(f"{where}: params must be a JSON object as text")
        seen.append(r["measure"])
    if sorted(seen) != sorted(names):
        missing = sorted(set(names) - set(seen)) or sorted(n for n in seen if seen.count(n) > 1)
        raise ValueError(f"the rows do not match the measures asked for ({', '.join(missing)})")
    return [dict(r, value=None if r["value"] is None else float(r["value"])) for r in rows]


def _not_json(name: str):
    raise ValueError(f"{name} is not JSON")


def store_measure_rows(db: Warehouse, rows: list[dict], report: JobReport) -> None:
    """One model's rows in one transaction (the same upsert, whichever executor
    computed them), counted into `report`."""
    now, version = datetime.now().replace(microsecond=0), code_version()
    rows = [dict(r, computed_at=now, code_version=version) for r in rows]
    frame = pl.DataFrame(rows, schema_overrides={"value": pl.Float64, "error": pl.String})
    with briefly(db) as con, transaction(con):
        upsert(con, "measures", frame, ["model_id", "measure"], ignore=("computed_at",))
    report.models += 1
    report.values += sum(r["status"] == "ok" for r in rows)
    report.failed += [(r["model_id"], r["measure"], r["error"]) for r in rows
                      if r["status"] == "failed"]
    report.not_applicable += sum(r["status"] == "not_applicable" for r in rows)


def measure_models(db: Warehouse, *, pattern: str = "*",
                   where: str | None = None, recompute: bool = False,
                   model_ids: list[str] | None = None,
                   data_root: Path | None = None, device: torch.device | None = None,
                   settings: Settings | None = None,
                   refresh_stale: bool = True) -> JobReport:
    """Compute what the warehouse lacks, in this process, one model after another:
    fgm-measure's driver loop (train/driver.py) with one in-process worker and
    nothing printed. `db`: a path, a connection factory or an open connection
    (warehouse.store.Warehouse); the warehouse is opened only to read a model's inputs
    and to write its values, never while a measure computes.
    refresh_stale=False: values stored with other settings are kept (a grid's resume
    fills gaps; only fgm-measure recomputes what another budget computed)."""
    from rich.console import Console

    from fgm.train.driver import measure_run
    from fgm.train.executor import ExecutorSettings
    from fgm.train.pool import LocalBackend
    backend = LocalBackend(ExecutorSettings(workers=1), str(device or "cpu"))
    with backend:
        return measure_run(db, Console(quiet=True), backend, pattern=pattern, where=where,
                           recompute=recompute, data_root=data_root, settings=settings,
                           model_ids=model_ids, refresh_stale=refresh_stale)
