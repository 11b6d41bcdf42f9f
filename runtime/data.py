"""Training data: the embedded MNIST-5k, loaders for the common formats, batching and augmentation.

`load_dataset(spec)` reads the `data` setting of a `train:` section. Accepted specs:

- `mnist5k` (the default): 5000 real MNIST digits shipped with cnnc (`runtime/data/mnist5k.npz`,
  see `runtime/data/MNIST5K.md` for source and licence), 1x28x28, 10 classes;
- `PATH.npz`: arrays `x` and `y` (or `x_train`, `y_train` as Keras' mnist.npz names them), and
  optionally `x_test`, `y_test`. Loaded with allow_pickle=False, so object arrays are refused.
  Layout of x: (N, H, W) is one channel; a 4-d x is (N, H, W, C) when its last axis is 1 or 3
  and its second is not, else (N, C, H, W). Integer pixels must lie in 0..255 and are scaled to
  [0, 1]; float pixels are used as they are;
- `mnist:DIR`: the MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte,
  t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each optionally .gz) — Fashion-MNIST too;
- `cifar10:DIR`: the CIFAR-10 *binary* version (data_batch_1.bin .. data_batch_5.bin,
  test_batch.bin, in DIR or DIR/cifar-10-batches-bin). The python version is pickles and is
  never unpickled;
- `folder:DIR`: one subfolder per class (class index = position in the sorted folder names), or,
  when DIR has both a `train` and a `test` subfolder, each of those laid out that way. Needs
  Pillow. Images are all converted to L (when every image is greyscale) or else to RGB, and must
  share one size.
- `imagefolder:DIR` is not loaded here: it is streamed by worker processes (runtime/images.py).

Relative paths resolve against `base_dir` (the .cnn file's directory) or else the current one.

Without a test split (npz without x_test, folder without train/test) the data is split 80/20,
stratified: within each class the images are ordered by the key
blake2b(f"{seed}:{index}", digest_size=8) and the first n_class / 5 (rounded half up) go to the
test split; both splits keep the original order. This depends on nothing but the seed and the
index, so it is the same on every machine and numpy version. MNIST-5k always uses this with
seed 0 (whatever the training seed), giving 4000 train / 1000 test, 400 / 100 per digit.

Pixels become float32 in [0, 1]; `pad_to` then zero-pads centrally (pad value 0 = black);
with normalize=True each channel is standardised with the mean and std of the train split,
applied to both splits. Every user mistake raises a CnncError that names the file.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cnnc.dsl.errors import CnncError, did_you_mean

from .budget import Estimate, limit

MNIST5K_SPLIT_SEED = 0
TEST_FRACTION = 0.2
FORMS = ("mnist5k", "PATH.npz", "mnist:DIR", "cifar10:DIR", "folder:DIR", "imagefolder:DIR")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp"}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass
class Dataset:
    """Images as float32 (N, C, H, W), labels as int64 (N,), split into train and test."""

    name: str
    train_x: np.ndarray = field(repr=False)
    train_y: np.ndarray = field(repr=False)
    test_x: np.ndarray = field(repr=False)
    test_y: np.ndarray = field(repr=False)
    classes: int
    image_shape: tuple[int, int, int]
    # The per-channel statistics that were subtracted / divided (pixel scale [0, 1]), so that
    # new images can be prepared the same way; None without normalisation.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation: random crop after zero-padding each side by `crop_pad`, and a
    random horizontal flip with probability 1/2."""

    crop_pad: int = 0
    hflip: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.crop_pad, int) or self.crop_pad < 0:
            raise ValueError(f"crop_pad must be a non-negative integer, got {self.crop_pad!r}")


