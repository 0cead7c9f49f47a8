"""A task of the PGDL competition (NeurIPS 2020, "Predicting Generalization in Deep
Learning") into the warehouse: fgm-ingest pgdl INPUT_TASK_DIR --reference
REFERENCE_TASK_DIR/model_configs.json.

    INPUT_TASK_DIR/model_<k>/config.json         {"model_config": [...], "input_shape": [H, W, C]}
    INPUT_TASK_DIR/model_<k>/weights.hdf5        Keras's save_weights
    INPUT_TASK_DIR/model_<k>/weights_init.hdf5   (where present) the initial weights
    INPUT_TASK_DIR/dataset_1/train/shard_*.tfrecord
    model_configs.json: {model_id: {"hparams": {name: {"current_value": v,
                          "possible_values": [...]}}, "metrics": {"train_acc", "test_acc", ...}}}

Each model becomes a row of a results table of foreign models (ingest/foreign.py):
its own architecture (its config.json, converted by ingest/keras.py), its weights as
checkpoints, its hyperparameters with the order of possible_values as levels, its
accuracies as outcomes; the shards are its dataset; the task is the sweep. A model
the converter cannot read is reported with the layer and left out; the task's
other models still go in. No TensorFlow is needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from fgm.warehouse import FgmError, InputError

from .foreign import prepare_foreign
from .keras import KerasSequential
from .table import PreparedTable
from .zoo import Architecture, DatasetDef, ModelsToml, sha256_bytes


@dataclass
class PgdlTask:
    prepared: PreparedTable
    skipped: list[str] = field(default_factory=list)     # "model_k: why"


def _reference(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"not readable JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise InputError(path, "expected {model_id: {hparams, metrics}}")
    return data


def _row(model: str, entry: object, ref: Path) -> dict:
    """One model's hyperparameters (value, level) and accuracies from the reference."""
    if not isinstance(entry, dict) or not isinstance(entry.get("hparams"), dict) \
            or not isinstance(entry.get("metrics"), dict):
        raise InputError(ref, f"{model}: expected hparams and metrics")
    row: dict[str, object] = {}
    for name, hp in entry["hparams"].items():
        if not isinstance(hp, dict) or "current_value" not in hp \
                or not isinstance(hp.get("possible_values"), list):
            raise InputError(ref, f"{model}: hparams.{name}: expected current_value and "
                             "possible_values")
        value, possible = hp["current_value"], hp["possible_values"]
        if value not in possible:
            raise InputError(ref, f"{model}: hparams.{name}: current_value {value!r} is not "
                             f"one of possible_values {possible}")
        row[f"hp.{name}"] = str(value)
        row[f"level.{name}"] = str(possible.index(value))
    for key in ("train_acc", "test_acc"):
        value = entry["metrics"].get(key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise InputError(ref, f"{model}: metrics.{key}: expected an accuracy, got {value!r}")
        row[key] = str(value)
    return row


def _first_image_shape(shard: Path) -> tuple[int, int, int]:
    """(H, W, C) of a shard's first image (the competition's: float32 NHWC)."""
    from .tfrecord import read_examples
    first = read_examples(shard, ("inputs", "output"), limit=1)
    if not first or first[0]["inputs"].ndim != 3:
        raise FgmError(f"{shard}: expected records of (H, W, C) images")
    return tuple(int(v) for v in first[0]["inputs"].shape)


def prepare_pgdl(task_dir: Path | str, reference: Path | str, *, sweep: str | None = None,
                 progress=None) -> PgdlTask:
    """Read and check a PGDL task (no warehouse needed): every model converted,
    its weights loaded, run on the task's training shards."""
    # absolute: the warehouse keeps the shards' and weights' paths for fgm-measure,
    # which may run from another folder
    task_dir, reference = Path(task_dir).resolve(), Path(reference).resolve()
    if not task_dir.is_dir():
        raise FgmError(f"{task_dir}: no such directory (a PGDL task's input_data/<task>)")
    ref = _reference(reference)
    folders = sorted(d.name for d in task_dir.iterdir()
                     if d.is_dir() and d.name.startswith("model"))
    if not folders:
        raise FgmError(f"{task_dir}: no model_* folders")
    missing, extra = sorted(set(folders) - set(ref)), sorted(set(ref) - set(folders))
    if missing or extra:
        raise InputError(reference, "its model ids do not match the task's folders: "
                         + "; ".join(p for p in (
                             f"folders without an entry: {', '.join(missing[:5])}" if missing
                             else "", f"entries without a folder: {', '.join(extra[:5])}"
                             if extra else "") if p))
    shards = sorted((task_dir / "dataset_1" / "train").glob("shard_*.tfrecord"))
    if not shards:
        raise FgmError(f"{task_dir}: no dataset_1/train/shard_*.tfrecord")
    task = task_dir.name
    image_shape = _first_image_shape(shards[0])
    architectures, rows, skipped, channels = {}, [], [], None
    for model in folders:
        folder = task_dir / model
        try:
            try:
                config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise FgmError(f"config.json: not readable ({exc})") from None
            if not isinstance(config, dict) or "model_config" not in config:
                raise FgmError("config.json: expected model_config and input_shape")
            if not (folder / "weights.hdf5").is_file():
                raise FgmError("no weights.hdf5")
            net = KerasSequential(config.get("model_config"), config.get("input_shape"))
            if net.input_shape != image_shape:
                # Keras pads by the real input's size: another one is another network
                raise FgmError(f"input_shape {list(net.input_shape)}, but the task's "
                               f"images are {list(image_shape)}")
            net.keras_state_dict(folder / "weights.hdf5")     # weights fit the config
            if (folder / "weights_init.hdf5").is_file():
                net.keras_state_dict(folder / "weights_init.hdf5")
        except FgmError as exc:
            skipped.append(f"{model}: {exc}")
            continue
        c = net.input_shape[2]
        if channels is not None and c != channels:
            skipped.append(f"{model}: {c} input channels where the task's others have "
                           f"{channels}")
            continue
        channels = c
        canonical = {"model_config": config["model_config"],
                     "input_shape": config["input_shape"]}
        architectures[model] = Architecture(
            model, f"pgdl:{task}/{model}/config.json", "pgdl", "keras-sequential", "{}",
            str(folder / "config.json"),
            sha256_bytes(json.dumps(canonical, sort_keys=True).encode()),
            json.dumps(canonical, sort_keys=True))
        row = {"model_id": f"{task}/{model}", "arch": model, "dataset": task,
               **_row(model, ref[model], reference),
               "checkpoint.final": f"{model}/weights.hdf5"}
        if (folder / "weights_init.hdf5").is_file():
            row["checkpoint.init"] = f"{model}/weights_init.hdf5"
        rows.append(row)
    if not rows:
        raise FgmError(f"{task_dir}: no model could be converted:\n  " + "\n  ".join(skipped))
    columns = sorted({k for r in rows for k in r})
    frame = pl.DataFrame([{c: r.get(c) for c in columns} for r in rows],
                         schema={c: pl.String for c in columns})
    dataset = DatasetDef(task, f"tfrecord:{task}/dataset_1/train", "tfrecord",
                         str(task_dir / "dataset_1" / "train"), None, (0.0,) * channels,
                         (1.0,) * channels, "NHWC", shards=tuple(str(s) for s in shards))
    toml = ModelsToml(reference, architectures, {task: dataset})
    prepared = prepare_foreign(reference, toml, frame=frame,
                               sweep=sweep or task, checkpoint_root=task_dir,
                               progress=progress)
    return PgdlTask(prepared, skipped)
