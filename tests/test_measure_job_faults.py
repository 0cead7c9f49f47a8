"""Faults found by an independent review of the searches (#10) and the Ray executor
(#11): each test failed on commits c7142df/00d865f."""

import io
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from test_ingest_bundles import make_bundle, model_id

from fgm.ingest.bundles import prepare_bundle, store_bundle
from fgm.measures.context import Settings
from fgm.measures.registry import list_measures
from fgm.measures.runner import (
    JobReport,
    check_measure_rows,
    measure_models,
    models_to_measure,
    store_measure_rows,
)
from fgm.warehouse import connect
from fgm.warehouse.store import briefly


def _ingest(db: Path, bundle: Path) -> str:
    prepared = prepare_bundle(bundle)
    con = connect(db)
    try:
        store_bundle(con, prepared)
    finally:
        con.close()
    return prepared.model_id


def _value(db: Path, mid: str, measure: str):
    con = connect(db, read_only=True)
    try:
        return con.execute("SELECT value, status, error FROM measures WHERE model_id = ? "
                           "AND measure = ?", [mid, measure]).fetchone()
    finally:
        con.close()


# ------------------------------------------------------------------ rows from workers

def test_a_row_with_a_huge_integer_is_refused_not_a_driver_crash():
    """check_measure_rows must turn any bad row into ValueError (the driver then
    refuses the row and goes on); OverflowError escapes and stops the whole grid."""
    row = dict(model_id="m", measure="a", value=10 ** 400, status="ok", error=None,
               params="{}")
    with pytest.raises(ValueError):
        check_measure_rows([row], "m", ["a"])


def test_params_that_are_not_strict_json_are_refused():
    """json.loads accepts NaN/Infinity, which is not JSON; such params are stored as is."""
    row = dict(model_id="m", measure="a", value=1.0, status="ok", error=None,
               params='{"converged": NaN}')
    with pytest.raises(ValueError):
        check_measure_rows([row], "m", ["a"])


# ------------------------------------------------------------------ --set validation

@pytest.mark.parametrize("assignment", [
    "sigma_start=nan", "sigma_start=-1", "sigma_mag_start=0", "alpha_start=inf",
    "alpha_mag_start=-0.05", "ascent_lr=inf", "eps=nan", "eps=-1", "delta=0",
    "delta=-1", "batch=0", "batch=-3", "power_iterations=-5", "spectral=bogus",
    "seed=-7", "seed=99999999999999"])
def test_set_refuses_senseless_values(assignment):
    """Bad input: a clear error naming the option, not a value that makes every
    measure fail (and be stored as failed, never retried) or a silent mislabel."""
    with pytest.raises(ValueError):
        Settings.parse("paper", [assignment])


def test_set_seed_does_not_silently_override_the_seed_option():
    """fgm-measure --seed 0 --set seed=5: two answers to one question; one wins silently."""
    with pytest.raises(ValueError):
        Settings.parse("paper", ["seed=5"], seed=0, spectral="fft")


# ------------------------------------------------------------------ Ray: failures

def _cluster():
    import ray

    from fgm.train.executor import ExecutorSettings
    from fgm.train.ray_executor import RayBackend
    backend = RayBackend(ExecutorSettings("ray"), "cpu")
    # only Ray's exception classes are used here; nothing is started
    backend.ray = backend.cluster.ray = ray
    return backend


def test_a_dead_measure_worker_does_not_overwrite_good_values(db, tmp_path):
    """fgm-measure --executor ray --recompute (or a stale-settings recompute): a task
    whose worker died for good must not replace the values already stored with NULLs
    (nothing finished is lost), and the model must still be measured on a rerun."""
    import ray

    from fgm.train.driver import Display, Job
    from fgm.train.driver import finish_measures as _finish_measures
    mid = _ingest(db, make_bundle(tmp_path / "runs"))
    good = [{"model_id": mid, "measure": "vc_dim", "value": 123.0, "status": "ok",
             "error": None, "params": "{}"}]
    store_measure_rows(db, good, JobReport())
    assert _value(db, mid, "vc_dim")[0] == 123.0
    display = Display(Console(file=io.StringIO()), "measures", 1)
    job = Job("measure", mid, mid, names=["vc_dim"])
    _finish_measures(_cluster(), db, JobReport(), display, job, False,
                     ray.exceptions.WorkerCrashedError())
    assert _value(db, mid, "vc_dim")[0] == 123.0, _value(db, mid, "vc_dim")


