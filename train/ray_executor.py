"""--executor ray: one Ray task per model, this process the warehouse's one writer.

The driver (this process) connects to Ray (a local instance it starts, or a
cluster it joins with --address), puts the dataset into Ray's object store once,
and keeps as many tasks in flight as the cluster has room for. A training task
(train/tasks.py) writes its run bundle under --out, which every node must see,
and returns the bundle's path; a measure task returns its rows. As each result
comes the driver checks it as the local path does (prepare_bundle for a bundle,
check_measure_rows for rows) and writes it in its own short transaction, so a
reader is never locked out for long. Workers never open the warehouse.

Faults: Ray retries a task whose worker died up to --max-retries times; a model
that still fails is stored as failed (ingest/failed.py) and the grid goes on.
Killed (Ctrl-C or kill -9), the next run of the same command resumes from the
bundles on disk: finished ones are ingested, never trained again.
"""

from __future__ import annotations

import logging
import math
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fgm.warehouse import FgmError, InputError, WarehouseLocked
from fgm.warehouse.store import briefly

from .bundle import clean_stale
from .executor import ExecutorSettings, GridPlan
from .tasks import OutNotWritable, measure_task, train_task

PROBE_SECONDS = 5.0      # an address where nothing answers fails in this time, not Ray's minutes
CAPACITY_EVERY = 10.0    # seconds between looks at the cluster's size (nodes come and go)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise FgmError("--executor ray needs Ray, which is not installed here: "
                       "pip install 'fgm[ray]'") from None
    return ray


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


NO_AUTO = ("--address auto: no Ray cluster runs on this machine; start one with `ray start "
           "--head`, or leave --address out to start a Ray instance for this run alone")


def probe_address(address: str) -> None:
    """Fail in seconds, naming the address, where no Ray cluster answers: Ray itself
    keeps retrying a missing cluster for minutes."""
    if address == "auto":   # $RAY_ADDRESS, else the cluster last started on this machine
        try:
            from ray._private.services import canonicalize_bootstrap_address
            found = canonicalize_bootstrap_address("auto")
        except Exception:   # noqa: BLE001 - Ray's private API moved: let ray.init look
            return
        if found is None:
            raise FgmError(NO_AUTO)
        _probe(found.removeprefix("ray://"), f"auto ({found}, the Ray cluster last started "
               f"here)", client=found.startswith("ray://"))
        return
    _probe(address.removeprefix("ray://"), address, client=address.startswith("ray://"))


# One cheap call that only the expected service answers: the cluster's own (GCS)
# port for host:port, the Ray Client server's for ray://host:port. The other
# answers it with UNIMPLEMENTED, which Ray itself would retry for half a minute.
PROBE_METHOD = {False: "/ray.rpc.NodeInfoGcsService/GetClusterId",
                True: "/ray.rpc.RayletDriver/ClusterInfo"}
WRONG_PORT = {False: "this is not a Ray cluster's port (a Ray Client server? then write "
                     "ray://{hostport})",
              True: "this is not a Ray Client server (a cluster's own port? then leave out "
                    "ray://, or give the client server's port, 10001 unless changed)"}


def _probe(hostport: str, label: str, client: bool = False) -> None:
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FgmError(f"--address {label!r}: expected auto, host:port or ray://host:port")
    bare = host.strip("[]")
    try:
        socket.create_connection((bare, int(port)), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        raise FgmError(f"--address {label}: no Ray cluster answers there "
                       f"({exc.strerror or exc}); start one with `ray start --head "
                       f"--port {port}` on {bare}, or check the host and port") from None
    try:
        import grpc  # Ray speaks gRPC; something else on the port would never answer it
    except ImportError:
        return
    hostport = hostport.removeprefix("ray://")
    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=PROBE_SECONDS)
        call = channel.unary_unary(PROBE_METHOD[client], request_serializer=None,
                                   response_deserializer=None)
        try:
            call(b"", timeout=PROBE_SECONDS)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise FgmError(f"--address {label}: "
                               + WRONG_PORT[client].format(hostport=hostport)) from None
            # anything else (a token asked for, a refusal of the empty request) is
            # Ray answering: ray.init says the rest
    except grpc.FutureTimeoutError:
        raise FgmError(f"--address {label}: something listens there, but it is not a "
                       f"Ray cluster (no answer to Ray's protocol within "
                       f"{PROBE_SECONDS:g} s)") from None
    finally:
        channel.close()


