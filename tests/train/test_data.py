"""Tests of mmr_ext.train.data: the bundled mnist5k split and the file readers (on small synthetic
files written in the real formats)."""
import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from mmr_ext.train import data as D
from mmr_ext.train.data import DATASETS, dataset_info, load_dataset


# ------------------------------------------------------------------------------------------
# bundled mnist5k

@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k", split="train"), load_dataset("mnist5k", split="test")


def test_mnist5k_sizes_and_classes(mnist5k):
    train, test = mnist5k
    assert len(train) == 4000 and len(test) == 1000
    assert train.images.shape == (4000, 1, 28, 28) and test.images.shape == (1000, 1, 28, 28)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert torch.bincount(train.labels, minlength=10).tolist() == [400] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [100] * 10
    for ds in (train, test):
        assert ds.images.min() >= 0 and ds.images.max() <= 1
        assert ds.images.max() == 1 and ds.images.min() == 0
        # values are k/255 for integers k: the scaling is exact
        k = ds.images * 255
        assert torch.allclose(k, k.round(), atol=1e-4)
    info = train.info
    assert info.name == "mnist5k" and info.num_classes == 10 and info.in_shape == (1, 28, 28)
    assert info.split == "train" and test.info.split == "test" and info.bundled
    assert info.input_dim == 784
    x, y = train[3]
    assert x.shape == (1, 28, 28) and y.dim() == 0


def test_mnist5k_split_is_disjoint_and_covers_all(mnist5k):
    train, test = mnist5k
    tr = {bytes(r.numpy().tobytes()) for r in train.images}
    te = {bytes(r.numpy().tobytes()) for r in test.images}
    assert len(tr) == 4000 and len(te) == 1000
    assert not tr & te


def test_mnist5k_classes_mixed_in_prefix(mnist5k):
    # the source file is sorted by class; the split must not be
    for ds in mnist5k:
        assert len(torch.unique(ds.labels[:50])) >= 8


def test_mnist5k_split_is_pinned(mnist5k):
    # the split is part of the results' reproducibility: it must never change silently
    train, test = mnist5k
    assert train.labels[:16].tolist() == [5, 9, 1, 0, 0, 3, 9, 9, 7, 9, 4, 6, 2, 0, 1, 8]
    assert test.labels[:16].tolist() == [0, 2, 8, 3, 7, 2, 6, 8, 1, 6, 9, 5, 8, 1, 2, 2]
    assert float(train.images.double().sum()) == pytest.approx(411381.368267, abs=1e-3)
    assert float(test.images.double().sum()) == pytest.approx(103391.585209, abs=1e-3)


def test_mnist5k_deterministic_and_independent_of_global_rng(mnist5k):
    train, test = mnist5k
    D._mnist5k_arrays.cache_clear()
    np.random.seed(123)
    torch.manual_seed(456)
    np.random.rand(7)
    train2 = load_dataset("mnist5k", split="train")
    test2 = load_dataset("mnist5k", split="test", data_dir="/ignored/for/bundled")
    assert torch.equal(train.images, train2.images) and torch.equal(train.labels, train2.labels)
    assert torch.equal(test.images, test2.images) and torch.equal(test.labels, test2.labels)


def test_mnist5k_returns_independent_writable_tensors():
    a = load_dataset("mnist5k", split="test")
    a.images[0].fill_(0.5)
    b = load_dataset("mnist5k", split="test")
    assert not torch.all(b.images[0] == 0.5)


