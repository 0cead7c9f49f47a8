"""The evaluation queries of docs/warehouse.md (the README links there), run
literally with fgm-query sql on a warehouse whose evaluations are known: two rounds
of `table`, models landing in between."""

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from reference import psi_ref, tau_ref
from warehouse_fixture import build_warehouse, ingest_file

from fgm.analysis.cli import main as query
from fgm.measures.registry import mirror_definitions
from fgm.warehouse import connect

PAGE = Path(__file__).resolve().parents[1] / "docs" / "warehouse.md"
DEPTHS, WIDTHS = [2, 4, 8], [16, 32, 64]
MEASURES = {"prod_of_spec": "spectral", "sum_of_spec": "spectral", "path_norm": "norms",
            "param_norm": "norms"}


def page_queries() -> list[str]:
    section = PAGE.read_text().split("\n## Evaluations in SQL\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return re.findall(r'fgm-query sql "(.*?)"', block, flags=re.S)


def grid() -> pl.DataFrame:
    rng = np.random.default_rng(7)
    rows = []
    for i, (depth, width) in enumerate(itertools.product(DEPTHS, WIDTHS)):
        gap = 0.04 * DEPTHS.index(depth) - 0.01 * WIDTHS.index(width) + rng.normal(0, 0.02)
        rows.append({"model_id": f"m{i}", "hp.depth": depth, "hp.width": width,
                     "gen.gap": round(float(gap), 4),
                     **{f"complexity.{m}": float(rng.normal(0, 1)) + (k - 1.5) * gap * 20
                        for k, m in enumerate(MEASURES)}})
    return pl.DataFrame(rows)


def big_psi_ref(t: pl.DataFrame, measure: str) -> float:
    levels = [[DEPTHS.index(d), WIDTHS.index(w)] for d, w in zip(t["hp.depth"], t["hp.width"],
                                                                  strict=True)]
    psi = [p for p in psi_ref(t[f"complexity.{measure}"].to_list(), t["gen.gap"].to_list(),
                              levels) if not math.isnan(p)]
    return sum(psi) / len(psi)


def run(*args):
    out = CliRunner().invoke(query, [str(a) for a in args])
    assert out.exit_code == 0, out.output
    return out.output


@pytest.fixture
def evaluated(db):
    full = grid()
    first = full.filter(pl.col("hp.depth") <= 4)
    build_warehouse(db, first)
    con = connect(db)
    mirror_definitions(con)      # the families, as fgm-measure records them
    con.close()
    for _ in ("first round", "second round"):
        run("table", "--db", db)
        run("table", "--where", "depth >= 4", "--db", db)
        # other questions about the same models, which the queries must not mix in
        run("table", "--convention", "paper", "--db", db)
        run("table", "--all-models", "--db", db)
        run("table", "--sweep", "fixture", "--db", db)
        run("table", "--where", "depth >= 4", "--convention", "paper", "--db", db)
        run("psi", "-m", "path_norm", "--db", db)
        run("psi", "-m", "prod_of_spec", "--where", "depth >= 4", "--db", db)
        ingest_file(db, Path("fixture.csv"), frame=full, sweep="fixture", replace=True)
    return db, first, full


def test_the_docs_have_three_evaluation_queries():
    queries = page_queries()
    assert len(queries) == 3 and all(q.startswith("SELECT") for q in queries)


def test_the_docs_evaluation_queries_answer_what_they_say(evaluated):
    db, first, full = evaluated
    q_spectral, q_families, q_history = [
        json.loads(run("sql", q, "--db", db, "--format", "json")) for q in page_queries()]

    # Ψ of every spectral measure on the depth ≥ 4 models, newest first, the older stale
    deep_first, deep_full = (t.filter(pl.col("hp.depth") >= 4) for t in (first, full))
    expected = [(m, big_psi_ref(t, m), stale) for m in ("prod_of_spec", "sum_of_spec")
                for t, stale in ((deep_full, False), (deep_first, True))]
    assert [(r["measure"], r["Psi"], r["stale"]) for r in q_spectral] == [
        (m, pytest.approx(v), s) for m, v, s in expected]
    assert q_spectral[0]["created_at"] > q_spectral[1]["created_at"]

    # families ranked by mean Ψ over all models (the second, fresh table)
    means = {f: np.mean([big_psi_ref(full, m) for m, fam in MEASURES.items() if fam == f])
             for f in ("spectral", "norms")}
    best = {f: max(big_psi_ref(full, m) for m, fam in MEASURES.items() if fam == f)
            for f in means}
    ranked = sorted(means, key=means.get, reverse=True)
    assert [(r["family"], r["measures"], r["mean_Psi"], r["best_Psi"]) for r in q_families] == [
        (f, 2, round(means[f], 3), round(best[f], 3)) for f in ranked]

    # path_norm's τ over all models: 6 models, then 9 once depth 8 landed
    taus = [tau_ref(t["complexity.path_norm"].to_list(), t["gen.gap"].to_list())
            for t in (first, full)]
    assert [(r["n_models"], r["tau"], r["stale"]) for r in q_history] == [
        (6, pytest.approx(taus[0]), True),
        (9, pytest.approx(taus[1]), False)]
