"""Charts as altair on Polars frames: the paper's Figure 1 panels, Tables 5
and 6 as heatmaps, training curves, and a measure against the gap."""

from __future__ import annotations

import altair as alt
import polars as pl

WIDTH = 520
PAGE_WIDTH = 1200       # the report's content width (its body's max-width), in px
LABEL_LIMIT = 180       # a heatmap's row labels (measure names) are cut with … past this

# Colours for an axis's values (training curves, a measure against the gap): Vega's
# category10, whose first colours differ in hue (blue, orange, green, red, ...), not
# tableau10 (Vega-Lite's default), whose second and third colours, orange and a salmon
# red, look alike on thin translucent lines. Past ten values no scheme keeps every value
# apart: category20 then.
CATEGORY10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
              "#7f7f7f", "#bcbd22", "#17becf"]


def category_scale(order: list[str] | None) -> alt.Scale:
    """A categorical scale whose colours are clearly told apart, in the values' order."""
    if order is not None and len(order) <= len(CATEGORY10):
        return alt.Scale(domain=order, range=CATEGORY10[:len(order)])
    return alt.Scale(scheme="category20")


def tidy(value: pl.Expr, digits: int) -> pl.Expr:
    """value rounded to what is shown, with no negative zero: -0.0004 and float noise of
    an exact zero such as -1.85e-17 both become 0."""
    rounded = value.round(digits)
    return (pl.when(rounded.is_null() | (rounded != 0)).then(rounded)   # value's name, nulls
            .otherwise(pl.lit(0.0)))


def converged_per_level(models: pl.DataFrame) -> alt.Chart:
    """Figure 1 (left): models above 99% training accuracy per hyperparameter value.
    models: model_id, axis, value, level, train_acc."""
    counts = (models.with_columns((pl.col("train_acc") > 0.99).alias("above"))
              .group_by("axis", "level", "value")
              .agg(pl.col("above").sum().alias("above_99"), pl.len().alias("models"))
              .sort("axis", "level"))
    return alt.Chart(counts).mark_bar().encode(
        x=alt.X("value:N", sort=alt.SortField("level"), title=None),
        y=alt.Y("above_99:Q", title="models above 99% training accuracy"),
        tooltip=["axis", "value", "above_99", "models"],
    ).properties(width=110, height=160).facet(
        facet=alt.Facet("axis:N", title=None), columns=4
    ).resolve_scale(x="independent").properties(
        title="Models above 99% training accuracy, per hyperparameter value")


