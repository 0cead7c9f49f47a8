"""The paper's published figures as data (Jiang et al. 2020, Tables 1, 2, 5, 6, 7,
9 and 10), shipped with fgm in paper_figures.csv.

Transcribed from the text of the paper. One row per row of a printed table:
`table`, `row` (its position there), `quantity` (psi: ψ per axis, overall τ and Ψ;
cmi: the normalised CMI per axis with |S| = 0, 1, 2, or |S| = 2 and K for the
main-text tables), `statistic` (value; mean and std over 5 seeds for Tables 9
and 10), `kind` (measure, oracle, canonical, random, entropy: Table 6's
"conditional entropy" row), `label` as printed, `ref` (the equation, where the
table gives it) and `measure`: SPEC §4's name, empty where fgm has no such
measure (e.g. Table 7's "median margin", or "displacement", which Table 6 prints
beside frob-distance with the same numbers). Numbers are as printed, with their
precision; the paper's own inconsistencies stay (Table 1 prints 1/γ with the
opposite signs of Table 5's 1/margin; Table 5's pacbayes-mag-init and -orig
match Table 9's "ratio cplx gaussian (0ref) u1" rows, not the rows Table 9
labels pacbayes-mag-init and -orig).

Table 7 (SVHN) names measures by the paper's internal names ("spectral product
dd/2 om"); they are matched to SPEC's by meaning, the magnitude-aware bounds by
the variant that Table 5's rows are.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

import polars as pl

from fgm.warehouse import FgmError

FIGURES = "paper_figures.csv"
PAPER_AXES = ("batch_size", "dropout", "learning_rate", "depth", "optimizer",
              "weight_decay", "width")
NUMBERS = (*PAPER_AXES, "tau", "Psi", "s0", "s1", "s2", "K")
TABLES = ("1", "2", "5", "6", "7", "9", "10")


@cache
def _figures() -> pl.DataFrame:
    schema = {"table": pl.String, "row": pl.Int64, "quantity": pl.String,
              "statistic": pl.String, "kind": pl.String, "label": pl.String, "ref": pl.String,
              "measure": pl.String, **dict.fromkeys(NUMBERS, pl.Float64)}
    text = files("fgm.analysis").joinpath(FIGURES).read_bytes()
    return pl.read_csv(text, schema=schema)


def paper_figures() -> pl.DataFrame:
    """Every transcribed row of every table."""
    return _figures()


def paper_table(table: str | int, quantity: str | None = None) -> pl.DataFrame:
    """One table's rows in the printed order (Tables 1 and 2: both halves, or the
    one `quantity` names). Numbers absent from that table are dropped as columns."""
    table = str(table)
    if table not in TABLES:
        raise FgmError(f"the paper's figures hold Tables {', '.join(TABLES)}, not {table!r}")
    frame = _figures().filter(pl.col("table") == table)
    if quantity is not None:
        frame = frame.filter(pl.col("quantity") == quantity)
    keep = [c for c in frame.columns if c not in NUMBERS or frame[c].null_count() < frame.height]
    return frame.select(keep).sort("quantity", "row", descending=[True, False])
