"""--executor local: tasks in worker processes on this machine, one torch thread each.

A small pool of persistent processes (started with `spawn`, so no torch state is
inherited from the driver), each running one task at a time: a worker that dies
(killed, out of memory) costs only the task it was running, which is tried again
on a fresh worker up to `max_retries` times, as Ray retries a task whose worker
died. concurrent.futures' ProcessPoolExecutor would fail every task in flight when
one worker dies, and cannot tell which one was to blame.

Workers ignore Ctrl-C (the terminal sends it to the whole process group): the
driver takes it, stores what finished, and stops the workers itself, so none is
left behind. A worker whose driver is gone finds its pipe closed and exits.

With one worker the tasks run in the driver's own process (no pipes, no copies):
`--workers 1`.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

# One thread per task, wherever it runs: intra-op threads shape the float sums, so
# they shape the weights; a local run and a Ray run (one CPU per task) of one grid
# then give the same checkpoint bytes.
THREADS = 1

_report: Callable[..., None] | None = None


def report(*info) -> None:
    """A task's progress (e.g. 'measure', name, i, n), passed to the driver's
    on_progress callback; nothing where no driver listens."""
    if _report is not None:
        _report(*info)


def set_threads(threads: int) -> None:
    import torch
    torch.set_num_threads(max(1, threads))


class WorkerDied(Exception):
    """The process running a task died before it answered."""


class TaskFailed(Exception):
    """A task's own exception that could not travel back as itself."""


@dataclass
class Ticket:
    """One submitted task: what a caller holds until it is done."""
    fn: Callable
    args: tuple
    tries: int = 0
    done: bool = False
    ok: bool = False
    value: object = None
    key: int = field(default_factory=lambda: next(_keys))

    def __hash__(self) -> int:
        return self.key

    def __eq__(self, other) -> bool:
        return self is other


def _counter():
    n = 0
    while True:
        n += 1
        yield n


_keys = _counter()


