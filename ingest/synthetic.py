"""Synthetic results tables: a full grid of models with a planted gap signal.

For benchmarks, tests and trying the tools without training anything. The
gap is a noisy function of the levels, and each measure is the gap seen
through a monotone transform plus measure-specific noise, so some measures
rank the gap well and others barely at all.
"""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl

PAPER_AXES: dict[str, list] = {
    "batch_size": [32, 64, 128],
    "depth": [2, 4, 8],
    "dropout": [0.0, 0.25, 0.5],
    "learning_rate": [0.1, 0.032, 0.01],
    "optimizer": ["sgd", "adam", "rmsprop"],
    "weight_decay": [0.0, 1e-4, 5e-4],
    "width": [192, 384, 768],
}


def synthetic_table(n_models: int | None = None, n_measures: int = 5, *,
                    axes: dict[str, list] | None = None, seed: int = 0,
                    converged_share: float = 1.0, null_share: float = 0.0,
                    levels: bool = True) -> pl.DataFrame:
    """One row per model in the results-table format (SPEC §5).

    Without `n_models` the table is the full grid; with it, the grid is
    repeated over seeds (or cut) until it has `n_models` rows.
    """
    axes = axes or PAPER_AXES
    rng = np.random.default_rng(seed)
    grid = list(itertools.product(*[range(len(v)) for v in axes.values()]))
    n = n_models or len(grid)
    rows = [grid[i % len(grid)] for i in range(n)]
    seeds = np.array([i // len(grid) for i in range(n)])
    lv = np.array(rows, dtype=np.int64).reshape(n, len(axes))  # (n, k)
    effects = rng.normal(0, 0.03, size=len(axes))
    gap = 0.15 + (lv - 1) @ effects + rng.normal(0, 0.02, size=n)
    test_acc = np.clip(1.0 - gap, 0.0, 1.0)
    data: dict[str, object] = {"model_id": [f"m{i:06d}" for i in range(n)], "seed": seeds}
    for j, (axis, values) in enumerate(axes.items()):
        data[f"hp.{axis}"] = [values[k] for k in lv[:, j]]
        if levels:
            data[f"level.{axis}"] = lv[:, j]
    data["train_acc"] = np.ones(n)
    data["test_acc"] = test_acc
    data["is.converged"] = rng.random(n) < converged_share
    for m in range(n_measures):
        noise = rng.normal(0, 0.01 * (1 + 3 * m), size=n)
        value = np.exp(3 * (1.0 - test_acc) + noise) * (-1 if m % 7 == 6 else 1)
        value[rng.random(n) < null_share] = np.nan
        data[f"complexity.measure_{m:02d}"] = value
    return pl.DataFrame(data)


def main(argv: list[str] | None = None) -> None:
    """python -m fgm.ingest.synthetic OUT.csv|OUT.parquet [--models N] [--measures K]"""
    import argparse
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="python -m fgm.ingest.synthetic",
                                 description="Write a synthetic results table (the paper's "
                                             "7-axis grid, a planted gap signal).")
    ap.add_argument("out", type=Path)
    ap.add_argument("--models", type=int, default=None, help="default: the full 2,187 grid")
    ap.add_argument("--measures", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    table = synthetic_table(args.models, args.measures, seed=args.seed, converged_share=0.95)
    if args.out.suffix == ".parquet":
        table.write_parquet(args.out)
    else:
        table.write_csv(args.out)
    print(f"{args.out}: {table.height} models, {args.measures} measures (synthetic)")


if __name__ == "__main__":
    main()
