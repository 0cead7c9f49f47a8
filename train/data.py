"""Datasets as tensors: CIFAR-10, SVHN and Fashion-MNIST through torchvision
from a local root (downloading only when asked), and scikit-learn's digits.

A torchvision-layout folder whose files are not the official ones (so their
md5 sums differ, e.g. ../shared/data/cifar10-subset) loads with a warning:
its pickles are read by an unpickler that only admits numpy arrays, never
arbitrary objects.
"""

from __future__ import annotations

import io
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fgm.warehouse import FgmError


class DatasetWarning(UserWarning):
    """The data loaded, but not from files torchvision could verify."""


@dataclass
class Data:
    name: str
    x_train: torch.Tensor   # (m, C, H, W) float32, normalised per channel
    y_train: torch.Tensor   # (m,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    info: dict = field(default_factory=dict)  # split, sizes, source, warnings

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device) -> Data:
        return Data(self.name, self.x_train.to(device), self.y_train.to(device),
                    self.x_test.to(device), self.y_test.to(device), self.num_classes, self.info)


def _normalise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8/float (N, H, W, C) -> float32 (N, C, H, W) with the training set's mean/std."""
    a = torch.as_tensor(x_train, dtype=torch.float32).permute(0, 3, 1, 2)
    b = torch.as_tensor(x_test, dtype=torch.float32).permute(0, 3, 1, 2)
    mean = a.mean(dim=(0, 2, 3), keepdim=True)
    std = a.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return ((a - mean) / std).contiguous(), ((b - mean) / std).contiguous()


# --------------------------------------------------------------------------- safe pickles

class _ArrayUnpickler(pickle.Unpickler):
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _load_batch(path: Path) -> dict:
    try:
        return _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise FgmError(f"{path}: not a CIFAR-10 batch file ({exc})") from None


def _cifar10_layout(root: Path) -> tuple[np.ndarray, ...]:
    base = root / "cifar-10-batches-py"
    parts = [_load_batch(base / f"data_batch_{i}") for i in range(1, 6)]
    test = _load_batch(base / "test_batch")
    def images(batches):
        data = np.concatenate([b[b"data"] for b in batches])
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)   # (N, H, W, C)
    def labels(batches):
        return np.concatenate([np.asarray(b[b"labels"]) for b in batches])
    return images(parts), labels(parts), images([test]), labels([test])


# --------------------------------------------------------------------------- loaders

def _torchvision(cls, root: Path, download: bool, **kw):
    train = cls(str(root), download=download, **kw["train"])
    test = cls(str(root), download=download, **kw["test"])
    return train, test


def load_cifar10(root: Path, download: bool = False) -> Data:
    import torchvision
    source = "torchvision (verified)"
    try:
        tr, te = _torchvision(torchvision.datasets.CIFAR10, root, download,
                              train={"train": True}, test={"train": False})
        xs = (tr.data, np.asarray(tr.targets), te.data, np.asarray(te.targets))
    except RuntimeError as exc:
        if not (root / "cifar-10-batches-py" / "test_batch").exists():
            raise FgmError(f"{root}: no CIFAR-10 here (expected cifar-10-batches-py/ in "
                           f"torchvision's layout); pass --data-root, or --download. ({exc})"
                           ) from None
        source = "torchvision layout, files not the official ones (md5 differs)"
        warnings.warn(f"{root}: CIFAR-10 files are not torchvision's official ones (md5 "
                      "differs); loading them anyway", DatasetWarning, stacklevel=2)
        xs = _cifar10_layout(root)
    return _make("cifar10", *xs, num_classes=10, source=source)


def load_svhn(root: Path, download: bool = False) -> Data:
    import torchvision
    from scipy.io import loadmat
    source = "torchvision (verified)"
    try:
        tr, te = _torchvision(torchvision.datasets.SVHN, root, download,
                              train={"split": "train"}, test={"split": "test"})
        xs = (tr.data.transpose(0, 2, 3, 1), tr.labels, te.data.transpose(0, 2, 3, 1),
              te.labels)
    except RuntimeError as exc:
        files = [root / "train_32x32.mat", root / "test_32x32.mat"]
        if not all(f.exists() for f in files):
            raise FgmError(f"{root}: no SVHN here (expected train_32x32.mat and "
                           f"test_32x32.mat); pass --data-root, or --download. ({exc})") from None
        source = "SVHN layout, files not the official ones (md5 differs)"
        warnings.warn(f"{root}: SVHN files are not the official ones (md5 differs); "
                      "loading them anyway", DatasetWarning, stacklevel=2)
        xs = []
        for f in files:
            mat = loadmat(f)
            x = np.transpose(mat["X"], (3, 0, 1, 2))            # (H, W, C, N) -> (N, H, W, C)
            y = mat["y"].astype(np.int64).reshape(-1) % 10        # SVHN labels '0' as 10
            xs += [x, y]
    return _make("svhn", *xs, num_classes=10, source=source)


def load_fashion_mnist(root: Path, download: bool = False) -> Data:
    import torchvision
    try:
        tr, te = _torchvision(torchvision.datasets.FashionMNIST, root, download,
                              train={"train": True}, test={"train": False})
    except RuntimeError as exc:
        raise FgmError(f"{root}: no Fashion-MNIST here (expected FashionMNIST/raw/ in "
                       f"torchvision's layout); pass --data-root, or --download. ({exc})"
                       ) from None
    return _make("fashion_mnist", tr.data.numpy()[..., None], tr.targets.numpy(),
                 te.data.numpy()[..., None], te.targets.numpy(), num_classes=10,
                 source="torchvision")


def load_digits(test_size: int = 497, seed: int = 0) -> Data:
    """scikit-learn's 1,797 bundled 8x8 digits: a fixed, seeded split (1,300 / 497)."""
    from sklearn.datasets import load_digits as sk_digits
    bunch = sk_digits()
    order = np.random.default_rng(seed).permutation(len(bunch.target))
    test, train = order[:test_size], order[test_size:]
    x = bunch.images[..., None]                                   # (N, 8, 8, 1), 0..16
    return _make("digits", x[train], bunch.target[train], x[test], bunch.target[test],
                 num_classes=10, source="scikit-learn load_digits",
                 split=f"seeded permutation (seed {seed}): last {len(train)} train, "
                       f"first {test_size} test")


def _make(name, x_train, y_train, x_test, y_test, *, num_classes, source, split=None) -> Data:
    a, b = _normalise(np.asarray(x_train), np.asarray(x_test))
    info = {"source": source, "train_size": int(len(a)), "test_size": int(len(b)),
            "split": split or "official train / test", "augmentation": "none"}
    return Data(name, a, torch.as_tensor(np.asarray(y_train), dtype=torch.int64), b,
                torch.as_tensor(np.asarray(y_test), dtype=torch.int64), num_classes, info)


def load_dataset(name: str, root: Path | None = None, download: bool = False) -> Data:
    if name == "digits":
        return load_digits()
    if root is None:
        root = Path("data")
    loaders = {"cifar10": load_cifar10, "svhn": load_svhn, "fashion_mnist": load_fashion_mnist}
    if name not in loaders:
        raise FgmError(f"unknown dataset {name!r}; datasets: digits, {', '.join(loaders)}")
    return loaders[name](Path(root), download)
