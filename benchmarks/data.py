"""Images per second of our streamed `imagefolder:` pipeline against torchvision's ImageFolder +
DataLoader, with the same transforms and worker count, and the share of a ResNet-18 CPU training
step spent waiting for data.

Needs, in one Python environment: cnnc (with numpy, lark, networkx, pydantic, Pillow), torch,
torchvision, scikit-learn and scikit-image (their bundled photos are the source images). torch
and torchvision are not dependencies of cnnc; install cnnc into an environment that has them:

    pip install --no-deps -e . && pip install lark networkx pydantic pillow scikit-learn scikit-image
    python benchmarks/data.py --dir /tmp/imagenet_like [--images 2000] [--workers 2] [--batch 64]

The folder (made once, cached in --dir): `--images` JPEGs (quality 90) in 5 classes, random crops
of the photos in the scikit-learn and scikit-image wheels resized to ImageNet-like sizes (long
side 400 to 500, aspect 4:3 or 3:4 give or take 10%, about 500x375 on average).

Two recipes, each read once over the whole folder by both pipelines, batches of --batch:
- rrc: RandomResizedCrop 224 + horizontal flip + ToTensor + Normalize(ImageNet mean/std);
- alexnet: Resize(256) + RandomCrop 224 + flip + ToTensor + PCA lighting 0.1 (ImageNet
  eigenvectors; torchvision has no op for it, so `Lighting` below is fb.resnet.torch's as a tensor
  transform) + Normalize.
Ours is timed from the first request to the last batch (worker start-up included, as the
DataLoader's is). Each side delivers float32 NCHW batches with labels.

Then ResNet-18 (examples/resnet18.cnn) is trained for one epoch on --resnet-images of the folder
with the rrc recipe on the NumPy CPU backend, and the time the training loop spent waiting for
batches (the pool's wait_seconds) is printed as a share of the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLASSES = 5


def bundled_photos() -> list[np.ndarray]:
    """scikit-learn's china and flower and scikit-image's astronaut, coffee and chelsea, uint8 HxWx3."""
    from sklearn.datasets import load_sample_images
    import skimage.data
    return [np.ascontiguousarray(a[..., :3]) for a in
            [*load_sample_images().images, skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]]


def make_folder(root: Path, n: int, seed: int = 0) -> None:
    """root/<class>/<i>.jpg, n images in all, unless root already holds them."""
    from PIL import Image
    mark = root / f"done-{n}"
    if mark.exists():
        return
    rng = np.random.default_rng(seed)
    pics = bundled_photos()
    for i in range(n):
        c = i % CLASSES
        src = pics[c]
        h, w = src.shape[:2]
        ch, cw = int(rng.integers(h // 2, h + 1)), int(rng.integers(w // 2, w + 1))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        long = int(rng.integers(400, 501))
        aspect = (4 / 3 if rng.random() < 0.75 else 3 / 4) * float(rng.uniform(0.9, 1.1))
        size = (long, int(long / aspect)) if aspect >= 1 else (int(long * aspect), long)
        folder = root / f"{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(src[y0:y0 + ch, x0:x0 + cw]).resize(size, Image.BILINEAR).save(
            folder / f"{i:05d}.jpg", "JPEG", quality=90)
    mark.write_text(str(n))


def config(recipe: str, batch: int, workers: int):
    from cnnc.compiler.train_config import TrainConfig
    if recipe == "rrc":
        return TrainConfig(batch=batch, workers=workers, random_resized_crop=224, flip=True,
                           normalize=True, mean=MEAN, std=STD)
    return TrainConfig(batch=batch, workers=workers, resize=256, crop_size=224, crop_mode="random", flip=True,
                       lighting=0.1, eigen="imagenet", normalize=True, mean=MEAN, std=STD)


def ours(root: Path, recipe: str, batch: int, workers: int) -> tuple[float, int]:
    """(images/s, images) of our pool over every image of root, training transforms."""
    from cnnc.runtime import images
    index = images._folder_index(root, images._class_folders(root))  # every file, no held-out split
    cfg = config(recipe, batch, workers)
    part = images.Split(index, cfg, (3, 224, 224), True, "RGB", cfg.seed, "skip")
    pool = images.ImagePool({"train": part}, batch, workers)
    n = 0
    t0 = time.perf_counter()
    try:
        for x, y in pool.batches("train", 0, shuffle=True):
            assert x.shape[1:] == (3, 224, 224) and x.dtype == np.float32
            n += len(y)
    finally:
        seconds = time.perf_counter() - t0
        pool.close()
    return n / seconds, n


class Lighting:
    """AlexNet's PCA colour noise on a [0, 1] CHW tensor (fb.resnet.torch's Lighting): every pixel
    += eigvec @ (alpha * eigval), alpha ~ N(0, std) per component."""

    def __init__(self, std: float):
        import torch
        from cnnc.runtime.transforms import IMAGENET_EIGVAL, IMAGENET_EIGVEC
        self.std = std
        self.eigval = torch.tensor(IMAGENET_EIGVAL)
        self.eigvec = torch.tensor(IMAGENET_EIGVEC)

    def __call__(self, img):
        import torch
        alpha = torch.randn(3) * self.std
        return img + (self.eigvec @ (alpha * self.eigval)).view(3, 1, 1)


def torchvision_rate(root: Path, recipe: str, batch: int, workers: int) -> tuple[float, int]:
    import torch
    from torchvision import datasets, transforms as T
    if recipe == "rrc":
        steps = [T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]
    else:
        steps = [T.Resize(256), T.RandomCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), Lighting(0.1),
                 T.Normalize(MEAN, STD)]
    data = datasets.ImageFolder(str(root), T.Compose(steps))
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers)
    n = 0
    t0 = time.perf_counter()
    for x, y in loader:
        assert tuple(x.shape[1:]) == (3, 224, 224) and x.dtype == torch.float32
        n += len(y)
    return n / (time.perf_counter() - t0), n


def subset(root: Path, out: Path, n: int) -> Path:
    """out/<class>/: symbolic links to the first n / CLASSES images of each class of root."""
    for c in sorted(p for p in root.iterdir() if p.is_dir()):
        (out / c.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(c.iterdir())[: n // CLASSES]:
            link = out / c.name / f.name
            if not link.exists():
                link.symlink_to(f)
    return out


def resnet18_wait(root: Path, n: int, batch: int, workers: int) -> dict:
    from cnnc.runtime import api
    with tempfile.TemporaryDirectory() as tmp:
        data = subset(root, Path(tmp) / "data", n)
        net = Path(tmp) / "resnet18.cnn"
        net.write_text((REPO / "examples" / "resnet18.cnn").read_text() + f"""