def test_measures_whose_worker_died_are_retried_by_the_next_run(db, tmp_path):
    """A worker that died (OOM, node lost) is not the measure's failure: the next run
    of the same command must measure the model again (train failures are retried)."""
    import ray

    from fgm.train.driver import Display, Job
    from fgm.train.driver import finish_measures as _finish_measures
    mid = _ingest(db, make_bundle(tmp_path / "runs"))
    display = Display(Console(file=io.StringIO()), "measures", 1)
    _finish_measures(_cluster(), db, JobReport(), display,
                     Job("measure", mid, mid, names=["vc_dim"]), False,
                     ray.exceptions.WorkerCrashedError())
    with briefly(db) as con:
        todo = models_to_measure(con, list_measures("vc_dim"), None, False, None, Settings())
    assert todo.height == 1, "a transient worker death became a permanent 'failed' value"


# ------------------------------------------------------------------ Ray: bundle paths

def _grid_run(db, out: Path, job_mid: str):
    from fgm.train.driver import Display, GridPlan, GridRun, Job
    plan = GridPlan(grid=None, jobs=[(None, 0, job_mid)], todo=[(None, 0, job_mid)], out=out,
                    db=db, device="cpu", data_root=None, download=False, no_ingest=False,
                    no_measures=True, console=Console(file=io.StringIO()))
    run = GridRun(plan, _cluster())
    run.display = Display(plan.console, "g", 1)
    return run, Job("train", job_mid, "label")


def test_a_returned_bundle_path_is_confined_to_out_and_to_its_model(db, tmp_path):
    """A worker returns a path; the driver must check it is --out/<the job's model_id>
    before ingesting it. Here model A's task returns a bundle of model B outside --out:
    B is ingested, A is counted as trained, and A is missing from the warehouse."""
    out = tmp_path / "runs"
    elsewhere = make_bundle(tmp_path / "elsewhere", seed=7)
    job_mid = "a" * 16
    run, job = _grid_run(db, out, job_mid)
    from fgm.train.driver import Job
    outcome = {"converged": True, "steps": 1, "train_loss": 0.0, "gap": 0.0}
    connect(db).close()
    failed = []
    run._failed = lambda job, why, store=True: failed.append(why)   # its storing: elsewhere
    run._trained(job, {"bundle": str(elsewhere), "node": "n", "outcome": outcome,
                       "seconds": 0.1, "gpu_memory": None})
    assert failed and f"not {out / job_mid}" in failed[0]
    con = connect(db, read_only=True)
    try:
        ids = {r[0] for r in con.sql("SELECT model_id FROM models").fetchall()}
    finally:
        con.close()
    assert model_id(elsewhere) not in ids, f"ingested {elsewhere} for job {job_mid}"
    # a bundle in the job's own place, but of another model: refused too
    shutil.copytree(elsewhere, out / job_mid)
    failed.clear()
    run._trained(Job("train", job_mid, "label"), {"bundle": str(out / job_mid), "node": "n",
                                                  "outcome": outcome, "seconds": 0.1,
                                                  "gpu_memory": None})
    assert failed and "its bundle was refused" in failed[0]


# ------------------------------------------------------------------ stale settings

