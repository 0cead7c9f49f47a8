"""Benchmark: the demo grid's training, and the first command a new user runs.

By default, training only (no warehouse, one model after another in this
process): models per hour, median seconds per model, the share of time spent
checking the stop rule on the full training set, and peak memory.

--command: `fgm-train grid --preset demo` as the README gives it (every model
trained, ingested and measured, the default executor: one worker process per
core) in a new folder, timed wall to wall. Target: at most 3 minutes on 2 cores.

    python bench/train.py [--preset demo] [--dataset D --data-root DIR] [--device auto]
    python bench/train.py --command [--workers N] [--log FILE]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fgm.train.data import load_dataset
from fgm.train.grid import load_grid, override
from fgm.train.loop import resolve_device, train_one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--set", dest="settings", action="append", default=[])
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--limit", type=int, default=None, help="train only the first N models")
    ap.add_argument("--command", action="store_true",
                    help="time `fgm-train grid --preset PRESET` end to end, measures included")
    ap.add_argument("--workers", default=None, help="with --command: fgm-train's --workers")
    ap.add_argument("--log", default=None, help="with --command: write its output to this file")
    args = ap.parse_args()
    if args.command:
        return command(args)
    grid = load_grid(args.preset)
    if args.settings:
        grid = override(grid, args.settings)
    if args.dataset:
        grid.dataset = args.dataset
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    data = load_dataset(grid.dataset, args.data_root).to(device)
    load_s = time.perf_counter() - t0
    configs = grid.configs()[: args.limit]
    seconds, checks, steps, converged = [], 0.0, 0, 0
    start = time.perf_counter()
    for c in configs:
        r = train_one(c, data, grid.train, 0, device)
        seconds.append(r.timing["seconds"])
        checks += r.timing["stop_check_seconds"]
        steps += r.outcome["steps"]
        converged += r.outcome["converged"]
    total = time.perf_counter() - start
    print(f"grid {grid.name!r} on {grid.dataset} ({data.info['train_size']} train images), "
          f"{len(configs)} models on {device} ({torch.get_num_threads()} threads)")
    print(f"data loading: {load_s:.1f} s")
    print(f"training: {total:.1f} s in all ({total / 60:.2f} min; target <= 5 min for demo), "
          f"{converged}/{len(configs)} converged, {steps} steps")
    print(f"models per hour: {3600 * len(configs) / total:.0f}")
    print(f"median seconds per model: {statistics.median(seconds):.2f} "
          f"(min {min(seconds):.2f}, max {max(seconds):.2f})")
    print(f"share of time checking the stop rule on the full training set: "
          f"{100 * checks / sum(seconds):.1f}%")
    print(f"peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def command(args) -> None:
    """The README's first command in an empty folder, wall to wall."""
    extra = ["--workers", args.workers] if args.workers else []
    env = {k: v for k, v in os.environ.items() if k not in ("FGM_DB", "FGM_WORKERS")}
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        run = subprocess.run([str(Path(sys.executable).parent / "fgm-train"), "grid",
                              "--preset", args.preset, *extra], cwd=folder, env=env,
                             capture_output=True, text=True)
        wall = time.perf_counter() - start
    if run.returncode:
        raise SystemExit(run.stdout[-2000:] + run.stderr[-2000:])
    lines = (run.stdout + run.stderr).splitlines()
    if args.log:
        Path(args.log).write_text(run.stdout + run.stderr)
    trained = [line for line in lines if "(trained in " in line]
    measured = [line for line in lines if "(computed in " in line]

    def seconds(line: str, word: str) -> float:
        return float(line.split(word, 1)[1].split(" s", 1)[0])
    print(f"fgm-train grid --preset {args.preset} {' '.join(extra)}: {wall:.1f} s wall "
          f"({wall / 60:.2f} min; target <= 3 min on 2 cores), {os.cpu_count()} cores")
    print(f"  {len(trained)} models trained, {sum(seconds(x, 'trained in ') for x in trained):.0f} "
          f"s of training; {len(measured)} measured, "
          f"{sum(seconds(x, '(computed in ') for x in measured):.0f} s of measures "
          f"(summed over workers)")
    print(f"  {lines[-1] if lines else ''}")


if __name__ == "__main__":
    main()
