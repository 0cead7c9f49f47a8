"""`fgm.open`: the warehouse from Python, every answer of fgm-query as a polars
DataFrame, a result object or an altair chart.

Each call opens the file read-only for as long as it runs, with the command line's
lock-down and waiting (a grid that is writing the warehouse is waited for, a few
seconds, as fgm-query waits), and closes it again: a notebook that keeps a handle
open does not keep a running grid from storing its models."""

from __future__ import annotations

import difflib
import functools
import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

import polars as pl

from fgm.analysis import queries
from fgm.analysis.evaluate import Selection, table5, table6
from fgm.warehouse import FgmError
from fgm.warehouse.store import resolve_db

from .results import (
    CmiResult,
    NotStoredWarning,
    OracleResult,
    PsiResult,
    ReadOnlyError,
    RobustResult,
)

if TYPE_CHECKING:
    import altair as alt
    import duckdb


class SelectionOptions(TypedDict, total=False):
    """Which models are evaluated: fgm-query's selection options, by the same names.

    where: an SQL predicate over the hyperparameters (each axis's value and
        `<axis>_level`, e.g. "weight_decay = 0"), parsed and checked as fgm-query
        checks --where; dataset, sweep: a dataset's or a sweep's name (or id);
    all_models: include the models that did not converge; relevel: rank axes afresh by
        value across grids whose levels disagree; pool_seeds: evaluate all models
        together, ignoring seeds; converged_searches_only: leave out values of σ/α
        searches that did not converge (psi, table); seeds: only models of these seeds.
    """
    where: str | None
    dataset: str | None
    sweep: str | None
    all_models: bool
    relevel: bool
    pool_seeds: bool
    converged_searches_only: bool
    seeds: list[int] | tuple[int, ...] | None


_OPTIONS = tuple(SelectionOptions.__annotations__)


def _selection(options: dict, *, allowed: tuple[str, ...] = _OPTIONS) -> Selection:
    unknown = [k for k in options if k not in allowed]
    if unknown:
        close = difflib.get_close_matches(unknown[0], allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"unknown selection option {unknown[0]!r}{hint} (options: "
                        f"{', '.join(allowed)})")
    return queries.selection(**options)


