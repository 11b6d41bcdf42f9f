"""The model zoo in examples/: each file, checked through the real command line, has exactly the
parameter, buffer and MAC counts of the network it describes, and stays short."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

# Reference counts. Provenance: torchvision 0.29 model definitions (weights=None):
# params = sum(p.numel() for p in model.parameters()); buffers = BatchNorm running mean+var
# elements; macs = Conv2d+Linear multiply-accumulates for one 3x224x224 image (None: not recorded).
# lenet5/alexnet_2012/googlenet_2014 by arithmetic from the papers' layouts (alexnet_2012 equals
# Caffe's bvlc_alexnet reference model; its input is 3x227x227, lenet5's 1x32x32).
REFERENCE = {
    # name:           (params,      buffers, macs,           output)
    "lenet5":         (61_706,      0,       None,           [10]),
    "alexnet_2012":   (60_965_224,  0,       None,           [1000]),
    "alexnet":        (61_100_840,  0,       714_188_480,    [1000]),
    "vgg11":          (132_863_336, 0,       None,           [1000]),
    "vgg16":          (138_357_544, 0,       15_470_264_320, [1000]),
    "vgg19":          (143_667_240, 0,       None,           [1000]),
    "vgg16_bn":       (138_365_992, 8_448,   None,           [1000]),
    "googlenet_2014": (6_998_552,   0,       None,           [1000]),
    "googlenet":      (6_624_904,   14_560,  1_498_376_192,  [1000]),
    "resnet18":       (11_689_512,  9_600,   1_814_073_344,  [1000]),
    "resnet34":       (21_797_672,  17_024,  None,           [1000]),
    "resnet50":       (25_557_032,  53_120,  4_089_184_256,  [1000]),
    "resnet101":      (44_549_160,  105_344, None,           [1000]),
    "resnet152":      (60_192_808,  151_424, None,           [1000]),
    "densenet121":    (7_978_856,   83_648,  2_834_161_664,  [1000]),
    "densenet169":    (14_149_480,  158_400, None,           [1000]),
    "densenet201":    (20_013_928,  229_056, None,           [1000]),
}


def _resnet20_cifar() -> tuple[int, int]:
    """ResNet-20 for CIFAR-10 with 1x1 conv + BatchNorm projection shortcuts ("option B"), by hand.

    Convs have no bias; a BatchNorm on c channels has 2c parameters (scale, shift) and 2c buffers.
    """
    def conv(cin, cout, k):
        return cin * cout * k * k

    def bn(c):
        return 2 * c

    stem = conv(3, 16, 3) + bn(16)                                  # 432 + 32 = 464
    basic = {c: 2 * (conv(c, c, 3) + bn(c)) for c in (16, 32, 64)}  # identity-shortcut block
    down = {c: conv(c // 2, c, 3) + bn(c) + conv(c, c, 3) + bn(c)   # first block of stages 2, 3
            + conv(c // 2, c, 1) + bn(c) for c in (32, 64)}         # ... and its projection
    stages = 3 * basic[16] + (down[32] + 2 * basic[32]) + (down[64] + 2 * basic[64])
    fc = 64 * 10 + 10
    params = stem + stages + fc
    # BatchNorm channels: stem 16; stage 1: 6 x 16; stages 2, 3: 7 BatchNorms each (6 + projection)
    buffers = 2 * (16 + 6 * 16 + 7 * 32 + 7 * 64)
    return params, buffers


REFERENCE["resnet20_cifar"] = (*_resnet20_cifar(), None, [10])


def test_resnet20_cifar_arithmetic():
    # stem 464 + stage 1 14,016 + stage 2 51,648 + stage 3 205,696 + dense 650
    assert _resnet20_cifar() == (272_474, 1_568)


def check_json(name: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "cnnc", "check", f"examples/{name}.cnn", "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.mark.parametrize("name", list(REFERENCE), ids=list(REFERENCE))
def test_counts_match_reference(name):
    params, buffers, macs, output = REFERENCE[name]
    got = check_json(name)
    assert got["network"] == name
    assert got["params"]["total"] == params
    assert got["buffers"] == buffers
    if macs is not None:
        assert got["macs"] == macs
    assert got["output"] == output


def code_lines(path: Path) -> int:
    """Lines that are neither blank nor comments (a comment line's first non-space character is `#`)."""
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.lstrip().startswith("#"))


@pytest.mark.parametrize("name, limit", [("googlenet_2014", 60), ("googlenet", 60), ("resnet50", 40),
                                         ("densenet121", 40)])
def test_models_stay_short(name, limit):
    n = code_lines(EXAMPLES / f"{name}.cnn")
    assert n <= limit, f"{name}.cnn has {n} non-blank non-comment lines, more than {limit}"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.cnn")), ids=lambda p: p.name)
def test_example_opens_with_a_comment(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#"), f"{path.name} should open with a comment giving its source"
