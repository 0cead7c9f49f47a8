"""--executor local: worker processes (train/pool.py) under the one driver loop
(train/driver.py). Workers are real processes, killed with real signals; every wait
is for something observable (a bundle on disk, a child process, a process exit)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fgm.ingest.bundles import find_bundles
from fgm.train.bundle import sha256_file
from fgm.train.cli import main as train_cli
from fgm.train.pool import LocalPool, WorkerDied
from fgm.warehouse import connect

BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).parent))
import pool_tasks  # noqa: E402 - the tasks must import in a spawned worker
from test_ray import GRID  # noqa: E402 - the tiny grid of max_steps={steps}


def run_all(pool: LocalPool, tickets: list) -> None:
    done: list = []
    while len(done) < len(tickets):
        done += pool.wait(30)


# --------------------------------------------------------------------------- the pool

def test_results_errors_and_progress_come_back_from_worker_processes():
    seen = []
    with LocalPool(2, on_progress=lambda t, info: seen.append(info)) as pool:
        squares = [pool.submit(pool_tasks.square, i) for i in range(5)]
        boom = pool.submit(pool_tasks.boom)
        here = pool.submit(pool_tasks.whoami)
        run_all(pool, squares + [boom, here])
    assert [t.value for t in squares] == [0, 1, 4, 9, 16] and all(t.ok for t in squares)
    assert not boom.ok and isinstance(boom.value, ValueError) and "boom" in str(boom.value)
    pid, threads = here.value
    assert pid != os.getpid() and threads == 1
    assert sorted(seen) == [("square", i) for i in range(5)]


def test_a_killed_worker_costs_only_its_task_which_is_tried_again(tmp_path):
    marker = tmp_path / "killed-once"
    with LocalPool(2, max_retries=2) as pool:
        once = pool.submit(pool_tasks.die_once, str(marker))
        always = pool.submit(pool_tasks.die_always)
        others = [pool.submit(pool_tasks.square, i) for i in range(4)]
        run_all(pool, [once, always, *others])
    assert once.ok and once.tries == 1 and marker.exists()
    assert not always.ok and isinstance(always.value, WorkerDied)
    assert "died 3 time(s) (killed by signal 9; --max-retries 2)" in str(always.value)
    assert [t.value for t in others] == [0, 1, 4, 9] and all(t.tries == 0 for t in others)


def test_one_worker_runs_in_this_process_with_one_thread():
    import torch
    before = torch.get_num_threads()
    with LocalPool(1) as pool:
        here = pool.submit(pool_tasks.whoami)
        run_all(pool, [here])
    assert here.value == (os.getpid(), 1)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("workers", ["0", "-1", str(4 * (os.cpu_count() or 1) + 1)])
def test_a_number_of_workers_the_machine_cannot_have_is_refused(workers, grid_file, tmp_path):
    out = CliRunner().invoke(train_cli, ["grid", "--grid", str(grid_file), "--workers",
                                         workers, "--out", str(tmp_path / "runs")])
    assert out.exit_code == 1 and f"--workers {workers}: expected an integer in [1," \
        in out.output
    assert not (tmp_path / "runs").exists()


def test_workers_is_the_local_executors_option(grid_file):
    out = CliRunner().invoke(train_cli, ["grid", "--grid", str(grid_file), "--workers", "2",
                                         "--executor", "ray"])
    assert out.exit_code == 1 and "--workers is an option of --executor local" in out.output


# --------------------------------------------------------------------------- grids



def finals(out: Path) -> dict[str, str]:
    return {b.name: sha256_file(b / "final.safetensors") for b in find_bundles(out)}


def test_one_worker_and_two_give_the_same_bytes_and_the_manifest_says_how(tmp_path):
    """No environment variable: one torch thread per model, in this process or in a
    worker process (test_ray.py compares a Ray run with the same)."""
    grid = tmp_path / "g.toml"
    grid.write_text(GRID.format(steps=30))
    runs = {}
    for workers in ("1", "2"):
        out = tmp_path / f"runs{workers}"
        run = CliRunner().invoke(train_cli, ["grid", "--grid", str(grid), "--out", str(out),
                                             "--db", str(tmp_path / f"w{workers}.duckdb"),
                                             "--no-measures", "--device", "cpu",
                                             "--workers", workers])
        assert run.exit_code == 0, run.output
        runs[workers] = finals(out)
    assert len(runs["1"]) == 4 and runs["1"] == runs["2"]
    manifest = json.loads(next(iter(find_bundles(tmp_path / "runs2")))
                          .joinpath("manifest.json").read_text())
    assert manifest["timing"]["threads"] == 1


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def start(tmp_path: Path, steps: int, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    grid = tmp_path / "g.toml"
    grid.write_text(GRID.format(steps=steps))
    out, db = tmp_path / "runs", tmp_path / "w.duckdb"
    env = {k: v for k, v in os.environ.items() if k not in ("FGM_DB", "FGM_WORKERS")}
    proc = subprocess.Popen([str(BIN / "fgm-train"), "grid", "--grid", str(grid), "--out",
                             str(out), "--db", str(db), "--device", "cpu", "--workers", "2",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    return proc, out, db


def wait_for(condition, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {what} within 5 minutes"
        time.sleep(0.02)   # a poll interval


def test_ctrl_c_stores_what_finished_says_so_and_leaves_no_worker_behind(tmp_path):
    proc, out, db = start(tmp_path, 400, "--no-measures")
    wait_for(lambda: out.exists() and len(find_bundles(out)) >= 1, proc, "bundle")
    first = {b.name for b in find_bundles(out)}
    workers = children(proc.pid)
    assert workers, "no worker process"
    os.killpg(proc.pid, signal.SIGINT)     # as a terminal does: the whole process group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted:" in stderr and "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    # the workers are stopped by the driver; multiprocessing's resource tracker (a
    # child too) leaves once the driver's end of its pipe closes: wait for the exits
    deadline = time.monotonic() + 60
    while [p for p in workers if alive(p)]:
        assert time.monotonic() < deadline, "a worker outlived its driver"
        time.sleep(0.05)   # a poll interval
    con = connect(db, read_only=True)
    try:
        stored = {r[0] for r in con.sql("SELECT model_id FROM models").fetchall()}
    finally:
        con.close()
    # the model whose bundle was seen finished before the Ctrl-C is in the warehouse
    assert first <= stored, (first, stored)


def test_a_worker_killed_mid_model_costs_only_that_model_which_is_retried(tmp_path):
    proc, out, db = start(tmp_path, 200, "--no-measures")
    wait_for(lambda: len(children(proc.pid)) >= 2, proc, "worker")
    victim = children(proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout + stderr
    assert len(find_bundles(out)) == 4
    con = connect(db, read_only=True)
    try:
        assert con.sql("SELECT status, count(*) FROM models GROUP BY ALL").fetchall() == \
            [("done", 4)]
    finally:
        con.close()
