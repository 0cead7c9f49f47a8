"""The PGDL competition's format read without TensorFlow (issue #23): TFRecord
shards of serialized tensors, and Keras Sequential configs with their HDF5
weights converted to PyTorch. tests/pgdl/fixture was written by the real
TensorFlow and tf-keras (tests/pgdl/make_fixture.py); every converted model's
logits must equal Keras's own to 1e-5."""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fgm.ingest.keras import KerasSequential
from fgm.ingest.tfrecord import read_examples
from fgm.warehouse import FgmError

FIXTURE = Path(__file__).parent / "pgdl" / "fixture"
TASK = FIXTURE / "input_data" / "task_tiny"
SHARD = TASK / "dataset_1" / "train" / "shard_1.tfrecord"


def shard_arrays(path=SHARD):
    ex = read_examples(path, ("inputs", "output"))
    return np.stack([e["inputs"] for e in ex]), np.stack([e["output"] for e in ex])


def converted(k: int, weights: str = "weights.hdf5") -> KerasSequential:
    cfg = json.loads((TASK / f"model_{k}" / "config.json").read_text())
    model = KerasSequential(cfg["model_config"], cfg["input_shape"])
    model.load_state_dict(model.keras_state_dict(TASK / f"model_{k}" / weights), strict=True)
    return model.eval()


def test_the_shard_reads_as_tensorflow_wrote_it():
    x, y = shard_arrays()
    assert x.shape == (64, 9, 12, 3) and x.dtype == np.float32
    assert y.shape == (64,) and y.dtype == np.int32 and 0 <= y.min() and y.max() < 10
    assert 0 <= x.min() and x.max() < 1       # the generator's uniform floats


@pytest.mark.parametrize("k", range(4))
def test_converted_models_give_keras_logits(k):
    x, _ = shard_arrays()
    want = np.load(FIXTURE / "keras_logits.npz")[f"model_{k}"]
    with torch.no_grad():
        got = converted(k)(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert got.shape == want.shape == (64, 10)
    assert np.abs(got - want).max() <= 1e-5, np.abs(got - want).max()
    assert np.abs(want).max() > 0.01          # not a trivially zero output


def test_same_padding_is_kerass_uneven_one():
    """9 x 12 input, 3x3 kernels, stride 2: 9 -> 5 with one row each side, 12 -> 6 with
    the one extra column on the right only (a ZeroPad2d before the convolution)."""
    layers = list(converted(0).layers)
    assert isinstance(layers[0], torch.nn.ZeroPad2d) and layers[0].padding == (0, 1, 1, 1)
    assert isinstance(layers[1], torch.nn.Conv2d) and layers[1].padding == (0, 0)


@pytest.mark.parametrize("layer,message", [
    ({"layer_name": "LSTM", "units": 3}, "layer 1: LSTM: a layer type the converter does not"),
    ({"layer_name": "Conv2D", "filters": 2, "kernel_size": 3, "padding": "causal"},
     "padding 'causal'"),
    ({"layer_name": "Conv2D", "filters": 2, "kernel_size": 3, "data_format": "channels_first"},
     "data_format 'channels_first'"),
    ({"layer_name": "Conv2D", "filters": 2.5, "kernel_size": 3}, "filters = 2.5"),
    ({"layer_name": "Dense", "units": 3, "activation": "softmax"}, "a softmax"),
    ({"layer_name": "Dense", "units": 3, "kernel_size": 2}, "kernel_size not handled"),
])
def test_what_the_converter_does_not_handle_is_named_with_the_layer(layer, message):
    config = [{"layer_name": "Flatten"}, layer, {"layer_name": "Dense", "units": 10}]
    if layer["layer_name"] == "Conv2D":
        config = [{"layer_name": "Conv2D", "filters": 2, "kernel_size": 1}, layer,
                  {"layer_name": "GlobalAveragePooling2D"}]
    with pytest.raises(FgmError) as err:
        KerasSequential(config, [8, 8, 3])
    assert message in str(err.value)


def test_weights_that_do_not_match_the_config_are_named(tmp_path):
    bad = tmp_path / "w.hdf5"
    shutil.copy(TASK / "model_1" / "weights.hdf5", bad)       # filters 8, not model_0's 4
    cfg = json.loads((TASK / "model_0" / "config.json").read_text())
    model = KerasSequential(cfg["model_config"], cfg["input_shape"])
    with pytest.raises(FgmError, match=r"layer 0 \(Conv2D, 'conv2d\w*'\): weight: shape "
                                       r"\(8, 3, 3, 3\) where the config gives \(4, 3, 3, 3\)"):
        model.keras_state_dict(bad)
    with h5py.File(bad, "r+") as f:
        names = list(f.attrs["layer_names"])
        f.attrs["layer_names"] = names[:-1]
    with pytest.raises(FgmError, match="11 layers, but the config has 12"):
        model.keras_state_dict(bad)
    shutil.copy(TASK / "model_0" / "weights.hdf5", bad)
    with h5py.File(bad, "r+") as f:
        f["dense_1"]["dense_1"]["kernel:0"][0, 0] = np.nan
    with pytest.raises(FgmError, match=r"layer 11 \(Dense, 'dense_1'\): kernel: not finite"):
        model.keras_state_dict(bad)


def test_a_truncated_or_corrupt_shard_names_the_record(tmp_path):
    blob = SHARD.read_bytes()
    cut = tmp_path / "cut.tfrecord"
    cut.write_bytes(blob[:len(blob) - 100])
    with pytest.raises(FgmError, match=r"cut.tfrecord, record 63 .*truncated"):
        read_examples(cut, ("inputs", "output"))
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    bad = tmp_path / "bad.tfrecord"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(FgmError, match=r"bad.tfrecord, record \d+ .*checksum does not match"):
        read_examples(bad, ("inputs", "output"))
    with pytest.raises(FgmError, match="no feature label"):
        read_examples(SHARD, ("inputs", "label"))
