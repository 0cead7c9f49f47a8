"""Dataset loading through torchvision from local files, with no download."""

import hashlib
import pickle
import struct
import warnings

import numpy as np
import pytest
import torch
from conftest import SHARED
from scipy.io import savemat

from fgm.train.data import DatasetWarning, load_dataset, load_digits
from fgm.warehouse import FgmError

CIFAR = SHARED / "data" / "cifar10-subset"


@pytest.mark.skipif(not CIFAR.exists(), reason="../shared/data/cifar10-subset not here")
def test_cifar10_subset_loads_with_a_warning_not_an_md5_failure():
    with pytest.warns(DatasetWarning, match="not torchvision's official ones"):
        data = load_dataset("cifar10", CIFAR)
    assert data.x_train.shape == (4000, 3, 32, 32) and data.x_test.shape == (1000, 3, 32, 32)
    # README of the subset: batch 1 labels per class 85/89/74/70/79/64/84/84/82/89
    counts = torch.bincount(data.y_train[:800], minlength=10).tolist()
    assert counts == [85, 89, 74, 70, 79, 64, 84, 84, 82, 89]
    # per-channel normalisation with the training set's statistics
    assert data.x_train.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert data.info["train_size"] == 4000 and data.info["augmentation"] == "none"
    # the pixels are the files' bytes: compare one image with a direct read
    with open(CIFAR / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][0].reshape(3, 32, 32)
    first = data.x_train[0].numpy()
    for c in range(3):  # normalised per channel: an affine map of the stored bytes
        r = np.corrcoef(first[c].ravel(), raw[c].ravel().astype(float))[0, 1]
        assert r == pytest.approx(1.0, abs=1e-6)


def test_a_data_file_that_would_run_code_is_refused(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (base / name).write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)
        with pytest.raises(FgmError, match="refusing to load builtins.print"):
            load_dataset("cifar10", tmp_path)


def test_svhn_loads_from_a_tiny_mat_file_in_svhns_layout(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 5)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)    # SVHN: (H, W, C, N)
        y = (np.arange(n) % 10 + 1).reshape(n, 1)                           # labels 1..10
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
    with pytest.warns(DatasetWarning):
        data = load_dataset("svhn", tmp_path)
    assert data.x_train.shape == (12, 3, 32, 32) and data.x_test.shape == (5, 3, 32, 32)
    assert data.y_train.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]   # '10' means 0


def _idx(path, magic, array):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        f.write(array.astype(np.uint8).tobytes())