@dataclass
class _Raw:
    """What a format loader returns: arrays still in their file's dtype, test split optional."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    train_src: str  # where the train data came from, for messages
    test_src: str
    classes: int | None = None  # fixed by the format (CIFAR-10, a folder's class count)
    class_names: tuple[str, ...] | None = None


# ---------------------------------------------------------------------------------------------
# Entry point


def load_dataset(spec: str, base_dir: Path | None = None, *, pad_to: tuple[int, int] | None = None,
                 normalize: bool = True, seed: int = 0, classes: int | None = None) -> Dataset:
    """Load the dataset named by `spec` (see the module docstring for the accepted forms)."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise CnncError("the `data` setting is empty", hint=_forms_hint())
    spec = spec.strip()
    if classes is not None and (not _is_int(classes) or classes < 1):
        raise CnncError(f"`classes` must be a positive integer, got {classes!r}")
    base = Path(base_dir) if base_dir is not None else Path.cwd()

    prefix, sep, rest = spec.partition(":")
    split_seed = seed
    if spec == "mnist5k":
        raw, split_seed = _load_mnist5k(), MNIST5K_SPLIT_SEED
    elif sep and prefix == "mnist":
        raw = _load_mnist_idx(_resolve(rest, base, spec, want_dir=True))
    elif sep and prefix == "cifar10":
        raw = _load_cifar10(_resolve(rest, base, spec, want_dir=True))
    elif sep and prefix == "folder":
        raw = _load_folder(_resolve(rest, base, spec, want_dir=True))
    elif sep and prefix == "imagefolder":
        raise CnncError(f"data `{spec}` is streamed, not loaded into memory: cnnc train and cnnc eval read it "
                        "(runtime/images.py)", hint="for an in-memory folder of same-size images write `folder:DIR`")
    elif spec.lower().endswith(".npz"):
        raw = _load_npz(_resolve(spec, base, spec, want_dir=False))
    else:
        if not sep and spec in ("mnist", "cifar10", "folder"):
            hint = f"`{spec}` needs a directory: write `{spec}:DIR`"
            hint += " (the built-in MNIST subset is `mnist5k`)" if spec == "mnist" else ""
        else:
            hint = did_you_mean(prefix if sep else spec, ["mnist5k", "mnist", "cifar10", "folder", "imagefolder"])
        kind = f"unknown data prefix `{prefix}:`" if sep else f"unknown data `{spec}`"
        raise CnncError(f"{kind}; accepted forms: {', '.join(FORMS)}", hint=hint or _forms_hint())
    return _finish(spec, raw, pad_to=pad_to, normalize=normalize, seed=split_seed, classes=classes)


def check_compatible(dataset: Dataset, input_shape: tuple, classes: int | None) -> None:
    """Raise a CnncError when the dataset cannot feed a network taking `input_shape` (C, H, W)
    images and producing `classes` scores."""
    want = tuple(int(d) for d in input_shape)
    if len(want) == 4:  # a batch dimension in front
        want = want[1:]
    have = tuple(dataset.image_shape)
    if have != want:
        hint = None
        if len(want) == 3 and have[0] != want[0]:
            hint = (f"the network takes {want[0]}-channel images, the data has {have[0]} channel(s); "
                    "use a dataset with matching channels or change the network's input")
        elif len(want) == 3 and have[1] <= want[1] and have[2] <= want[2]:
            hint = (f"pad the images: pad_to=({want[1]}, {want[2]}) zero-pads {have[1]}x{have[2]} to "
                    f"{want[1]}x{want[2]} (as LeNet-5 does with 28x28 MNIST)")
        else:
            hint = "resize the images or change the network's input shape"
        raise CnncError(f"data `{dataset.name}` has images of shape {have} (C, H, W) but the network's "
                        f"input is {want}", hint=hint)
    if classes is not None and dataset.classes > classes:
        raise CnncError(f"data `{dataset.name}` has {dataset.classes} classes (labels 0..{dataset.classes - 1}) "
                        f"but the network has only {classes} outputs",
                        hint=f"set `classes {dataset.classes}` in the network or use fewer classes of data")


def stratified_split(y: np.ndarray, test_fraction: float = TEST_FRACTION,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), both ascending; see the module docstring for the method."""
    y = np.asarray(y)
    keys = np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big")
                     for i in range(len(y))], dtype=np.uint64)
    test = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n_test = int(len(members) * test_fraction + 0.5)
        test.append(members[np.argsort(keys[members], kind="stable")[:n_test]])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    mask = np.ones(len(y), bool)
    mask[test_idx] = False
    return np.flatnonzero(mask), test_idx


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, shuffle: bool, rng: np.random.Generator,
            augment: Augment | None = None, drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (xb float32, yb int64) contiguous batches, one pass over the data. The order, crops
    and flips come from `rng` only, so the same rng state gives the same batches."""
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    n = len(x)
    order = rng.permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        # Fancy indexing copies, so augmenting in place never touches the dataset.
        xb = np.ascontiguousarray(x[idx], dtype=np.float32)
        yb = np.ascontiguousarray(y[idx], dtype=np.int64)
        if augment is not None:
            xb = _augment(xb, augment, rng)
        yield xb, yb


