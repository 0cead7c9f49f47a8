"""What an axis or a measure may be called. An axis becomes a column of hp_wide
(fgm-query's per-model view) and of --where predicates, so its name is a plain
SQL identifier that no other column of those views has."""

from __future__ import annotations

import re

# hp_wide (fgm-query's per-model view) has these columns beside one per axis and
# one `<axis>_level` per axis; `fgm-query models` adds the outcome columns.
RESERVED_COLUMNS = frozenset({
    "model_id", "dataset", "seed", "sweep_id", "sweep", "config_hash", "status",
    "train_acc", "test_acc", "train_loss", "test_loss", "gap", "converged", "steps",
    "train_size", "test_size", "included", "level", "value", "axis", "measure",
})
AXIS_RULE = ("an axis name is a letter followed by letters, digits or underscores "
             "(at most 64), must not end in '_level', and must not be one of: "
             + ", ".join(sorted(RESERVED_COLUMNS)))
MEASURE_RULE = ("a measure name starts with a letter or digit and holds only letters, "
                "digits and . _ - (at most 128)")
_AXIS = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_MEASURE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


def axis_name_problem(name: object) -> str | None:
    """Why `name` cannot be an axis name, or None."""
    if not isinstance(name, str) or not name:
        return f"empty axis name; {AXIS_RULE}"
    if not _AXIS.fullmatch(name):
        return f"axis name {name!r} is not allowed: {AXIS_RULE}"
    if name.lower() in RESERVED_COLUMNS or name.lower().endswith("_level"):
        return f"axis name {name!r} is reserved: {AXIS_RULE}"
    return None


def measure_name_problem(name: object) -> str | None:
    """Why `name` cannot be a measure name, or None."""
    if not isinstance(name, str) or not _MEASURE.fullmatch(name):
        return f"measure name {name!r} is not allowed: {MEASURE_RULE}"
    return None


def case_clash(names: list[str]) -> tuple[str, str] | None:
    """Two names equal but for case (SQL identifiers ignore case), or None."""
    seen: dict[str, str] = {}
    for n in names:
        if n.lower() in seen and seen[n.lower()] != n:
            return seen[n.lower()], n
        seen.setdefault(n.lower(), n)
    return None