def test_unknown_name_split_and_missing_data_dir(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*mnist5k.*cifar10.*gtsrb"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_dataset("mnist5k", split="val")
    for name in ("mnist", "fmnist", "cifar10", "gtsrb"):
        with pytest.raises(ValueError, match=f"'{name}' is not bundled: pass data_dir"):
            load_dataset(name)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_dataset("mnist", data_dir=tmp_path / "nope")


def test_names_and_aliases():
    assert set(DATASETS) == {"mnist5k", "mnist", "fmnist", "cifar10", "gtsrb"}
    assert dataset_info("Fashion-MNIST").name == "fmnist"
    assert dataset_info("CIFAR-10").in_shape == (3, 32, 32)
    assert dataset_info("GTS").num_classes == 43
    assert not dataset_info("mnist").bundled


# ------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)

def _idx_bytes(arr, magic=None):
    arr = np.asarray(arr, dtype=np.uint8)
    magic = (0x0800 | arr.ndim) if magic is None else magic
    head = magic.to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return head + arr.tobytes()


def _write(path, payload, gz):
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def _write_idx_set(root, n_train=12, n_test=5, gz=False, hw=(28, 28), seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n,) + hw, dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write(root / f"{prefix}-images-idx3-ubyte", _idx_bytes(x), gz)
        _write(root / f"{prefix}-labels-idx1-ubyte", _idx_bytes(y), gz)
        out[prefix] = (x, y)
    return out


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fmnist"])
def test_idx_reader_roundtrip(tmp_path, gz, name):
    ref = _write_idx_set(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_dataset(name, data_dir=tmp_path, split=split)
        x, y = ref[prefix]
        assert ds.images.shape == (len(x), 1, 28, 28) and ds.images.dtype == torch.float32
        assert torch.allclose(ds.images[:, 0] * 255, torch.from_numpy(x).float(), atol=1e-4)
        assert torch.equal(ds.labels, torch.from_numpy(y.astype(np.int64)))
        assert ds.info.name == name and ds.info.split == split


def test_idx_missing_file_names_it(tmp_path):
    _write_idx_set(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    load_dataset("mnist", data_dir=tmp_path, split="train")  # train split is complete
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("mnist", data_dir=tmp_path, split="test")
    assert "t10k-labels-idx1-ubyte" in str(e.value) and str(tmp_path) in str(e.value)


def _corrupt_case(tmp_path, which):
    ref = _write_idx_set(tmp_path)
    x, y = ref["train"]
    img = tmp_path / "train-images-idx3-ubyte"
    lbl = tmp_path / "train-labels-idx1-ubyte"
    if which == "magic":
        img.write_bytes(_idx_bytes(x, magic=0x00000801))
        return img, "magic number"
    if which == "truncated":
        img.write_bytes(_idx_bytes(x)[:-100])
        return img, "truncated"
    if which == "trailing":
        img.write_bytes(_idx_bytes(x) + b"\0" * 7)
        return img, "longer than its header"
    if which == "short_header":
        lbl.write_bytes(b"\0\0\x08")
        return lbl, "truncated"
    if which == "count":
        lbl.write_bytes(_idx_bytes(y[:-1]))
        return lbl, "11 labels"
    if which == "size":
        img.write_bytes(_idx_bytes(np.zeros((len(x), 32, 32))))
        return img, "32x32 pixels, expected 28x28"
    if which == "label_range":
        lbl.write_bytes(_idx_bytes(np.full(len(y), 10)))
        return lbl, r"labels in \[10, 10\]"
    if which == "bad_gzip":
        os.remove(img)
        bad = tmp_path / "train-images-idx3-ubyte.gz"
        bad.write_bytes(gzip.compress(_idx_bytes(x))[:-30])
        return bad, "cannot read"
    raise AssertionError(which)


@pytest.mark.parametrize("which", ["magic", "truncated", "trailing", "short_header", "count",
                                   "size", "label_range", "bad_gzip"])
def test_idx_corrupt_files(tmp_path, which):
    path, what = _corrupt_case(tmp_path, which)
    with pytest.raises(ValueError, match=what) as e:
        load_dataset("mnist", data_dir=tmp_path, split="train")
    assert str(path) in str(e.value)


# ------------------------------------------------------------------------------------------
# CIFAR-10 python batches

def _cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"synthetic", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"filenames": [b"f%d.png" % i for i in range(n)]}


def _write_cifar(folder, protocol=2, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        b = _cifar_batch(n, seed=i)
        with open(folder / name, "wb") as f:
            pickle.dump(b, f, protocol=protocol)
        batches[name] = b
    return batches


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("point_at", ["folder", "parent"])
def test_cifar_reader(tmp_path, protocol, point_at):
    folder = tmp_path / "cifar-10-batches-py"
    batches = _write_cifar(folder, protocol=protocol)
    root = folder if point_at == "folder" else tmp_path
    train = load_dataset("cifar10", data_dir=root, split="train")
    test = load_dataset("cifar10", data_dir=root, split="test")
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.info.in_shape == (3, 32, 32) and train.info.num_classes == 10
    want = np.concatenate([batches[f"data_batch_{k}"][b"data"] for k in range(1, 6)])
    got = (train.images * 255).round().to(torch.uint8).numpy()
    # row layout: 1024 red, 1024 green, 1024 blue values, each plane row-major
    assert got[5, 0, 0, 0] == want[5, 0] and got[5, 1, 0, 0] == want[5, 1024]
    assert got[5, 2, 1, 2] == want[5, 2048 + 32 + 2]
    assert np.array_equal(got.reshape(20, -1), want)
    assert test.labels.tolist() == batches["test_batch"][b"labels"]
    assert float(train.images.min()) >= 0 and float(train.images.max()) <= 1


def test_cifar_missing_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    os.remove(folder / "data_batch_3")
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "data_batch_3" in str(e.value) and str(folder) in str(e.value)
    load_dataset("cifar10", data_dir=tmp_path, split="test")  # test split is complete
    (folder / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="'test_batch'"):
        load_dataset("cifar10", data_dir=folder, split="test")


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


@pytest.mark.parametrize("which", ["truncated", "garbage", "not_dict", "no_labels", "shape",
                                   "label_count", "label_range", "evil"])
def test_cifar_corrupt_batches(tmp_path, which):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    path = folder / "test_batch"
    b = _cifar_batch(4, seed=9)
    what = {"truncated": "not a valid CIFAR-10 python batch", "garbage": "not a valid",
            "not_dict": "expected a dict", "no_labels": "missing key", "shape": r"\[N, 3072\]",
            "label_count": "expected 4 integers", "label_range": "labels in",
            "evil": "refusing to load global"}[which]
    if which == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    elif which == "garbage":
        path.write_bytes(b"this is not a pickle at all")
    else:
        if which == "not_dict":
            b = [b[b"data"], b[b"labels"]]
        elif which == "no_labels":
            del b[b"labels"]
        elif which == "shape":
            b[b"data"] = b[b"data"][:, :3000]
        elif which == "label_count":
            b[b"labels"] = b[b"labels"][:3]
        elif which == "label_range":
            b[b"labels"][0] = 10
        elif which == "evil":
            b[b"labels"] = _Evil(str(tmp_path / "pwned"))
        path.write_bytes(pickle.dumps(b, protocol=2))
    with pytest.raises(ValueError, match=what) as e:
        load_dataset("cifar10", data_dir=tmp_path, split="test")
    assert str(path) in str(e.value)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------
# GTSRB npz

def _gtsrb_arrays(float_images=False, n=(6, 3)):
    rng = np.random.default_rng(3)
    arrs = {}
    for split, k in zip(("train", "test"), n):
        x = rng.integers(0, 256, (k, 32, 32, 3), dtype=np.uint8)
        arrs[f"x_{split}"] = x.astype(np.float32) / 255 if float_images else x
        arrs[f"y_{split}"] = rng.integers(0, 43, k)
    return arrs


@pytest.mark.parametrize("float_images", [False, True])
def test_gtsrb_reader(tmp_path, float_images):
    arrs = _gtsrb_arrays(float_images)
    np.savez(tmp_path / "gtsrb.npz", **arrs)
    train = load_dataset("gtsrb", data_dir=tmp_path, split="train")
    test = load_dataset("gtsrb", data_dir=tmp_path, split="test")
    assert train.images.shape == (6, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert train.info.num_classes == 43 and train.info.name == "gtsrb"
    x = arrs["x_train"].astype(np.float32)
    x = x if float_images else x / 255
    # channels-last file -> channels-first tensor
    assert train.images[2, 1, 5, 7].item() == pytest.approx(float(x[2, 5, 7, 1]), abs=1e-6)
    assert np.allclose(train.images.numpy(), x.transpose(0, 3, 1, 2), atol=1e-6)
    assert test.labels.tolist() == arrs["y_test"].tolist()


def test_gtsrb_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("gtsrb", data_dir=tmp_path)
    assert "gtsrb.npz" in str(e.value) and str(tmp_path) in str(e.value)


@pytest.mark.parametrize("which", ["garbage", "truncated", "missing_key", "nchw", "dtype",
                                   "float_range", "label_range", "label_count", "single_npy"])
def test_gtsrb_corrupt(tmp_path, which):
    path = tmp_path / "gtsrb.npz"
    arrs = _gtsrb_arrays()
    what = {"garbage": "not a valid npz", "truncated": "not a valid npz",
            "missing_key": r"lacks array\(s\) \['y_train'\]",
            "nchw": r"expected \[N, 32, 32, 3\]", "dtype": "expected uint8 or float",
            "float_range": r"in \[0, 1\]", "label_range": "labels in",
            "label_count": "expected 6 integers", "single_npy": "not a valid npz"}[which]
    if which == "missing_key":
        del arrs["y_train"]
    elif which == "nchw":
        arrs["x_train"] = arrs["x_train"].transpose(0, 3, 1, 2)
    elif which == "dtype":
        arrs["x_train"] = arrs["x_train"].astype(np.int32)
    elif which == "float_range":
        arrs["x_train"] = arrs["x_train"].astype(np.float32)
    elif which == "label_range":
        arrs["y_train"][0] = 43
    elif which == "label_count":
        arrs["y_train"] = arrs["y_train"][:2]
    if which == "garbage":
        path.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    elif which == "single_npy":
        with open(path, "wb") as f:
            np.save(f, arrs["x_train"])
    else:
        np.savez(path, **arrs)
        if which == "truncated":
            path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=what) as e:
        load_dataset("gtsrb", data_dir=tmp_path, split="train")
    assert str(path) in str(e.value)
