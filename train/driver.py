"""The one driver loop of fgm-train grid and fgm-measure, whatever runs the tasks.

An executor (a Backend) only decides where a task runs: worker processes on this
machine (train/pool.py, `--executor local`, the default) or a Ray cluster
(train/ray_executor.py). It takes tasks with submit() and hands them back as they
finish with wait(), like concurrent.futures. Everything else is here, once:

- the queue of model tasks (train, then measure), as many in flight as the
  executor has room for;
- progress: done / running / queued / failed, models per hour, an ETA, and per
  model which measure is running (where the executor reports it);
- failures: a task that failed for good stores its model as failed (the grid
  goes on); a worker that died is retried by the executor;
- Ctrl-C: the results already complete are stored, the tasks in flight stopped,
  a summary printed, and running the same command again resumes;
- the warehouse: this process is its one writer. Workers never open it; each
  result is checked (prepare_bundle, check_measure_rows) and written in its own
  short transaction, so readers get in between.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fgm.warehouse import FgmError, InputError, WarehouseLocked
from fgm.warehouse.store import briefly

from .bundle import clean_stale
from .grid import AXES, Config
from .tasks import DataSpec, measure_task, node, train_task


class Backend(Protocol):
    """Where tasks run. Tickets are whatever the backend hands out."""
    inline: bool          # tasks run in this very process (Ctrl-C interrupts them)

    def describe(self) -> str: ...
    def capacity(self) -> int: ...
    def threads(self) -> int: ...
    def use_gpu(self) -> bool: ...
    def data(self, spec: DataSpec) -> object: ...     # what a task gets for its dataset
    def submit(self, fn: Callable, *args) -> object: ...
    def wait(self, tickets: list, timeout: float) -> list: ...
    def result(self, ticket) -> tuple[bool, object]: ...
    def cancel(self, ticket) -> None: ...
    def failure(self, exc: BaseException) -> str: ...


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def short(config: Config) -> str:
    v = config.values
    return (f"w={v['width']} d={v['depth']} p={v['dropout']} bs={v['batch_size']} "
            f"{v['optimizer']} lr={v['learning_rate']:g} wd={v['weight_decay']:g}")


# --------------------------------------------------------------------------- progress

class Display:
    """done / running / queued / failed, models per hour and an ETA: a rich bar on a
    terminal, plain lines elsewhere."""

    def __init__(self, console: Console, title: str, total: int):
        self.console, self.title, self.total = console, title, total
        self.started = self.done = self.failed = 0
        self.start = time.monotonic()
        self.activity: dict[str, str] = {}    # model label -> what its task is doing
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
        self.bar = Progress(*columns, console=console, disable=not console.is_terminal)

    def __enter__(self) -> Display:
        self.bar.__enter__()
        self.task = self.bar.add_task(self.title, total=self.total, status="")
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def rate(self) -> float:
        hours = (time.monotonic() - self.start) / 3600
        return (self.done + self.failed) / hours if hours > 0 else 0.0

    def status(self) -> str:
        running = self.started - self.done - self.failed
        text = (f"done {self.done} · running {running} · queued {self.total - self.started} "
                f"· failed {self.failed} · {self.rate():.0f} models/h")
        if self.activity:
            text += " · " + "; ".join(self.activity.values())
        return text

    def refresh(self) -> None:
        self.bar.update(self.task, completed=self.done + self.failed, status=self.status())

    def line(self, text: str) -> None:
        if self.console.is_terminal:
            self.bar.console.print(text, highlight=False, markup=False)
        else:
            click.echo(text)

    def summary(self) -> str:
        running = self.started - self.done - self.failed
        return (f"{self.done} of {self.total} models done, {self.failed} failed, {running} "
                f"stopped in flight, {self.total - self.started} not started")


# --------------------------------------------------------------------------- scheduling

@dataclass
class Job:
    kind: str                      # "train" | "measure"
    model_id: str
    label: str
    config: Config | None = None
    seed: int | None = None
    names: list[str] = field(default_factory=list)
    dataset: str | None = None     # which dataset the task gets
    first: bool = True             # the model's first job (counts it as started)
    reported: bool = False         # its result was counted and shown (a retried write
    stored: bool = False           # after WarehouseLocked does neither twice)
    train_seconds: float | None = None


class Interrupted(Exception):
    """Ctrl-C: what was complete is stored; `cancelled` tasks were stopped in flight."""

    def __init__(self, cancelled: int):
        super().__init__(cancelled)
        self.cancelled = cancelled


def schedule(backend: Backend, queue: deque, display: Display,
             submit: Callable[[Job], object], finish: Callable[[Job, bool, object], None]) -> None:
    """Keep the executor full from `queue` (which `finish` may add to, at the front)
    and hand each result to `finish(job, ok, value_or_error)` as it completes.

    A reader that holds the warehouse longer than a write waits (WarehouseLocked
    from `submit` or `finish`) costs nothing: the job goes back to the queue, the
    result waits in `pending` and is handed over again while the tasks run on.

    Ctrl-C is taken between results, never in the middle of a write: the results
    already complete are still handed over, the tasks in flight stopped, and
    Interrupted(number stopped) raised. A second Ctrl-C (or the first, where tasks
    run in this process) stops at once. On any other error everything in flight is
    stopped."""
    inflight: dict = {}
    stop: list[int] = []
    pending: deque = deque()      # (job, ok, value) whose write found the warehouse held

    def on_sigint(signum, frame):
        if stop or backend.inline:
            raise KeyboardInterrupt
        stop.append(signum)

    def fill() -> None:
        while queue and not stop and len(inflight) < max(1, backend.capacity()):
            job = queue.popleft()
            try:
                ticket = submit(job)
            except WarehouseLocked:      # its inputs could not be read: later
                queue.appendleft(job)
                break
            display.started += job.first
            job.first = False
            inflight[ticket] = job
        display.refresh()

    def hand_over(job: Job, ok: bool, value) -> bool:
        try:
            finish(job, ok, value)
        except WarehouseLocked as exc:
            if not pending:
                display.line(f"waiting to write: {first_line(exc)}")
            pending.append((job, ok, value))
            return False
        return True

    def handle(ticket, ok_only: bool = False) -> None:
        job = inflight.pop(ticket)
        display.activity.pop(job.label, None)
        fill()   # the workers go on while the driver stores this one
        ok, value = backend.result(ticket)
        if ok or not ok_only:
            hand_over(job, ok, value)
        display.refresh()

    def retry_pending() -> None:
        for _ in range(len(pending)):
            if not hand_over(*pending.popleft()):
                break

    def stop_inflight() -> None:
        for ticket in list(inflight):
            backend.cancel(ticket)

    def progress(ticket, info) -> None:
        """A task's report (train/pool.py report()): what it is doing, on the bar."""
        job = inflight.get(ticket)
        if job is None or not info:
            return
        if info[0] == "measure":
            _, name, i, n = info
            display.activity[job.label] = f"{name} {i}/{n}"
        elif info[0] == "train":
            _, step, estimate = info
            display.activity[job.label] = f"step {step} ce {estimate:.3f}"
        display.refresh()

    backend.progress = progress
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main else None
    try:
        try:
            fill()
            while (inflight or pending or queue) and not stop:
                retry_pending()
                fill()
                if not inflight:
                    continue
                for ticket in backend.wait(list(inflight), 1.0):
                    if stop:
                        break
                    handle(ticket)
                fill()
        except KeyboardInterrupt:
            if stop or not backend.inline:   # a second Ctrl-C: at once
                stop_inflight()
                raise Interrupted(len(inflight)) from None
            stop.append(signal.SIGINT)
        if stop and inflight:
            for ticket in backend.wait(list(inflight), 0):   # finished: nothing is lost
                if ticket in inflight:
                    handle(ticket, ok_only=True)
            stop_inflight()
        if stop:
            retry_pending()
            if pending:     # bundles stay on disk (the next run ingests them); rows do not
                display.line(f"{len(pending)} result(s) not written: the warehouse was "
                             "held; the next run ingests their bundles or measures again")
            raise Interrupted(len(inflight))
    except BaseException:
        stop_inflight()
        raise
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------- grids

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


