"""Benchmark: do this code's measures equal the values a warehouse stores, and how
long do they take? For the one-network-protocol change (issue #21): a demo
warehouse measured by the code before it, recomputed by this code.

    # the warehouse, by the code of another commit (a worktree with its own venv
    # that reuses this one's packages), with every measure:
    python bench/recompute.py --make-old f65f195 --out /tmp/old.duckdb
    # then this code, on a copy of it, with the settings its values were computed with:
    python bench/recompute.py /tmp/old.duckdb

prints, per measure, the largest relative difference between the stored and the
recomputed value, the count over 1e-6, and the seconds of measures summed over
the models, the stored run's (from its log, --make-old) and this one's, each with
two single-thread worker processes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "train" / "grids" / "demo.toml"


def make_old(ref: str, out: Path) -> None:
    """The demo grid, trained and measured by the code of commit `ref`."""
    work = Path(tempfile.mkdtemp(prefix="fgm-old-"))
    tree, venv = work / "tree", work / "venv"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref],
                   check=True, capture_output=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = next((venv / "lib").glob("python*/site-packages"))
        here = next(p for p in sys.path if p.endswith("site-packages"))
        (site / "reuse.pth").write_text(here + "\n")     # torch & co. from this venv
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps",
                        "-e", str(tree)], check=True)
        env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
        env.pop("FGM_DB", None)
        start = time.perf_counter()
        run = subprocess.run([str(venv / "bin" / "fgm-train"), "grid", "--grid", str(DEMO),
                              "--out", str(work / "runs"), "--db", str(out), "--workers", "2"],
                             env=env, capture_output=True, text=True, cwd=work)
        wall = time.perf_counter() - start
        if run.returncode:
            sys.exit(run.stdout[-3000:] + run.stderr[-3000:])
        seconds = [float(s) for s in re.findall(r"computed in ([\d.]+) s", run.stdout)]
        (out.with_suffix(".json")).write_text(json.dumps(
            {"ref": ref, "wall_s": wall, "measure_seconds": seconds}))
        print(f"{ref}: {len(seconds)} models measured, {sum(seconds):.1f} s of measures "
              f"summed ({wall:.0f} s wall with training) -> {out}")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                       capture_output=True)


def recompute(db: Path) -> None:
    import duckdb
    import polars as pl

    from fgm.measures.context import Settings
    from fgm.measures.runner import measure_models
    con = duckdb.connect(str(db), read_only=True)
    stored = con.sql("SELECT model_id, measure, value, params FROM measures").pl()
    con.close()
    params = [json.loads(p) for p in stored["params"].drop_nulls() if p]
    budget = next((p["budget"] for p in params if "budget" in p), "paper")
    keys = Settings.__dataclass_fields__
    over = {k: v for p in params for k, v in p.items() if k in keys and k != "budget"}
    settings = Settings.preset(budget, **over)
    work = Path(tempfile.mkdtemp(prefix="fgm-recompute-")) / "w.duckdb"
    shutil.copy(db, work)
    start = time.perf_counter()
    from rich.console import Console

    from fgm.train import driver
    from fgm.train.driver import measure_run  # noqa: I001
    from fgm.train.executor import ExecutorSettings
    from fgm.train.pool import LocalBackend
    seconds: list[float] = []
    finish = driver.finish_measures

    def timed(backend, db, report, display, job, ok, value, summary=False):
        if ok and isinstance(value, dict) and "seconds" in value:
            seconds.append(value["seconds"])      # the worker's own time for the model
        return finish(backend, db, report, display, job, ok, value, summary)
    driver.finish_measures = timed
    with LocalBackend(ExecutorSettings(workers=2), "cpu") as backend:
        report = measure_run(str(work), Console(quiet=True), backend, recompute=True,
                             settings=settings)
    wall = time.perf_counter() - start
    del measure_models
    con = duckdb.connect(str(work), read_only=True)
    new = con.sql("SELECT model_id, measure, value AS new FROM measures").pl()
    con.close()
    both = stored.join(new, on=["model_id", "measure"]).with_columns(
        ((pl.col("new") - pl.col("value")).abs()
         / pl.col("value").abs().clip(lower_bound=1e-300)).alias("rel"))
    per = both.group_by("measure").agg(
        pl.col("rel").max().alias("max_rel"), (pl.col("rel") > 1e-6).sum().alias("over_1e-6"),
        (pl.col("value").is_null() != pl.col("new").is_null()).sum().alias("null_differs"),
        pl.len().alias("values")).sort("measure")
    with pl.Config(tbl_rows=60):
        print(per)
    n_over = int(per["over_1e-6"].sum()) + int(per["null_differs"].sum())
    print(f"\n{both.height} values of {stored['model_id'].n_unique()} models recomputed "
          f"(budget {budget!r}); {n_over} differ by more than 1e-6 or in being NULL; "
          f"largest relative difference {both['rel'].max():.2e}")
    print(f"this code: {sum(seconds):.1f} s of measures summed over {len(seconds)} models "
          f"({wall:.1f} s wall, 2 single-thread workers, {report.models} models stored)")
    log = db.with_suffix(".json")
    if log.is_file():
        old = json.loads(log.read_text())
        print(f"{old['ref']}: {sum(old['measure_seconds']):.1f} s of measures summed over "
              f"{len(old['measure_seconds'])} models (the grid's log): ratio "
              f"{sum(seconds) / sum(old['measure_seconds']):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db", type=Path, nargs="?", help="a warehouse whose NiNs have checkpoints")
    ap.add_argument("--make-old", metavar="REF", help="train and measure the demo grid with "
                    "the code of commit REF into --out")
    ap.add_argument("--out", type=Path, default=Path("old.duckdb"))
    args = ap.parse_args()
    if args.make_old:
        make_old(args.make_old, args.out.resolve())
    if args.db:
        recompute(args.db)


if __name__ == "__main__":
    main()
