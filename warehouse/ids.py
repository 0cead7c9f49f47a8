"""Natural keys shared by every writer: the same configuration, seed and dataset
get the same model_id whether they come from a results table or a run bundle."""

from __future__ import annotations

import hashlib
import json


def canonical_value(value: object) -> object:
    """Numbers as floats (so 32, 32.0 and "32" agree), everything else as text."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        return str(value)


def config_hash(values: dict[str, object]) -> str:
    """sha256 of the canonical JSON of a configuration's hyperparameter values."""
    canon = {axis: canonical_value(v) for axis, v in values.items()}
    return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()


def model_id_for(config: str, dataset: str, seed: int) -> str:
    return hashlib.sha256(f"{config}|{dataset}|{int(seed)}".encode()).hexdigest()[:16]