def measure_summary(db, model_id: str) -> str:
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


def ingest_finished(out: Path, model_ids: list[str], db, console: Console) -> None:
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
            with briefly(db) as con:
                store_bundle(con, prepared)
        except InputError as exc:    # the bundle stays on disk, the grid goes on
            refused.append(m)
            console.print(f"refused the finished bundle {out / m}: {exc}", soft_wrap=True)
    if len(missing) > len(refused):
        console.print(f"ingested {len(missing) - len(refused)} finished bundle(s) the "
                      f"warehouse lacked")


def _largest_first(job: tuple) -> float:
    """A model's work, roughly: NiN blocks grow as width² (the 1x1 convolutions), one
    per depth; the same order for equal sizes as the grid's (sorted is stable)."""
    values = job[0].values
    try:
        return -float(values.get("width", 1)) ** 2 * float(values.get("depth", 1))
    except (TypeError, ValueError):
        return 0.0


class GridRun:
    def __init__(self, plan: GridPlan, backend: Backend):
        from fgm.measures.runner import JobReport
        self.plan, self.backend = plan, backend
        self.queue: deque[Job] = deque()
        self.report = JobReport()
        self.not_converged = 0
        self.failures: list[tuple[str, str]] = []
        self.trained = 0
        self.mirrored = False

    def run(self) -> None:
        p, b = self.plan, self.backend
        g, out = p.grid, p.out
        p.console.print(f"grid {g.name!r} on {g.dataset}: {len(p.jobs)} models, "
                        f"{len(p.jobs) - len(p.todo)} already finished, {len(p.todo)} to "
                        f"train on {b.describe()}", soft_wrap=True)
        finished = p.finished
        measure_jobs = []
        if not p.no_ingest:
            ingest_finished(out, finished, p.db, p.console)
            if finished and not p.no_measures:   # a run killed between ingest and measures
                labels = {mid: f"{short(c)} seed {s}" for c, s, mid in p.jobs}
                measure_jobs = [Job("measure", mid, labels[mid], names=names)
                                for mid, names in self._missing_measures(finished).items()]
        if not p.todo and not measure_jobs:
            return
        self.data = b.data(DataSpec(g.dataset, p.data_root, p.download,
                                    train_examples=g.train.get("train_examples")))
        self.queue.extend(measure_jobs)
        # the largest models first: the last to finish are then small ones, and no
        # worker waits long on the others at the end (longest processing time first)
        self.queue.extend(Job("train", mid, f"{short(c)} seed {s}", c, s)
                          for c, s, mid in sorted(p.todo, key=_largest_first))
        total = len(p.todo) + len(measure_jobs)
        start = time.perf_counter()
        with Display(p.console, g.name, total) as self.display:
            try:
                schedule(b, self.queue, self.display, self.submit, self.finish)
            except Interrupted:
                self._store_landed()
                click.echo(f"interrupted: {self.display.summary()}; what finished is stored; "
                           f"run the same command again to resume", err=True)
                raise SystemExit(130) from None
        stale = clean_stale(out)    # temp directories of workers that died
        seconds = time.perf_counter() - start
        rate = total / seconds * 3600 if seconds > 0 else 0.0
        text = (f"done: {self.trained} models trained into {out} "
                f"({seconds:.1f} s, {rate:.0f} models/h)")
        if self.not_converged:
            text += f", {self.not_converged} not converged (kept, flagged)"
        if stale:
            text += f", {len(stale)} temp dir(s) of dead workers removed"
        click.echo(text)
        if self.failures:
            where = "" if p.no_ingest else " (stored as failed; run again to retry them)"
            click.echo(f"{len(self.failures)} model(s) failed{where}:")
            for label, why in self.failures:
                click.echo(f"  FAILED {label}: {why}")
            raise SystemExit(1)

    def _store_landed(self) -> None:
        """Ctrl-C: bundles that workers finished but whose results the driver had not
        taken yet (they landed on disk in the last moments) are stored now, so that
        "what finished is stored" holds. A second Ctrl-C leaves them for the rerun."""
        p = self.plan
        if p.no_ingest:
            return
        landed = [mid for _, _, mid in p.todo if (p.out / mid / "manifest.json").is_file()]
        try:
            ingest_finished(p.out, landed, p.db, p.console)
        except (KeyboardInterrupt, FgmError, OSError) as exc:
            click.echo(f"note: {len(landed)} finished bundle(s) not stored now ({exc!s:.200}); "
                       "the rerun stores them", err=True)

    def _missing_measures(self, model_ids: list[str]) -> dict[str, list[str]]:
        from fgm.measures.registry import list_measures, mirror_definitions
        from fgm.measures.runner import models_to_measure
        with briefly(self.plan.db) as con:
            if not self.mirrored:        # the registry into measure_definitions, once
                mirror_definitions(con)
                self.mirrored = True
            # the missing ones only: values fgm-measure computed with another budget stay
            todo = models_to_measure(con, list_measures(), None, False, model_ids, None)
        return {r["model_id"]: r["measure"] for r in todo.iter_rows(named=True)}

    def submit(self, job: Job):
        p, b = self.plan, self.backend
        if job.kind == "train":
            return b.submit(train_task, p.grid, job.config, job.seed, job.model_id, self.data,
                            str(p.out), b.use_gpu(), b.threads(), p.precision, p.compile)
        from fgm.measures.context import Settings
        from fgm.measures.runner import model_inputs
        with briefly(p.db) as con:
            inputs = model_inputs(con, job.model_id)
        return b.submit(measure_task, job.model_id, inputs, self.data, job.names, Settings(),
                        b.use_gpu(), b.threads())

    def finish(self, job: Job, ok: bool, value) -> None:
        if job.kind == "measure":
            why = finish_measures(self.backend, self.plan.db, self.report, self.display, job,
                                  ok, value, summary=True)
            if why:
                self.failures.append((f"measures of {job.label}", why))
            return
        if not ok:
            from .bundle import is_complete
            from .tasks import finished_bundle
            if is_complete(self.plan.out, job.model_id):   # its worker died after writing it
                self._trained(job, finished_bundle(self.plan.out, job.model_id))
            else:
                self._failed(job, self.backend.failure(value))
            return
        self._trained(job, value)

    def _trained(self, job: Job, value: dict) -> None:
        """A finished training task: its bundle checked, stored, its measures queued.
        Called again for the same job when a write found the warehouse held (flags)."""
        from fgm.ingest.bundles import prepare_bundle, store_bundle
        p = self.plan
        if not job.reported:
            expected = p.out / job.model_id
            bundle = Path(str(value.get("bundle")))
            if bundle.resolve() != expected.resolve():   # only its own place under --out
                self._failed(job, f"its task returned the bundle path {bundle}, not "
                                  f"{expected}")
                return
            if not (bundle / "manifest.json").is_file():
                raise FgmError(f"{bundle}: node {value['node']} wrote this run bundle, but "
                               f"this driver does not see it; --out must be storage that "
                               f"every node and the driver share")
            self.trained += 1
            job.reported = True
            o = value["outcome"]
            self.not_converged += not o.get("converged", False)
            gpu = (f", {value['gpu_memory'] / 2**20:.0f} MiB GPU" if value.get("gpu_memory")
                   else "")
            where = f" on {value['node']}" if value.get("node") != node() else ""
            how = ("finished earlier (its bundle was on disk)" if value.get("reused") else
                   f"trained in {value['seconds']:.1f} s{where}{gpu}")
            self.display.line(
                f"[{self.trained}/{len(p.todo)}] {job.label}: "
                f"{'converged' if o.get('converged') else 'NOT converged'} in "
                f"{o.get('steps')} steps ({how}), train ce {o.get('train_loss', math.nan):.4f}, "
                f"gap {o.get('gap', math.nan):.4f}")
            if p.no_ingest:
                self.display.done += 1
                return
        if not job.stored:
            try:
                prepared = prepare_bundle(p.out / job.model_id)
                if prepared.model_id != job.model_id:
                    raise InputError(p.out / job.model_id, f"the bundle is of model "
                                     f"{prepared.model_id}, not {job.model_id}")
                with briefly(p.db) as con:
                    store_bundle(con, prepared)
            except InputError as exc:    # the bundle on disk stays the record of it
                self._failed(job, f"its bundle was refused: {exc}", store=False)
                return
            job.stored = True
        names = [] if p.no_measures else self._missing_measures([job.model_id]).get(
            job.model_id, [])
        if names:
            self.queue.appendleft(Job("measure", job.model_id, job.label, names=names,
                                      first=False))
        else:
            self.display.done += 1

    def _failed(self, job: Job, why: str, store: bool = True) -> None:
        p = self.plan
        stored = ""
        if store and not p.no_ingest:   # first: a held warehouse retries all of this
            from fgm.ingest.failed import store_failed_model
            g, c = p.grid, job.config
            with briefly(p.db) as con:
                store_failed_model(
                    con, model_id=job.model_id, sweep=f"{g.name}/{g.dataset}",
                    dataset=g.dataset, sweep_config=g.as_dict(), seed=job.seed,
                    config_hash=c.hash, error=why,
                    hyperparameters=[{"axis": a, "value": c.values[a], "level": c.levels[a]}
                                     for a in AXES])
            stored = " (stored as failed)"
        self.failures.append((job.label, why))
        self.display.failed += 1
        self.display.line(f"FAILED {job.label}: {why}{stored}")


