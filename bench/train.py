"""Benchmark: the demo grid end to end (training only, no warehouse).

Prints models per hour, median seconds per model, the share of time spent
checking the stop rule on the full training set, and peak memory. Target:
the demo grid in 5 minutes or less on a 2-core machine.

    python bench/train.py [--preset demo] [--dataset D --data-root DIR] [--device auto]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from fgm.train.cli import resolve_device
from fgm.train.data import load_dataset
from fgm.train.grid import load_grid, override
from fgm.train.loop import train_one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--set", dest="settings", action="append", default=[])
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--limit", type=int, default=None, help="train only the first N models")
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
