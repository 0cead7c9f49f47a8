"""What storing an evaluation costs: the fingerprint of the data it read (taken in
the evaluation's own read), the write, and the staleness view, on a synthetic
warehouse of N models x 40 measures x 7 axes.

    python bench/stored.py [--models 10000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fgm.analysis.evaluate import Selection
from fgm.analysis.stored import snapshot, store_evaluation
from fgm.ingest.synthetic import synthetic_table
from fgm.ingest.table import ingest_table
from fgm.warehouse import connect


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.duckdb"
        con = connect(db)
        ingest_table(con, Path("synthetic.csv"), frame=synthetic_table(args.models, 40),
                     sweep="bench")
        measure = con.sql("SELECT min(measure) FROM measures").fetchall()[0][0]
        ids = [r[0] for r in con.sql("SELECT model_id FROM models").fetchall()]
        con.close()
        sel = Selection()
        con = connect(db, read_only=True)
        one, t_one = timed(lambda: snapshot(con, sel, ids, measure))
        every, t_all = timed(lambda: snapshot(con, sel, ids, "*"))
        con.close()
        rows = [{"measure": f"m{i}", "kind": "measure", "axis": "all", "quantity": q,
                 "value": 0.5, "detail": None} for i in range(40) for q in ("tau", "Psi")]
        _, t_store = timed(lambda: store_evaluation(db, every, "table psi", sel, {}, rows))
        for k in range(20):   # 20 evaluations of one measure each, 20 of everything
            store_evaluation(db, one, "psi", sel, {"measure": measure, "k": k}, rows[:2])
            store_evaluation(db, every, "table psi", sel, {"k": k}, rows)
        con = connect(db, read_only=True)
        (n, stale), t_view = timed(lambda: con.sql(
            "SELECT count(*), count(*) FILTER (WHERE stale) FROM latest_evaluation").fetchall()[0])
        con.close()
    print(f"{args.models} models x 40 measures x 7 axes")
    print(f"fingerprint of one measure's inputs:  {t_one * 1000:8.0f} ms")
    print(f"fingerprint of every measure's:       {t_all * 1000:8.0f} ms")
    print(f"storing a table's evaluation:         {t_store * 1000:8.0f} ms (open, write, close)")
    print(f"latest_evaluation over 41 evaluations: {t_view * 1000:7.0f} ms "
          f"({n} values, {stale} stale)")


if __name__ == "__main__":
    main()
