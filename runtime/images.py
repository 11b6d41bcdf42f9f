"""Streaming image folders: `imagefolder:DIR` read on demand by worker processes.

Only the file index (paths and labels) is held in memory. Images are decoded, transformed and
batched by N worker processes (started with forkserver, or spawn where there is none), which
write each batch into one slot of a ring of shared-memory batch buffers; the main process
receives the slot's number only, so no pixel array is pickled. A bounded number of batches is
prepared ahead (`workers + PREFETCH` slots), which bounds memory whatever the folder's size.

Layouts accepted by `imagefolder:DIR`:
- DIR/<class>/**/<image>: one subfolder per class, class index = position in sorted names;
- DIR/train/<class>/... with DIR/val/<class>/... (or DIR/test/...) as the evaluation split;
- DIR/LIST.txt: lines `relative/path label` (paths relative to the list's folder); a sibling
  val.txt (or test.txt) next to a train.txt is the evaluation split.
Without an evaluation split the images are split 80/20 as data.stratified_split does.

Determinism: the order of epoch e is a permutation drawn from default_rng([seed, e]); the
transform of sample i in epoch e draws from default_rng([seed, e, i]). Nothing depends on which
worker prepares a batch or how many there are, and a run resumed at batch b starts there
without touching the earlier ones.

Bad images: CMYK, palette, alpha, 16-bit and greyscale files are converted to the network's
mode (RGB or L; 16-bit values scaled by 1/257). Files that cannot be decoded (truncated, empty,
not an image, a decompression bomb past Pillow's MAX_IMAGE_PIXELS) are an error under
`on_bad_image error`; under `skip` (the default) sample i is replaced by the next readable
sample in index order (i+1, i+2, ..., wrapping), transformed with sample i's generator, so the
step count and every other sample stay as they were. Each bad path is reported once and counted.
"""

from __future__ import annotations

import math
import os
import queue
import secrets
import signal
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from cnnc.dsl.errors import CnncError

