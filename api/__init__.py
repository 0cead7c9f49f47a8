"""fgm as a library: the warehouse's answers as DataFrames, and the measures of a model.

    import fgm
    with fgm.open("fgm.duckdb") as wh:      # read-only, locked down, as fgm-query
        wh.table()                          # Table 5 as a polars DataFrame
        wh.psi("path_norm").Psi             # Ψ = (1/n) Σ_i ψ_i
    fgm.measure(model, (x, y), init=init)   # {measure: value or None}

Every error a user can act on is an `FgmError` carrying the message the command
line prints. docs/python.md has the whole interface.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from fgm.warehouse.errors import FgmError, InputError, SchemaVersionError, WarehouseLocked

try:
    __version__ = version("fgm")
except PackageNotFoundError:   # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "Warehouse",
    "PsiResult",
    "CmiResult",
    "OracleResult",
    "RobustResult",
    "measure",
    "measure_details",
    "list_measures",
    "MeasureDetail",
    "FgmError",
    "InputError",
    "NotAWarehouse",
    "NotStoredWarning",
    "ReadOnlyError",
    "SchemaVersionError",
    "UnsupportedModel",
    "WarehouseLocked",
]

# `open` is not in __all__: `from fgm import *` would shadow the builtin open.
# Imported on first use: `import fgm.warehouse` (every command line, every worker
# process) stays as light as it was; torch, altair and the evaluation load only when
# a notebook asks for them.
_LAZY = {
    "open": "fgm.library", "Warehouse": "fgm.library",
    "PsiResult": "fgm.results", "CmiResult": "fgm.results",
    "OracleResult": "fgm.results", "RobustResult": "fgm.results",
    "ReadOnlyError": "fgm.results", "NotStoredWarning": "fgm.results",
    "measure": "fgm.measuring", "measure_details": "fgm.measuring",
    "list_measures": "fgm.measuring", "MeasureDetail": "fgm.measuring",
    "UnsupportedModel": "fgm.measuring",
    "NotAWarehouse": "fgm.warehouse.store",
}

if TYPE_CHECKING:
    from fgm.library import Warehouse
    from fgm.library import open as open  # noqa: A004  (not in __all__: see above)
    from fgm.measuring import (
        MeasureDetail,
        UnsupportedModel,
        list_measures,
        measure,
        measure_details,
    )
    from fgm.results import (
        CmiResult,
        NotStoredWarning,
        OracleResult,
        PsiResult,
        ReadOnlyError,
        RobustResult,
    )
    from fgm.warehouse.store import NotAWarehouse


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fgm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
