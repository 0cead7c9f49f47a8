"""The measure registry: one decorated function per measure (timm-style).

    @measure(eq="44", needs=("final",))
    def path_norm(ctx): ...

records the name (the function's), the paper's equation number, the family
(the module the function lives in) and what it needs: `final`, `init` and
`epoch1` weights, the training `data`, the training `trace`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

NEEDS = ("final", "init", "epoch1", "data", "trace")


@dataclass(frozen=True)
class MeasureSpec:
    name: str
    eq: str
    family: str
    needs: tuple[str, ...]
    fn: Callable
    description: str


REGISTRY: dict[str, MeasureSpec] = {}


def measure(eq: str, needs: tuple[str, ...] = ("final",), name: str | None = None):
    """Register a measure. A duplicate name is an error."""
    def register(fn: Callable) -> Callable:
        key = name or fn.__name__
        if key in REGISTRY:
            raise ValueError(f"measure {key!r} is registered twice "
                             f"({REGISTRY[key].fn.__module__} and {fn.__module__})")
        unknown = set(needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"measure {key!r}: unknown needs {sorted(unknown)}; "
                             f"allowed: {', '.join(NEEDS)}")
        doc = (fn.__doc__ or "").strip().splitlines()
        REGISTRY[key] = MeasureSpec(key, eq, fn.__module__.rsplit(".", 1)[-1], tuple(needs),
                                    fn, doc[0] if doc else "")
        return fn
    return register


def _load_families() -> None:
    from . import (  # noqa: F401  (importing registers)
        norms,
        optimization,
        output,
        pac_bayes,
        sharpness,
        spectral,
    )


def list_measures(pattern: str = "*") -> list[MeasureSpec]:
    """Registered measures whose name matches a glob pattern (or a comma list of them);
    an empty pattern matches none (fgm-measure --measures '' is an error, not all)."""
    _load_families()
    patterns = [p.strip() for p in pattern.split(",") if p.strip()]
    return [spec for name, spec in sorted(REGISTRY.items())
            if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def mirror_definitions(con) -> None:
    """Write the registry into the warehouse's measure_definitions table."""
    import polars as pl

    from fgm.warehouse.upsert import upsert
    specs = list_measures()
    frame = pl.DataFrame({"measure": [s.name for s in specs], "equation": [s.eq for s in specs],
                          "family": [s.family for s in specs],
                          "needs": [list(s.needs) for s in specs],
                          "description": [s.description for s in specs]})
    upsert(con, "measure_definitions", frame, ["measure"])
