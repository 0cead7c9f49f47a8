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