def histogram(outcomes: pl.DataFrame, column: str, title: str, log: bool = False) -> alt.Chart:
    """Figure 1 (middle, right): the distribution of a per-model quantity."""
    data = outcomes.select(column).drop_nulls()
    if log:
        data = data.filter(pl.col(column) > 0).with_columns(pl.col(column).log10())
    return alt.Chart(data).mark_bar().encode(
        x=alt.X(f"{column}:Q", bin=alt.Bin(maxbins=40),
                title=f"log10 {column}" if log else column),
        y=alt.Y("count():Q", title="models"),
    ).properties(width=WIDTH // 2 + 40, height=200, title=title)


# The paper's names for Table 6's columns (fgm's JSON keys are s0, s1, s2).
COLUMN_LABELS = {"s0": "|S| = 0", "s1": "min |S| = 1", "s2": "min |S| = 2"}


def ink(value: pl.Expr, diverging: bool) -> pl.Expr:
    """White text on the dark cells of the colour scale, black on the light ones:
    red-blue is dark at both ends (|τ| ≥ 0.5), viridis at its low end."""
    dark = value.abs() >= 0.5 if diverging else value <= 0.55
    return pl.when(dark).then(pl.lit("white")).otherwise(pl.lit("black"))


def heatmap(table: pl.DataFrame, columns: list[str], title: str, *,
            diverging: bool) -> alt.Chart:
    """A table's shape as a heatmap: one row per measure, one column per quantity."""
    columns = [c for c in columns if table[c].null_count() < table.height]  # drop empty ones
    names = [COLUMN_LABELS.get(c, c) for c in columns]
    long = (table.select(["measure", *columns]).rename(dict(zip(columns, names, strict=True)))
            .unpivot(index="measure", variable_name="column", value_name="value")
            .drop_nulls("value")
            .with_columns(tidy(pl.col("value"), 2).alias("label"),
                          ink(pl.col("value"), diverging).alias("ink"))
            .with_columns(tidy(pl.col("value"), 3)))
    scale = (alt.Scale(scheme="redblue", domain=[-1, 1], reverse=True) if diverging
             else alt.Scale(scheme="viridis", domain=[0, 1]))
    order = table["measure"].to_list()
    base = alt.Chart(long).encode(
        x=alt.X("column:N", sort=names, title=None, axis=alt.Axis(labelAngle=-40,
                                                                 orient="top")),
        y=alt.Y("measure:N", sort=order, title=None, axis=alt.Axis(labelLimit=LABEL_LIMIT)))
    cells = base.mark_rect().encode(
        color=alt.Color("value:Q", scale=scale, title="τ" if diverging else "CMI"),
        tooltip=["measure", "column", "value"])
    text = base.mark_text(fontSize=9).encode(text=alt.Text("label:Q", format=".2f"),
                                             color=alt.Color("ink:N", legend=None,
                                                             scale=alt.Scale(
                                                                 domain=["black", "white"],
                                                                 range=["black", "white"])))
    return (cells + text).properties(width=heatmap_step(len(columns)) * len(columns),
                                     height=16 * len(order), title=title)


def heatmap_step(n_columns: int) -> int:
    """A heatmap column's width: 60 px, narrower when that would make the chart (its
    row labels, cells, the angled column labels' overhang and the legend) wider than
    the page, but never below what a cell's label "-0.00" needs."""
    room = PAGE_WIDTH - LABEL_LIMIT - 10 - 40 - 80   # labels, padding, overhang, legend
    return max(30, min(60, room // max(1, n_columns)))


def traces(points: pl.DataFrame, color: str, order: list[str] | None = None) -> alt.Chart:
    """Training curves: estimated cross-entropy against step, one line per model."""
    return alt.Chart(points).mark_line(opacity=0.7, strokeWidth=1.5).encode(
        x=alt.X("step:Q", title="step"),
        y=alt.Y("train_loss:Q", scale=alt.Scale(type="log"), title="training cross-entropy"),
        detail="model_id:N",
        color=alt.Color(f"{color}:N", title=color, sort=order, scale=category_scale(order)),
        tooltip=["model_id", "step", "train_loss", color],
    ).properties(width=WIDTH, height=260, title=f"Training curves, coloured by {color}")


def measure_vs_gap(frame: pl.DataFrame, measure: str, color: str, log: bool,
                   order: list[str] | None = None) -> alt.Chart:
    """A measure against the generalization gap, coloured by an axis's value."""
    return alt.Chart(frame).mark_circle(size=40, opacity=0.7).encode(
        x=alt.X("value:Q", title=measure, scale=alt.Scale(type="log" if log else "linear")),
        y=alt.Y("gap:Q", title="generalization gap"),
        color=alt.Color(f"{color}:N", title=color, sort=order, scale=category_scale(order)),
        tooltip=["model_id", "value", "gap", color],
    ).properties(width=WIDTH, height=320, title=f"{measure} against the gap")


def paper_vs_here(points: pl.DataFrame) -> alt.HConcatChart:
    """The paper's figure against this warehouse's, one point per measure, the
    diagonal drawn: a panel for Ψ and one for K, each point coloured by whether the
    measure's sign of Ψ agrees with the paper's.
    points: measure, quantity (Ψ or K), paper, here, sign."""
    panels = []
    for quantity in ("Ψ", "K"):
        data = points.filter(pl.col("quantity") == quantity)
        if not data.height:
            continue
        if quantity == "Ψ":
            lo, hi = -1.0, 1.0
        else:
            lo, hi = 0.0, max(float(data.select(pl.max_horizontal("paper", "here")).max()
                                    .item()) * 1.05, 1e-3)
        diagonal = alt.Chart(pl.DataFrame({"paper": [lo, hi], "here": [lo, hi]})).mark_line(
            color="#888", strokeDash=[4, 4]).encode(x="paper:Q", y="here:Q")
        # both panels coloured by the measure's sign of Ψ: the legend is shared, and a
        # measure whose Ψ flips is the same red in the K panel
        color = alt.Color("sign:N", title="sign of Ψ",
                          scale=alt.Scale(domain=["agree", "flip", "n/a"],
                                          range=["#1f77b4", "#d62728", "#999999"]))
        dots = alt.Chart(data).mark_circle(size=60, opacity=0.8).encode(
            x=alt.X("paper:Q", title=f"{quantity} in the paper",
                    scale=alt.Scale(domain=[lo, hi])),
            y=alt.Y("here:Q", title=f"{quantity} here", scale=alt.Scale(domain=[lo, hi])),
            color=color, tooltip=["measure", "paper", "here"])
        panels.append((diagonal + dots).properties(width=WIDTH // 2 - 20, height=WIDTH // 2 - 20,
                                                   title=f"{quantity}: the paper and here"))
    return alt.hconcat(*panels)
