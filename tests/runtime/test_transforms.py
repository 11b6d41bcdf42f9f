"""The image transforms of runtime/transforms.py, checked against their definitions (torchvision's
for PIL images) on real photos shipped in scikit-learn and scikit-image."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from cnnc.compiler.train_config import TrainConfig
from cnnc.runtime import transforms as T

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def bundled(package: str, *parts: str) -> Image.Image:
    """A photo from an installed wheel, opened by path (as its loader does) without importing the
    package, which takes seconds."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"{package} is not installed (pip install -e '.[test]')")
    with Image.open(Path(spec.submodule_search_locations[0], *parts)) as im:
        return im.convert("L" if im.mode == "L" else "RGB")


@pytest.fixture(scope="module")
def china() -> Image.Image:
    return bundled("sklearn", "datasets", "images", "china.jpg")  # 640x427 RGB


@pytest.fixture(scope="module")
def flower() -> Image.Image:
    return bundled("sklearn", "datasets", "images", "flower.jpg")


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    return bundled("skimage", "data", "coffee.png")  # 600x400 RGB


@pytest.fixture(scope="module")
def camera() -> Image.Image:
    return bundled("skimage", "data", "camera.png")  # 512x512 L


def cfg(**kw) -> TrainConfig:
    kw.setdefault("normalize", False)
    return TrainConfig(**kw)


def chw(img: Image.Image) -> np.ndarray:
    a = np.asarray(img, np.float32) / 255
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def test_resize_short_side_and_centre_crop(china):
    t = T.build_pipeline(cfg(resize=256, crop_size=224), (3, 224, 224), train=False)
    x = t(china, np.random.default_rng(0))
    assert x.shape == (3, 224, 224) and x.dtype == np.float32 and t.out_shape == (3, 224, 224)
    # 640x427 -> short side 256, long int(256 * 640 / 427) = 383; centre offset round(...)
    w, h = T.resized_size(640, 427, 256)
    assert (w, h) == (int(256 * 640 / 427), 256)
    big = china.resize((w, h), Image.BILINEAR)
    top, left = int(round((h - 224) / 2)), int(round((w - 224) / 2))
    np.testing.assert_array_equal(x, chw(big.crop((left, top, left + 224, top + 224))))
    assert t.draft_size == (256, 256)


def test_centre_offsets_round_half_to_even():
    # torchvision uses Python's round: 0.5 -> 0, 1.5 -> 2
    assert T.center_offsets(225, 225, 224, 224) == (0, 0)
    assert T.center_offsets(227, 227, 224, 224) == (2, 2)


def test_random_crop_positions_cover_all_offsets_and_are_determined_by_rng(china):
    small = china.resize((40, 30))
    t = T.build_pipeline(cfg(crop_size=(28, 36), crop_mode="random"), (3, 28, 36), train=True)
    full = chw(small)
    seen = set()
    for s in range(300):
        x = t(small, np.random.default_rng(s))
        np.testing.assert_array_equal(x, t(small, np.random.default_rng(s)))
        hits = [(i, j) for i in range(3) for j in range(5) if np.array_equal(full[:, i:i + 28, j:j + 36], x)]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) == 15  # every offset of the 3x5 possible ones


def test_pad_crop_keeps_its_old_meaning(china):
    img = china.resize((32, 32))
    t = T.build_pipeline(cfg(crop=4), (3, 32, 32), train=True)
    x = t(img, np.random.default_rng(3))
    padded = np.zeros((3, 40, 40), np.float32)
    padded[:, 4:36, 4:36] = chw(img)
    assert any(np.array_equal(padded[:, i:i + 32, j:j + 32], x) for i in range(9) for j in range(9))


def test_flip_is_a_mirror_half_the_time(coffee):
    img = coffee.resize((48, 32))
    t = T.build_pipeline(cfg(flip=True), (3, 32, 48), train=True)
    plain, mirror = chw(img), chw(img)[:, :, ::-1]
    flips = 0
    for s in range(200):
        x = t(img, np.random.default_rng(s))
        flipped = np.array_equal(x, mirror)
        assert flipped or np.array_equal(x, plain)
        flips += flipped
        assert flipped == (np.random.default_rng(s).random() < 0.5)
    assert 70 < flips < 130


