"""Tests for cnnc.runtime.data: the embedded MNIST-5k, every file format (written small in
tmp_path), splits, scaling, padding, batching, augmentation and each user-error message."""

from __future__ import annotations

import gzip
import struct
import sys
from importlib import resources

import numpy as np
import pytest

from cnnc.dsl.errors import CnncError
from cnnc.runtime.data import Augment, Dataset, batches, check_compatible, load_dataset, stratified_split


def _error(spec, *args, **kwargs) -> CnncError:
    with pytest.raises(CnncError) as info:
        load_dataset(spec, *args, **kwargs)
    return info.value


# ---------------------------------------------------------------------------------------------
# Writers for small files of each format


def write_idx(path, arr: np.ndarray, magic: int, gz: bool = False):
    data = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def make_mnist(d, n_train=30, n_test=10, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir(exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        write_idx(d / f"{split}-images-idx3-ubyte", x, 2051, gz)
        write_idx(d / f"{split}-labels-idx1-ubyte", y, 2049, gz)
        arrays[split] = (x, y)
    return arrays


def cifar_records(labels, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    rec = np.concatenate([np.asarray(labels, np.uint8)[:, None], x.reshape(len(labels), -1)], axis=1)
    return x, rec.tobytes()


def make_cifar(d, per_file=3):
    d.mkdir(exist_ok=True)
    xs, ys = [], []
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for k, name in enumerate(names):
        labels = [(k * per_file + j) % 10 for j in range(per_file)]
        x, data = cifar_records(labels, seed=k)
        (d / name).write_bytes(data)
        xs.append(x)
        ys.append(labels)
    return xs, ys


def make_npz(path, n_per_class=10, classes=3, shape=(6, 6), **extra):
    y = np.repeat(np.arange(classes), n_per_class)
    x = (np.arange(len(y))[:, None, None] * np.ones(shape)).astype(np.uint8)  # image i is filled with i
    np.savez(path, x=x, y=y, **extra)
    return x, y


# ---------------------------------------------------------------------------------------------
# Embedded MNIST-5k


def test_mnist5k_file_is_shipped_as_package_data():
    ref = resources.files("cnnc.runtime") / "data" / "mnist5k.npz"
    with resources.as_file(ref) as path, np.load(path, allow_pickle=False) as z:
        assert z["x"].dtype == np.uint8 and z["x"].shape == (5000, 28, 28)
        assert z["y"].dtype == np.uint8 and z["y"].shape == (5000,)
        assert np.array_equal(np.bincount(z["y"]), np.full(10, 500))
    assert (resources.files("cnnc.runtime") / "data" / "MNIST5K.md").is_file()


def test_mnist5k_split_counts_range_and_determinism():
    d = load_dataset("mnist5k", normalize=False)
    assert isinstance(d, Dataset)
    assert d.train_x.shape == (4000, 1, 28, 28) and d.test_x.shape == (1000, 1, 28, 28)
    assert d.train_x.dtype == np.float32 and d.train_y.dtype == np.int64
    assert np.array_equal(np.bincount(d.train_y), np.full(10, 400))
    assert np.array_equal(np.bincount(d.test_y), np.full(10, 100))
    assert d.classes == 10 and d.image_shape == (1, 28, 28) and d.mean is None
    assert d.train_x.min() == 0.0 and d.train_x.max() == 1.0
    # Real digits: mostly background, some ink.
    assert 0.05 < d.train_x.mean() < 0.25
    # The split is fixed: the same twice, and independent of the training seed.
    again = load_dataset("mnist5k", normalize=False, seed=123)
    assert np.array_equal(d.train_x, again.train_x) and np.array_equal(d.test_y, again.test_y)
    assert np.array_equal(d.test_x, again.test_x)


def test_mnist5k_normalised_with_train_statistics():
    d = load_dataset("mnist5k")
    assert abs(d.train_x.mean()) < 1e-4 and abs(d.train_x.std() - 1) < 1e-3
    assert 0.1 < d.mean[0] < 0.2 and 0.25 < d.std[0] < 0.4
    raw = load_dataset("mnist5k", normalize=False)
    np.testing.assert_allclose(d.test_x, (raw.test_x - d.mean[0]) / d.std[0], atol=1e-5)


def test_mnist5k_padded_for_lenet():
    d = load_dataset("mnist5k", pad_to=(32, 32), normalize=False)
    raw = load_dataset("mnist5k", normalize=False)
    assert d.image_shape == (1, 32, 32) and d.train_x.shape == (4000, 1, 32, 32)
    assert np.array_equal(d.train_x[:, :, 2:30, 2:30], raw.train_x)
    border = d.train_x.copy()
    border[:, :, 2:30, 2:30] = 0
    assert not border.any()


# ---------------------------------------------------------------------------------------------
# .npz


def test_npz_split_is_stratified_and_seeded(tmp_path):
    x, y = make_npz(tmp_path / "d.npz", n_per_class=10, classes=3)
    d = load_dataset(str(tmp_path / "d.npz"), normalize=False)
    assert np.array_equal(np.bincount(d.train_y), [8, 8, 8]) and np.array_equal(np.bincount(d.test_y), [2, 2, 2])
    ids = lambda a: np.rint(a[:, 0, 0, 0] * 255).astype(int)  # noqa: E731 -- image i holds value i
    train_ids, test_ids = ids(d.train_x), ids(d.test_x)
    assert sorted(np.concatenate([train_ids, test_ids])) == list(range(30))
    assert np.array_equal(y[train_ids], d.train_y) and np.array_equal(y[test_ids], d.test_y)
    assert np.all(np.diff(train_ids) > 0)  # original order kept
    same = load_dataset(str(tmp_path / "d.npz"), normalize=False, seed=0)
    assert np.array_equal(ids(same.test_x), test_ids)
    others = {tuple(ids(load_dataset(str(tmp_path / "d.npz"), normalize=False, seed=s).test_x)) for s in range(1, 6)}
    assert len(others - {tuple(test_ids)}) >= 1


def test_stratified_split_is_fixed_across_versions():
    # Pinned so that a change of method (which would silently change every default split) is noticed.
    tr, te = stratified_split(np.repeat(np.arange(2), 5), 0.2, seed=0)
    assert len(te) == 2 and sorted(np.concatenate([tr, te])) == list(range(10))
    assert np.array_equal(te, stratified_split(np.repeat(np.arange(2), 5), 0.2, seed=0)[1])


@pytest.mark.parametrize("shape, expect", [
    ((12, 5, 7), (1, 5, 7)),          # (N, H, W)
    ((12, 3, 5, 7), (3, 5, 7)),       # (N, C, H, W)
    ((12, 5, 7, 3), (3, 5, 7)),       # (N, H, W, C)
    ((12, 5, 7, 1), (1, 5, 7)),       # (N, H, W, 1)
    ((12, 1, 5, 3), (1, 5, 3)),       # second axis 1: channels first even though the last is 3
])
def test_npz_layouts(tmp_path, shape, expect):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    y = np.arange(12) % 2
    xt, yt = x[:4], y[:4]
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=xt, y_test=yt)
    d = load_dataset(str(tmp_path / "d.npz"), normalize=False)
    assert d.image_shape == expect and len(d.train_x) == 12 and len(d.test_x) == 4
    if len(shape) == 3:
        nchw = x[:, None]
    else:
        nchw = x if expect[0] == shape[1] else x.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(d.train_x, nchw / np.float32(255))


def test_npz_keras_names_and_float_pixels(tmp_path):
    x = np.random.default_rng(0).random((10, 4, 4)).astype(np.float64) * 3
    np.savez(tmp_path / "k.npz", x_train=x, y_train=np.arange(10) % 5, x_test=x[:2], y_test=[0, 4])
    d = load_dataset(str(tmp_path / "k.npz"), normalize=False)
    np.testing.assert_allclose(d.train_x[:, 0], x.astype(np.float32))  # floats are not rescaled
    assert d.classes == 5 and d.test_y.tolist() == [0, 4]


def test_npz_normalisation_uses_train_statistics_per_channel(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (20, 3, 4, 4), dtype=np.uint8)
    x[:, 1] //= 4  # channels with different statistics
    xt = rng.integers(0, 256, (5, 3, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20) % 2, x_test=xt, y_test=np.arange(5) % 2)
    d = load_dataset(str(tmp_path / "d.npz"))
    np.testing.assert_allclose(d.train_x.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(d.train_x.std(axis=(0, 2, 3)), 1, atol=1e-4)
    xf = x / 255.0
    mean, std = xf.mean(axis=(0, 2, 3)), xf.std(axis=(0, 2, 3))
    np.testing.assert_allclose(d.mean, mean, rtol=1e-6) and np.testing.assert_allclose(d.std, std, rtol=1e-5)
    np.testing.assert_allclose(d.test_x, (xt / 255.0 - mean[:, None, None]) / std[:, None, None], atol=1e-5)


def test_padding_pads_before_normalisation(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.full((10, 28, 28), 255, np.uint8), y=np.arange(10) % 2)
    d = load_dataset(str(tmp_path / "d.npz"), pad_to=(32, 32))
    # One value for the padding (pixel 0) and one for the image (pixel 1), standardised together.
    assert d.image_shape == (1, 32, 32) and len(np.unique(d.train_x)) == 2
    assert d.train_x[0, 0, 0, 0] < 0 < d.train_x[0, 0, 16, 16]
    assert 0 < d.mean[0] < 1
    err = _error(str(tmp_path / "d.npz"), pad_to=(16, 16))
    assert "pad_to" in err.message and "d.npz" in err.message


def test_relative_paths_resolve_against_base_dir_or_cwd(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    make_npz(tmp_path / "sub" / "d.npz")
    assert len(load_dataset("sub/d.npz", base_dir=tmp_path).train_y) == 24
    monkeypatch.chdir(tmp_path / "sub")
    assert len(load_dataset("d.npz").train_y) == 24
    err = _error("sub/d.npz", base_dir=tmp_path / "sub")
    assert "d.npz" in err.message and "not found" in err.message


def test_npz_errors(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(p, x=np.zeros((3, 2, 2)), y=np.array([object(), 1, 2], dtype=object))
    err = _error(str(p))
    assert "bad.npz" in err.message and "unpickl" in err.message

    p.write_bytes(b"not a zip file at all" * 10)
    assert "bad.npz" in _error(str(p)).message

    make_npz(p, n_per_class=50)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # truncated
    err = _error(str(p))
    assert "bad.npz" in err.message and "corrupt or truncated" in err.message

    np.save(tmp_path / "single.npy", np.zeros(3))
    (tmp_path / "single.npz").write_bytes((tmp_path / "single.npy").read_bytes())
    assert "single.npz" in _error(str(tmp_path / "single.npz")).message

    np.savez(p, x=np.zeros((3, 2, 2)))
    err = _error(str(p))
    assert "bad.npz" in err.message and "`y`" in err.message

    np.savez(p, x=np.zeros((3, 2, 2), np.uint8), y=[0, 1])
    err = _error(str(p))
    assert "bad.npz" in err.message and "3 images but 2 labels" in err.message

    np.savez(p, x=np.zeros((0, 2, 2), np.uint8), y=np.zeros(0, np.int64))
    err = _error(str(p))
    assert "bad.npz" in err.message and "no images" in err.message

    np.savez(p, x=np.zeros((10, 2, 2), np.uint8), y=np.arange(10) - 1)
    err = _error(str(p))
    assert "bad.npz" in err.message and "-1" in err.message

    np.savez(p, x=np.zeros((50, 2, 2), np.uint8), y=np.arange(50) % 10)
    err = _error(str(p), classes=5)
    assert "bad.npz" in err.message and "label 9" in err.message and "0..4" in err.message
    assert load_dataset(str(p), classes=12).classes == 12

    np.savez(p, x=np.full((10, 2, 2), 300, np.int64), y=np.arange(10) % 2)
    assert "0..255" in _error(str(p)).message

    np.savez(p, x=np.zeros((10, 2), np.uint8), y=np.arange(10) % 2)
    assert "shape" in _error(str(p)).message
    np.savez(p, x=np.zeros((10, 2, 0), np.uint8), y=np.arange(10) % 2)
    assert "shape" in _error(str(p)).message

    np.savez(p, x=np.zeros((2, 2, 2), np.uint8), y=[0, 1])
    assert "too few" in _error(str(p)).message

    assert "not found" in _error(str(tmp_path / "missing.npz")).message
    (tmp_path / "dir.npz").mkdir()
    assert "directory" in _error(str(tmp_path / "dir.npz")).message


# ---------------------------------------------------------------------------------------------
# MNIST IDX


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    arrays = make_mnist(tmp_path / "m", gz=gz)
    d = load_dataset("mnist:m", base_dir=tmp_path, normalize=False)
    assert d.train_x.shape == (30, 1, 28, 28) and d.test_x.shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(d.train_x[:, 0], arrays["train"][0] / np.float32(255))
    assert d.train_y.tolist() == arrays["train"][1].tolist() and d.test_y.tolist() == list(range(10))
    assert d.classes == 10 and d.name == "mnist:m"


def test_mnist_idx_errors(tmp_path):
    d = tmp_path / "m"
    make_mnist(d)
    images = d / "train-images-idx3-ubyte"
    good = images.read_bytes()

    images.write_bytes(struct.pack(">I", 2049) + good[4:])
    err = _error(f"mnist:{d}")
    assert "train-images-idx3-ubyte" in err.message and "magic" in err.message

    images.write_bytes(good[:-5])
    err = _error(f"mnist:{d}")
    assert "train-images-idx3-ubyte" in err.message and "wrong length" in err.message

    images.write_bytes(good[:6])
    assert "truncated" in _error(f"mnist:{d}").message

    images.write_bytes(gzip.compress(good))  # gzipped but named without .gz
    err = _error(f"mnist:{d}")
    assert "magic" in err.message and ".gz" in err.hint

    images.unlink()
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(good)[:-20])
    err = _error(f"mnist:{d}")
    assert "train-images-idx3-ubyte.gz" in err.message and "gzip" in err.message

    (d / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot really gzip")
    assert "gzip" in _error(f"mnist:{d}").message

    (d / "train-images-idx3-ubyte.gz").unlink()
    err = _error(f"mnist:{d}")
    assert "missing" in err.message and "train-images-idx3-ubyte" in err.message

    images.write_bytes(good)
    write_idx(d / "t10k-labels-idx1-ubyte", np.arange(7) % 10, 2049)
    err = _error(f"mnist:{d}")
    assert "t10k-labels-idx1-ubyte" in err.message and "10 images" in err.message and "7 labels" in err.message

    write_idx(d / "t10k-labels-idx1-ubyte", np.arange(10), 2049)
    err = _error(f"mnist:{d}", classes=5)
    assert "labels-idx1-ubyte" in err.message and "out of range" in err.message and "0..4" in err.message

    assert "not found" in _error(f"mnist:{tmp_path / 'nowhere'}").message
    assert "directory" in _error(f"mnist:{images}").message


# ---------------------------------------------------------------------------------------------
# CIFAR-10 binary


def test_cifar10_binary(tmp_path):
    xs, ys = make_cifar(tmp_path / "c")
    d = load_dataset(f"cifar10:{tmp_path / 'c'}", normalize=False)
    assert d.train_x.shape == (15, 3, 32, 32) and d.test_x.shape == (3, 3, 32, 32)
    assert d.classes == 10 and d.image_shape == (3, 32, 32)
    np.testing.assert_array_equal(d.train_x, np.concatenate(xs[:5]) / np.float32(255))
    np.testing.assert_array_equal(d.test_x, xs[5] / np.float32(255))
    assert d.train_y.tolist() == sum(ys[:5], []) and d.test_y.tolist() == ys[5]
    # R, G, B planes land in channels 0, 1, 2.
    x, data = cifar_records([3])
    rec = np.frombuffer(data, np.uint8)
    assert np.array_equal(rec[1:1025].reshape(32, 32), x[0, 0]) and np.array_equal(rec[2049:].reshape(32, 32), x[0, 2])


def test_cifar10_finds_extracted_subfolder(tmp_path):
    make_cifar(tmp_path / "cifar-10-batches-bin")
    assert len(load_dataset("cifar10:.", base_dir=tmp_path).train_y) == 15


def test_cifar10_errors(tmp_path):
    d = tmp_path / "c"
    make_cifar(d)
    batch = d / "data_batch_3.bin"
    good = batch.read_bytes()

    batch.write_bytes(good[:-100])
    err = _error(f"cifar10:{d}")
    assert "data_batch_3.bin" in err.message and "3073" in err.message

    batch.write_bytes(b"\x0c" + good[1:])
    err = _error(f"cifar10:{d}")
    assert "data_batch_3.bin" in err.message and "label 12" in err.message

    batch.write_bytes(b"")
    assert "data_batch_3.bin" in _error(f"cifar10:{d}").message

    batch.unlink()
    err = _error(f"cifar10:{d}")
    assert "data_batch_3.bin" in err.message and "missing" in err.message

    # The python version is pickles: refused without being opened.
    py = tmp_path / "cifar-10-batches-py"
    py.mkdir()
    for name in ["data_batch_1", "data_batch_2", "test_batch", "batches.meta"]:
        (py / name).write_bytes(b"\x80\x04this would be unpickled")
    err = _error(f"cifar10:{py}")
    assert "python version" in err.message and "binary" in err.hint and str(py) in err.message

    batch.write_bytes(good)
    err = _error(f"cifar10:{d}", classes=2)
    assert "out of range" in err.message


# ---------------------------------------------------------------------------------------------
# Image folders


def _png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_grey_with_split(tmp_path):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(0)
    imgs = {}
    for cls in ("b_dog", "a_cat"):
        for i in range(5):
            a = rng.integers(0, 256, (6, 8), dtype=np.uint8)
            _png(tmp_path / "f" / cls / f"{i}.png", a)
            imgs[(cls, i)] = a
    (tmp_path / "f" / "a_cat" / "notes.txt").write_text("ignored")
    d = load_dataset("folder:f", base_dir=tmp_path, normalize=False)
    assert d.class_names == ("a_cat", "b_dog") and d.classes == 2
    assert d.image_shape == (1, 6, 8)
    assert np.bincount(d.train_y).tolist() == [4, 4] and np.bincount(d.test_y).tolist() == [1, 1]
    first = d.train_x[0, 0] if d.train_y[0] == 0 else None
    pool = [a / np.float32(255) for (cls, _), a in imgs.items() if cls == "a_cat"]
    assert first is not None and any(np.array_equal(first, a) for a in pool)


def test_folder_rgb_train_test(tmp_path):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(1)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("x", "y", "z"):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", rng.integers(0, 256, (5, 4, 3), dtype=np.uint8))
    # One greyscale image among colour ones: converted to RGB like the others.
    _png(tmp_path / "train" / "x" / "9.png", np.full((5, 4), 200, np.uint8))
    d = load_dataset(f"folder:{tmp_path}", normalize=False)
    assert d.image_shape == (3, 5, 4) and len(d.train_y) == 10 and len(d.test_y) == 6
    assert np.bincount(d.test_y).tolist() == [2, 2, 2]
    grey = d.train_x[3]  # x/0, x/1, x/2, x/9: the fourth
    assert np.allclose(grey, 200 / 255)


def test_folder_errors(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    f = tmp_path / "f"
    for cls in ("a", "b"):
        for i in range(5):
            _png(f / cls / f"{i}.png", np.zeros((6, 6), np.uint8))
    _png(f / "b" / "3.png", np.zeros((7, 6), np.uint8))
    err = _error(f"folder:{f}")
    assert "3.png" in err.message and "6x7" in err.message and "one size" in err.message

    (f / "b" / "3.png").write_bytes(b"\x89PNG but not really")
    err = _error(f"folder:{f}")
    assert "3.png" in err.message and "cannot read" in err.message

    (f / "b" / "3.png").unlink()
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed
    err = _error(f"folder:{f}")
    assert "Pillow" in err.message and "pip install pillow" in err.hint and str(f) in err.message


def test_folder_layout_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    err = _error(f"folder:{tmp_path / 'empty'}")
    assert "no class subfolders" in err.message and "empty" in err.message
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    err = _error(f"folder:{tmp_path / 'noimg'}")
    assert "no images" in err.message and "noimg" in err.message


# ---------------------------------------------------------------------------------------------
# Spec errors and compatibility


def test_unknown_specs_list_the_accepted_forms():
    for spec in ("imagenet:/data", "cifar100:/x", "mnist", "data.csv"):
        err = _error(spec)
        assert "mnist5k" in err.message and "cifar10:DIR" in err.message and "folder:DIR" in err.message
    assert "mnist5k" in _error("mnist").hint and "mnist:DIR" in _error("mnist").hint
    assert "did you mean `mnist5k`" in _error("mnist5").hint
    assert "empty" in _error("  ").message
    assert "no path" in _error("mnist:").message


def test_check_compatible():
    d = load_dataset("mnist5k", normalize=False)
    check_compatible(d, (1, 28, 28), 10)
    check_compatible(d, (1, 28, 28), None)
    check_compatible(d, (64, 1, 28, 28), 12)  # a batch dimension is fine; spare outputs too
    with pytest.raises(CnncError) as info:
        check_compatible(d, (1, 32, 32), 10)
    assert "(1, 28, 28)" in info.value.message and "(1, 32, 32)" in info.value.message
    assert "mnist5k" in info.value.message and "pad_to=(32, 32)" in info.value.hint
    with pytest.raises(CnncError) as info:
        check_compatible(d, (3, 28, 28), 10)
    assert "channel" in info.value.hint
    with pytest.raises(CnncError) as info:
        check_compatible(d, (1, 28, 28), 5)
    assert "10 classes" in info.value.message and "5 outputs" in info.value.message


# ---------------------------------------------------------------------------------------------
# Batching and augmentation


def test_batches_cover_the_data_once_and_are_deterministic():
    x = np.arange(10 * 2 * 3 * 3, dtype=np.float32).reshape(10, 2, 3, 3)
    y = np.arange(10)
    out = list(batches(x, y, 4, shuffle=True, rng=np.random.default_rng(7)))
    assert [len(b) for b, _ in out] == [4, 4, 2]
    for xb, yb in out:
        assert xb.dtype == np.float32 and yb.dtype == np.int64
        assert xb.flags.c_contiguous and yb.flags.c_contiguous
        assert np.array_equal(xb, x[yb])
    seen = np.concatenate([yb for _, yb in out])
    assert sorted(seen) == list(range(10)) and seen.tolist() != list(range(10))
    again = np.concatenate([yb for _, yb in batches(x, y, 4, shuffle=True, rng=np.random.default_rng(7))])
    assert np.array_equal(seen, again)
    plain = list(batches(x, y, 4, shuffle=False, rng=np.random.default_rng(0), drop_last=True))
    assert [yb.tolist() for _, yb in plain] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError):
        next(batches(x, y, 0, shuffle=False, rng=np.random.default_rng(0)))


def test_crop_shifts_content():
    x = np.zeros((64, 1, 9, 9), np.float32)
    x[:, 0, 4, 4] = 1.0  # one bright pixel in the centre
    original = x.copy()
    (xb, _), = batches(x, np.zeros(64), 64, shuffle=False, rng=np.random.default_rng(0), augment=Augment(crop_pad=2))
    assert xb.shape == x.shape and xb.flags.c_contiguous
    assert np.array_equal(xb.sum(axis=(1, 2, 3)), np.ones(64))  # the pixel is never cropped away
    pos = np.array([np.unravel_index(np.argmax(img[0]), (9, 9)) for img in xb])
    shifts = pos - 4
    assert np.abs(shifts).max() <= 2 and len({tuple(s) for s in shifts}) > 5
    assert np.array_equal(x, original)  # the dataset is untouched
    (xb2, _), = batches(x, np.zeros(64), 64, shuffle=False, rng=np.random.default_rng(0), augment=Augment(crop_pad=2))
    assert np.array_equal(xb, xb2)


def test_crop_pads_with_zeros_at_the_edge():
    x = np.ones((32, 1, 4, 4), np.float32)
    (xb, _), = batches(x, np.zeros(32), 32, shuffle=False, rng=np.random.default_rng(3), augment=Augment(crop_pad=4))
    assert set(np.unique(xb)) <= {0.0, 1.0} and (xb == 0).any() and (xb.sum(axis=(1, 2, 3)) < 16).any()


def test_flip_mirrors():
    x = np.arange(64 * 2 * 3 * 5, dtype=np.float32).reshape(64, 2, 3, 5)
    (xb, yb), = batches(x, np.arange(64), 64, shuffle=False, rng=np.random.default_rng(0), augment=Augment(hflip=True))
    flipped = np.array([np.array_equal(b, x[i, :, :, ::-1]) for i, b in enumerate(xb)])
    kept = np.array([np.array_equal(b, x[i]) for i, b in enumerate(xb)])
    assert np.all(flipped | kept) and 10 < flipped.sum() < 54
    assert Augment().crop_pad == 0 and not Augment().hflip
    with pytest.raises(ValueError):
        Augment(crop_pad=-1)


# ---------------------------------------------------------------------------------------------
# Hostile data


def _png_header_only(path, width: int, height: int) -> None:
    """A real PNG signature and IHDR chunk declaring width×height, with one tiny IDAT: what a
    decompression bomb or a damaged file presents to a reader that trusts its header."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_a_png_declaring_30000_by_30000_pixels_is_refused(tmp_path):
    pytest.importorskip("PIL")
    for cls in ("a", "b"):
        for i in range(3):
            _png(tmp_path / "f" / cls / f"{i}.png", np.zeros((6, 6), np.uint8))
    _png_header_only(tmp_path / "f" / "b" / "bomb.png", 30000, 30000)
    err = _error(f"folder:{tmp_path / 'f'}")
    assert "bomb.png" in err.message and "too large to decode" in err.message and "900000000 pixels" in err.message


def test_a_float_pixel_beyond_float32_is_refused_naming_it(tmp_path):
    x = np.zeros((20, 8, 8))
    x[3, 2, 2] = 1e39
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20) % 2)
    err = _error(str(tmp_path / "d.npz"))
    assert "1e+39" in err.message and "float32" in err.message and "image 3" in err.message


def test_an_npz_declaring_a_huge_array_is_refused_before_loading(tmp_path):
    """The header says 10^12 floats; nothing that size is allocated."""
    import zipfile
    header = {"descr": "<f4", "fortran_order": False, "shape": (1_000_000, 1000, 1000)}
    with zipfile.ZipFile(tmp_path / "d.npz", "w") as z:
        with z.open("x.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.write(b"\0" * 64)
        with z.open("y.npy", "w") as f:
            np.lib.format.write_array(f, np.zeros(3, np.int64))
    err = _error(str(tmp_path / "d.npz"))
    assert "needs an estimated" in err.message and "TiB" in err.message


def test_a_gzip_bomb_is_refused(tmp_path, monkeypatch):
    """A small .gz that unpacks beyond the memory limit stops unpacking at the limit."""
    monkeypatch.setenv("CNNC_MAX_MEMORY", "4M")
    d = tmp_path / "m"
    d.mkdir()
    with gzip.open(d / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, 100000, 28, 28))
        for _ in range(10):
            f.write(b"\0" * (1 << 20))
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (d / name).write_bytes(b"")
    err = _error(f"mnist:{d}")
    assert "unpacks to more than" in err.message
