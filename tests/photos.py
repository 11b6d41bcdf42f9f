"""Real photos for image-pipeline tests, and broken image files.

The photos are the ones that ship inside installed wheels, none fetched: scikit-learn's
china.jpg and flower.jpg (`sklearn.datasets.load_sample_images`) and scikit-image's bundled
astronaut, coffee and chelsea. `photo_folder` re-encodes them, cropped and resized, into an
ImageFolder tree (one subfolder per class, class c made from photo c) of varied sizes and
formats; the `write_*` functions make the broken and unusual files a real collection holds.
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

PHOTO_NAMES = ("china", "flower", "astronaut", "coffee", "chelsea")
FORMATS = ("JPEG", "PNG", "WEBP")
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}


@lru_cache(maxsize=None)
def photos() -> dict[str, np.ndarray]:
    """The bundled photos as uint8 (H, W, 3) arrays, by name."""
    datasets = pytest.importorskip("sklearn.datasets")
    skdata = pytest.importorskip("skimage.data")
    bunch = datasets.load_sample_images()
    found = {Path(f).stem: img for f, img in zip(bunch.filenames, bunch.images)}
    for name in ("astronaut", "coffee", "chelsea"):
        found[name] = getattr(skdata, name)()
    return {name: np.ascontiguousarray(found[name][..., :3]) for name in PHOTO_NAMES}


def photo_folder(root: Path, per_class: int = 6, classes: int = 3, seed: int = 0,
                 max_side: int = 160, formats=FORMATS) -> list[tuple[Path, int]]:
    """root/<class>/<i>.<ext>: class c holds random crops of photo c, resized to random sizes
    (aspect ratios from 1:2 to 2:1, long side up to `max_side`), in rotating formats.
    Returns (path, class index) in the order written."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pics = photos()
    written = []
    for c in range(classes):
        src = pics[PHOTO_NAMES[c % len(PHOTO_NAMES)]]
        folder = Path(root) / f"{c:02d}_{PHOTO_NAMES[c % len(PHOTO_NAMES)]}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = src.shape[:2]
        for i in range(per_class):
            ch, cw = int(rng.integers(h // 2, h + 1)), int(rng.integers(w // 2, w + 1))
            y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            crop = Image.fromarray(src[y0:y0 + ch, x0:x0 + cw])
            long = int(rng.integers(max_side // 2, max_side + 1))
            aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
            size = (long, max(8, int(long / aspect))) if aspect >= 1 else (max(8, int(long * aspect)), long)
            fmt = formats[(c + i) % len(formats)]
            path = folder / f"{i:04d}{SUFFIX[fmt]}"
            crop.resize(size, Image.BILINEAR).save(path, fmt, quality=90)
            written.append((path, c))
    return written


def jpeg_bytes(shape=(48, 64), seed=0) -> bytes:
    from PIL import Image

    img = photos()["coffee"][: shape[0] * 4: 4, : shape[1] * 4: 4]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_truncated_jpeg(path: Path) -> Path:
    """A JPEG cut off in the middle of its scan data: the header reads, decoding fails."""
    data = jpeg_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    return Path(path)


def write_zero_bytes(path: Path) -> Path:
    Path(path).write_bytes(b"")
    return Path(path)


def write_bomb_png(path: Path, side: int = 30000) -> Path:
    """A 1-bit PNG whose header claims side×side pixels (900 M by default, past Pillow's
    decompression-bomb limit) while the file is a few hundred bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (side // 8 + 1) * 4)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return Path(path)


def write_mode(path: Path, mode: str, fmt: str = "PNG", shape=(40, 56)) -> Path:
    """A photo crop saved in an unusual mode: CMYK (JPEG), I;16 (16-bit PNG), P (palette),
    RGBA / LA (alpha), L (greyscale)."""
    from PIL import Image

    rgb = Image.fromarray(np.ascontiguousarray(photos()["chelsea"][: shape[0] * 4: 4, : shape[1] * 4: 4]))
    if mode == "I;16":
        arr = np.asarray(rgb.convert("L")).astype(np.uint16) * 257
        img = Image.fromarray(arr)  # Pillow gives uint16 arrays mode I;16
    elif mode == "P":
        img = rgb.convert("P", palette=Image.ADAPTIVE, colors=32)
    else:
        img = rgb.convert(mode)
    img.save(path, fmt)
    return Path(path)