def _worker(conn: Connection, threads: int) -> None:
    """A worker's life: tasks in, (ok, value) out, progress messages between."""
    global _report
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_threads(threads)
    _report = lambda *info: conn.send(("progress", info))   # noqa: E731
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):      # the driver is gone
            return
        if message is None:
            return
        fn, args = message
        try:
            answer = ("done", True, fn(*args))
        except BaseException as exc:   # noqa: BLE001 - the task's failure is its answer
            answer = ("done", False, exc)
        try:
            conn.send(answer)
        except (EOFError, OSError):
            return
        except Exception:   # noqa: BLE001 - an exception that does not pickle
            exc = answer[2]
            conn.send(("done", False, TaskFailed(
                f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_exception(exc))}")))


class _Process:
    def __init__(self, ctx, threads: int):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, threads), daemon=True)
        self.process.start()
        child.close()
        self.ticket: Ticket | None = None

    def stop(self, force: bool = False) -> None:
        if force:
            self.process.kill()
        else:
            try:
                self.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        self.process.join(timeout=None if force else 10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class LocalPool:
    """`workers` processes (or this one, for 1): submit(fn, *args) -> Ticket, then
    wait(timeout) hands back the tickets that finished. fn and args must pickle."""

    def __init__(self, workers: int, *, threads: int = THREADS, max_retries: int = 3,
                 on_progress: Callable[[Ticket, tuple], None] | None = None):
        self.workers, self.threads, self.max_retries = workers, threads, max_retries
        self.on_progress = on_progress
        self.queue: deque[Ticket] = deque()
        self.procs: list[_Process] = []
        self.finished: list[Ticket] = []
        self._ctx = multiprocessing.get_context("spawn")
        self._inline_threads: int | None = None

    @property
    def inline(self) -> bool:
        return self.workers == 1

    def __enter__(self) -> LocalPool:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown(force=exc[0] is not None)

    def capacity(self) -> int:
        return self.workers

    def submit(self, fn: Callable, *args) -> Ticket:
        ticket = Ticket(fn, args)
        self.queue.append(ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drop a queued ticket, or stop the worker running it (a new one takes its place)."""
        if ticket in self.queue:
            self.queue.remove(ticket)
        for p in self.procs:
            if p.ticket is ticket:
                p.ticket = None
                p.stop(force=True)
                self.procs.remove(p)
                break

    def running(self) -> int:
        return sum(p.ticket is not None for p in self.procs) + len(self.queue)

    # ------------------------------------------------------------------ in-process

    def _run_inline(self) -> None:
        global _report
        ticket = self.queue.popleft()
        previous = _report
        _report = (lambda *info: self.on_progress(ticket, info)) if self.on_progress else None
        try:
            ticket.value, ticket.ok = ticket.fn(*ticket.args), True
        except KeyboardInterrupt:
            self.queue.appendleft(ticket)
            raise
        except Exception as exc:   # noqa: BLE001 - the task's failure is its answer
            ticket.value, ticket.ok = exc, False
        finally:
            _report = previous
        ticket.done = True
        self.finished.append(ticket)

    # ------------------------------------------------------------------ processes

    def _dispatch(self) -> None:
        idle = [p for p in self.procs if p.ticket is None]
        while self.queue:
            if not idle:
                if len(self.procs) >= self.workers:
                    return
                p = _Process(self._ctx, self.threads)
                self.procs.append(p)
                idle.append(p)
            p = idle.pop()
            ticket = self.queue.popleft()
            try:
                p.conn.send((ticket.fn, ticket.args))
            except (OSError, BrokenPipeError):   # died while idle: a fresh one takes it
                self.queue.appendleft(ticket)
                self._bury(p)
                continue
            p.ticket = ticket

    def _bury(self, p: _Process) -> None:
        p.stop(force=True)
        self.procs.remove(p)

    def _died(self, p: _Process) -> None:
        ticket, code = p.ticket, p.process.exitcode
        self._bury(p)
        if ticket is None:
            return
        ticket.tries += 1
        if ticket.tries <= self.max_retries:
            self.queue.appendleft(ticket)
            return
        how = (f"killed by signal {-code}" if code is not None and code < 0
               else f"exit code {code}")
        ticket.done, ticket.ok = True, False
        ticket.value = WorkerDied(f"its worker process died {ticket.tries} time(s) "
                                  f"({how}; --max-retries {self.max_retries})")
        self.finished.append(ticket)

    def wait(self, timeout: float | None = None) -> list[Ticket]:
        """The tickets that finished since the last call; waits up to `timeout` seconds
        for one when none has (in-process: runs the next task)."""
        if not self.finished:
            if self.inline:
                if self.queue and timeout != 0:    # 0: only what has finished
                    if self._inline_threads is None:
                        import torch
                        self._inline_threads = torch.get_num_threads()
                        set_threads(self.threads)
                    self._run_inline()
            else:
                self._dispatch()
                busy = [p for p in self.procs if p.ticket is not None]
                if busy:
                    by_handle = {}
                    for p in busy:
                        by_handle[p.conn] = p
                        by_handle[p.process.sentinel] = p
                    for handle in wait(list(by_handle), timeout):
                        p = by_handle[handle]
                        if p not in self.procs or p.ticket is None:
                            continue
                        self._receive(p)
                self._dispatch()
        done, self.finished = self.finished, []
        return done

    def _receive(self, p: _Process) -> None:
        while True:
            try:
                if not p.conn.poll():
                    if not p.process.is_alive():
                        self._died(p)
                    return
                message = p.conn.recv()
            except (EOFError, OSError):
                self._died(p)
                return
            if message[0] == "progress":
                if self.on_progress:
                    self.on_progress(p.ticket, message[1])
                continue
            _, ok, value = message
            ticket, p.ticket = p.ticket, None
            ticket.done, ticket.ok, ticket.value = True, ok, value
            self.finished.append(ticket)
            return

    def shutdown(self, force: bool = False) -> None:
        for p in self.procs:
            p.stop(force=force or p.ticket is not None)
        self.procs = []
        if self._inline_threads is not None:
            set_threads(self._inline_threads)
            self._inline_threads = None


def default_workers() -> int:
    """As many as this process may use cores."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # pragma: no cover - not on Linux
        return os.cpu_count() or 1


class LocalBackend:
    """--executor local as the driver loop's Backend (train/driver.py)."""

    def __init__(self, settings, device: str):
        from .loop import resolve_device
        self.device = resolve_device(device)
        workers = settings.workers
        if workers is None:   # one GPU is shared by one process: more only by asking
            workers = 1 if self.device.type == "cuda" else default_workers()
        self.pool = LocalPool(workers, max_retries=settings.max_retries,
                              on_progress=self._progress)
        self.inline = self.pool.inline
        self.progress: Callable | None = None

    def _progress(self, ticket, info) -> None:
        if self.progress is not None:
            self.progress(ticket, info)

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(force=exc[0] is not None)

    def describe(self) -> str:
        where = ("this process" if self.inline else
                 f"{self.pool.workers} worker processes")
        return f"{self.device} ({where}, {THREADS} torch thread each)"

    def capacity(self) -> int:
        return self.pool.capacity()

    def threads(self) -> int:
        return THREADS

    def use_gpu(self) -> bool:
        return self.device.type == "cuda"

    def data(self, spec):
        return spec          # each worker loads it once (train/tasks.py DataSpec)

    def submit(self, fn: Callable, *args) -> Ticket:
        return self.pool.submit(fn, *args)

    def wait(self, tickets: list, timeout: float) -> list[Ticket]:
        return self.pool.wait(timeout)

    def result(self, ticket: Ticket) -> tuple[bool, object]:
        return ticket.ok, ticket.value

    def cancel(self, ticket: Ticket) -> None:
        self.pool.cancel(ticket)

    def failure(self, exc: BaseException) -> str:
        from fgm.warehouse import FgmError

        from .tasks import OutNotWritable
        if isinstance(exc, OutNotWritable):
            raise FgmError(str(exc).splitlines()[0]) from None
        if isinstance(exc, WorkerDied):
            return str(exc)
        import torch
        if isinstance(exc, torch.OutOfMemoryError):   # after the evaluations' own retry
            return f"out of device memory: {str(exc).strip().splitlines()[0]}"
        text = str(exc).strip()
        return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
