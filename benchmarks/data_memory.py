"""Peak resident memory of a training run over a streamed image folder, at two folder sizes.

    python benchmarks/data_memory.py [--sizes 2000 8000] [--workers 2] [--keep DIR]

For each size it writes a folder of JPEGs of ImageNet-like sizes (long side up to 500 px, made
from the real photos tests/photos.py takes from the scikit-learn and scikit-image wheels), then
trains a small network on `imagefolder:` data for one epoch in a fresh process and prints the
peak RSS of the main process and of each worker (getrusage ru_maxrss, so shared-memory pages a
process touched count in its own figure). With streaming, the peaks stay the same whatever the
folder's size: only the file index grows (about 100 bytes per image).

The transforms: the short side resized to 72 (JPEGs decoded at a reduced DCT scale by draft()),
a random 64x64 crop, mirrored half the time, normalised with ImageNet's mean and std.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

NET = """\
network memnet
input 3x64x64
classes 5
layers:
    conv 8 4x4 stride=2 pad=1 -> relu -> maxpool 2x2
    conv 16 3x3 pad=1 -> relu -> gap -> dense classes
train:
    optimizer momentum momentum=0.9
    lr 0.01
    batch 64
    epochs 1
    resize 72
    crop 64 random
    flip
    normalize imagenet
"""


def make_folder(root: Path, n: int) -> None:
    import photos
    if (root / "done").exists():
        return
    photos.photo_folder(root, per_class=n // 5, classes=5, max_side=500, formats=("JPEG",))
    (root / "done").write_text(str(n))


def one_run(folder: Path, workers: int, epochs: int = 1) -> dict:
    """Train one epoch here (called in a fresh process) and return the peaks."""
    from cnnc.runtime import api
    with tempfile.TemporaryDirectory() as tmp:
        net = Path(tmp) / "memnet.cnn"
        net.write_text(NET.replace("epochs 1", f"epochs {epochs}"))
        t0 = time.perf_counter()
        trainer, _ = api.prepare(net, data=f"imagefolder:{folder}", run_dir=Path(tmp) / "run", progress=False,
                                 workers=workers)
        result = api.run(trainer)
        seconds = time.perf_counter() - t0
        pool = trainer.data.pool
        return {"images": len(trainer.data.train_y) + len(trainer.data.test_y), "seconds": round(seconds, 1),
                "main_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "worker_peaks_mib": [pool.worker_peaks[w] / 2**20 for w in sorted(pool.worker_peaks)],
                "ring_mib": pool.ring_bytes / 2**20, "bad_images": result.bad_images,
                "data_wait_s": round(pool.wait_seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1, help="epochs per run (more batches at the same folder size)")
    ap.add_argument("--keep", type=Path, help="write the folders here and reuse them (default: a temporary folder)")
    ap.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # internal: one run in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one, args.workers, args.epochs)))
        return
    base = args.keep or Path(tempfile.mkdtemp(prefix="cnnc-mem-"))
    rows = []
    for n in args.sizes:
        folder = base / f"jpeg{n}"
        t0 = time.perf_counter()
        make_folder(folder, n)
        made = time.perf_counter() - t0
        out = subprocess.run([sys.executable, __file__, "--one", str(folder), "--workers", str(args.workers),
                              "--epochs", str(args.epochs)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        total = row["main_peak_mib"] + sum(row["worker_peaks_mib"])
        print(f"{row['images']:>6} images (written in {made:.0f} s), {args.workers} workers, {args.epochs} epoch(s) in "
              f"{row['seconds']} s: main peak {row['main_peak_mib']:.0f} MiB, workers "
              f"{', '.join(f'{p:.0f}' for p in row['worker_peaks_mib'])} MiB, total {total:.0f} MiB "
              f"(ring {row['ring_mib']:.1f} MiB); waited {row['data_wait_s']} s for data", flush=True)
    if len(rows) > 1:
        totals = [r["main_peak_mib"] + sum(r["worker_peaks_mib"]) for r in rows]
        print(f"growth from {rows[0]['images']} to {rows[-1]['images']} images: {totals[-1] - totals[0]:+.1f} MiB")


if __name__ == "__main__":
    main()
