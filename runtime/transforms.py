"""Image transforms of the `train:` section: decoded PIL image in, float32 CHW array out.

`build_pipeline(config, input_shape, train)` turns the validated settings into an ImageTransform,
called as `transform(img, rng)` with an RGB or L PIL image and a numpy Generator that is the only
source of randomness (the data source seeds it from (seed, epoch, sample index)). The steps run
in one fixed order, as torchvision's usual pipelines do:

    resize → crop → flip → colour jitter → to float [0, 1] → PCA lighting → normalise

Training applies the random steps; evaluation resizes, takes the centre crop (or the ten crops of
`eval_crop ten`: the 4 corners and the centre, then the same of the mirrored image, torchvision's
TenCrop order) and normalises. Each step follows torchvision's definition for PIL images:

- `resize N`: the short side to N, the long one to int(N * long / short) (truncated), bilinear
  with Pillow's antialiasing; `resize HxW` to exactly that. An image already that size is kept.
- `crop S center`: torchvision's CenterCrop (offset round((H - S) / 2), Python's rounding; a
  smaller image is zero-padded around first); `crop S random`: offsets uniform over all
  positions (smaller images padded likewise); `crop P pad`: zero-pad P on every side, then a random
  crop of the network's input size (RandomCrop(size, padding=P)).
- `random_resized_crop S scale=(a, b) ratio=(r0, r1)`: RandomResizedCrop: up to 10 tries of an area
  fraction uniform in [a, b] and a log-uniform aspect ratio, kept when it fits; otherwise the
  central crop clamped to the ratio range; then the crop is resized to S×S bilinearly. For
  evaluation it becomes `resize` (when given, else round(S * 256 / 224)) and a centre crop of S.
- `flip`: mirror left-right with probability 1/2.
- `jitter brightness= contrast= saturation= hue=`: ColorJitter: factors uniform in
  [max(0, 1 - v), 1 + v] (hue in [-h, h]), applied in a random order, with Pillow's ImageEnhance
  (and a shift of the HSV hue byte), as torchvision does for PIL images.
- `lighting s`: AlexNet's PCA colour noise on the [0, 1] pixels: alpha ~ N(0, s) per principal
  component, every pixel += eigvec @ (alpha * eigval) (fb.resnet.torch's Lighting).
- normalise: (x - mean) / std per channel.

Measured statistics (`normalize` without `mean`/`std`, `lighting` with `eigen=measured`) are
computed by `measure_statistics` over a sample of training images and stored into the config,
which travels in the run's checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from cnnc.compiler.train_config import IMAGENET_MEAN, IMAGENET_STD, TRANSFORM_FIELDS  # noqa: F401 - re-exported
from cnnc.dsl.errors import CnncError, InternalError

# fb.resnet.torch datasets/imagenet.lua (from the AlexNet paper's method, cuda-convnet's values
# 55.46, 4.794, 1.148 on 0..255 pixels, divided by 255): eigenvalues and, as columns, eigenvectors
# of the covariance of ImageNet's RGB pixels.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))
EVAL_RESIZE_RATIO = 256 / 224  # torchvision's references: Resize(256) before CenterCrop(224)

Step = Callable  # (PIL image, rng) -> PIL image


@dataclass
class ImageTransform:
    """transform(img, rng) -> float32 array of `out_shape`: (C, H, W), or (k, C, H, W) for k crops."""

    steps: list  # PIL → PIL, each called as step(img, rng)
    out_shape: tuple[int, ...]
    draft_size: tuple[int, int] | None  # (w, h) JPEG draft() may reduce to first; None: no reduction
    mode: str  # "RGB" or "L"
    lighting: tuple[float, np.ndarray, np.ndarray] | None  # (std, eigval (3,), eigvec (3, 3))
    mean: np.ndarray | None  # (C, 1, 1) float32
    std: np.ndarray | None
    multi: Callable | None = None  # PIL image -> list of PIL crops (ten-crop)
    names: tuple[str, ...] = ()

    def __call__(self, img, rng: np.random.Generator) -> np.ndarray:
        if img.mode != self.mode:
            img = img.convert(self.mode)
        for step in self.steps:
            img = step(img, rng)
        if self.multi is not None:
            return np.stack([self._to_array(c, rng) for c in self.multi(img)])
        return self._to_array(img, rng)

    def _to_array(self, img, rng: np.random.Generator) -> np.ndarray:
        want = self.out_shape[-2:]
        if (img.height, img.width) != want:
            raise CnncError(f"an image came out of the transforms as {img.width}x{img.height} "
                            f"(W x H) but the network takes {want[1]}x{want[0]}",
                            hint="add `resize` and `crop` settings to the train section "
                                 "(e.g. `resize 256` and `crop 224 center`)")
        a = np.asarray(img)
        chw = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        x = np.empty(chw.shape, np.float32)
        np.divide(chw, np.float32(255), out=x, dtype=np.float32)  # ToTensor's float(x) / 255, in one pass
        if self.lighting is not None:
            s, eigval, eigvec = self.lighting
            alpha = rng.normal(0.0, s, size=3)
            x += (eigvec @ (alpha * eigval)).astype(np.float32)[:, None, None]
        if self.mean is not None:
            x -= self.mean
            x /= self.std
        return x


# ---------------------------------------------------------------------------------------------
# Geometry, as torchvision computes it


def resized_size(width: int, height: int, size) -> tuple[int, int]:
    """(w, h) after `resize size`: an int is the short side (the long one truncated), (h, w) exact."""
    if not isinstance(size, int):
        return int(size[1]), int(size[0])
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_offsets(width: int, height: int, crop_h: int, crop_w: int) -> tuple[int, int]:
    """(top, left) of torchvision's centre crop of an image at least as large as the crop."""
    return int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))


