"""Datasets as tensors: CIFAR-10, SVHN and Fashion-MNIST through torchvision
from a local root (downloading only when asked), and scikit-learn's digits.

A torchvision-layout folder whose files are not the official ones (so their
md5 sums differ, e.g. ../shared/data/cifar10-subset) loads with a warning:
its pickles are read by an unpickler that only admits numpy arrays, never
arbitrary objects.
"""

from __future__ import annotations

import io
import math
import pickle
import re
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
    # image-like data (integer pixels 0..255): the uint8 images (N, C, H, W) of the
    # training and test sets, and the training set's per-channel mean and std
    raw: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device) -> Data:
        """The data on `device`, to stay there while a model trains. Image-like data
        travel as uint8 (a quarter of the bytes) and are normalised on the device,
        by the same arithmetic as on the host: the same floats."""
        device = torch.device(device)
        if self.raw is None or device.type == "cpu" or not self._raw_matches():
            return Data(self.name, self.x_train.to(device), self.y_train.to(device),
                        self.x_test.to(device), self.y_test.to(device), self.num_classes,
                        self.info, self.raw)
        raw = tuple(t.to(device) for t in self.raw)
        train, test = normalised(raw[0], raw[2], raw[3]), normalised(raw[1], raw[2], raw[3])
        return Data(self.name, train, self.y_train.to(device), test, self.y_test.to(device),
                    self.num_classes, self.info, raw)

    def _raw_matches(self) -> bool:
        """Whether `raw` is still these images (not after x_train was cut, say)."""
        return len(self.raw[0]) == len(self.x_train) and len(self.raw[1]) == len(self.x_test)


def first_examples(data: Data, n: int) -> Data:
    """The first `n` training images (in the dataset's own order), normalised with
    their own per-channel mean and std, and the test set with the same: what a grid's
    [train] train_examples = n trains on, whichever root the dataset came from (a
    full download, or a folder holding only its first images). FgmError where the
    dataset has fewer than n training images, or no integer pixels to normalise again."""
    if n > len(data.x_train):
        raise FgmError(f"{data.name}: train_examples = {n:,}, but the training set here has "
                       f"{len(data.x_train):,} images")
    if data.raw is None or not data._raw_matches():
        raise FgmError(f"{data.name}: train_examples needs images of integer pixels")
    images = data.raw[0][:n]
    floats = images.to(torch.float32)
    mean = floats.mean(dim=(0, 2, 3), keepdim=True)
    std = floats.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    info = dict(data.info, train_size=n, split=f"{data.info.get('split', '')}; the first "
                f"{n:,} training images, normalised with their own mean and std".lstrip("; "))
    return Data(data.name, normalised(images, mean, std), data.y_train[:n].clone(),
                normalised(data.raw[1], mean, std), data.y_test, data.num_classes, info,
                (images.contiguous(), data.raw[1], mean, std))


def normalised(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) images, normalised per channel, float32, where they lie."""
    return ((images.to(torch.float32) - mean) / std).contiguous()


def _normalise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8/float (N, H, W, C) -> float32 (N, C, H, W) with the training set's mean/std."""
    a, b, mean, std = _channels_first(x_train, x_test)
    return ((a - mean) / std).contiguous(), ((b - mean) / std).contiguous()


def _channels_first(x_train, x_test):
    a = torch.as_tensor(x_train, dtype=torch.float32).permute(0, 3, 1, 2)
    b = torch.as_tensor(x_test, dtype=torch.float32).permute(0, 3, 1, 2)
    mean = a.mean(dim=(0, 2, 3), keepdim=True)
    std = a.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return a, b, mean, std


def _raw(x_train: np.ndarray, x_test: np.ndarray):
    """(uint8 train, uint8 test, mean, std) for images of integer pixels 0..255, else None."""
    def as_uint8(x):
        if x.dtype == np.uint8:
            return x
        if x.size and (x.min() < 0 or x.max() > 255 or not np.array_equal(x, np.round(x))):
            return None
        return x.astype(np.uint8)
    a, b = as_uint8(x_train), as_uint8(x_test)
    if a is None or b is None:
        return None
    _, _, mean, std = _channels_first(x_train, x_test)
    return (torch.as_tensor(a).permute(0, 3, 1, 2).contiguous(),
            torch.as_tensor(b).permute(0, 3, 1, 2).contiguous(), mean, std)


