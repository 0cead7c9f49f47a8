"""The DuckDB warehouse: connect, apply schema.sql, the SQL views, typed rows."""

from .errors import FgmError, InputError, SchemaVersionError, WarehouseLocked
from .store import SCHEMA_VERSION, apply_schema, connect, resolve_db, scalar, transaction
from .version import code_version

__all__ = [
    "FgmError", "InputError", "SchemaVersionError", "WarehouseLocked", "SCHEMA_VERSION",
    "apply_schema", "connect", "resolve_db", "scalar", "transaction", "code_version",
]
