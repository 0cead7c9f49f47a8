"""The answers of `fgm.open(...).psi / cmi / oracle / robust`: the figures as
attributes, the whole result object of fgm-query's JSON as `raw`, and `to_frame()`
with the rows fgm-query's table prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import polars as pl

from fgm.warehouse.errors import FgmError


class ReadOnlyError(FgmError):
    """A write (storing an evaluation) through a handle opened read-only."""


class NotStoredWarning(UserWarning):
    """store=True, and the evaluation could not be kept (the file held by another
    process, a full disk): the answer is returned all the same."""


def _spread(raw: dict, keys: tuple[str, ...]) -> list[tuple[str, Any]]:
    """Std over seeds and interval bounds, as fgm-query's table prints them."""
    rows: list[tuple[str, Any]] = []
    if "seeds" in raw:
        n = raw["seeds"]["n"]
        rows += [(f"{k} std over {n} seeds", raw["seeds"]["std"].get(k)) for k in keys]
    if "ci" in raw:
        pct = f"{100 * raw['ci']['level']:g}%"
        for k in keys:
            lo, hi = raw["ci"].get(k) or (None, None)
            rows += [(f"{k} {pct} CI low", lo), (f"{k} {pct} CI high", hi)]
    return rows


def _frame(rows: list[tuple[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame({"quantity": [r[0] for r in rows],
                         "value": [None if r[1] is None else float(r[1]) for r in rows]},
                        schema={"quantity": pl.String, "value": pl.Float64})


def _cmi_rows(raw: dict) -> list[tuple[str, Any]]:
    return [*((f"cmi[{a}]", v) for a, v in raw["per_axis"].items()),
            ("|S|=0", raw["s0"]), ("min |S|=1", raw["s1"]), ("min |S|=2", raw["s2"]),
            (f"K (S = {{{', '.join(raw['argmin'])}}})" if raw["argmin"] is not None
             else "K", raw["K"])]


@dataclass
class _Result:
    raw: dict = field(repr=False)

    @property
    def n_models(self) -> int:
        return int(self.raw["n_models"])

    @property
    def note(self) -> str | None:
        """What fgm-query prints below the figures (e.g. why K is null)."""
        return self.raw.get("note")

    @property
    def constant_axes(self) -> dict[str, str]:
        """Axes with one value in the selection: they take no part."""
        return dict(self.raw.get("constant_axes") or {})

    def to_pandas(self):
        """to_frame() as a pandas DataFrame (needs pandas: pip install fgm[pandas])."""
        return self.to_frame().to_pandas()

    def to_frame(self) -> pl.DataFrame:   # pragma: no cover - each result has its own
        raise NotImplementedError


@dataclass
class PsiResult(_Result):
    """Kendall's τ over all models (Eq. 2), the granulated ψ_i per axis (Eq. 4) and
    Ψ = (1/n) Σ_i ψ_i (Eq. 5). With several seeds: the means across seeds, their
    std in `raw["seeds"]`."""
    measure: str = ""
    tau: float | None = None
    psi: dict[str, float | None] = field(default_factory=dict)
    Psi: float | None = None

    @classmethod
    def of(cls, raw: dict) -> PsiResult:
        return cls(raw, raw["measure"], raw["tau"], dict(raw["psi"]), raw["Psi"])

    def to_frame(self) -> pl.DataFrame:
        raw = self.raw
        rows = [("tau", raw["tau"]), *((f"psi[{a}]", v) for a, v in raw["psi"].items()),
                ("Psi", raw["Psi"]), *_spread(raw, ("tau", "Psi"))]
        if "unconverged_searches" in raw:
            rows.append(("values from unconverged searches", raw["unconverged_searches"]))
        return _frame(rows)


@dataclass
class CmiResult(_Result):
    """Conditional mutual information Î(S) for |S| ≤ 2 (App. B) and K, its minimum
    over the conditioning sets; `per_axis`: Î({axis}), `s0`, `s1`, `s2`: the least
    over the sets of each size, `argmin`: the set behind K."""
    measure: str = ""
    K: float | None = None
    per_axis: dict[str, float | None] = field(default_factory=dict)
    s0: float | None = None
    s1: float | None = None
    s2: float | None = None
    argmin: list[str] | None = None

    @classmethod
    def of(cls, raw: dict) -> CmiResult:
        return cls(raw, raw["measure"], raw["K"], dict(raw["per_axis"]), raw["s0"],
                   raw["s1"], raw["s2"], raw["argmin"])

    def to_frame(self) -> pl.DataFrame:
        entropy = [(f"H(V_g | {a}) bits", v)
                   for a, v in self.raw.get("conditional_entropy", {}).items()]
        return _frame(_cmi_rows(self.raw) + entropy + _spread(self.raw, ("K",)))


@dataclass
class OracleResult(_Result):
    """The noisy oracle g + N(0, ε²): exact expected τ, ψ_i and Ψ; Monte Carlo CMI
    (`cmi`, with K and its standard error)."""
    eps: float = 0.0
    tau: float | None = None
    psi: dict[str, float | None] = field(default_factory=dict)
    Psi: float | None = None
    K: float | None = None

    @classmethod
    def of(cls, raw: dict) -> OracleResult:
        return cls(raw, raw["eps"], raw["tau"], dict(raw["psi"]), raw["Psi"],
                   raw["cmi"]["K"])

    @property
    def cmi(self) -> dict:
        return self.raw["cmi"]

    def to_frame(self) -> pl.DataFrame:
        raw = self.raw
        return _frame([("tau", raw["tau"]), *((f"psi[{a}]", v) for a, v in raw["psi"].items()),
                       ("Psi", raw["Psi"]), *_cmi_rows(raw["cmi"]),
                       ("K stderr", raw["cmi"]["stderr"]["K"])])


@dataclass
class RobustResult(_Result):
    """Robust sign-error over environments, configurations one axis apart (Dziugaite
    et al. 2020): per axis and overall, the environments kept, mean, p90 and max."""
    measure: str = ""
    per_axis: dict[str, dict] = field(default_factory=dict)
    overall: dict = field(default_factory=dict)

    @classmethod
    def of(cls, raw: dict) -> RobustResult:
        return cls(raw, raw["measure"], dict(raw["per_axis"]), dict(raw["overall"]))

    def to_frame(self) -> pl.DataFrame:
        rows = [{"axis": a, **v} for a, v in self.raw["per_axis"].items()]
        rows.append({"axis": "overall", **self.raw["overall"]})
        schema = {"axis": pl.String, "environments": pl.Int64, "mean": pl.Float64,
                  "p90": pl.Float64, "max": pl.Float64, "note": pl.String}
        return pl.DataFrame([{k: r.get(k) for k in schema} for r in rows], schema=schema)