# --------------------------------------------------------------------------- safe pickles

_NUMERIC = re.compile(r"[biufc]\d{0,2}")   # how numpy pickles a numeric dtype: u1, f4, c16


def _refuse(message: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(message)


def _safe_dtype(spec, align=False, copy=False) -> np.dtype:
    """numpy.dtype(spec) for a plain numeric (or bool) type only: never an object dtype,
    whose array would unpickle arbitrary contents, nor a structured one."""
    if isinstance(spec, bytes):
        spec = spec.decode("latin1")
    if not isinstance(spec, str) or not _NUMERIC.fullmatch(spec):
        raise _refuse(f"refusing a numpy array of dtype {spec!r}; expected a numeric dtype "
                      f"such as u1 or f4")
    try:
        return np.dtype(spec, copy=True)   # a copy: a BUILD may set its byte order
    except TypeError as exc:
        raise _refuse(f"refusing a numpy array of dtype {spec!r} ({exc})") from None


def _checked_dtype(dtype) -> np.dtype:
    if (not isinstance(dtype, np.dtype) or dtype.hasobject or dtype.fields is not None
            or dtype.subdtype is not None or dtype.kind not in "biufc"):
        raise _refuse(f"refusing a numpy array of dtype {dtype!r}; expected a numeric dtype")
    return np.dtype(dtype.str)     # a fresh descriptor, whatever a BUILD did to that one


def _checked_shape(shape, dtype: np.dtype, size: int) -> tuple[int, ...]:
    """A shape of non-negative ints whose array fits in `size` bytes (the file's size:
    an array read from a file cannot be larger than the file)."""
    if (not isinstance(shape, tuple) or len(shape) > 32
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                       for n in shape)):
        raise _refuse(f"refusing a numpy array of shape {shape!r}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > size:
        raise _refuse(f"refusing a numpy array of shape {shape} ({nbytes:,} bytes): larger "
                      f"than the whole file ({size:,} bytes)")
    return shape


class _SafeArray(np.ndarray):
    """What numpy's _reconstruct gives while unpickling: an empty array whose state
    (shape, dtype, bytes) is checked before numpy fills it in."""

    _file_size = 0

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) != 5:
            raise _refuse("refusing a numpy array state that is not (version, shape, "
                          "dtype, fortran, data)")
        version, shape, dtype, fortran, data = state
        dtype = _checked_dtype(dtype)
        shape = _checked_shape(shape, dtype, self._file_size)
        if isinstance(data, str):
            data = data.encode("latin1")
        if not isinstance(data, bytes | bytearray):
            raise _refuse("refusing a numpy array whose data are not raw bytes")
        need = math.prod(shape) * dtype.itemsize
        if len(data) != need:
            raise _refuse(f"a numpy array of shape {shape} and dtype {dtype} needs "
                          f"{need:,} bytes of data, the file gives {len(data):,}")
        super().__setstate__((version, shape, dtype, bool(fortran), bytes(data)))


class _NdarrayName:
    """Stands for numpy.ndarray in a pickle: only _reconstruct's first argument. Not the
    class itself, which a REDUCE could call to allocate any array (or an object one)."""


_NDARRAY = _NdarrayName()


