"""Benchmark: the same 8-model digits grid on the local executor and on Ray.

Runs `fgm-train grid` as a user would (a subprocess each, --no-measures, a fresh
--out and warehouse each), and prints models per hour and the scaling efficiency
of Ray with 2 workers (one CPU and one torch thread each) against one local
process, plus the driver's own work per model: checking and ingesting a run
bundle, and checking and storing a model's 40 measure rows.

    python bench/scale.py                        # local (2 threads), local (1 thread), Ray x2
    python bench/scale.py --workers 4            # Ray with 4 one-CPU workers
    python bench/scale.py --gpu --dataset cifar10 --data-root ~/data
                                                 # 1, 2, 4, 8 models sharing one GPU

--gpu trains the grid on Ray with --gpus-per-model 1, 0.5, 0.25 and 0.125 and
prints models per hour and each model's peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
SETS = ["width=24,48", "depth=2,3", "batch_size=64,128"]     # 8 models of the demo grid


def run(label: str, args: list[str], root: Path, env: dict | None = None) -> dict:
    out, db = root / label / "runs", root / label / "w.duckdb"
    cmd = [str(BIN / "fgm-train"), "grid", "--preset", "demo", *sum([["--set", s] for s in SETS],
                                                                   []),
           "--out", str(out), "--db", str(db), "--no-measures", *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{label}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    text = done.stdout + done.stderr
    models = len(re.findall(r"^\[\d+/\d+\]", text, flags=re.M))
    phase = re.search(r"on Ray \(([\d.]+) s", text)     # the driver's own clock, after start-up
    gpu = [float(m) for m in re.findall(r"([\d.]+) MiB GPU", text)]
    return {"label": label, "models": models, "wall": wall,
            "train": float(phase.group(1)) if phase else wall, "gpu": gpu, "out": out}


def per_hour(r: dict, key: str) -> float:
    return 3600 * r["models"] / r[key]


def ingest_overhead(bundles: Path, root: Path) -> tuple[float, float]:
    """Median ms per model of the driver's writes: a bundle (prepare_bundle with the
    warehouse closed, then store_bundle in one transaction) and 40 measure rows
    (check_measure_rows, then store_measure_rows)."""
    from fgm.ingest.bundles import find_bundles, prepare_bundle, store_bundle
    from fgm.measures import list_measures
    from fgm.measures.runner import JobReport, check_measure_rows, store_measure_rows
    from fgm.warehouse.store import briefly
    db = root / "overhead.duckdb"
    names = [s.name for s in list_measures()]
    bundle_ms, rows_ms = [], []
    for b in find_bundles(bundles):
        t = time.perf_counter()
        prepared = prepare_bundle(b)
        with briefly(db) as con:
            store_bundle(con, prepared)
        bundle_ms.append(1000 * (time.perf_counter() - t))
        rows = [{"model_id": b.name, "measure": n, "value": 1.0 + i, "status": "ok",
                 "error": None, "params": json.dumps({"seed": 0})} for i, n in enumerate(names)]
        t = time.perf_counter()
        store_measure_rows(db, check_measure_rows(rows, b.name, names), JobReport())
        rows_ms.append(1000 * (time.perf_counter() - t))
    return statistics.median(bundle_ms), statistics.median(rows_ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="Ray workers (one CPU each)")
    ap.add_argument("--address", default=None, help="join this Ray cluster instead")
    ap.add_argument("--gpu", action="store_true", help="the GPU-sharing runs instead")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args()
    data = ["--dataset", args.dataset] + (["--data-root", args.data_root] if args.data_root
                                          else [])
    ray = ["--executor", "ray"] + (["--address", args.address] if args.address else [])
    with tempfile.TemporaryDirectory(prefix="fgm-scale-") as tmp:
        root = Path(tmp)
        if args.gpu:
            print(f"8 models of the demo grid on {args.dataset}, on Ray, sharing one GPU")
            for share in (1, 0.5, 0.25, 0.125):
                r = run(f"gpu{share}", [*data, *ray, "--gpus-per-model", str(share)], root)
                mem = f"{max(r['gpu']):.0f} MiB" if r["gpu"] else "?"
                print(f"  --gpus-per-model {share:<5} ({int(1 / share)} at a time): "
                      f"{per_hour(r, 'train'):6.0f} models/h, peak GPU memory per model {mem}")
            return
        local2 = run("local", [*data, "--device", "cpu"], root)
        local1 = run("local1", [*data, "--device", "cpu"], root, env={"OMP_NUM_THREADS": "1"})
        if args.address is None:
            ray_env = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
        else:
            ray_env = {}
        rayr = run("ray", [*data, *ray, "--cpus-per-model", "1"], root, env=ray_env)
        cores = os.cpu_count()
        print(f"8 models of the demo grid on {args.dataset}, training only; {cores} cores")
        for r, what in ((local2, f"local, 1 process, torch's {cores} threads"),
                        (local1, "local, 1 process, 1 thread (a Ray task's arithmetic)"),
                        (rayr, f"Ray, {args.workers} workers x 1 CPU")):
            extra = (f"; {per_hour(r, 'train'):.0f} models/h once Ray is up "
                     f"({r['wall'] - r['train']:.1f} s start-up)" if r is rayr else "")
            print(f"  {what:52s} {r['wall']:6.1f} s  {per_hour(r, 'wall'):6.0f} models/h{extra}")
        eff1 = per_hour(rayr, "train") / (args.workers * per_hour(local1, "wall"))
        eff2 = per_hour(rayr, "train") / per_hour(local2, "wall")
        print(f"  scaling efficiency: {eff1:.0%} of {args.workers} x one 1-thread process; "
              f"{eff2:.2f}x the local executor's models/h")
        bundle_ms, rows_ms = ingest_overhead(rayr["out"], root)
        print(f"  driver overhead per model: {bundle_ms:.0f} ms to check and ingest a bundle, "
              f"{rows_ms:.0f} ms to check and store its 40 measure rows")


if __name__ == "__main__":
    main()