def _join_error(address: str, exc: BaseException) -> FgmError:
    chain, e = [], exc
    while e is not None and len(chain) < 5:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    text = " ".join(chain)
    if "InvalidAuthToken" in text or ("token" in text.lower() and "auth" in text.lower()):
        return FgmError(f"--address {address}: the cluster asks for Ray's auth token; set "
                        f"RAY_AUTH_MODE=token and give this machine the cluster's token "
                        f"($RAY_AUTH_TOKEN, or ~/.ray/auth_token; `ray get-auth-token` "
                        f"prints it on the head node)")
    return FgmError(f"--address {address}: could not join the Ray cluster there "
                    f"({_first_line(exc)})")


class Cluster:
    """Ray, connected for one command: `with Cluster(settings) as cluster: ...`."""

    def __init__(self, settings: ExecutorSettings):
        self.s = settings
        self.ray = None
        self._capacity, self._looked = 0, -math.inf

    def __enter__(self) -> Cluster:
        ray = _import_ray()
        address = self.s.address
        if address is not None:
            probe_address(address)
        logging.getLogger("ray").setLevel(logging.ERROR)
        try:
            if address is None:
                ray.init(address="local", include_dashboard=False, log_to_driver=False,
                         logging_level=logging.ERROR)
            elif address.startswith("ray://"):
                ray.init(address=address, logging_level=logging.ERROR)
            else:
                ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        except Exception as exc:
            if address is None:
                raise FgmError(f"could not start a local Ray instance ({_first_line(exc)})") \
                    from None
            if address == "auto" and isinstance(exc, ConnectionError):
                raise FgmError(NO_AUTO) from None
            raise _join_error(address, exc) from None
        self.ray = ray
        try:
            self._check()
        except BaseException:
            ray.shutdown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.ray.shutdown()

    def _nodes(self) -> list[dict]:
        return [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]

    def describe(self) -> str:
        nodes = self._nodes()
        cpus = sum(n.get("CPU", 0) for n in nodes)
        gpus = sum(n.get("GPU", 0) for n in nodes)
        size = f"{cpus:g} CPUs, {gpus:g} GPUs"
        if self.s.address is None:
            return f"a local Ray instance ({size})"
        where = self.s.address
        if where == "auto":
            try:
                where = f"auto = {self.ray.get_runtime_context().gcs_address}"
            except Exception:   # noqa: BLE001 - only a label
                pass
        return f"the Ray cluster at {where} ({len(nodes)} node(s), {size})"

    def capacity(self) -> int:
        """How many models run at once: per node, its CPUs (and GPUs) divided by one
        model's share, rounded down. Looked up again every CAPACITY_EVERY seconds."""
        now = time.monotonic()
        if now - self._looked >= CAPACITY_EVERY:
            slots = 0
            for r in self._nodes():
                k = math.floor(r.get("CPU", 0) / self.s.cpus_per_model + 1e-9)
                if self.s.gpus_per_model:
                    k = min(k, math.floor(r.get("GPU", 0) / self.s.gpus_per_model + 1e-9))
                slots += k
            self._capacity, self._looked = slots, now
        return self._capacity

    def _check(self) -> None:
        """What would leave every task waiting forever, said before any task starts."""
        nodes = self._nodes()
        where = self.describe()
        if self.s.gpus_per_model and not any(n.get("GPU", 0) for n in nodes):
            raise FgmError(f"--gpus-per-model {self.s.gpus_per_model:g}: {where} has no GPU")
        if self.capacity() < 1:
            gpu = (f" and {self.s.gpus_per_model:g} GPU" if self.s.gpus_per_model else "")
            raise FgmError(f"no node of {where} has {self.s.cpus_per_model} CPU(s){gpu} for "
                           f"one model; lower --cpus-per-model or --gpus-per-model")

    def remote(self, func: Callable, name: str):
        return self.ray.remote(func).options(
            name=name, num_cpus=self.s.cpus_per_model, num_gpus=self.s.gpus_per_model,
            max_retries=self.s.max_retries, retry_exceptions=False)

    def failure(self, exc: BaseException) -> str:
        """One line for a task that failed for good; OutNotWritable stops the run."""
        ray = self.ray
        cause = getattr(exc, "cause", None)
        if isinstance(exc, OutNotWritable) or isinstance(cause, OutNotWritable):
            raise FgmError(str(cause or exc).splitlines()[0]) from None
        if isinstance(exc, ray.exceptions.RayTaskError) and cause is not None:
            return f"{type(cause).__name__}: {_first_line(cause)}"
        if isinstance(exc, ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError):
            return (f"its worker died {self.s.max_retries + 1} time(s) (--max-retries "
                    f"{self.s.max_retries}): {_first_line(exc)}")
        return f"{type(exc).__name__}: {_first_line(exc)}"


