"""What every fgm CLI shares: --db, --format, and errors without tracebacks."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import click
import polars as pl

from .errors import FgmError

FORMATS = ("table", "csv", "json")

db_option = click.option(
    "--db", type=click.Path(dir_okay=False), default=None, envvar="FGM_DB",
    help="The warehouse file (default: $FGM_DB, else ./fgm.duckdb).")
format_option = click.option(
    "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
    help="Output format.")


@contextlib.contextmanager
def plain_warnings() -> Iterator[None]:
    """fgm's own warnings (a dataset whose files are not the official ones, say) as
    one line each, `warning: ...`, once per run: not Python's file:line display
    with the source line under it, once per place that loads the data."""
    seen: set[str] = set()
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("fgm."):
            if str(message) not in seen:
                seen.add(str(message))
                click.echo(f"warning: {message}", err=True)
            return
        original(message, category, filename, lineno, file, line)
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def friendly_errors(func: Callable) -> Callable:
    """Turn FgmError, and any DuckDB or Polars error a user's input can cause, into
    one line on stderr and exit 1; fgm's warnings become plain lines (plain_warnings)."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        import duckdb

        try:
            with plain_warnings():
                return func(*args, **kwargs)
        except FgmError as exc:
            raise click.ClickException(str(exc)) from None
        except (duckdb.Error, pl.exceptions.PolarsError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise click.ClickException(first) from None
    return wrapper


def clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null, numpy scalars plain Python."""
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(obj: Any) -> str:
    return json.dumps(clean(obj), indent=None, default=str)


def _plain_table(frame: pl.DataFrame, title: str | None) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.6g}"
        return str(v)
    cells = [[fmt(v) for v in row] for row in frame.iter_rows()]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(frame.columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(frame.columns, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) if _numeric(c) else c.ljust(w)
                        for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _json_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(v, dict) and set(v) == {"key", "value"}
                                       for v in value):
        value = {str(v["key"]): v["value"] for v in value}   # a MAP, as Polars hands it over
    return to_json(value)


def flatten_nested(frame: pl.DataFrame) -> pl.DataFrame:
    """Nested columns (maps, lists, structs: model_levels' `levels`, say) as JSON text,
    which CSV and a plain table can hold."""
    nested = [c for c, t in frame.schema.items() if t.is_nested()]
    if not nested:
        return frame
    return frame.with_columns(
        pl.Series(c, [_json_text(v) for v in frame[c].to_list()], dtype=pl.String)
        for c in nested)


def emit_frame(frame: pl.DataFrame, fmt: str, *, title: str | None = None) -> None:
    """Print a result frame as an aligned table, CSV, or a JSON array of row objects."""
    if fmt == "json":
        click.echo(to_json(frame.to_dicts()))
    elif fmt == "csv":
        click.echo(flatten_nested(frame).write_csv(), nl=False)
    else:
        click.echo(_plain_table(flatten_nested(frame), title))

