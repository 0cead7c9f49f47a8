"""fgm-query report: one self-contained HTML page (works offline: the Vega
libraries are inlined, the data is in the page, no network URL), plus a PNG
and an SVG of every chart."""

from __future__ import annotations

import dataclasses
import difflib
import html
import json
import re
from datetime import datetime
from functools import cache
from pathlib import Path

import altair as alt
import duckdb
import polars as pl

from fgm.warehouse import FgmError

from . import charts
from .compare import compare_paper
from .evaluate import Selection, select_models, table5, table6

TRACE_MODELS = 200   # at most this many training curves, chosen evenly, to keep the page light
TRACE_POINTS = 4000  # and at most this many points over all of them (each curve thinned evenly)
# URL strings inside the Vega bundle that are links, not namespaces: blanked so the page
# names no network address. What remains are the W3C XML namespace identifiers SVG needs.
BUNDLE_LINKS = ("https://vega.github.io/editor/", "https://github.com/vega/vega-lite/issues/2415",
                "https://vega.github.io/schema/vega/v6.json")
XML_NAMESPACES = ("http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink",
                  "http://www.w3.org/2000/xmlns/")


@cache
def vega_bundle() -> str:
    import vl_convert as vlc
    js = vlc.javascript_bundle()
    for link in BUNDLE_LINKS:
        js = js.replace(link, "")
    return js.replace("</script", "<\\/script")


