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

# Seeds are stored as INTEGER (32-bit signed, schema.sql), as ingest/validate.py checks.
SEED_MAX = 2**31 - 1
SEED = click.IntRange(0, SEED_MAX)


class FiniteRange(click.FloatRange):
    """click.FloatRange that also refuses nan and ±inf: nan compares false with every
    bound, so a range alone lets it through (and inf where a side is open-ended)."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number; expected {self._describe_range()}",
                      param, ctx)
        return super().convert(number, param, ctx)


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



def emit_stream(frames: Iterator[pl.DataFrame], fmt: str,
                max_rows: int | None = None) -> tuple[int, int, bool]:
    """Print a result that arrives as a stream of frames, one batch at a time, so that
    memory stays bounded however many rows there are: CSV with one header, a JSON
    array of row objects, or an aligned table (which needs every row it shows at once,
    so it shows at most `max_rows`). After `max_rows` rows are printed the rest is
    counted, not printed, until the stream ends or its timeout stops the counting.
    Returns (rows printed, rows left out, whether all of those were counted)."""
    shown = left = 0
    held: list[pl.DataFrame] = []          # the table format's rows, to align them
    opened = printed = False

    def close() -> None:
        nonlocal printed
        if printed:
            return
        printed = True
        if fmt == "json":
            click.echo("]" if shown else "[]")
        elif fmt == "table":
            click.echo(_plain_table(flatten_nested(pl.concat(held, how="vertical_relaxed")),
                                    None))

    try:
        for frame in frames:
            if printed:                     # past max_rows: counted only
                left += frame.height
                continue
            if max_rows is not None:
                room = max(max_rows - shown, 0)
                left += max(frame.height - room, 0)
                frame = frame.head(room) if room or not opened else frame.head(0)
            if fmt == "table":
                held.append(frame)
            elif fmt == "csv":
                if frame.height or not opened:
                    click.echo(flatten_nested(frame).write_csv(include_header=not opened),
                               nl=False)
            elif frame.height:
                rows = to_json(frame.to_dicts())[1:-1]
                click.echo(("," if shown else "[") + rows, nl=False)
            shown += frame.height
            opened = True
            if max_rows is not None and shown >= max_rows:
                close()                     # the rows first; then the rest is counted
    except FgmError as exc:
        if not (printed and type(exc).__name__ == "QueryTimeout"):
            raise
        return shown, left, False           # the count stopped at the timeout
    close()
    return shown, left, True