def test_normalisation_numbers(camera):
    t = T.build_pipeline(cfg(normalize=True, mean=(0.5,), std=(0.25,), crop_size=64), (1, 64, 64), train=False)
    x = t(camera, np.random.default_rng(0))
    raw = chw(camera)[:, 224:288, 224:288]  # centre of 512x512
    np.testing.assert_allclose(x, (raw - 0.5) / 0.25, rtol=1e-6, atol=1e-6)


def test_rrc_params_follow_torchvision_sampling():
    # Replaying the same draws by hand gives the same box.
    for s in range(50):
        rng = np.random.default_rng(s)
        i, j, h, w = T.rrc_params(500, 375, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        rng = np.random.default_rng(s)
        area = rng.uniform(0.08, 1.0) * 500 * 375
        ar = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        ww, hh = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
        if 0 < ww <= 500 and 0 < hh <= 375:
            assert (h, w) == (hh, ww)
            assert (i, j) == (int(rng.integers(0, 375 - hh + 1)), int(rng.integers(0, 500 - ww + 1)))
        assert 0 <= i and i + h <= 375 and 0 <= j and j + w <= 500


def test_rrc_falls_back_to_the_central_crop_clamped_to_the_ratio():
    # A scale range no box fits (more than the whole image) forces the fallback after 10 tries.
    assert T.rrc_params(1000, 100, (1.5, 2.0), (3 / 4, 4 / 3), np.random.default_rng(0)) == (
        0, (1000 - 133) // 2, 100, 133)
    assert T.rrc_params(100, 1000, (1.5, 2.0), (3 / 4, 4 / 3), np.random.default_rng(0)) == (
        (1000 - 133) // 2, 0, 133, 100)
    assert T.rrc_params(120, 100, (1.5, 2.0), (3 / 4, 4 / 3), np.random.default_rng(0)) == (0, 0, 100, 120)


def test_random_resized_crop_is_crop_then_bilinear_resize(flower):
    t = T.build_pipeline(cfg(random_resized_crop=64), (3, 64, 64), train=True)
    x = t(flower, np.random.default_rng(5))
    i, j, h, w = T.rrc_params(flower.width, flower.height, (0.08, 1.0), (3 / 4, 4 / 3), np.random.default_rng(5))
    np.testing.assert_array_equal(x, chw(flower.crop((j, i, j + w, i + h)).resize((64, 64), Image.BILINEAR)))
    assert t.draft_size is None  # small crops are upsampled: no reduction is safe
    ev = T.build_pipeline(cfg(random_resized_crop=64), (3, 64, 64), train=False)
    assert ev.names[:2] == ("resize 73", "centre crop")  # round(64 * 256 / 224)


def test_lighting_is_the_pca_formula(coffee):
    img = coffee.resize((32, 32))
    t = T.build_pipeline(cfg(lighting=0.1, eigen="imagenet"), (3, 32, 32), train=True)
    x = t(img, np.random.default_rng(9))
    alpha = np.random.default_rng(9).normal(0, 0.1, 3)
    shift = np.array(T.IMAGENET_EIGVEC) @ (alpha * np.array(T.IMAGENET_EIGVAL))
    np.testing.assert_allclose(x, chw(img) + shift[:, None, None].astype(np.float32), rtol=0, atol=1e-6)


def test_jitter_applies_pillow_enhancers_in_the_drawn_order(china):
    from PIL import ImageEnhance
    img = china.resize((40, 30))
    t = T.build_pipeline(cfg(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1), (3, 30, 40), train=True)
    for s in range(5):
        x = t(img, np.random.default_rng(s))
        order, f = T.jitter_params(0.4, 0.4, 0.4, 0.1, np.random.default_rng(s))
        y = img
        for k in order:
            y = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color][k](y).enhance(f[k]) \
                if k < 3 else T.adjust_hue(y, f[k])
        np.testing.assert_array_equal(x, chw(y))
        assert all(0.6 <= v <= 1.4 for v in f[:3]) and -0.1 <= f[3] <= 0.1


def test_ten_crop_layout(coffee):
    t = T.build_pipeline(cfg(resize=80, crop_size=64, eval_crop="ten"), (3, 64, 64), train=False)
    x = t(coffee, np.random.default_rng(0))
    assert x.shape == t.out_shape == (10, 3, 64, 64)
    r = chw(coffee.resize(T.resized_size(coffee.width, coffee.height, 80), Image.BILINEAR))
    H, W = r.shape[1:]
    top, left = int(round((H - 64) / 2)), int(round((W - 64) / 2))
    five = [r[:, :64, :64], r[:, :64, W - 64:], r[:, H - 64:, :64], r[:, H - 64:, W - 64:],
            r[:, top:top + 64, left:left + 64]]
    m = r[:, :, ::-1]
    mirrored = [m[:, :64, :64], m[:, :64, W - 64:], m[:, H - 64:, :64], m[:, H - 64:, W - 64:],
                m[:, top:top + 64, left:left + 64]]
    for k, want in enumerate(five + mirrored):
        np.testing.assert_array_equal(x[k], want)
    # the mirror's top-left crop is the original's top-right crop, mirrored
    np.testing.assert_array_equal(x[5], x[1][:, :, ::-1])


def test_measured_statistics(china, flower):
    c = TrainConfig(resize=32, crop_size=32, lighting=0.1)
    assert T.needs_measuring(c)
    m = T.measure_statistics([china, flower], c, (3, 32, 32))
    assert not T.needs_measuring(m)
    geo = T.build_pipeline(c.model_copy(update={"normalize": False, "lighting": 0.0}), (3, 32, 32), False)
    px = np.concatenate([geo(im, None).reshape(3, -1) for im in (china, flower)], axis=1).astype(np.float64)
    np.testing.assert_allclose(m.mean, px.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(m.std, px.std(axis=1), rtol=1e-6)
    cov = np.cov(px, bias=True)
    vec, val = np.array(m.eigvec), np.array(m.eigval)
    np.testing.assert_allclose(cov @ vec, vec * val, atol=1e-9)
    assert list(val) == sorted(val, reverse=True)


def test_settings_in_use_names_only_what_the_config_sets():
    assert T.settings_in_use(TrainConfig()) == []
    used = T.settings_in_use(TrainConfig(resize=256, crop_size=224, crop_mode="random", eval_crop="ten"))
    assert used == ["resize", "crop_size", "eval_crop"]


def test_the_whole_recipe_draws_only_from_the_given_generator(china):
    import random
    c = cfg(resize=64, crop_size=56, crop_mode="random", flip=True, brightness=0.4, contrast=0.4, saturation=0.4,
            hue=0.05, lighting=0.1, eigen="imagenet", normalize=True, mean=MEAN, std=STD)
    t = T.build_pipeline(c, (3, 56, 56), train=True)
    a = t(china, np.random.default_rng([7, 1, 3]))
    np.random.seed(123)
    random.seed(123)  # global generators play no part
    np.testing.assert_array_equal(a, t(china, np.random.default_rng([7, 1, 3])))
    assert not np.array_equal(a, t(china, np.random.default_rng([7, 1, 4])))


def test_a_crop_larger_than_the_image_pads_around_it_as_torchvision_does(coffee):
    img = coffee.resize((30, 21))
    x = T.build_pipeline(cfg(crop_size=(24, 34)), (3, 24, 34), train=False)(img, None)
    # pad left (34 - 30) // 2 = 2, top (24 - 21) // 2 = 1, the rest right and below
    want = np.zeros((3, 24, 34), np.float32)
    want[:, 1:22, 2:32] = chw(img)
    np.testing.assert_array_equal(x, want)


def test_an_image_of_the_wrong_size_without_a_crop_is_a_clear_error(coffee):
    from cnnc.dsl.errors import CnncError
    with pytest.raises(CnncError, match="network takes 32x32"):
        T.build_pipeline(cfg(), (3, 32, 32), train=False)(coffee, None)