train:
    optimizer sgd momentum=0.9 weight_decay=1e-4
    lr 0.01
    batch {batch}
    epochs 1
    random_resized_crop 224
    flip
    normalize imagenet
""")
        t0 = time.perf_counter()
        trainer, _ = api.prepare(net, data=f"imagefolder:{data}", run_dir=Path(tmp) / "run", progress=False,
                                 workers=workers)
        api.run(trainer)
        seconds = time.perf_counter() - t0
        wait = trainer.data.pool.wait_seconds
        return {"images": len(trainer.data.train_y) + len(trainer.data.test_y), "seconds": seconds,
                "wait": wait, "share": wait / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="where the generated JPEG folder is kept")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--resnet-images", type=int, default=160, help="images of the ResNet-18 run (0: skip it)")
    ap.add_argument("--resnet-batch", type=int, default=32)
    args = ap.parse_args()
    import torch
    import torchvision
    torch.set_num_threads(1)  # the workers decode; the main process only collates
    make_folder(args.dir, args.images)
    print(f"folder {args.dir}: {args.images} JPEGs; {args.workers} workers each, batch {args.batch}; "
          f"{os.cpu_count()} cores, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    for recipe in ("rrc", "alexnet"):
        ours_rate, n1 = ours(args.dir, recipe, args.batch, args.workers)
        tv_rate, n2 = torchvision_rate(args.dir, recipe, args.batch, args.workers)
        print(f"{recipe:8s} cnnc {ours_rate:7.1f} images/s ({n1} images)   torchvision {tv_rate:7.1f} images/s "
              f"({n2} images)   ratio {ours_rate / tv_rate:.2f}x", flush=True)
    if args.resnet_images:
        torch.set_num_threads(os.cpu_count() or 1)
        r = resnet18_wait(args.dir, args.resnet_images, args.resnet_batch, args.workers)
        print(f"resnet18 CPU training, {r['images']} images, batch {args.resnet_batch}, {args.workers} workers: "
              f"{r['seconds']:.1f} s, waiting for data {r['wait']:.2f} s = {100 * r['share']:.1f}% of the run")
    print(f"load average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
