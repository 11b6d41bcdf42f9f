"""Our image transforms (runtime/transforms.py) against torchvision's, on the photos that ship in
scikit-learn and scikit-image: the largest difference per transform, and the distribution of
RandomResizedCrop boxes.

torchvision is not a dependency of cnnc, so the two sides run in two Python environments: the
first writes our outputs and the random parameters drawn, the second (any environment with
torch, torchvision and Pillow) replays those parameters through torchvision and compares.

    python benchmarks/transforms_torchvision.py ours /tmp/ours.npz          # cnnc's venv
    /path/to/tv-env/bin/python benchmarks/transforms_torchvision.py torchvision /tmp/ours.npz

Compared: Resize(256) + CenterCrop(224) + ToTensor + Normalize; TenCrop(224) after Resize(256);
Resize((200, 300)); resized_crop with the box our RandomResizedCrop drew; RandomResizedCrop's
fallback box; ColorJitter(0.4, 0.4, 0.4, 0.1)'s adjustments in the order and with the factors we
drew. The photos are read from the files inside the installed wheels, so both sides see the same
pixels. PCA lighting has no torchvision counterpart (tests/runtime/test_transforms.py checks its formula).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

NAMES = {"china": ("sklearn", "datasets/images/china.jpg"), "flower": ("sklearn", "datasets/images/flower.jpg"),
         "astronaut": ("skimage", "data/astronaut.png"), "coffee": ("skimage", "data/coffee.png"),
         "camera": ("skimage", "data/camera.png")}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photos(site: Path | None = None) -> dict:
    import importlib.util
    from PIL import Image
    out = {}
    for name, (pkg, rel) in NAMES.items():
        root = site / pkg if site else Path(importlib.util.find_spec(pkg).submodule_search_locations[0])
        with Image.open(root / rel) as im:
            out[name] = im.convert("L" if im.mode == "L" else "RGB")
    return out


def ours(path: str) -> None:
    from cnnc.compiler.train_config import TrainConfig
    from cnnc.runtime import transforms as T
    out = {}
    for name, im in photos().items():
        c = 1 if im.mode == "L" else 3
        nm = dict(normalize=True, mean=MEAN, std=STD) if c == 3 else dict(normalize=True, mean=(0.5,), std=(0.25,))
        out[f"{name}/eval"] = T.build_pipeline(TrainConfig(resize=256, crop_size=224, **nm), (c, 224, 224), False)(im, None)
        out[f"{name}/ten"] = T.build_pipeline(TrainConfig(resize=256, crop_size=224, eval_crop="ten", **nm),
                                              (c, 224, 224), False)(im, None)
        out[f"{name}/resize_exact"] = T.build_pipeline(TrainConfig(resize=(200, 300), normalize=False),
                                                       (c, 200, 300), False)(im, None)
        out[f"{name}/rrc_box"] = np.array(T.rrc_params(im.width, im.height, (0.08, 1.0), (3 / 4, 4 / 3),
                                                       np.random.default_rng(1)))
        out[f"{name}/rrc"] = T.build_pipeline(TrainConfig(random_resized_crop=224, **nm), (c, 224, 224), True)(
            im, np.random.default_rng(1))
        out[f"{name}/fallback"] = np.array(T.rrc_params(im.width, im.height, (1.5, 2.0), (3 / 4, 4 / 3),
                                                        np.random.default_rng(0)))
        if c == 3:
            order, f = T.jitter_params(0.4, 0.4, 0.4, 0.1, np.random.default_rng(2))
            out[f"{name}/jit_order"], out[f"{name}/jit_f"] = order, np.array(f)
            out[f"{name}/jit"] = T.build_pipeline(
                TrainConfig(resize=64, crop_size=64, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                            normalize=False), (3, 64, 64), True)(im, np.random.default_rng(2))
    out["boxes"] = np.array([T.rrc_params(500, 375, (0.08, 1.0), (3 / 4, 4 / 3), np.random.default_rng(s))
                             for s in range(20000)])
    out["site"] = np.array(str(Path(np.__file__).parents[1]))
    np.savez(path, **out)
    print(f"wrote {len(out)} arrays to {path}")


def torchvision_side(path: str) -> None:
    import torch
    import torchvision
    from torchvision import transforms as TT
    from torchvision.transforms import functional as F
    from PIL import Image
    theirs = np.load(path)
    worst = {}

    def cmp(key, a):
        b = theirs[key]
        worst[key] = float(np.abs(np.asarray(a, np.float64) - b).max()) if np.shape(a) == b.shape else float("inf")

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    for name, im in photos(Path(str(theirs["site"]))).items():
        c = 1 if im.mode == "L" else 3
        mean, std = (MEAN, STD) if c == 3 else ((0.5,), (0.25,))
        norm = TT.Compose([TT.ToTensor(), TT.Normalize(mean, std)])
        cmp(f"{name}/eval", TT.Compose([TT.Resize(256), TT.CenterCrop(224), norm])(im).numpy())
        crops = TT.Compose([TT.Resize(256), TT.TenCrop(224)])(im)
        cmp(f"{name}/ten", torch.stack([norm(x) for x in crops]).numpy())
        cmp(f"{name}/resize_exact", TT.Compose([TT.Resize((200, 300)), TT.ToTensor()])(im).numpy())
        i, j, h, w = (int(v) for v in theirs[f"{name}/rrc_box"])
        cmp(f"{name}/rrc", norm(F.resized_crop(im, i, j, h, w, [224, 224])).numpy())
        cmp(f"{name}/fallback", np.array(TT.RandomResizedCrop.get_params(im, (1.5, 2.0), (3 / 4, 4 / 3))))
        if c == 3:
            x = TT.CenterCrop(64)(TT.Resize(64)(im))
            fns = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
            for k in theirs[f"{name}/jit_order"]:
                x = fns[k](x, float(theirs[f"{name}/jit_f"][k]))
            cmp(f"{name}/jit", TT.ToTensor()(x).numpy())
    for k, v in worst.items():
        print(f"{k:24s} max |ours - torchvision| = {v:.3g}")
    torch.manual_seed(0)
    img = Image.new("RGB", (500, 375))
    tv = np.array([TT.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(20000)])
    ob = theirs["boxes"]
    for what, a, b in (("area fraction", ob[:, 2] * ob[:, 3] / (500 * 375), tv[:, 2] * tv[:, 3] / (500 * 375)),
                       ("aspect w/h", ob[:, 3] / ob[:, 2], tv[:, 3] / tv[:, 2]),
                       ("top", ob[:, 0], tv[:, 0]), ("left", ob[:, 1], tv[:, 1])):
        print(f"RandomResizedCrop {what:13s} ours mean {a.mean():.4f} sd {a.std():.4f} | "
              f"torchvision mean {b.mean():.4f} sd {b.std():.4f} (20,000 boxes on 500x375)")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("ours", "torchvision"):
        sys.exit(__doc__)
    (ours if sys.argv[1] == "ours" else torchvision_side)(sys.argv[2])