# --------------------------------------------------------------------------- progress

class Display:
    """done / running / queued / failed, models per hour and an ETA: a rich bar on a
    terminal, plain lines elsewhere (as the local executor)."""

    def __init__(self, console: Console, title: str, total: int):
        self.console, self.title, self.total = console, title, total
        self.started = self.done = self.failed = 0
        self.start = time.monotonic()
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
        return (f"done {self.done} · running {running} · queued {self.total - self.started} "
                f"· failed {self.failed} · {self.rate():.0f} models/h")

    def refresh(self) -> None:
        self.bar.update(self.task, completed=self.done + self.failed, status=self.status())

    def line(self, text: str) -> None:
        if self.console.is_terminal:
            self.bar.console.print(text, highlight=False, markup=False)
        else:
            click.echo(text)


# --------------------------------------------------------------------------- scheduling

@dataclass
class Job:
    kind: str                      # "train" | "measure"
    model_id: str
    label: str
    config: object = None
    seed: int | None = None
    names: list[str] = field(default_factory=list)
    dataset: str | None = None     # fgm-measure: which dataset object the task gets
    first: bool = True             # the model's first job (counts it as started)
    reported: bool = False         # its result was counted and shown (a retried write
    stored: bool = False           # after WarehouseLocked does neither twice)


def schedule(cluster: Cluster, queue: deque, display: Display,
             submit: Callable[[Job], object], finish: Callable[[Job, bool, object], None]) -> None:
    """Keep the cluster full from `queue` (which `finish` may add to, at the front)
    and hand each result to `finish(job, ok, value_or_error)` as it completes.

    A reader that holds the warehouse longer than a write waits (WarehouseLocked
    from `submit` or `finish`) costs nothing: the job goes back to the queue, the
    result waits in `pending` and is handed over again while the tasks run on.

    Ctrl-C is taken between results, never in the middle of a write: the results
    already complete are still handed over, the tasks in flight cancelled, and
    KeyboardInterrupt(number cancelled) raised. A second Ctrl-C stops at once. On any
    other error everything in flight is cancelled."""
    ray = cluster.ray
    inflight: dict = {}
    stop: list[int] = []
    pending: deque = deque()      # (job, ok, value) whose write found the warehouse held

    def on_sigint(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)

    def fill() -> None:
        while queue and not stop and len(inflight) < max(1, cluster.capacity()):
            job = queue.popleft()
            try:
                ref = submit(job)
            except WarehouseLocked:      # its inputs could not be read: later
                queue.appendleft(job)
                break
            display.started += job.first
            job.first = False
            inflight[ref] = job
        display.refresh()

    def hand_over(job: Job, ok: bool, value) -> bool:
        try:
            finish(job, ok, value)
        except WarehouseLocked as exc:
            if not pending:
                display.line(f"waiting to write: {_first_line(exc)}")
            pending.append((job, ok, value))
            return False
        return True

    def handle(ref, ok_only: bool = False) -> None:
        job = inflight.pop(ref)
        fill()   # the workers go on while the driver ingests this one
        try:
            value, ok = ray.get(ref), True
        except ray.exceptions.RayError as exc:
            value, ok = exc, False
        if ok or not ok_only:
            hand_over(job, ok, value)
        display.refresh()

    def retry_pending() -> None:
        for _ in range(len(pending)):
            if not hand_over(*pending.popleft()):
                break

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main else None
    try:
        fill()
        while (inflight or pending or queue) and not stop:
            retry_pending()
            fill()
            if not inflight:
                continue
            ready, rest = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            if ready and rest:
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
            for ref in ready:
                if stop:
                    break
                handle(ref)
            fill()
        if stop and inflight:
            ready, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=0)
            for ref in ready:            # finished: stored, nothing finished is lost
                handle(ref, ok_only=True)
            for ref in inflight:
                ray.cancel(ref, force=True)
        if stop:
            retry_pending()
            if pending:     # bundles stay on disk (the next run ingests them); rows do not
                display.line(f"{len(pending)} result(s) not written: the warehouse was "
                             "held; the next run ingests their bundles or measures again")
            raise KeyboardInterrupt(len(inflight))
    except BaseException:
        for ref in inflight:
            ray.cancel(ref, force=True)
        raise
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------- grids

