"""Benchmark: ingest a generated results table into a new warehouse.

Default: 10,000 models x 40 measures x 7 axes (the issue's target: under 10 s
on a 2-core machine). Prints seconds per phase and peak memory.

    python bench/ingest.py [--models 10000] [--measures 40]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from fgm.ingest.synthetic import synthetic_table
from fgm.ingest.table import ingest_table
from fgm.warehouse import connect


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=10_000)
    ap.add_argument("--measures", type=int, default=40)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        table = synthetic_table(args.models, args.measures, null_share=0.01)
        csv = Path(tmp) / "results.csv"
        table.write_csv(csv)
        print(f"table: {table.height} models x {args.measures} measures x 7 axes, "
              f"{csv.stat().st_size / 2**20:.1f} MiB CSV")
        db = Path(tmp) / "bench.duckdb"
        t0 = time.perf_counter()
        con = connect(db)
        t1 = time.perf_counter()
        summary = ingest_table(con, csv)
        t2 = time.perf_counter()
        again = ingest_table(con, csv)
        t3 = time.perf_counter()
        con.close()
        print(summary)
        print(f"open + schema: {t1 - t0:.2f} s")
        print(f"ingest into a new warehouse: {t2 - t1:.2f} s (target < 10 s)")
        print(f"re-ingest (all unchanged): {t3 - t2:.2f} s  [{again.values[2]} values unchanged]")
        print(f"peak memory: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
