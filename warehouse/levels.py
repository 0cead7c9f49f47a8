"""One level, one value: what the levels of models evaluated together must mean.

Evaluation sees a model only through its levels (ψ compares models whose levels
differ on one axis alone). So among models ranked together:

- a value has one level per axis (depth 4 is not level 2 here and level 0 there), and
- models with the same level on every axis have the same value on every axis (width
  16 and width 24 cannot both be level 0 of models that agree on every other level).

The second rule is the one a narrowed grid breaks (`--set width=16` makes 16 level
0 beside a sweep where 24 is). It is stated over whole level vectors, not per axis,
because an axis may legitimately mean other values at one level in other contexts:
a grid's learning rates per optimizer (level 0 is 0.1 for SGD and 1e-3 for Adam),
told apart by the optimizer's level.

Ingest keeps every sweep to these rules whatever path its models come by (a grid,
bundles from another machine, a results table); evaluation checks the selection
it ranks, which may span sweeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from .store import scalar


@dataclass(frozen=True)
class LevelConflict:
    """The first pair of models that break a rule: `axis` is where they part."""
    axis: str
    rule: str               # "value" (one value, two levels) or "level" (one level, two values)
    level: int | str
    value: str
    model: str
    other_level: int | str
    other_value: str
    other_model: str

    def describe(self) -> str:
        if self.rule == "axes":
            return (f"model {self.model} {self.value} the axis {self.axis!r}, which the "
                    f"sweep's models {self.other_value} (model {self.other_model}): a sweep's "
                    "models have the same axes")
        if self.rule == "value":
            return (f"{self.axis} = {self.value} is level {self.level} for model "
                    f"{self.model} but level {self.other_level} for model {self.other_model}")
        return (f"level {self.level} of {self.axis} is {self.value} for model {self.model} but "
                f"{self.other_value} for model {self.other_model}, which agrees with it on "
                f"the level of every other axis")


def _pair(rows: pl.DataFrame, column: str, focus: set[str] | None) -> tuple | None:
    """Two rows of `rows` that differ in `column`, the first one of a `focus` model."""
    for a in rows.iter_rows(named=True):
        if focus is not None and a["model_id"] not in focus:
            continue
        other = rows.filter(pl.col(column) != a[column])
        if other.height:
            return a, other.row(0, named=True)
    return None


def level_conflicts(hp: pl.DataFrame, *, focus: set[str] | None = None,
                    limit: int | None = 1,
                    rules: tuple[str, ...] = ("value", "level")) -> list[LevelConflict]:
    """Models of `hp` (columns model_id, axis, level, value_text, and optionally
    value_num) that break the rules above, by axis: at most `limit` (None: one per
    axis and rule). With `focus`, only pairs that take at least one of those models
    count. Numbers are compared as numbers (0 from a table is 0.0 from a grid)."""
    if "value_num" in hp.columns:
        hp = hp.with_columns(pl.when(pl.col("value_num").is_not_null())
                             .then(pl.col("value_num").cast(pl.String))
                             .otherwise(pl.col("value_text")).alias("value_text"))
    hp = hp.select("model_id", "axis", "level", "value_text").unique()
    found: list[LevelConflict] = []
    # one value, one level
    two = (hp.filter(pl.lit("value" in rules)).group_by("axis", "value_text")
           .agg(pl.col("level").n_unique().alias("k"))
           .filter(pl.col("k") > 1).sort("axis", "value_text"))
    for axis, value in two.select("axis", "value_text").iter_rows():
        if any(c.axis == axis for c in found):
            continue
        rows = (hp.filter((pl.col("axis") == axis) & (pl.col("value_text") == value))
                .sort("level", "model_id"))
        pair = _pair(rows, "level", focus)
        if pair:
            a, b = pair
            found.append(LevelConflict(axis, "value", a["level"], value, a["model_id"],
                                       b["level"], value, b["model_id"]))
    # one level vector, one configuration
    keyed = hp.sort("axis").group_by("model_id").agg(
        pl.concat_str("axis", pl.lit("="), pl.col("level").cast(pl.String))
        .str.join("\x1f").alias("levels"),
        pl.concat_str("axis", pl.lit("="), "value_text").str.join("\x1f").alias("values"))
    clash = (keyed.group_by("levels").agg(pl.col("values").n_unique().alias("k"))
             .filter(pl.col("k") > 1).filter(pl.lit("level" in rules)))
    if clash.height:
        both = hp.join(keyed.join(clash.select("levels"), on="levels")
                       .select("model_id", "levels"), on="model_id")
        parts = (both.group_by("levels", "axis")
                 .agg(pl.col("value_text").n_unique().alias("k"))
                 .filter(pl.col("k") > 1).sort("axis", "levels"))
        done: set[str] = set()
        for axis, levels in parts.select("axis", "levels").iter_rows():
            if axis in done:
                continue
            rows = (both.filter((pl.col("levels") == levels) & (pl.col("axis") == axis))
                    .sort("value_text", "model_id"))
            pair = _pair(rows, "value_text", focus)
            if pair:
                done.add(axis)
                a, b = pair
                found.append(LevelConflict(axis, "level", a["level"], a["value_text"],
                                           a["model_id"], b["level"], b["value_text"],
                                           b["model_id"]))
    found.sort(key=lambda c: (c.axis, c.rule))
    return found if limit is None else found[:limit]


def sweep_conflict(con, sweep_id: str, incoming: pl.DataFrame) -> LevelConflict | None:
    """The first rule that `incoming` (model_id, axis, level, value_text, value_num),
    added to the models the warehouse holds in sweep `sweep_id`, would break; None
    when it fits. Stored models that incoming ones replace (same model_id) do not
    count."""
    if not scalar(con, "SELECT count(*) FROM models WHERE sweep_id = ?", [sweep_id]):
        return next(iter(level_conflicts(incoming, rules=("level",))), None)
    # pairs of stored models that break a rule (an older fgm let them in) are the
    # evaluation's to refuse; only what the incoming models would break stops them
    con.register("_incoming_levels", incoming.select("model_id"))
    try:
        stored = con.sql(
            "SELECT h.model_id, h.axis, h.level, h.value_text, h.value_num "
            "FROM hyperparameters AS h "
            "JOIN models AS m USING (model_id) WHERE m.sweep_id = ? AND h.model_id NOT IN "
            "(SELECT model_id FROM _incoming_levels)", params=[sweep_id]).pl()
    finally:
        con.unregister("_incoming_levels")
    both = pl.concat([stored, incoming.select(stored.columns)], how="vertical_relaxed")
    focus = set(incoming["model_id"].to_list())
    # the sweep's axes: models with an axis more or less would never share a level
    # vector with the others, yet evaluation ranks them together (a missing axis is
    # one more level), so a width 16 of such a model would pass for the sweep's 24
    sets = both.group_by("model_id").agg(pl.col("axis").sort().str.join(",").alias("axes"))
    stored_sets = sets.filter(~pl.col("model_id").is_in(list(focus)))
    if stored_sets["axes"].n_unique() == 1:
        axes = set(stored_sets["axes"][0].split(","))
        for mid, theirs in sets.filter(pl.col("model_id").is_in(list(focus))).iter_rows():
            mine = set(theirs.split(","))
            if mine != axes:
                extra, missing = sorted(mine - axes), sorted(axes - mine)
                axis = (extra or missing)[0]
                have = "has" if extra else "lacks"
                others = "lack" if extra else "have"
                return LevelConflict(axis, "axes", "", have, mid, "", others,
                                     stored_sets["model_id"][0])
    # one value at two levels is legitimate across contexts (a learning rate per
    # optimizer: 0.01 is level 1 of SGD's and level 0 of Adam's): only whole level
    # vectors are checked here; evaluation refuses what it cannot rank
    return next(iter(level_conflicts(both, focus=focus, rules=("level",))), None)
