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


# Training settings that change only what is logged, never the weights.
LOGGING_ONLY = frozenset({"trace_every"})


def training_hash(train: dict[str, object]) -> str:
    """sha256 of the canonical JSON of the training settings that shape the weights
    (stop rule, step budget, learning-rate drops, ...): two grids that train one
    configuration differently train two different models."""
    canon = {k: v for k, v in train.items() if k not in LOGGING_ONLY}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, default=str).encode()).hexdigest()


def model_id_for(config: str, dataset: str, seed: int, training: str | None = None) -> str:
    """The model's id: its configuration, dataset and seed, and for a model trained by
    fgm the hash of its training settings (results tables carry none)."""
    key = f"{config}|{dataset}|{int(seed)}" + (f"|{training}" if training else "")
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def sweep_id_for(name: str) -> str:
    """A sweep's id: a hash of its name (`<grid>/<dataset>`, or a results table's)."""
    return hashlib.sha256(f"sweep:{name}".encode()).hexdigest()[:16]