def finish_measures(backend: Backend, db, report, display: Display, job: Job, ok: bool,
                    value, summary: bool = False) -> str | None:
    """A measure task's result into the warehouse, checked before it is written. A
    task that failed for good (its worker died --max-retries + 1 times) stores
    nothing: values stored before stay, the next run measures the model again; the
    reason is returned."""
    from fgm.measures.runner import check_measure_rows, store_measure_rows
    if ok and isinstance(value, dict) and "skipped" in value:
        report.skipped.append((job.model_id, value["skipped"]))
        display.line(f"measures of {job.label}: skipped ({value['skipped']})")
        display.done += 1
        return None
    if ok:
        try:
            rows = check_measure_rows(value.get("rows") if isinstance(value, dict) else value,
                                      job.model_id, job.names)
        except ValueError as exc:
            report.skipped.append((job.model_id, f"rows refused: {exc}"))
            display.line(f"measures of {job.label}: rows refused ({exc})")
            display.failed += 1
            return f"rows refused: {exc}"
    else:    # not the measures' failure but the task's: nothing is stored
        why = f"measure task failed: {backend.failure(value)}"
        report.skipped.append((job.model_id, f"{why}; nothing stored, run again to retry"))
        display.failed += 1
        display.line(f"measures of {job.label}: {why}; nothing stored, the next run "
                     f"measures it again")
        return why
    store_measure_rows(db, rows, report)
    display.done += 1
    seconds = value.get("seconds") if isinstance(value, dict) else None
    took = f" (computed in {seconds:.1f} s)" if seconds is not None else ""
    if summary:      # fgm-train grid: a line per model
        try:
            display.line(f"measures of {job.label}{measure_summary(db, job.model_id)}{took}")
        except WarehouseLocked:     # stored already: only the line is lost
            display.line(f"measures of {job.label}: {sum(r['status'] == 'ok' for r in rows)} "
                         f"values stored{took}")
    return None


