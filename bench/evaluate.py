"""Benchmark: the full Table 5 + Table 6 over generated warehouses.

40 measures, 7 axes, all 29 conditioning sets, oracles at 4 ε (CMI by Monte
Carlo), canonical and random baselines; for 2,187 and 10,000 models. Also
times a per-pair Python loop doing the |S| = 2 CMI of one measure on the same
data and prints the ratio. Targets (2 cores): 2,187 models < 10 s, 10,000
models < 60 s, peak memory < 4 GiB, ≥ 100× faster than the loop.

--api: Table 5 as a notebook asks it, fgm.open(db).table(), beside `fgm-query table
--no-store --format json` as a command (a process of its own, start-up included):
Warehouse.table() is to take no longer.

    python bench/evaluate.py [--sizes 2187,10000] [--draws 10] [--api]
"""

from __future__ import annotations

import argparse
import math
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from fgm.analysis.evaluate import Selection, measure_values, select_models, table5, table6
from fgm.analysis.ranking import Conditioning, cmi_by_set
from fgm.analysis.sql import create_hp_wide
from fgm.ingest.synthetic import synthetic_table
from fgm.ingest.table import ingest_table
from fgm.warehouse import connect


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loop_cmi_one_set(mu, gap, levels, s, rows) -> float:
    """The per-pair loop: every ordered pair (a, b), a 2x2 table per slice."""
    slices = defaultdict(lambda: [0, 0, 0, 0])
    n = len(mu)
    mu, gap, la = mu.tolist(), gap.tolist(), levels.tolist()
    i, j = s
    for a in rows:
        for b in range(n):
            if a == b:
                continue
            key = (la[a][i], la[b][i], la[a][j], la[b][j])
            slices[key][2 * (gap[a] > gap[b]) + (mu[a] > mu[b])] += 1
    num = den = 0.0
    for t in slices.values():
        total = sum(t)
        pg = [(t[0] + t[1]) / total, (t[2] + t[3]) / total]
        pm = [(t[0] + t[2]) / total, (t[1] + t[3]) / total]
        mi = sum(c / total * math.log(c / total / (pg[k // 2] * pm[k % 2]))
                 for k, c in enumerate(t) if c)
        h = -sum(p * math.log(p) for p in pg if p)
        num, den = num + total * mi, den + total * h
    return num / den if den else math.nan


def bench(n_models: int, draws: int, tmp: Path) -> None:
    db = tmp / f"bench{n_models}.duckdb"
    con = connect(db)
    ingest_table(con, Path(f"synthetic{n_models}.csv"),
                 frame=synthetic_table(n_models, 40, converged_share=0.95, null_share=0.01))
    con.close()
    con = connect(db, read_only=True)
    create_hp_wide(con)
    t0 = time.perf_counter()
    t5 = table5(con, Selection())
    t1 = time.perf_counter()
    t6 = table6(con, Selection(), draws=draws)
    t2 = time.perf_counter()
    print(f"\n== {n_models} models ({t5['n_models'][0]} converged with values), 40 measures, "
          f"7 axes, 29 conditioning sets, oracles at 4 eps ({draws} CMI draws each)")
    print(f"Table 5 (tau, psi, Psi): {t1 - t0:.2f} s  [{t5.height} rows]")
    print(f"Table 6 (CMI, K):        {t2 - t1:.2f} s  [{t6.height} rows]")
    print(f"total:                   {t2 - t0:.2f} s")

    models = select_models(con, Selection())
    mu, sub = measure_values(con, "measure_00", models)
    con.close()
    cond = Conditioning.build(sub.levels, sizes=(2,))
    t3 = time.perf_counter()
    ours = cmi_by_set(mu, sub.gap, cond)
    ours_s = time.perf_counter() - t3
    n = len(mu)
    rows = range(n) if n <= 2500 else range(0, n, max(1, n // 400))
    t4 = time.perf_counter()
    first = loop_cmi_one_set(mu, sub.gap, sub.levels, cond.sets[0], rows)
    loop_s = (time.perf_counter() - t4) * (n / len(rows)) * len(cond.sets)
    if len(rows) == n:
        assert abs(first - ours[0]) < 1e-9, (first, ours[0])
    how = "measured on one set, x21 sets" if len(rows) == n else \
        f"measured on {len(rows)} of {n} rows and one set, extrapolated"
    print(f"|S| = 2 CMI of one measure: fgm {ours_s * 1e3:.0f} ms, per-pair Python loop "
          f"{loop_s:.0f} s ({how}): {loop_s / ours_s:,.0f}x faster")


def api(n_models: int, tmp: Path) -> None:
    """Warehouse.table() against fgm-query table on the same warehouse."""
    import fgm
    db = tmp / f"api{n_models}.duckdb"
    con = connect(db)
    ingest_table(con, Path(f"synthetic{n_models}.csv"),
                 frame=synthetic_table(n_models, 40, converged_share=0.95, null_share=0.01))
    con.close()
    t0 = time.perf_counter()
    with fgm.open(db) as wh:
        frame = wh.table()
    t1 = time.perf_counter()
    run = subprocess.run([str(Path(sys.executable).parent / "fgm-query"), "table", "--no-store",
                          "--format", "json", "--db", str(db)], capture_output=True, text=True)
    t2 = time.perf_counter()
    if run.returncode:
        raise SystemExit(run.stderr[-2000:])
    print(f"\n== Table 5 of {n_models} models, 40 measures: fgm.open(db).table() "
          f"{t1 - t0:.2f} s (open included) [{frame.height} rows]; fgm-query table "
          f"{t2 - t1:.2f} s (a new process, start-up included)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2187,10000")
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--api", action="store_true",
                    help="time fgm.open(db).table() beside fgm-query table")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.sizes.split(",")):
            if args.api:
                api(n, Path(tmp))
            else:
                bench(n, args.draws, Path(tmp))
    print(f"\npeak memory: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
