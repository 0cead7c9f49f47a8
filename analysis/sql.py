"""Read-only SQL over the warehouse, and the per-axis wide view of hyperparameters."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import duckdb
import polars as pl

from fgm.warehouse import FgmError
from fgm.warehouse.wide import create_hp_wide  # noqa: F401  (fgm's readers build it here)

ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
_ANALYZE = {"ANALYZE", "ANALYSE"}   # EXPLAIN ANALYZE runs the statement it explains


def lock_down(con: duckdb.DuckDBPyConnection, memory_limit: str | None = None) -> None:
    """No file access beyond the open warehouse, and no way to turn that back on.
    `memory_limit` (DuckDB's syntax, e.g. '4GB') is set first: once
    lock_configuration is on, no setting can change."""
    if memory_limit is not None:
        literal = "'" + str(memory_limit).replace("'", "''") + "'"
        try:
            con.execute(f"SET memory_limit = {literal}")
        except duckdb.Error as exc:
            raise FgmError(f"--memory-limit {memory_limit!r}: {str(exc).strip()} "
                           "(expected a size such as 512MB or 4GB)") from None
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def _words(text: str) -> list[tuple[int, str]]:
    """(offset, text) of every token of `text` but comments, per DuckDB's own tokenizer."""
    tokens = duckdb.tokenize(text)
    ends = [pos for pos, _ in tokens[1:]] + [len(text)]
    return [(pos, text[pos:end].strip()) for (pos, kind), end in zip(tokens, ends, strict=True)
            if kind != duckdb.token_type.comment]


def _bare(word: str) -> str:
    return word.strip('"\'').upper()


def _parses_as_one(text: str) -> list | None:
    try:
        statements = duckdb.extract_statements(text)
    except duckdb.Error:
        return None
    return statements if len(statements) == 1 else None


def _check_explain(query: str) -> None:
    """Plain EXPLAIN of a SELECT only. EXPLAIN ANALYZE (in any spelling: ANALYSE,
    `EXPLAIN (ANALYZE ...)`, even `(ANALYZE false)`, comments anywhere) executes the
    statement it explains, so it is refused, as is EXPLAIN of anything but a SELECT."""
    words = _words(query)
    snippet = " ".join(w for _, w in words)[:60]
    if any(_bare(w) in _ANALYZE for _, w in words):
        raise FgmError(f"refused: EXPLAIN ANALYZE runs the statement it explains; "
                       f"fgm-query sql allows plain EXPLAIN only ({snippet!r}).")
    if len(words) < 2 or _bare(words[0][1]) != "EXPLAIN":
        raise FgmError(f"refused: not a statement fgm-query sql understands ({snippet!r}).")
    inner = None
    if words[1][1] == "(":      # an option list, e.g. (FORMAT json), or a query in brackets
        depth = 0
        for i, (_, w) in enumerate(words[1:], 1):
            depth += (w == "(") - (w == ")")
            if depth == 0:
                if i + 1 < len(words):
                    inner = _parses_as_one(query[words[i + 1][0]:])
                break
    if inner is None:
        inner = _parses_as_one(query[words[1][0]:])
    if inner is None or inner[0].type != duckdb.StatementType.SELECT:
        kind = inner[0].type.name.replace("_", " ") if inner else "unrecognised"
        raise FgmError(f"refused: fgm-query sql explains SELECT queries only; this explains "
                       f"a {kind} statement ({snippet!r}).")


def _checked(sql: str) -> list:
    """The statements of `sql`, each a SELECT or a plain EXPLAIN of one; else FgmError."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise FgmError(str(exc)) from None
    if not statements:
        raise FgmError("no SQL statement given")
    for st in statements:
        if st.type not in ALLOWED:
            kind = st.type.name.replace("_", " ")
            raise FgmError(f"refused: fgm-query sql is read-only and runs SELECT queries only; "
                           f"this is a {kind} statement ({st.query.strip()[:60]!r}).")
        if st.type == duckdb.StatementType.EXPLAIN:
            _check_explain(st.query)
    return statements


class QueryTimeout(FgmError):
    """--timeout passed: the query, or the printing of its rows, was stopped."""


@contextmanager
def alarm(timeout: float | None) -> Iterator[None]:
    """The whole of a command under `timeout` seconds (and one more, for the watchdog
    of readonly_batches to answer first): a SIGALRM also breaks a write to a pipe
    whose reader has stopped reading, which no check between batches can. Main
    thread only (signals), else nothing."""
    import signal
    if not timeout or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise QueryTimeout(f"the query timed out after {timeout:g} s (printing its rows "
                           "included) and was stopped; give --timeout SECONDS for a "
                           "longer limit (0: none)")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, timeout + 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Rows per batch handed from DuckDB to Python: a result is never held whole, so the
# memory of printing it stays bounded however many rows it has.
BATCH_ROWS = 8192


@contextmanager
def readonly_batches(con: duckdb.DuckDBPyConnection, sql: str,
                     timeout: float | None = None) -> Iterator[Iterator[pl.DataFrame]]:
    """Run one or more SELECT statements and hand over the last one's rows as a stream
    of frames of at most BATCH_ROWS rows (the first one carries the schema, even when
    there are no rows). Anything that writes (to the warehouse or to a file) or
    attaches another database is refused, and so is EXPLAIN ANALYZE (it runs what it
    explains). `timeout` (seconds) covers the whole use of the stream, not only
    DuckDB's part: the statements are interrupted once that much time has passed, and
    a batch asked for after it is refused, so a slow reader of the rows is stopped too."""
    statements = _checked(sql)
    deadline = time.monotonic() + timeout if timeout else None
    done, fired = threading.Event(), threading.Event()

    def watchdog() -> None:
        if done.wait(timeout):
            return
        fired.set()
        while not done.is_set():   # again and again: an interrupt between two statements
            con.interrupt()        # is lost, the next one must still stop
            done.wait(0.05)

    def timed_out() -> FgmError:
        return QueryTimeout(f"the query timed out after {timeout:g} s and was stopped; "
                        "give --timeout SECONDS for a longer limit (0: none)")

    def batches(reader) -> Iterator[pl.DataFrame]:
        first = True
        while True:
            if deadline is not None and time.monotonic() > deadline:
                raise timed_out()
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                if first:
                    yield pl.from_arrow(reader.schema.empty_table())
                return
            except (duckdb.Error, OSError) as exc:   # pyarrow's own wrapper of an interrupt
                if fired.is_set():
                    raise timed_out() from None
                raise FgmError(str(exc).strip()) from None
            first = False
            yield pl.from_arrow(batch)

    guard = threading.Thread(target=watchdog, daemon=True) if timeout else None
    if guard:
        guard.start()
    try:
        try:
            for st in statements[:-1]:     # run, their rows read and dropped batch by batch
                for _ in con.sql(st.query).to_arrow_reader(BATCH_ROWS):
                    pass
            reader = con.sql(statements[-1].query).to_arrow_reader(BATCH_ROWS)
        except duckdb.Error as exc:
            if fired.is_set():
                raise timed_out() from None
            raise FgmError(str(exc).strip()) from None
        yield batches(reader)
    finally:
        done.set()
        if guard:
            guard.join()


def run_readonly(con: duckdb.DuckDBPyConnection, sql: str,
                 timeout: float | None = None) -> pl.DataFrame:
    """readonly_batches' rows as one frame (for callers that want the whole answer)."""
    with readonly_batches(con, sql, timeout) as frames:
        return pl.concat(list(frames), how="vertical_relaxed")