# --------------------------------------------------------------------------- fgm-measure

def measure_run(db, console: Console, backend: Backend, *, pattern: str = "*",
                where: str | None = None, recompute: bool = False,
                data_root: Path | None = None, settings=None,
                model_ids: list[str] | None = None, refresh_stale: bool = True):
    """fgm-measure: what the warehouse lacks, one task per model; a JobReport."""
    from fgm.measures.context import Settings
    from fgm.measures.registry import list_measures, mirror_definitions
    from fgm.measures.runner import SKIP_ERRORS, JobReport, model_inputs, models_to_measure
    specs = list_measures(pattern)
    if not specs:
        names = ", ".join(s.name for s in list_measures())
        raise FgmError(f"no measure matches {pattern!r}; measures: {names}")
    settings = settings or Settings()
    with briefly(db) as con:
        # --where is checked (and refused) here, before the first write
        todo = models_to_measure(con, specs, where, recompute, model_ids,
                                 settings if refresh_stale else None)
        mirror_definitions(con)
    report, start = JobReport(), time.perf_counter()
    data: dict[str, object] = {}
    for row in todo.unique(["data_key"], maintain_order=True).iter_rows(named=True):
        try:   # fgm's own datasets by name; a foreign model's as ingested (its spec)
            data[row["data_key"]] = backend.data(DataSpec(
                row["dataset"], data_root, spec=row["dataset_spec"],
                sha256=row["dataset_sha256"]))
        except SKIP_ERRORS as exc:     # its models are skipped, with why
            data[row["data_key"]] = exc
    queue: deque[Job] = deque()
    for row in todo.iter_rows(named=True):
        if isinstance(data[row["data_key"]], Exception):
            report.skipped.append((row["model_id"], str(data[row["data_key"]])))
        else:
            queue.append(Job("measure", row["model_id"], row["model_id"],
                             names=list(row["measure"]), dataset=row["data_key"]))
    if queue:
        console.print(f"{len(queue)} models to measure on {backend.describe()}",
                      soft_wrap=True)

    def submit(job: Job):
        with briefly(db) as con:
            inputs = model_inputs(con, job.model_id)
        return backend.submit(measure_task, job.model_id, inputs, data[job.dataset], job.names,
                              settings, backend.use_gpu(), backend.threads())

    def finish(job: Job, ok: bool, value) -> None:
        finish_measures(backend, db, report, display, job, ok, value)

    with Display(console, "measures", len(queue)) as display:
        try:
            schedule(backend, queue, display, submit, finish)
        except Interrupted:
            report.seconds = time.perf_counter() - start
            click.echo(f"interrupted: {display.summary()}; what finished is stored; run "
                       f"the same command again to resume\n{report}", err=True)
            raise SystemExit(130) from None
    report.seconds = time.perf_counter() - start
    return report