class _ArrayUnpickler(pickle.Unpickler):
    """Admits dicts, lists, numbers, bytes and numeric numpy arrays, nothing else."""

    def __init__(self, raw: bytes):
        super().__init__(io.BytesIO(raw), encoding="bytes")
        self.size = len(raw)

    def find_class(self, module: str, name: str):
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY
        if (module, name) == ("numpy", "dtype"):
            return _safe_dtype
        if (module, name) == ("_codecs", "encode"):   # protocol 2's way to spell bytes
            return _latin1_encode
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") \
                and name == "_reconstruct":
            return self._reconstruct
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            return self._frombuffer
        raise _refuse(f"refusing to load {module}.{name} from a data file")

    def _reconstruct(self, subtype, shape, dtype):
        # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') + BUILD(state):
        # only the empty placeholder is made here, the state is checked in _SafeArray
        if subtype is not _NDARRAY:
            raise _refuse(f"refusing to reconstruct {subtype!r}; expected numpy.ndarray")
        _checked_shape(shape, np.dtype(np.uint8), self.size)
        array = np.ndarray.__new__(_SafeArray, (0,), np.uint8)
        array._file_size = self.size
        return array

    def _frombuffer(self, buffer, dtype, shape, order):
        # protocol 5: numpy._core.numeric._frombuffer(bytes, dtype, shape, order)
        dtype = _checked_dtype(dtype)
        shape = _checked_shape(shape, dtype, self.size)
        if not isinstance(buffer, bytes | bytearray) or \
                len(buffer) != math.prod(shape) * dtype.itemsize:
            raise _refuse(f"a numpy array of shape {shape} and dtype {dtype} needs "
                          f"{math.prod(shape) * dtype.itemsize:,} bytes of data, the file "
                          f"gives {len(buffer) if isinstance(buffer, bytes | bytearray) else 0:,}")
        return np.frombuffer(bytes(buffer), dtype=dtype).reshape(
            shape, order="F" if order == "F" else "C").copy()


def _latin1_encode(text, encoding="latin1", errors="strict") -> bytes:
    """_codecs.encode as protocol 2 uses it: a str of code points < 256 to bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") \
            or errors != "strict":
        raise _refuse(f"refusing _codecs.encode with encoding {encoding!r}; only latin1")
    return text.encode("latin1")


def _plain(value):
    """Arrays made while unpickling as ordinary numpy arrays (a batch's values, and
    the items of a list value; deeper ones stay _SafeArray, an ndarray all the same)."""
    if isinstance(value, _SafeArray):
        return value.view(np.ndarray)
    if isinstance(value, list):
        return [v.view(np.ndarray) if isinstance(v, _SafeArray) else v for v in value]
    return value


def _load_batch(path: Path) -> dict:
    """A CIFAR-10 batch file: {b'data': uint8 (N, 3072), b'labels': N ints, ...}."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FgmError(f"{path}: cannot read the CIFAR-10 batch file: {exc.strerror}") from None
    try:
        batch = _ArrayUnpickler(raw).load()
    except Exception as exc:   # anything a malformed pickle raises: never a traceback
        raise FgmError(f"{path}: not a CIFAR-10 batch file "
                       f"({str(exc) or type(exc).__name__})") from None
    if not isinstance(batch, dict):
        raise FgmError(f"{path}: not a CIFAR-10 batch file (a {type(batch).__name__}, "
                       f"expected a dict with b'data' and b'labels')")
    batch = {k: _plain(v) for k, v in batch.items()}
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32):
        what = (f"dtype {data.dtype}, shape {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise FgmError(f"{path}: key b'data': expected a uint8 array of shape (N, 3072), "
                       f"found {what}")
    try:
        labels = np.asarray(labels) if isinstance(labels, list | np.ndarray) else None
    except (ValueError, TypeError, OverflowError):
        labels = None
    if (labels is None or labels.shape != (len(data),) or labels.dtype.kind not in "iu"
            or (len(labels) and (labels.min() < 0 or labels.max() > 9))):
        raise FgmError(f"{path}: key b'labels': expected {len(data)} integer labels "
                       f"in 0..9, one per image")
    batch[b"labels"] = labels
    return batch


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
    raw = _raw(np.asarray(x_train), np.asarray(x_test))
    info = {"source": source, "train_size": int(len(a)), "test_size": int(len(b)),
            "split": split or "official train / test", "augmentation": "none"}
    return Data(name, a, torch.as_tensor(np.asarray(y_train), dtype=torch.int64), b,
                torch.as_tensor(np.asarray(y_test), dtype=torch.int64), num_classes, info, raw)


def load_dataset(name: str, root: Path | None = None, download: bool = False) -> Data:
    if name == "digits":
        return load_digits()
    if root is None:
        root = Path("data")
    loaders = {"cifar10": load_cifar10, "svhn": load_svhn, "fashion_mnist": load_fashion_mnist}
    if name not in loaders:
        raise FgmError(f"unknown dataset {name!r}; datasets: digits, {', '.join(loaders)}")
    return loaders[name](Path(root), download)
