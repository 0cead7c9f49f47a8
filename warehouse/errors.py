"""Errors a user can act on. CLIs print them as one message, without a traceback."""

from __future__ import annotations


class FgmError(Exception):
    """Base class: the message names what was wrong and what was expected."""


class WarehouseLocked(FgmError):
    """Another process holds the DuckDB file."""


class SchemaVersionError(FgmError):
    """The warehouse was written by a schema this code does not know."""


class InputError(FgmError):
    """A file given by the user is malformed: names the file, row and column."""

    def __init__(self, path: str, message: str, *, row: int | None = None,
                 column: str | None = None):
        where = [str(path)]
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}")
        self.path, self.row, self.column = path, row, column