class RayExecutor:
    def __init__(self, settings: ExecutorSettings):
        self.settings = settings

    def grid(self, plan: GridPlan) -> None:
        use_gpu = self.settings.use_gpu(plan.device)
        with Cluster(self.settings) as cluster:
            _GridRun(plan, cluster, use_gpu).run()

    def measure(self, db, console: Console, *, device: str = "auto", **job):
        use_gpu = self.settings.use_gpu(device)
        with Cluster(self.settings) as cluster:
            return _measure_run(db, console, cluster, use_gpu, **job)


def _short(config) -> str:
    from .cli import _short as short
    return short(config)


class _GridRun:
    def __init__(self, plan: GridPlan, cluster: Cluster, use_gpu: bool):
        from fgm.measures.runner import JobReport
        self.plan, self.cluster, self.use_gpu = plan, cluster, use_gpu
        self.threads = cluster.s.cpus_per_model
        self.queue: deque[Job] = deque()
        self.report = JobReport()
        self.not_converged = 0
        self.failures: list[tuple[str, str]] = []
        self.trained = 0
        self.mirrored = False

    def run(self) -> None:
        from .cli import _ingest_finished
        from .data import load_dataset
        p, ray = self.plan, self.cluster.ray
        g, out = p.grid, p.out
        p.console.print(f"grid {g.name!r} on {g.dataset}: {len(p.jobs)} models, "
                        f"{len(p.jobs) - len(p.todo)} already finished, {len(p.todo)} to "
                        f"train on {self.cluster.describe()}, up to "
                        f"{self.cluster.capacity()} at a time", soft_wrap=True)
        finished = p.finished
        measure_jobs = []
        if not p.no_ingest:
            _ingest_finished(out, finished, p.db, p.console)
            if finished and not p.no_measures:   # a run killed between ingest and measures
                labels = {mid: f"{_short(c)} seed {s}" for c, s, mid in p.jobs}
                measure_jobs = [Job("measure", mid, labels[mid], names=names)
                                for mid, names in self._missing_measures(finished).items()]
        if not p.todo and not measure_jobs:
            return
        self.data = load_dataset(g.dataset, p.data_root, p.download)
        self.data_ref = ray.put(self.data)
        self.train_remote = self.cluster.remote(train_task, "train_task")
        self.measure_remote = self.cluster.remote(measure_task, "measure_task")
        self.queue.extend(measure_jobs)
        self.queue.extend(Job("train", mid, f"{_short(c)} seed {s}", c, s)
                          for c, s, mid in p.todo)
        total = len(p.todo) + len(measure_jobs)
        start = time.perf_counter()
        with Display(p.console, g.name, total) as self.display:
            try:
                schedule(self.cluster, self.queue, self.display, self.submit, self.finish)
            except KeyboardInterrupt as stop:
                d = self.display
                click.echo(f"interrupted: {d.done} of {total} models done, {d.failed} failed, "
                           f"{stop.args[0] if stop.args else 0} cancelled in flight, "
                           f"{total - d.started} not started; run the same command again "
                           f"to resume", err=True)
                raise SystemExit(130) from None
        stale = clean_stale(out)    # temp directories of workers that died on this machine
        seconds = time.perf_counter() - start
        rate = total / seconds * 3600 if seconds > 0 else 0.0
        text = (f"done: {self.trained} models trained into {out} on Ray "
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
        p = self.plan
        if job.kind == "train":
            return self.train_remote.remote(p.grid, job.config, job.seed, job.model_id,
                                            self.data_ref, str(p.out), self.use_gpu,
                                            self.threads, p.precision, p.compile)
        from fgm.measures.context import Settings
        from fgm.measures.runner import model_inputs
        with briefly(p.db) as con:
            inputs = model_inputs(con, job.model_id)
        return self.measure_remote.remote(job.model_id, inputs, self.data_ref, job.names,
                                          Settings(), self.use_gpu, self.threads)

    def finish(self, job: Job, ok: bool, value) -> None:
        if job.kind == "measure":
            why = _finish_measures(self.cluster, self.plan.db, self.report, self.display, job,
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
                self._failed(job, self.cluster.failure(value))
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
            how = ("finished earlier (its bundle was on disk)" if value.get("reused") else
                   f"{value['seconds']:.1f} s on {value['node']}{gpu}")
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
            from fgm.train.grid import AXES
            g, c = p.grid, job.config
            with briefly(p.db) as con:
                store_failed_model(
                    con, model_id=job.model_id, sweep=f"{g.name}/{self.data.name}",
                    dataset=self.data.name, sweep_config=g.as_dict(), seed=job.seed,
                    config_hash=c.hash, error=why,
                    hyperparameters=[{"axis": a, "value": c.values[a], "level": c.levels[a]}
                                     for a in AXES])
            stored = " (stored as failed)"
        self.failures.append((job.label, why))
        self.display.failed += 1
        self.display.line(f"FAILED {job.label}: {why}{stored}")


def _finish_measures(cluster: Cluster, db, report, display: Display, job: Job, ok: bool,
                     value, summary: bool = False) -> str | None:
    """A measure task's result into the warehouse, checked as the local path's are.
    A task that failed for good (its worker died --max-retries + 1 times) stores
    nothing: values stored before stay, the next run measures the model again; the
    reason is returned."""
    from fgm.measures.runner import check_measure_rows, store_measure_rows
    if ok and isinstance(value, dict) and "skipped" in value:
        report.skipped.append((job.model_id, value["skipped"]))
        display.line(f"measures of {job.label}: skipped ({value['skipped']})")
        display.done += 1
        return
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
        why = f"measure task failed: {cluster.failure(value)}"
        report.skipped.append((job.model_id, f"{why}; nothing stored, run again to retry"))
        display.failed += 1
        display.line(f"measures of {job.label}: {why}; nothing stored, the next run "
                     f"measures it again")
        return why
    store_measure_rows(db, rows, report)
    display.done += 1
    if summary:      # fgm-train grid: a line per model, as the local executor's
        from .cli import _measure_summary
        try:
            display.line(f"measures of {job.label}{_measure_summary(db, job.model_id)}")
        except WarehouseLocked:     # stored already: only the line is lost
            display.line(f"measures of {job.label}: {sum(r['status'] == 'ok' for r in rows)} "
                         f"values stored")
    return None


# --------------------------------------------------------------------------- fgm-measure

def _measure_run(db, console: Console, cluster: Cluster, use_gpu: bool, *, pattern: str = "*",
                 where: str | None = None, recompute: bool = False,
                 data_root: Path | None = None, settings=None):
    from fgm.measures.context import Settings
    from fgm.measures.registry import list_measures, mirror_definitions
    from fgm.measures.runner import SKIP_ERRORS, JobReport, model_inputs, models_to_measure

    from .data import load_dataset
    specs = list_measures(pattern)
    if not specs:
        names = ", ".join(s.name for s in list_measures())
        raise FgmError(f"no measure matches {pattern!r}; measures: {names}")
    settings = settings or Settings()
    with briefly(db) as con:
        mirror_definitions(con)
        todo = models_to_measure(con, specs, where, recompute, None, settings)
    report, start, ray = JobReport(), time.perf_counter(), cluster.ray
    refs = {}
    for name in todo["dataset"].unique(maintain_order=True).to_list():
        try:
            refs[name] = ray.put(load_dataset(name, data_root))
        except SKIP_ERRORS as exc:
            refs[name] = str(exc)
    queue: deque[Job] = deque()
    for row in todo.iter_rows(named=True):
        if isinstance(refs[row["dataset"]], str):
            report.skipped.append((row["model_id"], refs[row["dataset"]]))
        else:
            queue.append(Job("measure", row["model_id"], row["model_id"],
                             names=list(row["measure"]), dataset=row["dataset"]))
    console.print(f"{len(queue)} models to measure on {cluster.describe()}, up to "
                  f"{cluster.capacity()} at a time", soft_wrap=True)
    remote = cluster.remote(measure_task, "measure_task")
    threads = cluster.s.cpus_per_model

    def submit(job: Job):
        with briefly(db) as con:
            inputs = model_inputs(con, job.model_id)
        return remote.remote(job.model_id, inputs, refs[job.dataset], job.names, settings,
                             use_gpu, threads)

    def finish(job: Job, ok: bool, value) -> None:
        _finish_measures(cluster, db, report, display, job, ok, value)

    with Display(console, "measures", len(queue)) as display:
        try:
            schedule(cluster, queue, display, submit, finish)
        except KeyboardInterrupt:
            report.seconds = time.perf_counter() - start
            click.echo(f"interrupted: {report}", err=True)
            raise SystemExit(130) from None
    report.seconds = time.perf_counter() - start
    return report