def script_json(obj: object) -> str:
    """JSON to paste inside a <script>: '<', '>' and '&' as \\u escapes, so that data
    (a hyperparameter's text value, say) can never close the script and open another."""
    return (json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026"))


def _to_dict(chart: alt.TopLevelMixin) -> dict:
    """The chart's Vega-Lite spec with its data inline, however many rows: altair's
    default 5,000-row guard would fail a report on a large grid (one row per model
    and axis) with a traceback. The curves are thinned before (TRACE_POINTS)."""
    with alt.data_transformers.disable_max_rows():
        return chart.to_dict()


def spec(chart: alt.TopLevelMixin) -> dict:
    out = _to_dict(chart)
    out.pop("$schema", None)
    return out


def save_images(chart: alt.TopLevelMixin, out: Path, name: str) -> list[Path]:
    import vl_convert as vlc
    d = _to_dict(chart)
    version = d.get("$schema", "").rsplit("/v", 1)[-1].rsplit(".", 2)[0] or None
    kw = {"vl_version": version} if version in vlc.get_vegalite_versions() else {}
    png, svg = out / f"{name}.png", out / f"{name}.svg"
    png.write_bytes(vlc.vegalite_to_png(d, scale=2, **kw))
    svg.write_text(vlc.vegalite_to_svg(d, **kw))
    return [png, svg]


def _hp_frame(con: duckdb.DuckDBPyConnection, ids: list[str]) -> pl.DataFrame:
    frame = con.sql("SELECT h.model_id, h.axis, h.level, h.value_text AS value, o.train_acc "
                    "FROM hyperparameters AS h JOIN model_outcomes AS o USING (model_id)").pl()
    return frame.filter(pl.col("model_id").is_in(ids))


def level_order(hp: pl.DataFrame, axis: str) -> list[str]:
    """An axis's values in level order (for legends)."""
    return (hp.filter(pl.col("axis") == axis).select("level", "value").unique()
            .sort("level", "value")["value"].to_list())


def number(v: float, digits: int = 3) -> str:
    """A table's number as shown: rounded to `digits` decimals first, so that neither a
    small negative (-0.0004) nor float noise of an exact zero (-1.85e-17) prints as
    "-0.000"; 0.000 then."""
    rounded = round(v, digits)
    return f"{0.0 if rounded == 0 else rounded:.{digits}f}"


def _header(column: str) -> str:
    """A column's header, free to wrap where it reads well, so that headers do not make
    a table wider than the page: after each '_' of a name (weight_<wbr>decay), and the
    paper's labels only before |S| ("min" above "|S| = 1", never "|S| =" above "1")."""
    label = charts.COLUMN_LABELS.get(column)
    if label is not None:
        return re.sub(r"\|S\| = \d+", lambda m: f"<span class='nowrap'>{m.group(0)}</span>",
                      html.escape(label))
    return html.escape(column).replace("_", "_<wbr>")


# Counts that describe how a row was computed rather than what it found: when one value
# holds for every row, it is said once under the table instead of filling a column.
BOOKKEEPING = ("n_models", "draws", "seeds", "unconverged_searches", "failed",
               "not_applicable")


def _table_html(frame: pl.DataFrame) -> str:
    """The table, as narrow as its cells allow (headers wrap, an argmin such as
    dropout+width may too), so that it fits the page and every header is seen whole; a
    box that scrolls sideways only when it is still wider. The paper's column names
    (|S| = 0 ...), no column that is empty throughout, and the bookkeeping counts that
    are the same in every row said once, below."""
    frame = frame.select([c for c in frame.columns if frame[c].null_count() < frame.height])
    same = {c: frame[c].drop_nulls()[0] for c in BOOKKEEPING
            if c in frame.columns and frame.height > 1 and frame[c].drop_nulls().n_unique() == 1}
    frame = frame.drop(list(same))

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return number(v)
        return html.escape(str(v)).replace("+", "+<wbr>")
    head = "".join(f"<th>{_header(c)}</th>" for c in frame.columns)
    def td(v):
        return f"<td class='text'>{cell(v)}</td>" if isinstance(v, str) else f"<td>{cell(v)}</td>"
    body = "".join("<tr>" + "".join(td(v) for v in row) + "</tr>" for row in frame.iter_rows())
    note = ("<p class='note'>In every row that has it: " + ", ".join(
        f"{html.escape(c)} = {cell(v)}" for c, v in same.items()) + ".</p>" if same else "")
    return (f"<div class='scroll'><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>{note}")


def _selection_html(sel: Selection, models) -> str:
    """What the page is about: the filters given, and the axes left out."""
    parts = [f"<code>--{k} {html.escape(repr(v))}</code>"
             for k, v in (("where", sel.where), ("dataset", sel.dataset), ("sweep", sel.sweep))
             if v is not None]
    text = ("Models selected by " + ", ".join(parts) + "." if parts
            else "All models of the warehouse.")
    if models.constant:
        text += (" Constant in this selection, so left out of every table: "
                 + ", ".join(f"{html.escape(a)} = {html.escape(str(v))}"
                             for a, v in models.constant.items()) + ".")
    return text


@dataclasses.dataclass
class _Basics:
    """What every chart of the report starts from: all the selected models (converged
    or not: Figure 1 shows all), their outcomes and hyperparameters, and the axes that
    vary among them."""
    every: object
    ids: list[str]
    outcomes: pl.DataFrame
    hp: pl.DataFrame
    varying: list[str]
    shown: pl.DataFrame


def _basics(con: duckdb.DuckDBPyConnection, sel: Selection) -> _Basics:
    every = select_models(con, dataclasses.replace(sel, all_models=True))
    ids = every.ids.tolist()
    outcomes = con.sql("SELECT * FROM model_outcomes").pl().filter(pl.col("model_id").is_in(ids))
    hp = _hp_frame(con, ids)
    varying = [a for a in every.axes if hp.filter(pl.col("axis") == a)["value"].n_unique() > 1]
    shown = hp.filter(pl.col("axis").is_in(varying)) if varying else hp
    return _Basics(every, ids, outcomes, hp, varying, shown)


NO_CROSS_ENTROPY = ("none of these models has a final training cross-entropy in the "
                    "warehouse (results tables carry accuracies only; models trained by "
                    "fgm-train have it)")


def _cross_entropy(b: _Basics) -> alt.TopLevelMixin | None:
    if not b.outcomes.filter(pl.col("train_loss") > 0).height:
        return None
    return charts.histogram(b.outcomes, "train_loss", "Final training cross-entropy", log=True)


def _gap(b: _Basics) -> alt.TopLevelMixin:
    return charts.histogram(b.outcomes, "gap", "Generalization gap (train − test acc.)")


def _table5_chart(t5: pl.DataFrame, axes: list[str]) -> alt.TopLevelMixin:
    return charts.heatmap(t5.filter(pl.col("kind") != "canonical"), [*axes, "tau", "Psi"],
                          "Kendall's τ", diverging=True)


def _table6_chart(t6: pl.DataFrame, axes: list[str]) -> alt.TopLevelMixin:
    return charts.heatmap(t6, [*axes, "s0", "s1", "s2", "K"],
                          "Normalised conditional mutual information", diverging=False)


def _traces(con: duckdb.DuckDBPyConnection, b: _Basics,
            color: str | None) -> tuple[alt.TopLevelMixin, str] | None:
    """The training curves (at most TRACE_MODELS), coloured by an axis, and a note on
    how many are shown; None when no model has a trace."""
    trace = con.sql("SELECT model_id, step, train_loss FROM traces WHERE train_loss > 0").pl()
    trace = trace.filter(pl.col("model_id").is_in(b.ids))
    if not trace.height:
        return None
    if color is not None and color not in b.every.axes:
        raise unknown_axis(color, b.every.axes)
    axis = color or (b.varying[0] if b.varying else None)
    if not axis:
        return None
    keep = sorted(trace["model_id"].unique().to_list())
    keep = keep[:: -(-len(keep) // TRACE_MODELS)]       # ceil: never more than TRACE_MODELS
    labels = b.hp.filter(pl.col("axis") == axis).select("model_id", pl.col("value").alias(axis))
    points = trace.filter(pl.col("model_id").is_in(keep)).join(labels, on="model_id")
    points = thin_curves(points, max(2, TRACE_POINTS // len(keep)))
    note = (f"{len(keep)} of {trace['model_id'].n_unique()} models shown"
            if len(keep) < trace["model_id"].n_unique() else "")
    return charts.traces(points, axis, level_order(b.hp, axis)), note


def thin_curves(points: pl.DataFrame, per_curve: int) -> pl.DataFrame:
    """At most `per_curve` points of each model's curve, evenly spaced by index, its
    first and last point always kept (a long run's 300 points would otherwise make
    the page heavy and the chart no clearer)."""
    points = points.sort("model_id", "step")
    i = pl.int_range(pl.len(), dtype=pl.Int64).over("model_id")
    last = (pl.len().over("model_id").cast(pl.Int64) - 1).clip(lower_bound=1)
    # row i is kept when floor(i·(per_curve−1)/last) steps up from row i−1's: exact
    # integers, so the first row (−1 → 0), the last (→ per_curve−1) and, for a curve
    # no longer than per_curve, every row are kept
    bucket = i * (per_curve - 1) // last
    return points.filter(bucket != (i - 1) * (per_curve - 1) // last)


def build_report(con: duckdb.DuckDBPyConnection, out: Path, sel: Selection | None = None, *,
                 draws: int = 10, color: str | None = None) -> Path:
    sel = sel or Selection()
    out.mkdir(parents=True, exist_ok=True)
    b = _basics(con, sel)
    sections: list[tuple[str, str, alt.TopLevelMixin | None, str]] = []
    sections.append(("fig1_converged", "Figure 1: models that fit the training set",
                     charts.converged_per_level(b.shown), ""))
    ce = _cross_entropy(b)
    sections.append(("fig1_cross_entropy", "Figure 1: final training cross-entropy", ce,
                     "" if ce is not None else
                     f"<p class='note'>No panel: {html.escape(NO_CROSS_ENTROPY)}.</p>"))
    sections.append(("fig1_gap", "Figure 1: generalization gap", _gap(b), ""))
    axes = b.every.axes
    t5 = table5(con, sel)
    sections.append(("table5", "Table 5: τ within each axis (ψ_i), overall τ and Ψ",
                     _table5_chart(t5, axes), _table_html(t5)))
    t6 = table6(con, sel, draws=draws)
    sections.append(("table6", "Table 6: conditional mutual information",
                     _table6_chart(t6, axes), _table_html(t6)))
    sections.append(_paper_section(con, sel))
    curves = _traces(con, b, color)
    if curves is not None:
        chart, note = curves
        sections.append(("traces", "Training curves", chart,
                         f"<p class='note'>{note}</p>" if note else ""))
    return _write(out, sections, b.outcomes, b.every, sel)


CHART_KINDS = ("converged", "cross_entropy", "gap", "table5", "table6", "paper", "traces",
               "measure")


def chart(con: duckdb.DuckDBPyConnection, kind: str, sel: Selection | None = None, *,
          measure: str | None = None, color: str | None = None, draws: int = 10,
          log: bool | None = None) -> alt.TopLevelMixin:
    """One chart of the report, or of `plot_measure`, by name (CHART_KINDS): what
    fgm.open(...).chart(kind) shows inline in a notebook."""
    sel = sel or Selection()
    if kind not in CHART_KINDS:
        close = difflib.get_close_matches(str(kind), CHART_KINDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise FgmError(f"chart kind {kind!r}: expected one of {', '.join(CHART_KINDS)}.{hint}")
    if kind == "measure":
        if measure is None:
            raise FgmError("chart('measure') needs measure=NAME (and color=AXIS)")
        return _measure_chart(con, measure, color, sel, log)
    if kind in ("table5", "table6"):
        axes = select_models(con, sel).axes
        if kind == "table5":
            return _table5_chart(table5(con, sel), axes)
        return _table6_chart(table6(con, sel, draws=draws), axes)
    if kind == "paper":
        _, _, made, text = _paper_section(con, sel)
        if made is None:
            raise FgmError(" ".join(re.sub(r"<[^>]+>", "", html.unescape(text)).split()))
        return made
    b = _basics(con, sel)
    if kind == "converged":
        return charts.converged_per_level(b.shown)
    if kind == "gap":
        return _gap(b)
    if kind == "cross_entropy":
        made = _cross_entropy(b)
        if made is None:
            raise FgmError(f"no cross-entropy chart: {NO_CROSS_ENTROPY}")
        return made
    curves = _traces(con, b, color)
    if curves is None:
        raise FgmError("no training curves: none of these models has a training trace in "
                       "the warehouse (models trained by fgm-train have one)")
    return curves[0]


def _paper_section(con: duckdb.DuckDBPyConnection, sel: Selection):
    """The paper's Ψ (Table 5) and K (Table 6) against this warehouse's, computed with
    the paper's conventions (fgm-query compare --paper)."""
    heading = "The paper and this warehouse: Ψ (Table 5) and K (Table 6)"
    try:
        res = compare_paper(con, sel, registered=set())
    except FgmError as exc:   # e.g. models on several datasets, none the paper's
        return ("paper_vs_here", heading, None,
                f"<p class='note'>No panel: {html.escape(str(exc))}.</p>")
    facts = []
    if res["not_in_paper"]:
        facts.append("Not in the paper: " + ", ".join(map(html.escape, res["not_in_paper"])) + ".")
    if res["missing"]:
        facts.append(f"{len(res['missing'])} of the paper's measures are not in this "
                     "warehouse (<code>fgm-query compare --paper</code> lists them, with the "
                     "command that fills each).")
    if res.get("note"):
        facts.append(html.escape(res["note"][0].upper() + res["note"][1:]) + ".")
    for measure, text in res.get("caveats", {}).items():
        facts.append(f"On {html.escape(measure)}: {html.escape(text)}.")
    rows = res["measures"]
    if not rows:
        return ("paper_vs_here", heading, None,
                "<p class='note'>No panel: this warehouse holds none of the paper's "
                "measures. " + " ".join(facts) + "</p>")
    points = pl.DataFrame(
        [{"measure": r["measure"], "quantity": q, "paper": r[f"paper_{k}"], "here": r[k],
          "sign": r.get("Psi_sign") or "n/a"}
         for r in rows for q, k in (("Ψ", "Psi"), ("K", "K"))
         if r.get(f"paper_{k}") is not None and r.get(k) is not None],
        schema={"measure": pl.String, "quantity": pl.String, "paper": pl.Float64,
                "here": pl.Float64, "sign": pl.String}).with_columns(
        charts.tidy(pl.col("paper"), 3), charts.tidy(pl.col("here"), 3))   # as the tooltips say
    a = res["agreement"]
    words = [f"The sign of Ψ agrees for {a['Psi_sign_agree']} of {a['Psi_sign_compared']} "
             "measures"]
    if res["sign_flips"]:
        words[0] += " (it flips for " + ", ".join(map(html.escape, res["sign_flips"])) + ")"
    for key, name in (("Psi", "Ψ"), ("K", "K")):
        c = res["rank_correlation"].get(key)
        if c and c["spearman"] is not None:
            words.append(f"rank correlation of {name} across {c['n']} measures: Spearman "
                         f"{c['spearman']:.2f}, Kendall {c['kendall']:.2f}")
    text = ("<p>" + "; ".join(words) + ". Points on the dashed diagonal agree exactly; "
            "computed with <code>--convention paper</code>. " + " ".join(facts) + "</p>")
    table = pl.DataFrame([{k: r.get(k) for k in ("measure", "paper_label", "paper_Psi", "Psi",
                                                 "Psi_sign", "paper_K", "K")} for r in rows],
                         schema={"measure": pl.String, "paper_label": pl.String,
                                 "paper_Psi": pl.Float64, "Psi": pl.Float64,
                                 "Psi_sign": pl.String, "paper_K": pl.Float64,
                                 "K": pl.Float64})
    chart = charts.paper_vs_here(points) if points.height else None
    return ("paper_vs_here", heading, chart, text + _table_html(table))


def model_counts(converged: list[bool | None]) -> str:
    """The header's count of models, by convergence, in words: every part that is not
    zero, each said once ("30 models (27 converged, 2 of unknown convergence and 1 not
    converged)", "12 models (all converged)", "3 models (none converged)")."""
    n = len(converged)
    parts = [(sum(c is True for c in converged), "converged"),
             (sum(c is None for c in converged), "of unknown convergence"),
             (sum(c is False for c in converged), "not converged")]
    parts = [(k, words) for k, words in parts if k]
    text = f"{n} model{'' if n == 1 else 's'}"
    if not parts:
        return text
    if len(parts) == 1:
        words = parts[0][1]
        if n > 1:
            words = "none converged" if words == "not converged" else f"all {words}"
        return f"{text} ({words})"
    said = [f"{k} {words}" for k, words in parts]
    return f"{text} ({', '.join(said[:-1])} and {said[-1]})"


def _write(out: Path, sections, outcomes: pl.DataFrame, every, sel: Selection) -> Path:
    blocks, images = [], []
    for i, (name, heading, chart, extra) in enumerate(sections):
        if chart is None:
            blocks.append(f"<section><h2>{html.escape(heading)}</h2>{extra}</section>")
            continue
        images += save_images(chart, out, name)
        blocks.append(f"<section><h2>{html.escape(heading)}</h2><div id='c{i}'></div>{extra}"
                      f"<p class='files'>{name}.png · {name}.svg</p></section>")
    specs = script_json({f"c{i}": spec(c) for i, (_, _, c, _) in enumerate(sections)
                         if c is not None})
    datasets = ", ".join(sorted(outcomes["dataset"].unique().to_list()))
    counts = model_counts(outcomes["converged"].to_list())
    used = (", with those of unknown convergence" if outcomes["converged"].null_count() else "")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fgm report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; color: #222;
       max-width: {charts.PAGE_WIDTH}px; }}
h1 {{ font-size: 1.6em; }} h2 {{ font-size: 1.2em; margin-top: 2em; }}
table {{ border-collapse: collapse; font-size: 0.75em; margin-top: 1em; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 2px 4px; text-align: right; }}
td.text, th {{ text-align: left; }}
th {{ position: sticky; top: 0; background: #fff; }}
.scroll {{ overflow-x: auto; max-width: 100%; }}
th {{ vertical-align: bottom; }} .nowrap {{ white-space: nowrap; }}
.files, .note {{ color: #666; font-size: 0.85em; }}
section > div[id] {{ overflow-x: auto; }}
</style></head><body>
<h1>Generalization measures: report</h1>
<p>{counts} on
{html.escape(datasets)}; generated {datetime.now().strftime('%Y-%m-%d %H:%M')} by fgm.
{_selection_html(sel, every)}</p>
<p>Tables 5 and 6 use the converged models only{used} (Figure 1 shows all); τ is Kendall's
τ_a over pairs of models; ψ_i averages τ over groups of models that share every other
axis's level; Ψ is the mean of the ψ_i.</p>
{''.join(blocks)}
<script>{vega_bundle()}</script>
<script>
const specs = {specs};
for (const [id, s] of Object.entries(specs)) {{
  vegaEmbed('#' + id, s, {{mode: 'vega-lite', actions: false, renderer: 'svg'}});
}}
</script>
</body></html>
"""
    page_path = out / "index.html"
    page_path.write_text(page)
    return page_path


def unknown_axis(name: str, axes: list[str]):
    close = difflib.get_close_matches(name, axes, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return FgmError(f"unknown axis {name!r}.{hint} The axes that vary in this selection: "
                    f"{', '.join(axes) or '(none)'}")


def _measure_chart(con: duckdb.DuckDBPyConnection, measure: str, color: str | None,
                   sel: Selection, log: bool | None) -> alt.TopLevelMixin:
    """A measure against the gap, one point per model, coloured by an axis."""
    from .evaluate import measure_values
    models = select_models(con, sel)
    mu, sub = measure_values(con, measure, models)
    if color is None or color not in sub.axes:
        if color is None:
            raise FgmError(f"a chart of {measure} against the gap needs color=AXIS; the axes "
                           f"that vary in this selection: {', '.join(sub.axes) or '(none)'}")
        raise unknown_axis(color, sub.axes)
    values = sub.values.filter(pl.col("axis") == color).select(
        "model_id", pl.col("value_text").alias(color))
    frame = pl.DataFrame({"model_id": pl.Series(sub.ids.tolist(), dtype=pl.String),
                          "value": mu, "gap": sub.gap}).join(values, on="model_id", how="left")
    if log is None:
        log = bool(len(mu)) and float(mu.min()) > 0 and float(mu.max()) / float(mu.min()) > 100
    order = (sub.values.filter(pl.col("axis") == color)
             .join(con.sql("SELECT model_id, axis, level FROM hyperparameters").pl(),
                   on=["model_id", "axis"]).select("level", pl.col("value_text").alias("value"))
             .unique().sort("level", "value")["value"].to_list())
    return charts.measure_vs_gap(frame, measure, color, log, order)


def plot_measure(con: duckdb.DuckDBPyConnection, measure: str, color: str, out: Path,
                 sel: Selection | None = None, log: bool | None = None) -> list[Path]:
    """measure against the gap, coloured by an axis: PNG, SVG and a one-chart HTML page."""
    sel = sel or Selection()
    chart = _measure_chart(con, measure, color, sel, log)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{measure}_vs_gap_by_{color}"
    files = save_images(chart, out, name)
    page = out / f"{name}.html"
    page.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{name}</title>"
                    f"</head><body><div id='c'></div><script>{vega_bundle()}</script><script>"
                    f"vegaEmbed('#c', {script_json(spec(chart))}, {{mode: 'vega-lite', "
                    f"actions: false}});</script></body></html>")
    return [*files, page]