def test_fashion_mnist_loads_through_torchvision_from_idx_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 20), ("t10k", 7)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", 2051, rng.integers(0, 256, (n, 28, 28)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", 2049, np.arange(n) % 10)
    data = load_dataset("fashion_mnist", tmp_path)
    assert data.x_train.shape == (20, 1, 28, 28) and data.y_test.tolist() == list(range(7))


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FgmError, match="no CIFAR-10 here"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(FgmError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", tmp_path)


def test_digits_split_is_seeded_and_disjoint():
    a, b = load_digits(), load_digits()
    assert torch.equal(a.x_train, b.x_train)
    assert a.info["train_size"] + a.info["test_size"] == 1797
    train = {hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in a.x_train}
    test = {hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in a.x_test}
    assert len(train & test) < 5   # digits has a few exact duplicate images, nothing more


# --------------------------------------------------------------------------- crafted pickles
# Written opcode by opcode (protocol 3, the shape numpy itself gives), so that each can
# ask for what numpy would never write.

def _op_int(n: int) -> bytes:
    if -(2 ** 31) <= n < 2 ** 31:
        return b"J" + struct.pack("<i", n)
    body = pickle.encode_long(n)
    return b"\x8a" + bytes([len(body)]) + body          # LONG1


def _op_bytes(b: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(b)) + b           # BINBYTES


def _op_str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw       # BINUNICODE


def _op_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _op_dtype(spec: str) -> bytes:
    state = _op_tuple(_op_int(3), _op_str("|"), b"N", b"N", b"N", _op_int(-1), _op_int(-1),
                      _op_int(0))
    return (_op_global("numpy", "dtype") + _op_tuple(_op_str(spec), b"\x89", b"\x88") + b"R"
            + state + b"b")


def _op_array(shape, spec: str, raw: bytes, placeholder=(0,)) -> bytes:
    """numpy's own recipe: _reconstruct(ndarray, placeholder, b'b'), then BUILD with
    (version, shape, dtype, fortran, data)."""
    make = (_op_global("numpy._core.multiarray", "_reconstruct")
            + _op_tuple(_op_global("numpy", "ndarray"),
                        _op_tuple(*(_op_int(n) for n in placeholder)), _op_bytes(b"b"))
            + b"R")
    state = _op_tuple(_op_int(1), _op_tuple(*(_op_int(n) for n in shape)), _op_dtype(spec),
                      b"\x89", _op_bytes(raw))
    return make + state + b"b"


def _op_batch(data: bytes, n_labels: int = 2) -> bytes:
    labels = b"]" + b"(" + b"".join(_op_int(i % 10) for i in range(n_labels)) + b"e"
    return (b"\x80\x03}(" + _op_bytes(b"data") + data + _op_bytes(b"labels") + labels
            + b"u.")


def _cifar_dir(tmp_path, first: bytes, good: bytes | None = None):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir(exist_ok=True)
    rest = good if good is not None else first
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (base / name).write_bytes(first if name == "data_batch_1" else rest)
    return base / "data_batch_1"


def _load_quietly(root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)
        return load_dataset("cifar10", root)


def test_the_handwritten_pickles_are_what_numpy_reads():
    """The recipe above is numpy's own: a well-formed one loads with plain pickle."""
    raw = bytes(range(6))
    batch = pickle.loads(_op_batch(_op_array((2, 3), "u1", raw)))
    assert batch[b"data"].tolist() == [[0, 1, 2], [3, 4, 5]] and batch[b"labels"] == [0, 1]


TIB = 2 ** 40


@pytest.mark.parametrize("name,payload,message", [
    ("a 1 TiB placeholder", _op_array((2, 3072), "u1", bytes(2 * 3072), placeholder=(TIB,)),
     "1,099,511,627,776 bytes): larger than the whole file"),
    ("a 1 TiB array in the state", _op_array((TIB,), "u1", b"abc"),
     "1,099,511,627,776 bytes): larger than the whole file"),
    ("2^64 elements, short data", _op_array((2 ** 32, 2 ** 32), "u1", b""),
     "larger than the whole file"),
    ("a short buffer", _op_array((2, 64), "u1", bytes(100)),
     "needs 128 bytes of data, the file gives 100"),
    ("a short buffer of a wide dtype", _op_array((4,), "f8", bytes(16)),
     "needs 32 bytes of data, the file gives 16"),
    ("a negative dimension", _op_array((-1,), "u1", b""), "refusing a numpy array of shape (-1,)"),
    ("an object dtype", _op_array((2,), "O8", b""), "refusing a numpy array of dtype 'O8'"),
    ("a structured dtype", _op_array((2,), "V8", bytes(16)), "refusing a numpy array of dtype 'V8'"),
    ("ndarray called directly",
     _op_global("numpy", "ndarray") + _op_tuple(_op_tuple(_op_int(TIB)), _op_str("u1")) + b"R",
     "not callable"),
    ("_codecs.encode with another codec",
     _op_global("_codecs", "encode") + _op_tuple(_op_str("eJzLSM3JyQcABiwCFQ=="), _op_str("base64"))
     + b"R", "refusing _codecs.encode with encoding 'base64'"),
    ("bytes claiming 2^60 of them", b"\x8e" + struct.pack("<Q", 2 ** 60) + b"abc",
     "not a CIFAR-10 batch file"),
])
def test_a_crafted_numpy_pickle_is_a_clear_error(tmp_path, name, payload, message):
    if not payload.startswith(b"\x80"):
        payload = _op_batch(payload)
    first = _cifar_dir(tmp_path, payload)
    with pytest.raises(FgmError) as err:
        _load_quietly(tmp_path)
    assert str(err.value).startswith(f"{first}: ")
    assert message in str(err.value), name


def test_an_object_array_does_not_load_even_if_numpy_pickled_it(tmp_path):
    payload = pickle.dumps({b"data": np.array([1, "x", None], dtype=object), b"labels": [0]},
                           protocol=2)
    first = _cifar_dir(tmp_path, payload)
    with pytest.raises(FgmError, match=f"{first}: .*dtype 'O8'"):
        _load_quietly(tmp_path)


def _batch(n, seed, protocol):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    return data, labels, pickle.dumps({b"batch_label": b"training batch", b"data": data,
                                       b"labels": labels}, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_numpy_batch_pickled_with_protocol_2_4_or_5_loads(tmp_path, protocol):
    """Protocol 2 (Python 2's cPickle, or Python 3 asked for it) spells bytes as
    _codecs.encode(str, 'latin1'); protocol 5 arrays come through _frombuffer."""
    data, labels, payload = _batch(6, 0, protocol)
    if protocol == 2:
        assert b"_codecs" in payload
    _cifar_dir(tmp_path, payload)
    loaded = _load_quietly(tmp_path)
    assert loaded.x_train.shape == (30, 3, 32, 32) and loaded.x_test.shape == (6, 3, 32, 32)
    assert loaded.y_test.tolist() == labels
    # the pixels are the data's bytes: per channel, an affine map of them
    image, raw = loaded.x_test[0].numpy(), data[0].reshape(3, 32, 32).astype(float)
    for c in range(3):
        assert np.corrcoef(image[c].ravel(), raw[c].ravel())[0, 1] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("batch,message", [
    ([1, 2], "not a CIFAR-10 batch file (a list, expected a dict"),
    ({b"labels": [1]}, "key b'data': expected a uint8 array of shape (N, 3072), found NoneType"),
    ({b"data": np.zeros((2, 5), np.uint8), b"labels": [1, 2]}, "found dtype uint8, shape (2, 5)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, "key b'labels': expected 2 integer"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]}, "labels in 0..9"),
])
def test_a_batch_of_the_wrong_shape_names_the_key(tmp_path, batch, message):
    first = _cifar_dir(tmp_path, pickle.dumps(batch, protocol=2))
    with pytest.raises(FgmError) as err:
        _load_quietly(tmp_path)
    assert str(err.value).startswith(f"{first}: ") and message in str(err.value)
