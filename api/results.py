"""The answers of `fgm.open(...).psi / cmi / oracle / robust`: the figures as
attributes, the whole result object of fgm-query's JSON as `raw`, and `to_frame()`
with the rows fgm-query's table prints."""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from fgm.analysis import queries
from fgm.warehouse.errors import FgmError


class ReadOnlyError(FgmError):
    """A write (storing an evaluation) through a handle opened read-only."""


class NotStoredWarning(UserWarning):
    """store=True, and the evaluation could not be kept (the file held by another
    process, a full disk): the answer is returned all the same."""


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
    left_out: bool = field(default=False, repr=False)  # converged_searches_only=True

    @classmethod
    def of(cls, raw: dict, left_out: bool = False) -> PsiResult:
        return cls(raw, raw["measure"], raw["tau"], dict(raw["psi"]), raw["Psi"], left_out)

    def to_frame(self) -> pl.DataFrame:
        return queries.quantity_frame(queries.psi_quantities(self.raw, self.left_out))


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
        return queries.quantity_frame(queries.cmi_result_quantities(self.raw))


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
        return queries.quantity_frame(queries.oracle_quantities(self.raw))


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
        return queries.robust_frame(self.raw)