def test_a_grid_resume_does_not_redo_values_measured_with_another_budget(db, tmp_path):
    """fgm-measure --budget thorough, then the README's resume instruction (run the
    same fgm-train grid again): the resume fills gaps only; the thorough values stay.
    (fgm-measure with the default budget would recompute them: that is asked for.)"""
    mid = _ingest(db, make_bundle(tmp_path / "runs"))
    thorough = Settings.preset("thorough")
    params = {"converged": True, "seed": 0, "budget": "thorough", "draws": thorough.draws,
              "stderr_ratio": thorough.stderr_ratio,
              "bisection_steps": thorough.bisection_steps}
    rows = [{"model_id": mid, "measure": "pacbayes_flatness", "value": 50.0, "status": "ok",
             "error": None, "params": json.dumps(params)}]
    store_measure_rows(db, rows, JobReport())
    with briefly(db) as con:      # fgm-measure's question: stale under the paper budget
        todo = models_to_measure(con, list_measures("pacbayes_flatness"), None, False, [mid],
                                 Settings())
    assert todo.height == 1
    # a resume through the library, in this process
    report = measure_models(db, pattern="pacbayes_flatness", model_ids=[mid],
                            refresh_stale=False)
    assert report.models == 0 and _value(db, mid, "pacbayes_flatness")[0] == 50.0
    # a grid's resume (train/driver.py, every executor)
    run, _ = _grid_run(db, tmp_path / "runs", mid)
    assert "pacbayes_flatness" not in run._missing_measures([mid]).get(mid, [])


@pytest.mark.parametrize("name", ["pacbayes_mag_init", "pacbayes_mag_orig",
                                  "pac_sharpness_mag_init", "pac_sharpness_mag_orig"])
def test_delta_changes_values_so_it_is_recorded_and_triggers_a_recompute(name, monkeypatch):
    """--set delta=0.05 changes the pacbayes_mag_* and pac_sharpness_mag_* values
    (log(m/δ), log(2ω/δ)): their params record δ, so a run with another δ recomputes
    them and one with the same δ does not. (The searches are replaced by fixed
    scales: only the bound's use of δ is under test.)"""
    import torch

    from fgm.measures import pac_bayes, sharpness
    from fgm.measures.context import Context
    from fgm.measures.registry import REGISTRY
    from fgm.measures.runner import _stale
    from fgm.train.nin import NiN
    monkeypatch.setattr(pac_bayes, "sigma_mag", lambda ctx: (0.3, {"seed": ctx.settings.seed}))
    monkeypatch.setattr(sharpness, "alpha_mag", lambda ctx: (0.02, {"seed": ctx.settings.seed}))
    torch.manual_seed(0)
    net = NiN(1, 10, 8, 2).eval()
    x, y = torch.randn(20, 1, 8, 8), torch.zeros(20, dtype=torch.long)
    values = {}
    for delta in (0.01, 0.05):
        ctx = Context.from_models(net, x, y, 10, init=NiN(1, 10, 8, 2).eval(),
                                  settings=Settings(delta=delta))
        values[delta] = REGISTRY[name].fn(ctx)
    (v1, p1), (v5, _) = values[0.01], values[0.05]
    assert v1 != v5                                   # δ changes the value...
    assert p1["delta"] == 0.01                        # ...so it is recorded
    assert _stale(json.dumps(p1), Settings(delta=0.05))
    assert not _stale(json.dumps(p1), Settings())


def test_a_failed_search_is_retried_under_a_bigger_budget():
    """A measure that fails stores the settings it failed with, so a search that failed
    under --budget fast ("never dropped", NoSafeScale) is computed again by --budget
    thorough, and not again by another fast run."""
    import torch

    from fgm.measures.context import Context
    from fgm.measures.registry import MeasureSpec
    from fgm.measures.runner import _stale, run_one
    from fgm.train.nin import NiN

    def never_drops(ctx):
        raise ValueError("the training accuracy never dropped by 0.1")
    spec = MeasureSpec(name="x", eq="", family="pac_bayes", needs=(), fn=never_drops,
                       description="")
    ctx = Context.from_models(NiN(1, 10, 8, 2).eval(), torch.randn(4, 1, 8, 8),
                              torch.zeros(4, dtype=torch.long), 10,
                              settings=Settings.preset("fast"))
    value, status, error, params = run_one(spec, ctx)
    assert value is None and status == "failed" and "never dropped" in error
    assert _stale(json.dumps(params), Settings.preset("thorough"))
    assert not _stale(json.dumps(params), Settings.preset("fast"))