PREFETCH = 2  # batch slots beyond one per worker: how far the workers may run ahead
STALL_SECONDS = 300.0  # no batch from any worker for this long ends the run (a hung decoder)
POLL_SECONDS = 0.5
SHM_PREFIX = "cnnc-ring-"  # then the creating process's id
LIST_SPLITS = ("val.txt", "test.txt")
FOLDER_SPLITS = ("val", "test")
SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def default_workers() -> int:
    """One worker per core but one (the main process trains), at least one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores - 1, 32))


# ---------------------------------------------------------------------------------------------
# The index


@dataclass
class ImageIndex:
    """The files of one split: paths relative to `root`, and their labels."""

    root: str
    paths: list[str] = field(repr=False)
    labels: np.ndarray = field(repr=False)
    src: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def subset(self, idx: np.ndarray) -> "ImageIndex":
        return ImageIndex(self.root, [self.paths[i] for i in idx], self.labels[idx], self.src)


def _image_suffixes() -> set[str]:
    from .data import IMAGE_SUFFIXES
    return IMAGE_SUFFIXES


def _class_folders(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _walk_images(folder: Path) -> list[str]:
    """Image files under `folder`, recursively, relative to it, in sorted order."""
    suffixes = _image_suffixes()
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, folder)
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in suffixes:
                found.append(name if rel == "." else os.path.join(rel, name))
    return found


def _folder_index(root: Path, names: list[str]) -> ImageIndex:
    paths, labels = [], []
    for c, name in enumerate(names):
        if not (root / name).is_dir():
            continue
        files = _walk_images(root / name)
        paths += [os.path.join(name, f) for f in files]
        labels += [c] * len(files)
    extra = [n for n in _class_folders(root) if n not in names]
    if extra:
        raise CnncError(f"class folder {root / extra[0]} has no counterpart in the training split",
                        hint=f"the classes are: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}")
    if not paths:
        raise CnncError(f"{root} holds no images (looked for {', '.join(sorted(_image_suffixes()))} files "
                        "in its class subfolders)")
    return ImageIndex(str(root), paths, np.array(labels, np.int64), str(root))


def _list_index(path: Path) -> ImageIndex:
    paths, labels = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CnncError(f"cannot read the file list {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        rel, _, label = text.rpartition(" ")
        if not rel.strip() or not label.isdigit():
            raise CnncError(f"{path}:{n}: expected `relative/path label` (a path, a space, a class number), "
                            f"got `{text[:80]}`")
        paths.append(rel.strip())
        labels.append(int(label))
    if not paths:
        raise CnncError(f"the file list {path} names no images")
    return ImageIndex(str(path.parent), paths, np.array(labels, np.int64), str(path))


@dataclass
class ImageSplits:
    train: ImageIndex
    test: ImageIndex
    classes: int
    class_names: tuple[str, ...] | None


def index_images(path: Path, seed: int = 0) -> ImageSplits:
    """The train and evaluation index of `imagefolder:PATH` (see the module docstring)."""
    from .data import TEST_FRACTION, stratified_split

    names: list[str] | None = None
    test = None
    if path.is_file():
        train = _list_index(path)
        if path.name == "train.txt":
            for other in LIST_SPLITS:
                if (path.parent / other).is_file():
                    test = _list_index(path.parent / other)
                    break
    else:
        root = path / "train" if (path / "train").is_dir() else path
        names = _class_folders(root)
        if not names:
            raise CnncError(f"{root} has no class subfolders",
                            hint="imagefolder:DIR needs one subfolder of images per class (DIR/cat/*.jpg, "
                                 "DIR/dog/*.jpg), optionally under DIR/train and DIR/val, or a file list "
                                 "imagefolder:DIR/train.txt of `path label` lines")
        train = _folder_index(root, names)
        if root != path:
            for other in FOLDER_SPLITS:
                if (path / other).is_dir():
                    test = _folder_index(path / other, names)
                    break
    if test is None:
        tr, te = stratified_split(train.labels, TEST_FRACTION, seed)
        if len(tr) == 0 or len(te) == 0:
            raise CnncError(f"{train.src} has too few images ({len(train)}) for an 80/20 train/test split",
                            hint="add more images or give a separate val split")
        train, test = train.subset(tr), train.subset(te)
    classes = len(names) if names else int(max(train.labels.max(), test.labels.max())) + 1
    return ImageSplits(train, test, classes, tuple(names) if names else None)


# ---------------------------------------------------------------------------------------------
# Decoding one image


class BadImage(Exception):
    """A file that cannot be used as an image; str() is the reason."""


def open_image(path: str, mode: str, draft_size: tuple[int, int] | None = None):
    """The image at `path` decoded and converted to `mode` ("RGB" or "L"); BadImage when it cannot
    be. JPEGs are decoded at a reduced DCT scale when `draft_size` says the target is smaller."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Between MAX_IMAGE_PIXELS and twice that Pillow only warns; a data set has no use for either.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if draft_size is not None and im.format == "JPEG":
                    im.draft(None, tuple(int(v) for v in draft_size))
                im.load()
                return _convert(im, mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"too large to decode ({str(e).split(', could be')[0]}; a decompression bomb?)") from None
    except UnidentifiedImageError:
        size = _size(path)
        raise BadImage("an empty file (0 bytes)" if size == 0 else "not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise BadImage(f"cannot be decoded ({e})") from None


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _convert(im, mode: str):
    """CMYK, palette, alpha, 16-bit and float images to RGB or L."""
    from PIL import Image

    if im.mode in SIXTEEN_BIT or im.mode == "F":
        a = np.asarray(im)
        if im.mode != "F" and (im.mode != "I" or a.max(initial=0) > 255):
            a = a.astype(np.float64) / 257.0  # 0..65535 onto 0..255
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode == mode:
        return im.copy() if im.readonly else im
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") and mode == "RGB":
        return im.convert("RGBA").convert("RGB")
    return im.convert(mode)


# ---------------------------------------------------------------------------------------------
# Preparing batches (the same code in the workers and, with 0 workers, in the main process)


@dataclass
class Split:
    """What a worker needs to prepare samples of one split. The transform travels as the settings
    it is built from (a TrainConfig, the input shape, train or not) and is built where it is used."""

    index: ImageIndex
    config: object
    input_shape: tuple[int, int, int]
    train: bool
    mode: str  # "RGB" or "L"
    seed: int
    on_bad_image: str  # "skip" or "error"
    built: object = field(default=None, repr=False)  # the ImageTransform (runtime/transforms.py)

    @property
    def transform(self):
        if self.built is None:
            self.built = transforms_for(self.config, self.input_shape, self.train)
        return self.built

    def __getstate__(self):
        return {**self.__dict__, "built": None}


def fill_batch(split: Split, epoch: int, samples: np.ndarray, x: np.ndarray, y: np.ndarray) -> list[tuple[str, str]]:
    """Write samples (indices into the split) into x[:n], y[:n]; the bad files met, (path, reason)."""
    bad: list[tuple[str, str]] = []
    draft = getattr(split.transform, "draft_size", None)
    n = len(split.index)
    for row, i in enumerate(samples):
        i = int(i)
        rng = np.random.default_rng([split.seed, epoch, i])
        for k in range(n):
            j = (i + k) % n
            path = split.index.path(j)
            try:
                img = open_image(path, split.mode, draft)
            except BadImage as e:
                if split.on_bad_image == "error":
                    raise CnncError(f"bad image {path}: {e}",
                                    hint="remove or replace the file, or set `on_bad_image skip` in the "
                                         "train: section to skip such files (each one is reported)") from None
                bad.append((path, str(e)))
                continue
            x[row] = split.transform(img, rng)
            y[row] = split.index.labels[j]
            break
        else:
            raise CnncError(f"no image in {split.index.src} can be read ({len(bad)} tried)")
    return bad


def _worker(wid: int, shm_name: str, slot_floats: int, batch: int, splits: dict, tasks, results) -> None:
    """A worker process: take (slot, split, epoch, batch number, samples), fill the slot, report."""
    from multiprocessing import shared_memory

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    shm = shared_memory.SharedMemory(name=shm_name)
    try:
        while True:
            task = tasks.get()
            if task is None:
                break
            slot, name, epoch, b, samples = task
            split = splits[name]
            x, y = _slot_views(shm.buf, slot, slot_floats, batch, split.transform.out_shape)
            try:
                bad = fill_batch(split, epoch, samples, x, y)
            except CnncError as e:
                results.put(("error", wid, b, e.message, e.hint))
                continue
            except Exception as e:  # a bug in a transform: say where, the main process raises it
                results.put(("error", wid, b, f"image worker {wid} failed on batch {b + 1}: "
                                              f"{type(e).__name__}: {e}", None))
                continue
            del x, y
            results.put(("ok", slot, b, len(samples), bad))
    finally:
        import resource
        results.put(("exit", wid, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 0, None))
        shm.close()


def _slot_views(buf, slot: int, slot_floats: int, batch: int, out_shape) -> tuple[np.ndarray, np.ndarray]:
    """The x and y arrays of one slot: slot_floats float32 values for images (as many whole images
    of out_shape as fit), then batch int64 labels."""
    slot_bytes = slot_floats * 4 + batch * 8
    base = slot * slot_bytes
    x = np.ndarray((slot_floats // math.prod(out_shape), *out_shape), np.float32, buf, base)
    y = np.ndarray((batch,), np.int64, buf, base + slot_floats * 4)
    return x, y


# ---------------------------------------------------------------------------------------------
# The worker pool


def _context():
    import multiprocessing as mp
    methods = mp.get_all_start_methods()
    if "forkserver" in methods:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["cnnc.runtime.images"])
        return ctx
    return mp.get_context("spawn")


class ImagePool:
    """N worker processes and a ring of shared-memory batch slots, started on the first batch
    and shut down by close() (also at exit, and whenever an iteration ends by an exception)."""

    def __init__(self, splits: dict[str, Split], batch: int, workers: int,
                 on_bad: Callable[[str, str], None] | None = None, stall_seconds: float = STALL_SECONDS):
        self.splits, self.batch, self.workers = splits, int(batch), int(workers)
        per = {name: math.prod(s.transform.out_shape) for name, s in splits.items()}
        # A slot holds a training batch; a split with larger samples (the ten crops of evaluation)
        # is read in batches of as many samples as fit, so the ring is not sized by it.
        self.slot_floats = max(self.batch * per.get("train", max(per.values())), max(per.values()))
        self.split_batch = {name: min(self.batch, self.slot_floats // p) for name, p in per.items()}
        self.slots = self.workers + PREFETCH if self.workers else 1
        self.bad: dict[str, str] = {}
        self.on_bad = on_bad
        self.stall_seconds = stall_seconds
        self.worker_peaks: dict[int, int] = {}  # worker → peak resident bytes, reported as it exits
        self.wait_seconds = 0.0  # time the main process spent waiting for batches (preparing them, with 0 workers)
        self._live = None  # (shm, procs, tasks, results, finalizer) while started
        self._local = None  # the one slot of a 0-worker pool

    @property
    def ring_bytes(self) -> int:
        return self.slots * (self.slot_floats * 4 + self.batch * 8)

    # ---- lifetime
    def _start(self) -> None:
        from multiprocessing import shared_memory
        ctx = _context()
        # Named after this process, so that a segment in /dev/shm says whose it is.
        shm = shared_memory.SharedMemory(name=f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(6)}", create=True,
                                         size=max(self.ring_bytes, 1))
        tasks, results = ctx.Queue(), ctx.Queue()
        procs = []
        try:
            for wid in range(self.workers):
                p = ctx.Process(target=_worker, name=f"cnnc-image-worker-{wid}", daemon=True,
                                args=(wid, shm.name, self.slot_floats, self.batch, self.splits, tasks, results))
                p.start()
                procs.append(p)
        except BaseException:
            _shutdown(shm, procs, tasks, results, {}, wait=0.0)
            raise
        finalizer = weakref.finalize(self, _shutdown, shm, procs, tasks, results, {}, 2.0)
        self._live = (shm, procs, tasks, results, finalizer)

    def close(self, wait: float = 5.0) -> None:
        """Stop the workers (each told to exit, then terminated if it has not), free the ring."""
        live, self._live = self._live, None
        if live is not None:
            shm, procs, tasks, results, finalizer = live
            finalizer.detach()
            _shutdown(shm, procs, tasks, results, self.worker_peaks, wait)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- batches
    def batches(self, name: str, epoch: int, *, shuffle: bool, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(x, y) batches of split `name` in epoch `epoch`, from batch `start` on. Each batch is a
        view of a ring slot, valid until the next one is asked for."""
        split = self.splits[name]
        n = len(split.index)
        order = np.random.default_rng([split.seed, epoch]).permutation(n) if shuffle else np.arange(n)
        size = self.split_batch[name]
        count = math.ceil(n / size)
        if self.workers == 0:
            yield from self._local_batches(split, epoch, order, start, count, size)
            return
        if self._live is None:
            self._start()
        shm, procs, tasks, results, _ = self._live
        free = list(range(self.slots))
        ready: dict[int, tuple[int, int]] = {}
        submitted = start
        finished = False
        try:
            for b in range(start, count):
                while free and submitted < count:
                    tasks.put((free.pop(), name, epoch, submitted, order[submitted * size:(submitted + 1) * size]))
                    submitted += 1
                t0 = time.perf_counter()
                while b not in ready:
                    self._receive(results, procs, ready, b)
                self.wait_seconds += time.perf_counter() - t0
                slot, k = ready.pop(b)
                x, y = _slot_views(shm.buf, slot, self.slot_floats, self.batch, split.transform.out_shape)
                yield x[:k], y[:k]
                del x, y
                free.append(slot)
            finished = True
        finally:
            if not finished:  # an exception, Ctrl-C or an abandoned iteration: tasks are in flight
                self.close(wait=1.0)

    def _receive(self, results, procs, ready: dict, waiting_for: int) -> None:
        waited = 0.0
        while True:
            self._check_alive(procs, waiting_for)
            try:
                kind, a, b, c, d = results.get(timeout=POLL_SECONDS)
                break
            except queue.Empty:
                waited += POLL_SECONDS
                if waited >= self.stall_seconds:
                    raise CnncError(f"no batch from the {len(procs)} image worker(s) in {waited:.0f} s "
                                    f"(waiting for batch {waiting_for + 1})",
                                    hint="a file that hangs the decoder, or a stalled disk or network mount")
        if kind == "error":
            raise CnncError(c, hint=d)
        if kind == "exit":  # only sent when told to stop; here it means a worker ended early
            raise CnncError(f"image worker {a} stopped unexpectedly while batch {waiting_for + 1} was being prepared")
        for path, reason in d:
            self._note_bad(path, reason)
        ready[b] = (a, c)

    @staticmethod
    def _check_alive(procs, waiting_for: int) -> None:
        """A worker that died (killed for memory, a crash in a decoder) ends the run, named."""
        for i, p in enumerate(procs):
            if p.exitcode is not None:
                how = (f"was killed by signal {signal.Signals(-p.exitcode).name}" if p.exitcode < 0
                       else f"exited with code {p.exitcode}")
                raise CnncError(f"image worker {i} (pid {p.pid}) {how} while batch {waiting_for + 1} was "
                                "being prepared", hint="out of memory? try fewer --workers or a smaller batch")

    def _local_batches(self, split: Split, epoch: int, order, start: int, count: int, size: int):
        if self._local is None:
            self._local = bytearray(max(self.ring_bytes, 1))
        for b in range(start, count):
            samples = order[b * size:(b + 1) * size]
            x, y = _slot_views(memoryview(self._local), 0, self.slot_floats, self.batch, split.transform.out_shape)
            t0 = time.perf_counter()
            for path, reason in fill_batch(split, epoch, samples, x, y):
                self._note_bad(path, reason)
            self.wait_seconds += time.perf_counter() - t0
            yield x[:len(samples)], y[:len(samples)]

    def _note_bad(self, path: str, reason: str) -> None:
        if path not in self.bad:
            self.bad[path] = reason
            if self.on_bad is not None:
                self.on_bad(path, reason)


def _shutdown(shm, procs, tasks, results, peaks: dict, wait: float) -> None:
    """Tell every worker to stop, terminate those that do not within `wait` s, free the ring."""
    for p in procs:
        if p.is_alive():
            try:
                tasks.put(None)
            except (OSError, ValueError):
                pass
    deadline = time.monotonic() + wait
    alive = [p for p in procs]
    while alive and time.monotonic() < deadline:
        try:
            kind, a, b, _, _ = results.get(timeout=0.05)
            if kind == "exit":
                peaks[a] = b
        except (queue.Empty, OSError, ValueError, EOFError):
            pass
        alive = [p for p in alive if p.exitcode is None]
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    for p in procs:
        p.join(timeout=2.0)
        if p.exitcode is None:
            p.kill()
            p.join(timeout=2.0)
    for q in (tasks, results):
        try:
            q.cancel_join_thread()
            q.close()
        except (OSError, ValueError):
            pass
    try:
        shm.close()
    except BufferError:  # a batch view is still referenced; the mapping goes with it
        pass
    try:
        shm.unlink()
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------
# The data set the trainer and evaluation read


@dataclass
class StreamedDataset:
    """A `imagefolder:` data set: an index per split and the pool that prepares their batches."""

    name: str
    classes: int
    image_shape: tuple[int, int, int]
    train: ImageIndex = field(repr=False)
    test: ImageIndex = field(repr=False)
    pool: ImagePool = field(repr=False)
    class_names: tuple[str, ...] | None = None
    config: object = None  # the run's TrainConfig with the measured statistics filled in
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    streamed = True

    @property
    def train_y(self) -> np.ndarray:
        return self.train.labels

    @property
    def test_y(self) -> np.ndarray:
        return self.test.labels

    @property
    def bad_images(self) -> dict[str, str]:
        return self.pool.bad

    def train_batches(self, epoch: int, start: int = 0):
        return self.pool.batches("train", epoch, shuffle=True, start=start)

    def test_batches(self):
        return self.pool.batches("test", 0, shuffle=False)

    def close(self) -> None:
        self.pool.close()


def transforms_for(config, input_shape: tuple[int, int, int], train: bool):
    """The transform the `train:` section declares (runtime/transforms.py)."""
    from .transforms import build_pipeline
    return build_pipeline(config, input_shape, train)


def with_statistics(config, index: ImageIndex, mode: str, input_shape: tuple[int, int, int]):
    """The config with the statistics its transforms measure (normalisation mean and std, PCA
    eigenvectors) filled in from up to `stats_images` training images spread evenly over the
    index; unchanged when it gives them or needs none. Unreadable files are left out here (and
    reported when training meets them)."""
    from .transforms import measure_statistics, needs_measuring

    if not needs_measuring(config):
        return config
    n = len(index)
    picks = np.unique(np.linspace(0, n - 1, min(int(config.stats_images), n)).round().astype(np.int64))

    def sample():
        for i in picks:
            try:
                yield open_image(index.path(int(i)), mode)
            except BadImage:
                continue
    return measure_statistics(sample(), config, input_shape)


def load_streamed(spec: str, path: Path, input_shape: tuple, classes: int | None, config,
                  workers: int | None = None, batch: int | None = None) -> StreamedDataset:
    """The `imagefolder:` data set for a network taking `input_shape` (C, H, W) images."""
    want = tuple(int(d) for d in input_shape)[-3:]
    if want[0] not in (1, 3):
        raise CnncError(f"data `{spec}` gives 1-channel (greyscale) or 3-channel (RGB) images, but the "
                        f"network's input has {want[0]} channels")
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise CnncError(f"reading the images of `{spec}` needs Pillow, which is not installed",
                        hint="pip install 'cnnc[images]'") from None
    splits = index_images(path, getattr(config, "seed", 0))
    if classes is not None and splits.classes > classes:
        raise CnncError(f"data `{spec}` has {splits.classes} classes but the network has only {classes} outputs",
                        hint=f"set `classes {splits.classes}` in the network or use fewer classes of data")
    mode = "L" if want[0] == 1 else "RGB"
    config = with_statistics(config, splits.train, mode, want)
    seed, on_bad = config.seed, config.on_bad_image
    parts = {}
    for name, index, train in (("train", splits.train, True), ("test", splits.test, False)):
        part = Split(index, config, want, train, mode, seed, on_bad)
        if tuple(part.transform.out_shape)[-3:] != want:
            raise CnncError(f"the {name} transforms of `{spec}` give {tuple(part.transform.out_shape)} images, but "
                            f"the network takes {want}", hint="make the final crop size the network's input size")
        parts[name] = part
    if workers is None:
        workers = getattr(config, "workers", None)
    workers = default_workers() if workers is None else int(workers)
    if workers < 0:
        raise CnncError(f"--workers takes 0 or more processes, got {workers}")
    pool = ImagePool(parts, batch or config.batch, workers)
    return StreamedDataset(spec, splits.classes, want, splits.train, splits.test, pool, splits.class_names,
                           config=config)