def _augment(xb: np.ndarray, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    b, c, h, w = xb.shape
    p = aug.crop_pad
    if p:
        padded = np.zeros((b, c, h + 2 * p, w + 2 * p), np.float32)
        padded[:, :, p:p + h, p:p + w] = xb
        dy = rng.integers(0, 2 * p + 1, size=b)
        dx = rng.integers(0, 2 * p + 1, size=b)
        # windows[i, ch, oy, ox] is the h x w crop at offset (oy, ox): pick one per image.
        windows = sliding_window_view(padded, (h, w), axis=(2, 3))
        xb = np.ascontiguousarray(windows[np.arange(b), :, dy, dx])
    if aug.hflip:
        flip = rng.random(b) < 0.5
        xb[flip] = xb[flip, :, :, ::-1]
    return xb


# ---------------------------------------------------------------------------------------------
# Shared steps


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _forms_hint() -> str:
    return ("write `data mnist5k` (built in), `data path/to/file.npz`, `data mnist:DIR` (IDX files), "
            "`data cifar10:DIR` (CIFAR-10 binary version), `data folder:DIR` (one subfolder per class) or "
            "`data imagefolder:DIR` (streamed photos of any size)")


def _resolve(text: str, base: Path, spec: str, *, want_dir: bool) -> Path:
    if not text.strip():
        raise CnncError(f"data `{spec}` names no path", hint=_forms_hint())
    given = Path(text.strip()).expanduser()
    path = given if given.is_absolute() else base / given
    if not path.exists():
        what = "directory" if want_dir else "file"
        raise CnncError(f"data {what} not found: {path}",
                        hint=None if given.is_absolute() else f"relative paths are resolved against {base}")
    if want_dir and not path.is_dir():
        raise CnncError(f"data `{spec}` needs a directory, but {path} is a file")
    if not want_dir and path.is_dir():
        raise CnncError(f"data `{spec}` needs a file, but {path} is a directory")
    return path


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when its name ends in .gz; CnncError when unreadable. Neither
    the file nor what it unpacks to may exceed the memory limit (runtime/budget.py)."""
    try:
        Estimate(f"reading {path}", [("file", path.stat().st_size)]).check("a smaller file")
        if path.suffix != ".gz":
            return path.read_bytes()
    except OSError as e:
        raise CnncError(f"cannot read {path}: {e.strerror or e}") from None
    cap = limit()[0]
    chunks, total = [], 0
    try:
        with gzip.open(path) as f:
            while chunk := f.read(1 << 24):
                total += len(chunk)
                if cap is not None and total > cap:
                    raise CnncError(f"{path} unpacks to more than the {cap >> 20} MiB of memory available",
                                    hint="--max-memory SIZE sets the limit yourself")
                chunks.append(chunk)
    except (OSError, EOFError, zlib.error) as e:
        raise CnncError(f"{path} is not a valid gzip file (corrupt or truncated: {e})") from None
    return b"".join(chunks)


def _check_labels(y: np.ndarray, src: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise CnncError(f"labels in {src} must be one integer per image, got an array of shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise CnncError(f"labels in {src} must be whole numbers, got {y.dtype} values that are not")
    elif y.dtype.kind not in "iu":
        raise CnncError(f"labels in {src} must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise CnncError(f"label {y.min()} in {src} is out of range: labels must be 0..classes-1")
    return y


def _layout(x: np.ndarray, src: str) -> np.ndarray:
    """x as (N, C, H, W) (a view where possible), by the rule in the module docstring."""
    out = None
    if x.ndim == 3:
        out = x[:, None]
    elif x.ndim == 4:
        out = x.transpose(0, 3, 1, 2) if x.shape[3] in (1, 3) and x.shape[1] not in (1, 3) else x
    if out is not None and min(out.shape[1:]) > 0:
        return out
    raise CnncError(f"images in {src} must be (N, H, W), (N, C, H, W) or (N, H, W, C), got shape {x.shape}")


def _check_pixels(x: np.ndarray, src: str) -> None:
    if x.dtype == np.uint8:
        return
    if x.dtype.kind in "iu":
        if x.size and (x.min() < 0 or x.max() > 255):
            raise CnncError(f"integer pixels in {src} must lie in 0..255, found {x.min()}..{x.max()}",
                            hint="store uint8 pixels, or floats already scaled as you want them")
    elif x.dtype.kind == "f":
        top = float(np.finfo(np.float32).max)
        with np.errstate(all="ignore"):
            bad = ~np.isfinite(x) | (np.abs(x) > top)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            value = x.reshape(-1)[i]
            what = "NaN or infinity" if not np.isfinite(value) else f"{float(value):g}, beyond float32's ±{top:.3g}"
            raise CnncError(f"pixels in {src} include {what} (image {i // max(math.prod(x.shape[1:]), 1)})",
                            hint="pixels are cast to float32 for training; scale or clean the data first")
    else:
        raise CnncError(f"pixels in {src} have unsupported dtype {x.dtype}; use uint8 or float32")


def _to_float(x: np.ndarray, pad_to: tuple[int, int] | None, src: str) -> np.ndarray:
    """(N, C, H, W) float32 in [0, 1] (integers / 255), zero-padded centrally to pad_to."""
    n, c, h, w = x.shape
    ph, pw = h, w
    if pad_to is not None:
        ph, pw = pad_to
        if ph < h or pw < w:
            raise CnncError(f"pad_to=({ph}, {pw}) is smaller than the {h}x{w} images in {src}")
    out = np.zeros((n, c, ph, pw), np.float32)
    top, left = (ph - h) // 2, (pw - w) // 2
    out[:, :, top:top + h, left:left + w] = x  # casts on assignment: no float64 or unpadded copy
    if x.dtype.kind in "iu":
        out /= 255  # division keeps 255 -> exactly 1.0
    return out


def _channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over (N, H, W), accumulated in float64 a chunk at a time so that
    CIFAR-sized data needs no float64 copy."""
    c = x.shape[1]
    total, total_sq, count = np.zeros(c), np.zeros(c), 0
    for start in range(0, len(x), 1024):
        chunk = x[start:start + 1024].astype(np.float64)
        total += chunk.sum(axis=(0, 2, 3))
        total_sq += np.square(chunk).sum(axis=(0, 2, 3))
        count += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
    std[std < 1e-8] = 1.0  # a constant channel: leave its scale alone rather than divide by 0
    return mean, std


def _finish(name: str, raw: _Raw, *, pad_to, normalize: bool, seed: int, classes: int | None) -> Dataset:
    train_x = _layout(np.asarray(raw.train_x), raw.train_src)
    train_y = _check_labels(raw.train_y, raw.train_src)
    if len(train_x) != len(train_y):
        raise CnncError(f"{raw.train_src} has {len(train_x)} images but {len(train_y)} labels")
    if len(train_x) == 0:
        raise CnncError(f"{raw.train_src} holds no images")
    _check_pixels(train_x, raw.train_src)

    if raw.test_x is not None:
        test_x = _layout(np.asarray(raw.test_x), raw.test_src)
        test_y = _check_labels(raw.test_y, raw.test_src)
        if len(test_x) != len(test_y):
            raise CnncError(f"{raw.test_src} has {len(test_x)} images but {len(test_y)} labels")
        if len(test_x) == 0:
            raise CnncError(f"{raw.test_src} holds no images")
        _check_pixels(test_x, raw.test_src)
        if test_x.shape[1:] != train_x.shape[1:]:
            raise CnncError(f"test images in {raw.test_src} have shape {test_x.shape[1:]} but train images "
                            f"in {raw.train_src} have {train_x.shape[1:]}")
        if (test_x.dtype.kind in "iu") != (train_x.dtype.kind in "iu"):
            raise CnncError(f"train and test pixels in {raw.train_src} mix integer and float types; "
                            "they would be scaled differently")

    # Labels are checked before splitting, so that a bad label is reported as such.
    labelled = [(train_y, raw.train_src)] + ([(test_y, raw.test_src)] if raw.test_x is not None else [])
    if classes is None:
        classes = raw.classes or int(max(y.max() for y, _ in labelled)) + 1
    for y, src in labelled:
        if y.max() >= classes:
            raise CnncError(f"label {y.max()} in {src} is out of range: labels must be 0..{classes - 1} "
                            f"({classes} classes)")

    if raw.test_x is None:
        tr, te = stratified_split(train_y, TEST_FRACTION, seed)
        if len(te) == 0 or len(tr) == 0:
            raise CnncError(f"{raw.train_src} has too few images ({len(train_y)}) for an 80/20 train/test split",
                            hint="add more images or give a separate test split")
        test_x, test_y = train_x[te], train_y[te]
        train_x, train_y = train_x[tr], train_y[tr]

    if pad_to is not None:
        if (not isinstance(pad_to, (tuple, list)) or len(pad_to) != 2
                or not all(_is_int(v) and v > 0 for v in pad_to)):
            raise CnncError(f"pad_to must be two positive integers (height, width), got {pad_to!r}")
        pad_to = (int(pad_to[0]), int(pad_to[1]))
    h, w = pad_to or train_x.shape[2:]
    per_image = 4 * train_x.shape[1] * h * w
    Estimate(f"preparing the images of `{name}` as float32",
             [("train images", len(train_x) * per_image), ("test images", len(test_x) * per_image)]).check(
        "fewer or smaller images")
    train_f = _to_float(train_x, pad_to, raw.train_src)
    test_f = _to_float(test_x, pad_to, raw.test_src)
    mean = std = None
    if normalize:
        m, s = _channel_stats(train_f)
        for arr in (train_f, test_f):
            arr -= m.astype(np.float32)[:, None, None]
            arr /= s.astype(np.float32)[:, None, None]
        mean, std = tuple(float(v) for v in m), tuple(float(v) for v in s)
    return Dataset(name=name, train_x=train_f, train_y=train_y, test_x=test_f, test_y=test_y,
                   classes=int(classes), image_shape=tuple(int(d) for d in train_f.shape[1:]),
                   mean=mean, std=std, class_names=raw.class_names)


# ---------------------------------------------------------------------------------------------
# Formats


def _load_mnist5k() -> _Raw:
    ref = resources.files("cnnc.runtime") / "data" / "mnist5k.npz"
    try:
        with resources.as_file(ref) as path, np.load(path, allow_pickle=False) as z:
            x, y = z["x"], z["y"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        # Not a user mistake but an incomplete install; still say what is wrong.
        raise CnncError(f"the built-in dataset file {ref} is missing or damaged ({e})",
                        hint="reinstall cnnc, or rebuild it with runtime/make_mnist5k.py") from None
    return _Raw(x, y, None, None, "mnist5k.npz", "mnist5k.npz", classes=10)


def _load_npz(path: Path) -> _Raw:
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise CnncError(f"{path} is a single .npy array, not an .npz archive with `x` and `y`")
        with z:
            names = set(z.files)
            xk = "x" if "x" in names else "x_train" if "x_train" in names else None
            yk = "y" if "y" in names else "y_train" if "y_train" in names else None
            if xk is None or yk is None:
                missing = " and ".join(k for k, have in (("`x`", xk), ("`y`", yk)) if have is None)
                raise CnncError(f"{path} has no {missing} array (it holds: {', '.join(sorted(names)) or 'nothing'})",
                                hint="save images as `x` and integer labels as `y`, e.g. np.savez(path, x=x, y=y)")
            if ("x_test" in names) != ("y_test" in names):
                raise CnncError(f"{path} has only one of `x_test` and `y_test`; give both or neither")
            wanted = [xk, yk] + (["x_test", "y_test"] if "x_test" in names else [])
            Estimate(f"loading {path}", [(k, _member_bytes(z, k, path)) for k in wanted]).check(
                "a smaller data file")
            x, y = z[xk], z[yk]
            xt, yt = (z["x_test"], z["y_test"]) if "x_test" in names else (None, None)
    except CnncError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise CnncError(f"{path} holds Python objects (an object array or pickle); cnnc loads .npz files "
                            "without unpickling, which could run arbitrary code",
                            hint="save plain numeric arrays, e.g. x as uint8 and y as int64") from None
        raise CnncError(f"{path} is not a valid .npz file (corrupt or truncated: {e})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as e:
        raise CnncError(f"{path} is not a valid .npz file (corrupt or truncated: {e})") from None
    src = str(path)
    return _Raw(x, y, xt, yt, src, f"{src} (x_test/y_test)")


def _member_bytes(z, key: str, path: Path) -> int:
    """The size an .npz member declares in its header, read without loading it."""
    try:
        with z.zip.open(key + ".npy") as f:
            version = np.lib.format.read_magic(f)
            header = {(1, 0): np.lib.format.read_array_header_1_0,
                      (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if header is None:
                return 0  # another format version: np.load will judge it
            shape, _, dtype = header(f)
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise CnncError(f"{path}: the array `{key}` is damaged ({e})") from None
    return math.prod(shape) * dtype.itemsize


def _find(directory: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise CnncError(f"missing MNIST file {directory / names[0]} (or {names[0]}.gz) in {directory}",
                    hint="mnist:DIR needs train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                         "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, optionally gzipped")


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    data = _read_bytes(path)
    header = 4 + 4 * ndim
    kind = "images (idx3)" if ndim == 3 else "labels (idx1)"
    if len(data) < header:
        raise CnncError(f"{path} is truncated: {len(data)} bytes, shorter than an IDX header")
    found = struct.unpack(">I", data[:4])[0]
    if found != magic:
        hint = "the file looks gzip-compressed: name it with a .gz suffix" if data[:2] == b"\x1f\x8b" else None
        raise CnncError(f"{path} is not an MNIST {kind} file: magic number {found}, expected {magic}", hint=hint)
    dims = struct.unpack(f">{ndim}I", data[4:header])
    want = header + math.prod(dims)
    if len(data) != want:
        raise CnncError(f"{path} has the wrong length: {len(data)} bytes, but its header "
                        f"{'x'.join(map(str, dims))} needs {want} (truncated or corrupt)")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _load_mnist_idx(directory: Path) -> _Raw:
    parts = []
    for split in ("train", "t10k"):
        ipath = _find(directory, (f"{split}-images-idx3-ubyte", f"{split}-images.idx3-ubyte"))
        lpath = _find(directory, (f"{split}-labels-idx1-ubyte", f"{split}-labels.idx1-ubyte"))
        x, y = _read_idx(ipath, 2051, 3), _read_idx(lpath, 2049, 1)
        if len(x) != len(y):
            raise CnncError(f"{ipath} has {len(x)} images but {lpath} has {len(y)} labels")
        parts.append((x, y, str(lpath)))
    (x, y, src), (xt, yt, tsrc) = parts
    return _Raw(x, y, xt, yt, src, tsrc)


_CIFAR_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)
_CIFAR_RECORD = 1 + 3 * 32 * 32


def _load_cifar10(directory: Path) -> _Raw:
    if (directory / "cifar-10-batches-bin").is_dir():
        directory = directory / "cifar-10-batches-bin"
    missing = [f for f in _CIFAR_FILES if not (directory / f).is_file()]
    if missing:
        pickled = [p for p in ("data_batch_1", "batches.meta", "cifar-10-batches-py") if (directory / p).exists()]
        if pickled:
            raise CnncError(f"{directory} holds the CIFAR-10 python version ({pickled[0]}): those are "
                            "pickles, and cnnc does not unpickle data files (unpickling can run arbitrary code)",
                            hint="download the binary version, cifar-10-binary.tar.gz, from "
                                 "https://www.cs.toronto.edu/~kriz/cifar.html and point cifar10: at its "
                                 "cifar-10-batches-bin folder")
        raise CnncError(f"{directory} is missing CIFAR-10 binary file(s): {', '.join(missing)}",
                        hint="cifar10:DIR needs data_batch_1.bin .. data_batch_5.bin and test_batch.bin "
                             "(the binary version, cifar-10-binary.tar.gz)")
    loaded = []
    for name in _CIFAR_FILES:
        path = directory / name
        data = _read_bytes(path)
        if len(data) == 0 or len(data) % _CIFAR_RECORD:
            hint = ("this looks like CIFAR-100 (2 label bytes per record), which cifar10: does not read"
                    if len(data) and len(data) % (_CIFAR_RECORD + 1) == 0 else None)
            raise CnncError(f"{path} has {len(data)} bytes, not a whole number of {_CIFAR_RECORD}-byte records "
                            "(1 label byte + 3072 pixel bytes); truncated or corrupt", hint=hint)
        rec = np.frombuffer(data, np.uint8).reshape(-1, _CIFAR_RECORD)
        if rec[:, 0].max() > 9:
            raise CnncError(f"label {rec[:, 0].max()} in {path} is out of range: CIFAR-10 labels are 0..9 "
                            "(corrupt file?)")
        loaded.append((rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0], str(path)))
    train, (xt, yt, tsrc) = loaded[:5], loaded[5]
    x = np.concatenate([t[0] for t in train])
    y = np.concatenate([t[1] for t in train])
    return _Raw(x, y, xt, yt, str(directory), tsrc, classes=10)


def _class_dirs(directory: Path) -> list[Path]:
    return sorted((p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _load_folder(directory: Path) -> _Raw:
    if (directory / "train").is_dir() and (directory / "test").is_dir():
        roots = [directory / "train", directory / "test"]
    else:
        roots = [directory]
    names = [d.name for d in _class_dirs(roots[0])]
    if not names:
        raise CnncError(f"{roots[0]} has no class subfolders",
                        hint="folder:DIR needs one subfolder of images per class (DIR/cat/*.png, DIR/dog/*.png), "
                             "optionally under DIR/train and DIR/test")
    files: list[list[tuple[Path, int]]] = []
    for root in roots:
        entries = []
        for d in _class_dirs(root):
            if d.name not in names:
                raise CnncError(f"class folder {d} has no counterpart in {roots[0]}",
                                hint=f"the classes are the folders of {roots[0]}: {', '.join(names)}")
            entries += [(f, names.index(d.name)) for f in _image_files(d)]
        if not entries:
            raise CnncError(f"{root} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))} "
                            "files in its class subfolders)")
        files.append(entries)

    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise CnncError(f"reading the images in {directory} needs Pillow, which is not installed",
                        hint="pip install pillow") from None

    # First pass reads headers only: decide one mode for all, and check one size for all.
    modes, first = set(), None
    for path, _ in (e for entries in files for e in entries):
        try:
            with Image.open(path) as im:
                size, mode = im.size, im.mode
        except Image.DecompressionBombError as e:
            size = str(e).split(", could be")[0]  # "Image size (N pixels) exceeds limit of M pixels"
            raise CnncError(f"image {path} is too large to decode: {size[0].lower() + size[1:]}",
                            hint="a damaged or hostile file (a decompression bomb); remove it, or downscale "
                                 "the image") from None
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise CnncError(f"cannot read image {path}: {e}") from None
        if first is None:
            first = (path, size)
        elif size != first[1]:
            raise CnncError(f"image {path} is {size[0]}x{size[1]} but {first[0]} is {first[1][0]}x{first[1][1]}; "
                            "all images must have one size", hint="resize the images beforehand")
        modes.add(mode)
    mode = "L" if modes <= GREY_MODES else "RGB"
    w, h = first[1]
    Estimate(f"loading the images of {directory}",
             [("images", sum(len(e) for e in files) * (1 if mode == "L" else 3) * h * w)]).check(
        "fewer or smaller images")

    arrays = []
    for root, entries in zip(roots, files):
        w, h = first[1]
        x = np.empty((len(entries), 1 if mode == "L" else 3, h, w), np.uint8)
        for i, (path, _) in enumerate(entries):
            try:
                with Image.open(path) as im:
                    a = np.asarray(im.convert(mode))
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                raise CnncError(f"cannot read image {path}: {e}") from None
            if a.shape[:2] != (h, w):  # a file changed between the passes, or lies in its header
                raise CnncError(f"image {path} decoded to {a.shape[1]}x{a.shape[0]}, not the {w}x{h} its header said")
            x[i] = a[None] if mode == "L" else a.transpose(2, 0, 1)
        arrays.append((x, np.array([c for _, c in entries], np.int64), str(root)))
    (x, y, src), *rest = arrays
    xt, yt, tsrc = rest[0] if rest else (None, None, src)
    return _Raw(x, y, xt, yt, src, tsrc, classes=len(names), class_names=tuple(names))