def rrc_params(width: int, height: int, scale, ratio, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of RandomResizedCrop.get_params, drawing from `rng`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = width / height  # fallback: the central crop, clamped to the ratio range
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def ten_crop_boxes(width: int, height: int, crop_h: int, crop_w: int) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of FiveCrop's order: top-left, top-right, bottom-left, bottom-right, centre."""
    t, l = center_offsets(width, height, crop_h, crop_w)
    return [(0, 0, crop_w, crop_h), (width - crop_w, 0, width, crop_h), (0, height - crop_h, crop_w, height),
            (width - crop_w, height - crop_h, width, height), (l, t, l + crop_w, t + crop_h)]


# ---------------------------------------------------------------------------------------------
# Steps (PIL image, rng) -> PIL image


def _image():
    try:
        from PIL import Image, ImageEnhance
    except ImportError:
        raise CnncError("image transforms need Pillow, which is not installed", hint="pip install pillow") from None
    return Image, ImageEnhance


def _resize(size):
    Image, _ = _image()

    def step(img, rng):
        w, h = resized_size(img.width, img.height, size)
        if (w, h) == img.size:
            return img
        return img.resize((w, h), Image.BILINEAR)
    return step


def _pad_to(img, crop_h: int, crop_w: int):
    """Zero-pad around as torchvision's center_crop does when the image is smaller than the crop."""
    Image, _ = _image()
    w, h = img.size
    if crop_w <= w and crop_h <= h:
        return img
    left = (crop_w - w) // 2 if crop_w > w else 0
    top = (crop_h - h) // 2 if crop_h > h else 0
    out = Image.new(img.mode, (max(w, crop_w), max(h, crop_h)), 0)
    out.paste(img, (left, top))
    return out


def _center_crop(crop_h: int, crop_w: int):
    def step(img, rng):
        img = _pad_to(img, crop_h, crop_w)
        t, l = center_offsets(img.width, img.height, crop_h, crop_w)
        return img.crop((l, t, l + crop_w, t + crop_h))
    return step


def _random_crop(crop_h: int, crop_w: int, pad: int = 0):
    Image, _ = _image()

    def step(img, rng):
        if pad:
            out = Image.new(img.mode, (img.width + 2 * pad, img.height + 2 * pad), 0)
            out.paste(img, (pad, pad))
            img = out
        img = _pad_to(img, crop_h, crop_w)
        i = int(rng.integers(0, img.height - crop_h + 1))
        j = int(rng.integers(0, img.width - crop_w + 1))
        return img.crop((j, i, j + crop_w, i + crop_h))
    return step


def _random_resized_crop(size_h: int, size_w: int, scale, ratio):
    Image, _ = _image()

    def step(img, rng):
        i, j, h, w = rrc_params(img.width, img.height, scale, ratio, rng)
        return img.crop((j, i, j + w, i + h)).resize((size_w, size_h), Image.BILINEAR)
    return step


def _flip(img, rng):
    Image, _ = _image()
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def jitter_params(brightness: float, contrast: float, saturation: float, hue: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """ColorJitter.get_params: a random order of the 4 adjustments and a factor for each one in use."""
    order = rng.permutation(4)
    factors = [None if v == 0 else float(rng.uniform(max(0.0, 1 - v), 1 + v))
               for v in (brightness, contrast, saturation)]
    factors.append(None if hue == 0 else float(rng.uniform(-hue, hue)))
    return order, factors


def adjust_hue(img, factor: float):
    """torchvision's adjust_hue for PIL: shift the HSV hue byte by int(factor * 255), wrapping."""
    Image, _ = _image()
    if img.mode in ("L", "1", "I", "F"):
        return img
    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    np_h += np.array(np.int32(factor * 255)).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert(img.mode)


def _jitter(brightness: float, contrast: float, saturation: float, hue: float):
    _, ImageEnhance = _image()
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)

    def step(img, rng):
        order, factors = jitter_params(brightness, contrast, saturation, hue, rng)
        for k in order:
            f = factors[k]
            if f is None:
                continue
            img = enhancers[k](img).enhance(f) if k < 3 else adjust_hue(img, f)
        return img
    return step


# ---------------------------------------------------------------------------------------------
# Building a pipeline from the settings


def _hw(v) -> tuple[int, int] | None:
    if v is None:
        return None
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def crop_size(config) -> tuple[int, int] | None:
    """(h, w) of the crop the settings take (`crop S random|center` or `random_resized_crop S`)."""
    if config.random_resized_crop is not None:
        return _hw(config.random_resized_crop)
    if config.crop_size is not None:
        return _hw(config.crop_size)
    return None


def eval_resize(config):
    """The resize evaluation uses: `resize`, or for random_resized_crop S, round(S * 256 / 224)."""
    if config.resize is not None:
        return config.resize
    if config.random_resized_crop is not None:
        return int(round(min(_hw(config.random_resized_crop)) * EVAL_RESIZE_RATIO))
    return None


def settings_in_use(config) -> list[str]:
    """The image-transform settings the config sets (not their defaults): data that is not read
    from image files cannot honour them, and should say so."""
    fields = type(config).model_fields
    return [k for k in TRANSFORM_FIELDS if k not in ("eigval", "eigvec", "stats_images", "crop_mode")
            and getattr(config, k) != fields[k].default]


def needs_measuring(config) -> bool:
    """True when the pipeline needs statistics measured on training images (`measure_statistics`)."""
    return bool((config.normalize and config.mean is None)
                or (config.lighting > 0 and config.eigen == "measured" and config.eigval is None))


def build_pipeline(config, input_shape: tuple[int, int, int], train: bool) -> ImageTransform:
    """The transform of the `train:` section's settings for a network taking `input_shape` (C, H, W)."""
    c, h, w = (int(d) for d in input_shape[-3:])
    if c not in (1, 3):
        raise CnncError(f"image transforms make 1- or 3-channel images; the network's input has {c} channels")
    if needs_measuring(config):
        raise InternalError("build_pipeline needs the measured statistics: call measure_statistics first")
    steps: list = []
    names: list[str] = []
    draft = None
    crop = crop_size(config)
    multi = None
    resize = config.resize if train else eval_resize(config)
    rrc = config.random_resized_crop is not None
    if resize is not None and not (train and rrc):
        steps.append(_resize(resize))
        names.append(f"resize {resize}")
        if isinstance(resize, int):
            draft = (resize, resize)  # draft() keeps both sides ≥ this, so the short side stays ≥ N
        else:
            draft = (int(resize[1]), int(resize[0]))
    if train:
        if rrc:
            steps.append(_random_resized_crop(crop[0], crop[1], config.scale, config.ratio))
            names.append("random_resized_crop")
        elif crop is not None and config.crop_mode == "random":
            steps.append(_random_crop(*crop))
            names.append("random crop")
        elif crop is not None:
            steps.append(_center_crop(*crop))
            names.append("centre crop")
        elif config.crop:
            steps.append(_random_crop(h, w, pad=config.crop))
            names.append(f"pad {config.crop} + random crop")
        if config.flip:
            steps.append(_flip)
            names.append("flip")
        if config.brightness or config.contrast or config.saturation or config.hue:
            steps.append(_jitter(config.brightness, config.contrast, config.saturation, config.hue))
            names.append("jitter")
    elif crop is not None and config.eval_crop == "ten":
        ch, cw = crop

        def multi(img):
            Image, _ = _image()
            img = _pad_to(img, ch, cw)
            boxes = ten_crop_boxes(img.width, img.height, ch, cw)
            mirrored = img.transpose(Image.FLIP_LEFT_RIGHT)
            return [img.crop(b) for b in boxes] + [mirrored.crop(b) for b in boxes]
        names.append("ten crops")
    elif crop is not None:
        steps.append(_center_crop(*crop))
        names.append("centre crop")
    lighting = None
    if train and config.lighting > 0:
        eigval, eigvec = ((IMAGENET_EIGVAL, IMAGENET_EIGVEC) if config.eigen == "imagenet"
                          else (config.eigval, config.eigvec))
        lighting = (float(config.lighting), np.asarray(eigval, np.float64), np.asarray(eigvec, np.float64))
        names.append("lighting")
    mean = std = None
    if config.normalize:
        mean = np.asarray(config.mean, np.float32).reshape(c, 1, 1)
        std = np.asarray(config.std, np.float32).reshape(c, 1, 1)
        names.append("normalise")
    out_shape = (10, c, h, w) if multi is not None else (c, h, w)
    return ImageTransform(steps, out_shape, draft, "L" if c == 1 else "RGB", lighting, mean, std, multi,
                          tuple(names))


def measure_statistics(images: Iterable, config, input_shape: tuple[int, int, int]):
    """The config with the statistics it asks to measure filled in, from `images` (PIL images of the
    training data): the per-channel mean and std, and the eigen-decomposition of the 3×3 covariance
    of RGB pixels (eigenvalues descending, each eigenvector's largest component positive), all on
    [0, 1] pixels after the evaluation geometry (resize and centre crop, no randomness)."""
    c = int(input_shape[-3])
    plain = config.model_copy(update={"normalize": False, "lighting": 0.0, "eval_crop": "center"})
    geometry = build_pipeline(plain, input_shape, train=False)
    rng = np.random.default_rng(0)  # unused: evaluation geometry draws nothing
    n = 0
    s1 = np.zeros(c)
    s2 = np.zeros((c, c))
    for img in images:
        x = geometry(img, rng).reshape(c, -1).astype(np.float64)
        n += x.shape[1]
        s1 += x.sum(axis=1)
        s2 += x @ x.T
    if n == 0:
        raise CnncError("no training images to measure the normalisation statistics on")
    mean = s1 / n
    cov = s2 / n - np.outer(mean, mean)
    update = {}
    if config.normalize and config.mean is None:
        std = np.sqrt(np.maximum(np.diag(cov), 0))
        update["mean"] = tuple(float(v) for v in mean)
        update["std"] = tuple(float(v) if v > 1e-6 else 1.0 for v in std)  # a constant channel stays as it is
    if config.lighting > 0 and config.eigen == "measured" and config.eigval is None:
        val, vec = np.linalg.eigh(cov)
        order = np.argsort(val)[::-1]
        val, vec = np.maximum(val[order], 0), vec[:, order]
        vec *= np.where(vec[np.abs(vec).argmax(axis=0), range(3)] < 0, -1, 1)
        update["eigval"] = tuple(float(v) for v in val)
        update["eigvec"] = tuple(tuple(float(v) for v in row) for row in vec)
    return config.model_copy(update=update)
