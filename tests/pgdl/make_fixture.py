"""Writes tests/pgdl/fixture/: a tiny task in the layout of the PGDL competition
(NeurIPS 2020, "Predicting Generalization in Deep Learning"), made with the real
TensorFlow and Keras 2 (tf-keras), for ingest/pgdl.py's tests.

Not a dependency of fgm: run it by hand in an environment of its own when the
fixture must change, and check its output in:

    python -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow tf-keras h5py
    /tmp/tfvenv/bin/python tests/pgdl/make_fixture.py

The layout (the competition's starting kit, ingestion_program/data_manager.py):
    input_data/task_tiny/model_<k>/config.json      {"model_config": [...], "input_shape": [H, W, C]}
    input_data/task_tiny/model_<k>/weights.hdf5     Keras's save_weights (HDF5)
    input_data/task_tiny/model_<k>/weights_init.hdf5
    input_data/task_tiny/dataset_1/train/shard_1.tfrecord   tf.train.Example: inputs, output
    reference_data/task_tiny/model_configs.json     hparams (current_value, possible_values), metrics
and, for the tests, keras_logits.npz: each model's logits on the shard's images.

The models cover what the converter must get exactly right: Conv2D with
padding "same" and stride 2 on an odd (9) and an even (12) side of a non-square
input, BatchNormalization (Keras's epsilon and momentum), MaxPooling2D and
AveragePooling2D with "same" padding, Dropout, an Activation layer, a Dense after
Flatten (Keras flattens H, W, C), GlobalAveragePooling2D, and floats written
where Keras takes ints (as the competition's configs do).
"""

import json
import os
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

OUT = Path(__file__).parent / "fixture"
TASK = "task_tiny"
INPUT_SHAPE = [9, 12, 3]


def model_config(filters: int, dropout: float, head: str, foldable: bool) -> list[dict]:
    """foldable: Conv2D -> BatchNormalization -> Activation (the BatchNorm folds into
    the convolution); else Conv2D(activation="relu") -> BatchNormalization, which
    does not fold (fgm's measures that need a folded network are not applicable)."""
    relu = None if foldable else "relu"
    after = [{"layer_name": "Activation", "activation": "relu"}] if foldable else []
    layers = [
        {"layer_name": "Conv2D", "filters": float(filters), "kernel_size": [3.0, 3.0],
         "strides": [2.0, 2.0], "padding": "same", "activation": relu},      # 9 -> 5, 12 -> 6
        {"layer_name": "BatchNormalization"}, *after,
        {"layer_name": "Conv2D", "filters": filters * 2, "kernel_size": 3, "strides": 1,
         "padding": "same", "activation": relu, "use_bias": False},
        {"layer_name": "BatchNormalization", "epsilon": 0.01}, *after,
        {"layer_name": "MaxPooling2D", "pool_size": 2, "padding": "same"},  # 5 -> 3, 6 -> 3
        {"layer_name": "Dropout", "rate": dropout},
    ]
    if head == "dense":
        layers += [
            {"layer_name": "Conv2D", "filters": filters, "kernel_size": [2, 2],
             "strides": [2, 2], "padding": "same"},                          # 3 -> 2
            {"layer_name": "Activation", "activation": "relu"},
            {"layer_name": "Flatten"},
            {"layer_name": "Dense", "units": 16.0, "activation": "relu"},
            {"layer_name": "Dropout", "rate": dropout},
            {"layer_name": "Dense", "units": 10},
        ]
    else:
        layers += [
            {"layer_name": "AveragePooling2D", "pool_size": [3, 3], "strides": [1, 1],
             "padding": "same"},
            {"layer_name": "Conv2D", "filters": 10, "kernel_size": 1, "padding": "valid"},
            {"layer_name": "GlobalAveragePooling2D"},
        ]
    return layers


def build(config: list[dict]) -> keras.Sequential:
    model = keras.Sequential()
    for layer in config:
        kwargs = {k: (int(v) if isinstance(v, float) and v.is_integer() and k != "rate"
                      else [int(x) if isinstance(x, float) else x for x in v]
                      if isinstance(v, list) else v)
                  for k, v in layer.items() if k != "layer_name"}
        model.add(getattr(keras.layers, layer["layer_name"])(**kwargs))
    model.build([None] + INPUT_SHAPE)
    return model


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((64, *INPUT_SHAPE), dtype=np.float32)
    y = rng.integers(0, 10, 64).astype(np.int32)
    task = OUT / "input_data" / TASK
    shard = task / "dataset_1" / "train" / "shard_1.tfrecord"
    shard.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(shard)) as writer:
        for image, label in zip(x, y, strict=True):
            example = tf.train.Example(features=tf.train.Features(feature={
                "inputs": tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[tf.io.serialize_tensor(image).numpy()])),
                "output": tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[tf.io.serialize_tensor(label).numpy()]))}))
            writer.write(example.SerializeToString())
    reference, logits = {}, {}
    grid = [(4, 0.0, "dense"), (8, 0.0, "dense"), (4, 0.5, "dense"), (8, 0.5, "gap")]
    for k, (filters, dropout, head) in enumerate(grid):
        tf.random.set_seed(k)
        config = model_config(filters, dropout, head, foldable=k >= 1)
        model = build(config)
        folder = task / f"model_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(
            {"model_config": config, "input_shape": INPUT_SHAPE}, indent=1))
        model.save_weights(str(folder / "weights_init.hdf5"))
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss=keras.losses.
                      SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        model.fit(x, y, batch_size=16, epochs=3, verbose=0)   # moving statistics move
        model.save_weights(str(folder / "weights.hdf5"))
        out = model(x, training=False).numpy()
        logits[f"model_{k}"] = out
        train_acc = float((out.argmax(1) == y).mean())
        reference[f"model_{k}"] = {
            "hparams": {"filters": {"current_value": filters, "possible_values": [4, 8]},
                        "dropout": {"current_value": dropout, "possible_values": [0.0, 0.5]},
                        "head": {"current_value": head, "possible_values": ["dense", "gap"]}},
            "metrics": {"train_acc": train_acc, "test_acc": round(train_acc * 0.5, 4),
                        "train_loss": 1.0, "test_loss": 2.0}}
    ref = OUT / "reference_data" / TASK / "model_configs.json"
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(json.dumps(reference, indent=1))
    np.savez(OUT / "keras_logits.npz", **logits)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
