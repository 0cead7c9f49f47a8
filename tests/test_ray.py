"""--executor ray, on a real Ray cluster: one `ray start --head --num-cpus 2` started by
this module (as a separate process group, stopped at teardown) and joined with
--address by every test that can; one test starts fgm's own local instance.

Nothing of Ray is mocked: workers are killed by pid with SIGKILL, drivers with
SIGINT and SIGKILL, and every wait is for something observable (a line on the
cluster's stdout, a bundle on disk, a process title, a process exit).
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray  # noqa: F401 - in the dev extra: missing, this module fails instead of skipping
import torch
from click.testing import CliRunner

from fgm.ingest.bundles import find_bundles
from fgm.measures import list_measures
from fgm.measures.cli import main as measure_cli
from fgm.measures.runner import check_measure_rows, measure_models
from fgm.train.bundle import clean_stale, host_tag, sha256_file
from fgm.train.cli import main as train_cli
from fgm.warehouse import connect

pytestmark = pytest.mark.cluster

GRID = """
name = "tiny"
dataset = "digits"
[axes]
width = [24, 32]
depth = [2, 3]
dropout = [0.0]
batch_size = [128]
optimizer = ["adam"]
learning_rate = [1e-3]
weight_decay = [0.0]
[train]
max_steps = {steps}
lr_drop_steps = [40]
estimate_batches = 10
trace_every = 10
"""
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    proc: subprocess.Popen
    address: str
    client_port: int       # its Ray Client server (ray://)

    def task_pids(self, name: str) -> list[int]:
        """Workers of this cluster now running task `name`: Ray titles a worker
        `ray::<task>` while it runs one."""
        return [pid for pid, cmd in session(self.proc.pid) if cmd.startswith(f"ray::{name}")]


def session(sid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process of session `sid`: what `ray start`, started
    with a session of its own, and its children (Ray's workers among them) run."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                    found.append((int(entry), cmd.replace(b"\0", b" ").decode(errors="replace")))
            except (OSError, ProcessLookupError):
                continue
    return found


@pytest.fixture(scope="module")
def head():
    """One Ray cluster for the module: 2 CPUs, its own temp dir and ports, token
    authentication off (explicitly, so ~/.ray/auth_token does not matter)."""
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    temp = tempfile.mkdtemp(prefix="fgmray", dir="/tmp")   # Unix socket paths stay short
    port, client_port = free_port(), free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--port", str(port),
           "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--num-gpus", "0",
           "--ray-client-server-port", str(client_port), "--dashboard-port", str(free_port()),
           "--dashboard-agent-listen-port", str(free_port()), "--include-dashboard", "false",
           "--object-store-memory", str(200 * 2**20), "--temp-dir", temp,
           "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:          # observable: Ray says when the node is up
            seen.append(line)
            if "Ray runtime started" in line:
                break
        else:
            pytest.fail("ray start exited:\n" + "".join(seen[-30:]))
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield Head(proc, f"127.0.0.1:{port}", client_port)
    finally:
        proc.terminate()                  # ray start --block stops what it started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        for pid, _ in session(proc.pid):  # and whatever of its session is left
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        shutil.rmtree(temp, ignore_errors=True)
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("grid") / "tiny.toml"
    path.write_text(GRID.format(steps=60))
    return path


def invoke(args: list[str]):
    return CliRunner().invoke(train_cli, ["grid", *map(str, args)])


@pytest.fixture(scope="module")
def on_ray(head, grid_file, tmp_path_factory):
    """The tiny grid (4 models) trained and measured with --executor ray."""
    root = tmp_path_factory.mktemp("on_ray")
    out = invoke(["--grid", grid_file, "--out", root / "runs", "--db", root / "w.duckdb",
                  "--executor", "ray", "--address", head.address])
    assert out.exit_code == 0, out.output
    return root, out.output


# --------------------------------------------------------------------------- the grid

def test_a_grid_on_ray_lands_whole_and_matches_the_local_executor(on_ray, grid_file, tmp_path):
    root, output = on_ray
    assert "4 to train on the Ray cluster at 127.0.0.1" in output
    con = connect(root / "w.duckdb", read_only=True)
    try:
        assert con.sql("SELECT count(*), count(*) FILTER (WHERE status = 'done') "
                       "FROM models").fetchall() == [(4, 4)]
        per_model = con.sql("""
            SELECT m.model_id,
                   (SELECT count(*) FROM checkpoints c WHERE c.model_id = m.model_id),
                   (SELECT count(*) FROM traces t WHERE t.model_id = m.model_id),
                   (SELECT count(*) FROM measures s WHERE s.model_id = m.model_id)
            FROM models m""").fetchall()
        registered = len(list_measures())
        assert all(ck == 3 and tr > 3 and ms == registered for _, ck, tr, ms in per_model)
        ray_values = dict(((m, n), (v, s)) for m, n, v, s in con.sql(
            "SELECT model_id, measure, value, status FROM measures").fetchall())
    finally:
        con.close()

    # the local executor's worker processes, as they come: one torch thread each, as a
    # Ray task with --cpus-per-model 1, without any environment variable
    local_db = tmp_path / "local.duckdb"
    out = invoke(["--grid", grid_file, "--out", tmp_path / "runs", "--db", local_db,
                  "--no-measures", "--device", "cpu", "--workers", "2"])
    assert out.exit_code == 0, out.output
    assert "2 worker processes, 1 torch thread each" in out.output
    for bundle in find_bundles(root / "runs"):
        assert sha256_file(bundle / "final.safetensors") == \
            sha256_file(tmp_path / "runs" / bundle.name / "final.safetensors"), bundle.name
    # every measure of one model, computed locally, equals the Ray worker's value
    mid = find_bundles(tmp_path / "runs")[0].name
    measure_models(local_db, model_ids=[mid], device=torch.device("cpu"))
    con = connect(local_db, read_only=True)
    local = con.sql("SELECT measure, value, status FROM measures WHERE model_id = ?",
                    params=[mid]).fetchall()
    con.close()
    assert len(local) == registered
    assert {n: (v, s) for n, v, s in local} == {n: ray_values[(mid, n)] for n, _, _ in local}


def test_fgm_measure_on_ray_computes_what_the_grid_did(on_ray, head, tmp_path):
    root, _ = on_ray
    db = tmp_path / "w.duckdb"
    shutil.copy(root / "w.duckdb", db)
    con = connect(db)
    con.execute("DELETE FROM measures WHERE measure LIKE '%norm%' OR measure LIKE '%spec%'")
    con.close()
    run = CliRunner().invoke(measure_cli, ["--measures", "*norm*,*spec*", "--db", str(db),
                                           "--executor", "ray", "--address", head.address])
    assert run.exit_code == 0, run.output
    assert "4 models" in run.output and "0 models skipped" in run.output
    query = ("SELECT model_id, measure, value, status FROM measures WHERE measure IN "
             "(SELECT measure FROM measure_definitions WHERE measure LIKE '%norm%' "
             "OR measure LIKE '%spec%') ORDER BY ALL")
    con = connect(db, read_only=True)
    got = con.sql(query).fetchall()
    con.close()
    con = connect(root / "w.duckdb", read_only=True)
    want = con.sql(query).fetchall()
    con.close()
    assert len(got) >= 4 * 5 and got == want


def test_models_of_your_own_are_measured_on_ray_as_locally(head, tmp_path):
    """A foreign zoo (issue #21): the workers rebuild each model from the warehouse's
    architecture (the user's zoo.py, checked by its sha256) and the dataset's spec."""
    from fgm.ingest.cli import main as ingest_cli
    from fgm.ingest.example_zoo import make_zoo
    zoo = make_zoo(tmp_path / "zoo", steps=60, log=lambda *_: None)
    measures = "cross_entropy,param_norm,path_norm,frobenius_distance,steps_to_0.1_loss"
    values = {}
    for executor in ("local", "ray"):
        db = tmp_path / f"{executor}.duckdb"
        out = CliRunner().invoke(ingest_cli, [str(zoo / "results.csv"), "--models",
                                              str(zoo / "models.toml"), "--db", str(db)])
        assert out.exit_code == 0, out.output
        extra = ["--executor", "ray", "--address", head.address] if executor == "ray" else []
        run = CliRunner().invoke(measure_cli, ["--measures", measures, "--db", str(db), *extra])
        assert run.exit_code == 0 and "8 models" in run.output, run.output
        assert "0 models skipped" in run.output, run.output
        con = connect(db, read_only=True)
        values[executor] = con.sql("SELECT model_id, measure, value, status FROM measures "
                                   "ORDER BY ALL").fetchall()
        con.close()
    assert len(values["ray"]) == 8 * 5 and values["ray"] == values["local"]
    ok = [r[1] for r in values["ray"] if r[3] == "ok"]
    assert all(ok.count(m) == 8 for m in ("cross_entropy", "param_norm", "frobenius_distance"))
    assert ok.count("path_norm") == 4        # the ResNets and MLPs; the VGGs' max-pooling:
    assert sum(r[1] == "path_norm" and r[3] == "not_applicable" for r in values["ray"]) == 4


def test_the_default_is_a_local_ray_instance_of_its_own(grid_file, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")   # else Ray turns it on in this process
    out = invoke(["--grid", grid_file, "--set", "width=24", "--set", "depth=2",
                  "--out", tmp_path / "runs", "--db", tmp_path / "w.duckdb", "--no-measures",
                  "--executor", "ray"])
    assert out.exit_code == 0, out.output
    assert "1 to train on a local Ray instance" in out.output
    assert len(find_bundles(tmp_path / "runs")) == 1


# --------------------------------------------------------------------------- faults

class Killer(threading.Thread):
    """SIGKILLs the first `count` workers seen training (by pid, this cluster only)."""

    def __init__(self, head: Head, count: int = 1):
        super().__init__(daemon=True)
        self.head, self.count, self.killed, self.stop = head, count, [], threading.Event()

    def run(self):
        while not self.stop.is_set() and len(self.killed) < self.count:
            for pid in self.head.task_pids("train_task"):
                if pid not in self.killed:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
                    break
            self.stop.wait(0.01)   # a poll interval, not a wait for anything


def models(db) -> dict[str, str]:
    con = connect(db, read_only=True)
    try:
        return dict(con.sql("SELECT model_id, status FROM models").fetchall())
    finally:
        con.close()


def test_a_killed_worker_is_retried_and_a_model_that_still_fails_is_stored_failed(
        head, tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text(GRID.format(steps=100))
    args = ["--grid", grid, "--out", tmp_path / "runs", "--db", tmp_path / "w.duckdb",
            "--no-measures", "--executor", "ray", "--address", head.address]
    # no retries: the model whose worker is killed is stored as failed, the rest land
    killer = Killer(head)
    killer.start()
    out = invoke([*args, "--max-retries", "0"])
    killer.stop.set()
    assert killer.killed, "no worker was seen training"
    assert out.exit_code == 1, out.output
    assert "1 model(s) failed (stored as failed; run again to retry them)" in out.output
    assert "its worker died 1 time(s) (--max-retries 0)" in out.output
    status = models(tmp_path / "w.duckdb")
    assert sorted(status.values()) == ["done", "done", "done", "failed"]
    (failed,) = [m for m, s in status.items() if s == "failed"]
    con = connect(tmp_path / "w.duckdb", read_only=True)
    errors = con.sql("SELECT error FROM measures WHERE model_id = ?", params=[failed]).fetchall()
    con.close()
    assert errors and all("training failed: its worker died" in e for (e,) in errors)

    # with retries (the default), a worker killed while it trains costs a retry only
    killer = Killer(head)
    killer.start()
    out = invoke(args)
    killer.stop.set()
    assert out.exit_code == 0, out.output
    assert killer.killed and "3 already finished, 1 to train" in out.output
    assert sorted(models(tmp_path / "w.duckdb").values()) == ["done"] * 4
    assert len(find_bundles(tmp_path / "runs")) == 4
    assert not list((tmp_path / "runs").glob(".*tmp*")), "a dead worker's temp dir is left"


def test_ctrl_c_and_kill_9_of_the_driver_then_a_rerun_loses_and_repeats_nothing(
        head, tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text(GRID.format(steps=100))
    out, db = tmp_path / "runs", tmp_path / "w.duckdb"
    cmd = [str(BIN / "fgm-train"), "grid", "--grid", str(grid), "--out", str(out),
           "--db", str(db), "--no-measures", "--executor", "ray", "--address", head.address]

    def run_until_a_new_bundle(sig: int) -> tuple[int, str, int]:
        before = len(find_bundles(out)) if out.exists() else 0
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        deadline = time.monotonic() + 300
        while not (out.exists() and len(find_bundles(out)) > before):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no bundle within 5 minutes"
            time.sleep(0.02)   # a poll interval
        os.kill(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=120)
        return proc.returncode, stdout + stderr, before

    code, text, _ = run_until_a_new_bundle(signal.SIGINT)
    assert code == 130, text
    assert "interrupted:" in text and "run the same command again to resume" in text
    assert "Traceback" not in text
    code, text, before = run_until_a_new_bundle(signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert f"{before} already finished" in text
    # Ray ends the tasks of a driver that died: wait for that, then nothing runs twice
    deadline = time.monotonic() + 120
    while head.task_pids("train_task"):
        assert time.monotonic() < deadline, "the dead driver's tasks still run"
        time.sleep(0.05)
    done = {b.name: (b / "manifest.json").stat().st_mtime_ns for b in find_bundles(out)}
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done)} already finished, {4 - len(done)} to train" in rerun.stderr
    assert {b.name: (b / "manifest.json").stat().st_mtime_ns
            for b in find_bundles(out) if b.name in done} == done   # none trained again
    assert len(find_bundles(out)) == 4 and not list(out.glob(".*tmp*"))
    assert sorted(models(db).values()) == ["done"] * 4


# --------------------------------------------------------------------------- bad input

def test_an_unreachable_address_is_named_in_seconds(grid_file, tmp_path):
    start = time.monotonic()
    port = free_port()
    out = invoke(["--grid", grid_file, "--out", tmp_path / "runs", "--no-ingest",
                  "--executor", "ray", "--address", f"127.0.0.1:{port}"])
    assert out.exit_code == 1
    assert out.output.startswith(f"Error: --address 127.0.0.1:{port}: no Ray cluster answers "
                                 f"there")
    assert len(out.output.strip().splitlines()) == 1
    assert time.monotonic() - start < 15
    out = invoke(["--grid", grid_file, "--executor", "ray", "--address", "nowhere"])
    assert "--address 'nowhere': expected auto, host:port or ray://host:port" in out.output


def test_an_address_of_the_wrong_kind_of_port_says_which_it_is(head, grid_file, tmp_path):
    """The client server's port without ray://, or ray:// on the cluster's own port:
    Ray would retry either for half a minute; the probe's one call names the mistake."""
    client = f"127.0.0.1:{head.client_port}"
    out = invoke(["--grid", grid_file, "--out", tmp_path / "runs", "--no-ingest",
                  "--executor", "ray", "--address", client])
    assert out.exit_code == 1
    assert out.output.startswith(f"Error: --address {client}: this is not a Ray cluster's "
                                 f"port (a Ray Client server? then write ray://{client})")
    gcs = f"ray://{head.address}"
    out = invoke(["--grid", grid_file, "--out", tmp_path / "runs", "--no-ingest",
                  "--executor", "ray", "--address", gcs])
    assert out.exit_code == 1
    assert out.output.startswith(f"Error: --address {gcs}: this is not a Ray Client server")
    assert not (tmp_path / "runs").exists()     # refused before any task


def test_gpus_on_a_cluster_without_one_and_an_out_no_worker_can_write(head, grid_file,
                                                                      tmp_path):
    out = invoke(["--grid", grid_file, "--out", tmp_path / "runs", "--no-ingest",
                  "--executor", "ray", "--address", head.address, "--gpus-per-model", "0.5"])
    assert out.exit_code == 1
    assert f"--gpus-per-model 0.5: the Ray cluster at {head.address}" in out.output
    assert "has no GPU" in out.output and not (tmp_path / "runs").exists()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = invoke(["--grid", grid_file, "--set", "width=24", "--out", blocker / "runs",
                  "--db", tmp_path / "w.duckdb", "--executor", "ray", "--address",
                  head.address])
    assert out.exit_code == 1, out.output
    assert f"{blocker / 'runs'}: node " in out.output
    assert "cannot write a run bundle there" in out.output
    assert "Traceback" not in out.output


def test_ray_options_need_the_ray_executor(grid_file):
    out = invoke(["--grid", grid_file, "--cpus-per-model", "2"])
    assert out.exit_code == 1 and "--cpus-per-model is an option of --executor ray" in out.output


# --------------------------------------------------------------------------- pieces

def test_rows_from_a_worker_are_checked_before_they_are_stored():
    row = {"model_id": "m", "measure": "a", "value": 1.0, "status": "ok", "error": None,
           "params": "{}"}
    assert check_measure_rows([row], "m", ["a"])[0]["value"] == 1.0
    bad = [([dict(row, value=float("nan"))], "finite number"),
           ([dict(row, value=None)], "finite number"),
           ([dict(row, status="failed")], "needs no value"),
           ([dict(row, measure="b")], "not a measure that was asked for"),
           ([dict(row, model_id="x")], "a row of model 'x'"),
           ([dict(row, params="[1]")], "JSON object"),
           ([row, row], "do not match"),
           ([{"model_id": "m"}], "exactly the keys"),
           ("rows", "expected a list")]
    for rows, message in bad:
        with pytest.raises(ValueError, match=message):
            check_measure_rows(rows, "m", ["a"])


def test_temp_dirs_of_other_machines_are_left_alone(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    mine, theirs = f".m1.tmp-{dead.pid}@{host_tag()}", f".m2.tmp-{dead.pid}@0badc0de"
    for name in (mine, theirs, f"{mine}-aside"):
        (tmp_path / name).mkdir()
    assert sorted(p.name for p in clean_stale(tmp_path)) == [mine, f"{mine}-aside"]
    assert [p.name for p in tmp_path.iterdir()] == [theirs]


def test_a_reader_holding_the_warehouse_costs_a_wait_not_the_tasks_in_flight(head):
    """A write (or a read of a task's inputs) that finds the warehouse held by a long
    reader raises WarehouseLocked after briefly()'s wait: the job goes back to the
    queue, the result waits and is written later; nothing is cancelled or lost."""
    import io
    import posixpath
    from collections import deque

    from rich.console import Console

    from fgm.train.driver import Display, Job, schedule
    from fgm.train.executor import ExecutorSettings
    from fgm.train.ray_executor import RayBackend
    from fgm.warehouse import WarehouseLocked

    held = {"submit": 2, "finish": 3}
    written = []

    def submit(job):
        if held["submit"]:
            held["submit"] -= 1
            raise WarehouseLocked("w.duckdb: the warehouse is in use by another process")
        return remote.remote(f"runs/{job.model_id}")

    def finish(job, ok, value):
        if held["finish"]:
            held["finish"] -= 1
            raise WarehouseLocked("w.duckdb: the warehouse is in use by another process")
        written.append((job.model_id, ok, value))

    with RayBackend(ExecutorSettings("ray", head.address), "cpu") as backend:
        remote = backend.cluster.remote(posixpath.basename, "basename")
        queue = deque(Job("train", f"m{i}", f"m{i}") for i in range(5))
        text = io.StringIO()
        with Display(Console(file=text), "t", 5) as display:
            schedule(backend, queue, display, submit, finish)
    assert sorted(written) == [(f"m{i}", True, f"m{i}") for i in range(5)]
    assert held == {"submit": 0, "finish": 0}
    assert display.started == 5