def _errors(method: Callable) -> Callable:
    """FgmError as it is; a DuckDB or Polars error a user's input can cause (a query
    of theirs, a malformed file) as an FgmError with its first line, as fgm-query
    prints it."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        import duckdb
        try:
            return method(*args, **kwargs)
        except FgmError:
            raise
        except (duckdb.Error, pl.exceptions.PolarsError) as exc:
            text = str(exc).strip()
            message = text.splitlines()[0] if text else type(exc).__name__
        # raised outside the handler, so the new error carries no reference to the old
        # one's frames: a notebook keeps its last error, and with it whatever those
        # frames held (a query's result keeps the file's database open in the process)
        raise FgmError(message)
    return wrapper


def open(path: str | os.PathLike | None = None, *, read_only: bool = True) -> Warehouse:  # noqa: A001
    """The warehouse at `path` (default: $FGM_DB, then ./fgm.duckdb).

    Checked now, as fgm-query checks it: a missing file, a file that is not an fgm
    warehouse, one written by a newer fgm or locked down against (its own SQL
    functions, views in place of fgm's tables) raise FgmError. read_only=False lets
    `store=True` keep evaluations in the file (fgm-query keeps them by default)."""
    return Warehouse(path, read_only=read_only)


class Warehouse:
    """An fgm warehouse. Usable as a context manager; `close()` makes further calls an
    error. Results equal fgm-query's: both are the same library functions."""

    def __init__(self, path: str | os.PathLike | None = None, *, read_only: bool = True):
        if path is not None and not isinstance(path, str | os.PathLike):
            raise FgmError(f"path {path!r}: expected a file name or a Path")
        if not isinstance(read_only, bool):
            raise FgmError(f"read_only {read_only!r}: expected True or False")
        self.path: Path = resolve_db(path)
        self.read_only = read_only
        self._closed = False
        _errors(self._check)()   # the checks of every later call, once now

    def _check(self) -> None:
        with self._reader():
            pass

    # ---------------------------------------------------------------- plumbing
    def __enter__(self) -> Warehouse:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "read-write"
        return f"<fgm.Warehouse {str(self.path)!r} ({mode}{', closed' if self._closed else ''})>"

    @contextmanager
    def _reader(self, memory_limit: str | None = None):
        if self._closed:
            raise FgmError(f"{self.path}: this warehouse handle is closed; fgm.open it again")
        with queries.readonly(self.path, memory_limit) as con:
            yield con

    def _store(self, store: bool, con: duckdb.DuckDBPyConnection, sel: Selection, ids,
               scope: str | None):
        """The snapshot of what was read, taken on the connection that read it."""
        if not queries.check_flag("store", store):
            return None
        if self.read_only:
            raise ReadOnlyError(f"{self.path}: opened read-only; fgm.open(path, "
                                "read_only=False) to store evaluations (store=True)")
        from fgm.analysis.stored import snapshot
        return snapshot(con, sel, ids, scope)

    def _keep(self, snap, command: str, sel: Selection, options: dict, rows: list[dict],
              **question) -> None:
        if snap is None:
            return
        from fgm.analysis.stored import WRITE_ERRORS, store_evaluation
        try:
            store_evaluation(self.path, snap, command, sel, options, rows, **question)
        except WRITE_ERRORS as exc:
            # as fgm-query: the answer stands without it; said, not lost
            warnings.warn(f"{self.path}: evaluation not stored ("
                          f"{' '.join(str(exc).split())})", NotStoredWarning, stacklevel=3)

    # ---------------------------------------------------------------- listings
    @_errors
    def models(self, **selection: Unpack[SelectionOptions]) -> pl.DataFrame:
        """Every model, as `fgm-query models`: dataset, seed, each axis's value and the
        outcomes (train_acc, test_acc, gap, converged), in the grid's order. With
        selection options: only the models they pick (all_models defaults to True
        here, so unconverged models are listed unless all_models=False)."""
        selection.setdefault("all_models", True)
        sel = _selection(selection, allowed=tuple(
            o for o in _OPTIONS if o not in ("relevel", "pool_seeds", "converged_searches_only")))
        with self._reader() as con:
            frame = queries.models_frame(con)
            if sel != Selection(all_models=True):
                from fgm.analysis.evaluate import selected_model_ids
                frame = frame.filter(pl.col("model_id").is_in(selected_model_ids(con, sel)))
        return frame

    @_errors
    def measures(self) -> pl.DataFrame:
        """Every measure, as `fgm-query measures`: how many models have a value, failed
        or miss one; `reasons`: each stored reason with its status and model count."""
        with self._reader() as con:
            return queries.measures_frame(con)

    # ---------------------------------------------------------------- evaluation
    @_errors
    def psi(self, measure: str, *, ci: float | None = None, blocks: int = 20, seed: int = 0,
            convention: str = "spec", store: bool = False,
            **selection: Unpack[SelectionOptions]) -> PsiResult:
        """τ over all models (Eq. 2), ψ_i per axis (Eq. 4), Ψ their mean (Eq. 5), as
        `fgm-query psi`. ci: jackknife intervals at this level (over `blocks` blocks of
        configurations, seeded by `seed`); convention "paper": the paper's own."""
        sel = _selection(selection)
        with self._reader() as con:
            answer = queries.psi(con, sel, measure, ci=ci, blocks=blocks, seed=seed,
                                 convention=convention)
            snap = self._store(store, con, sel, answer.models.ids, measure)
        from fgm.analysis.stored import psi_rows
        self._keep(snap, "psi", sel, {"measure": measure, **queries.convention_option(
            convention)}, psi_rows(answer.res), ci=ci, blocks=blocks, seed=seed if ci else None)
        return PsiResult.of(answer.res, left_out=sel.converged_searches_only)

    @_errors
    def cmi(self, measure: str, *, pgdl: bool = False, ci: float | None = None,
            blocks: int = 20, seed: int = 0, convention: str = "spec", store: bool = False,
            **selection: Unpack[SelectionOptions]) -> CmiResult:
        """Î(S) for |S| ≤ 2 and K = min_S Î(S) (App. B), as `fgm-query cmi`; pgdl: the
        NeurIPS 2020 PGDL scorer's convention."""
        sel = _selection(selection, allowed=tuple(o for o in _OPTIONS
                                                  if o != "converged_searches_only"))
        with self._reader() as con:
            answer = queries.cmi(con, sel, measure, pgdl=pgdl, ci=ci, blocks=blocks,
                                 seed=seed, convention=convention)
            snap = self._store(store, con, sel, answer.models.ids, measure)
        from fgm.analysis.stored import cmi_rows
        self._keep(snap, "cmi", sel, {"measure": measure, **queries.convention_option(
            convention)}, cmi_rows(answer.res), pgdl=pgdl, ci=ci, blocks=blocks,
            seed=seed if ci else None)
        return CmiResult.of(answer.res)

    @_errors
    def oracle(self, eps: float, *, draws: int = 20, seed: int = 0, store: bool = False,
               **selection: Unpack[SelectionOptions]) -> OracleResult:
        """The noisy oracle g + N(0, ε²), as `fgm-query oracle --eps EPS`."""
        sel = _selection(selection, allowed=tuple(o for o in _OPTIONS
                                                  if o != "converged_searches_only"))
        with self._reader() as con:
            answer = queries.oracle(con, sel, eps, draws=draws, seed=seed)
            snap = self._store(store, con, sel, answer.models.ids, None)
        from fgm.analysis.stored import oracle_rows
        self._keep(snap, "oracle", sel, {"eps": eps, "draws": draws},
                   oracle_rows(answer.res), seed=seed)
        return OracleResult.of(answer.res)

    @_errors
    def robust(self, measure: str, *, test_size: int | None = None,
               weighting: str = "published", min_ess: float | None = None,
               store: bool = False, **selection: Unpack[SelectionOptions]) -> RobustResult:
        """Robust sign-error over environments, as `fgm-query robust`."""
        sel = _selection(selection, allowed=tuple(
            o for o in _OPTIONS if o not in ("pool_seeds", "converged_searches_only")))
        with self._reader() as con:
            answer = queries.robust(con, sel, measure, test_size=test_size,
                                    weighting=weighting, min_ess=min_ess)
            snap = self._store(store, con, sel, answer.models.ids, measure)
        from fgm.analysis.stored import robust_rows
        self._keep(snap, "robust", sel, {"measure": measure, "test_size": test_size,
                                         "weighting": weighting, "min_ess": min_ess},
                   robust_rows(answer.res))
        return RobustResult.of(answer.res)

    @_errors
    def table(self, *, ci: float | None = None, blocks: int = 20, seed: int = 0,
              convention: str = "spec", store: bool = False,
              **selection: Unpack[SelectionOptions]) -> pl.DataFrame:
        """Table 5: one row per measure and baseline (oracles, canonical orderings,
        random), columns measure, kind, tau, ψ per axis, Psi (and *_std with several
        seeds, *_lo/*_hi with ci), as `fgm-query table`."""
        return self._table("psi", 10, ci, blocks, seed, convention, store, selection)

    @_errors
    def table_cmi(self, *, draws: int = 10, ci: float | None = None, blocks: int = 20,
                  seed: int = 0, convention: str = "spec", store: bool = False,
                  **selection: Unpack[SelectionOptions]) -> pl.DataFrame:
        """Table 6: CMI per axis, the least over |S| = 0, 1, 2 and K, per measure and
        baseline, as `fgm-query table --kind cmi`."""
        return self._table("cmi", draws, ci, blocks, seed, convention, store, selection)

    def _table(self, kind, draws, ci, blocks, seed, convention, store, selection):
        pool_seeds = queries.check_flag("pool_seeds", selection.pop("pool_seeds", False))
        queries.check_interval(ci, blocks, seed)
        queries.check_int("draws", draws, 2, queries.MAX_DRAWS)
        queries.check_flag("store", store)
        queries.check_convention(convention)
        sel = _selection(selection)
        with self._reader() as con:
            if kind == "psi":
                frame = table5(con, sel, seed=seed, ci=ci, blocks=blocks,
                               pool_seeds=pool_seeds, convention=convention)
            else:
                frame = table6(con, sel, draws=draws, seed=seed, ci=ci, blocks=blocks,
                               pool_seeds=pool_seeds, convention=convention)
            from fgm.analysis.evaluate import select_models
            models = select_models(con, sel) if store else None
            snap = self._store(store, con, sel, models.ids if models else [], "*")
        if snap is not None:
            from dataclasses import replace

            from fgm.analysis.stored import table_rows
            self._keep(snap, f"table {kind}", replace(sel, pool_seeds=pool_seeds),
                       {**({"draws": draws} if kind == "cmi" else {}),
                        **queries.convention_option(convention)},
                       table_rows(frame, kind, models.axes), ci=ci, blocks=blocks, seed=seed)
        return frame

    @_errors
    def compare_paper(self, table: int | str | None = 5, *, pool_seeds: bool = False,
                      **selection: Unpack[SelectionOptions]) -> pl.DataFrame:
        """The paper's published figures beside this warehouse's, measure by measure
        (Table 5: τ, Ψ on CIFAR-10; 6: K; 7: SVHN τ, Ψ; None: 5 and 6), computed with
        the paper's conventions, as `fgm-query compare --paper --table T`. The
        agreement (signs, rank correlations) is in the frame's `attrs`-free summary:
        `compare_summary()`."""
        return self._compare(table, pool_seeds, selection)[1]

    @_errors
    def compare_summary(self, table: int | str | None = 5, *, pool_seeds: bool = False,
                        **selection: Unpack[SelectionOptions]) -> dict[str, Any]:
        """The whole comparison object of `fgm-query compare --paper --format json`."""
        return self._compare(table, pool_seeds, selection)[0]

    def _compare(self, table, pool_seeds, selection):
        from fgm.analysis.compare import DEFAULT_TABLES, compare_paper, comparison_frame
        tables = DEFAULT_TABLES if table is None else (str(table),)
        if any(t not in ("5", "6", "7") for t in tables):
            raise FgmError(f"table {table!r}: the paper's tables here are 5, 6 and 7")
        sel = _selection(selection, allowed=tuple(o for o in _OPTIONS if o not in (
            "pool_seeds", "converged_searches_only")))
        with self._reader() as con:
            res = compare_paper(con, sel, tables, pool_seeds=pool_seeds or None,
                                db=str(self.path))
        return res, comparison_frame(res)

    # ---------------------------------------------------------------- SQL and charts
    @_errors
    def sql(self, query: str, *, timeout: float | None = 60.0,
            memory_limit: str = "4GB") -> pl.DataFrame:
        """The rows of a SELECT, read-only exactly as `fgm-query sql`: anything that
        writes, attaches a file or reads one is refused (FgmError); timeout seconds
        (None or 0: none)."""
        from fgm.analysis.sql import readonly_batches
        if not isinstance(query, str):
            raise FgmError(f"query {query!r}: expected SQL text")
        if timeout is not None:
            queries.check_number("timeout", timeout, 0, queries.MAX_TIMEOUT)
        with self._reader(queries.memory_limit(memory_limit)) as con, \
                readonly_batches(con, query, timeout=timeout or None) as frames:
            return pl.concat(list(frames), how="vertical")

    @_errors
    def chart(self, kind: str, *, measure: str | None = None, color: str | None = None,
              draws: int = 10, log: bool | None = None,
              **selection: Unpack[SelectionOptions]) -> alt.TopLevelMixin:
        """One of the report's charts, which renders inline in Jupyter: "converged"
        (Figure 1: models that fit, per level), "cross_entropy", "gap" (histograms),
        "table5", "table6" (heatmaps), "paper" (the paper against this warehouse),
        "traces" (training curves coloured by the axis `color`), "measure" (a
        measure against the gap, coloured by `color`)."""
        from fgm.analysis.report import chart
        sel = _selection(selection, allowed=tuple(o for o in _OPTIONS
                                                  if o != "converged_searches_only"))
        with self._reader() as con:
            return chart(con, kind, sel, measure=measure, color=color, draws=draws, log=log)
