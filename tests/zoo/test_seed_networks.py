"""The seed notes' networks not covered elsewhere in the zoo: ZFNet, the CIFAR-10 ResNets
with option-A shortcuts (20, 56, 110 layers) and the plain 18- and 34-layer ImageNet networks.
Each one's parameter, buffer and MAC counts are derived here by arithmetic from its paper's
layout and must be what `cnnc check` reports; a hand-written PyTorch twin per family has the
same counts and computes what our -O2 plan computes with the same weights."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from twin import EXAMPLES, REPO, assert_twin_matches, check_json, code_lines, torch_counts


def conv(cin: int, cout: int, k: int, bias: bool = False) -> int:
    """Parameters of a k x k convolution."""
    return cout * cin * k * k + (cout if bias else 0)


def conv_macs(cin: int, cout: int, k: int, out: int) -> int:
    """Multiply-accumulates of a k x k convolution with an out x out output."""
    return out * out * cout * cin * k * k


def bn(c: int) -> int:
    """BatchNorm parameters (scale and shift; its running mean and variance are as many buffers)."""
    return 2 * c


def dense(fin: int, fout: int) -> int:
    return fin * fout + fout


def weight_layers(got: dict) -> int:
    """Convolutions and dense layers of a `cnnc check --json` answer: the depth papers count."""
    return sum(1 for layer in got["layers"] if layer["op"] in ("conv", "dense"))


# --- ZFNet -----------------------------------------------------------------------------------

def _zfnet() -> tuple[int, int, int]:
    """ZFNet, Fig. 3 of Zeiler & Fergus with the 512/1024/512 filters of conv3-5 (Table 2 (b)).

    Sizes: 224 -> conv1 7x7/2 pad 1: (224 + 2 - 7) // 2 + 1 = 110 -> pool 3x3/2, ceil mode:
    ceil(107 / 2) + 1 = 55 -> conv2 5x5/2: (55 - 5) / 2 + 1 = 26 -> pool: ceil(23 / 2) + 1 = 13
    -> conv3-5 3x3 pad 1: 13 -> pool: (13 - 3) / 2 + 1 = 6. Every conv and dense has a bias.
    """
    assert (224 + 2 - 7) // 2 + 1 == 110 and math.ceil((110 - 3) / 2) + 1 == 55
    assert (55 - 5) // 2 + 1 == 26 and math.ceil((26 - 3) / 2) + 1 == 13 and (13 - 3) // 2 + 1 == 6
    convs = [(3, 96, 7, 110), (96, 256, 5, 26), (256, 512, 3, 13), (512, 1024, 3, 13), (1024, 512, 3, 13)]
    fcs = [(512 * 6 * 6, 4096), (4096, 4096), (4096, 1000)]
    params = sum(conv(i, o, k, bias=True) for i, o, k, _ in convs) + sum(dense(i, o) for i, o in fcs)
    macs = sum(conv_macs(i, o, k, s) for i, o, k, s in convs) + sum(i * o for i, o in fcs)
    return params, 0, macs


class ZFNet(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        lrn = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, 7, stride=2, padding=1), nn.ReLU(),
            nn.MaxPool2d(3, 2, ceil_mode=True), nn.LocalResponseNorm(**lrn),
            nn.Conv2d(96, 256, 5, stride=2), nn.ReLU(),
            nn.MaxPool2d(3, 2, ceil_mode=True), nn.LocalResponseNorm(**lrn),
            nn.Conv2d(256, 512, 3, padding=1), nn.ReLU(),
            nn.Conv2d(512, 1024, 3, padding=1), nn.ReLU(),
            nn.Conv2d(1024, 512, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(3, 2, ceil_mode=True))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 6 * 6, 4096), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(4096, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def test_zfnet_arithmetic():
    # conv 14,208 + 614,656 + 1,180,160 + 4,719,616 + 4,719,104; fc 75,501,568 + 16,781,312 + 4,097,000
    assert _zfnet() == (107_627_624, 0, 2_476_704_896)


def test_zfnet_counts():
    got = check_json("zfnet")
    assert (got["params"]["total"], got["buffers"], got["macs"]) == _zfnet()
    assert got["output"] == [1000] and weight_layers(got) == 8


def test_zfnet_twin_counts():
    assert torch_counts(ZFNet()) == _zfnet()[:2]


def test_zfnet_twin_matches():
    torch.manual_seed(0)
    assert_twin_matches("zfnet", ZFNet(), batch=1)


# --- CIFAR-10 ResNets, option A --------------------------------------------------------------

CIFAR_DEPTHS = {20: 3, 56: 9, 110: 18}               # 6n + 2 layers
# He et al. 2016, Table 6: parameters as the paper rounds them.
PAPER_CIFAR_PARAMS = {20: "0.27M", 56: "0.85M", 110: "1.7M"}


def _cifar_resnet(n: int) -> tuple[int, int, int]:
    """ResNet-(6n+2) for CIFAR-10 with the parameter-free option-A shortcuts, by hand.

    Stem: 3x3 conv of 16 on 32x32. Stages of n blocks, two 3x3 convs each, with 16, 32 and 64
    filters on 32x32, 16x16 and 8x8; the first block of stages 2 and 3 halves the map with a
    stride-2 first conv (its input has half the filters). Convs have no bias; BatchNorm after each.
    """
    stem = conv(3, 16, 3) + bn(16)                                   # 432 + 32 = 464
    basic = {c: 2 * (conv(c, c, 3) + bn(c)) for c in (16, 32, 64)}  # identity shortcut
    first = {c: conv(c // 2, c, 3) + bn(c) + conv(c, c, 3) + bn(c)  # zero-padded shortcut: free
             for c in (32, 64)}
    stages = n * basic[16] + first[32] + (n - 1) * basic[32] + first[64] + (n - 1) * basic[64]
    fc = dense(64, 10)
    params = stem + stages + fc
    buffers = 2 * (16 + 2 * n * (16 + 32 + 64))                      # BatchNorm: stem + 2n per stage
    macs = (conv_macs(3, 16, 3, 32)
            + 2 * n * conv_macs(16, 16, 3, 32)
            + conv_macs(16, 32, 3, 16) + (2 * n - 1) * conv_macs(32, 32, 3, 16)
            + conv_macs(32, 64, 3, 8) + (2 * n - 1) * conv_macs(64, 64, 3, 8)
            + 64 * 10)
    return params, buffers, macs


def test_cifar_resnet_arithmetic():
    # ResNet-20: stem 464 + stage 1 14,016 + stage 2 51,072 + stage 3 203,520 + dense 650
    assert _cifar_resnet(3) == (269_722, 1_376, 40_551_040)
    assert _cifar_resnet(9) == (853_018, 4_064, 125_485_696)
    assert _cifar_resnet(18) == (1_727_962, 8_096, 252_887_680)


@pytest.mark.parametrize("depth", list(CIFAR_DEPTHS))
def test_cifar_resnet_counts(depth):
    n = CIFAR_DEPTHS[depth]
    got = check_json(f"cifar_resnet{depth}")
    assert (got["params"]["total"], got["buffers"], got["macs"]) == _cifar_resnet(n)
    assert got["output"] == [10] and weight_layers(got) == 6 * n + 2 == depth
    digits = len(PAPER_CIFAR_PARAMS[depth]) - 3                      # "0.27M": 2 decimals, "1.7M": 1
    assert f"{got['params']['total'] / 1e6:.{digits}f}M" == PAPER_CIFAR_PARAMS[depth]


class BasicBlockA(nn.Module):
    """Two 3x3 convs; the shortcut subsamples and zero-pads channels where the shape changes."""

    def __init__(self, cin: int, c: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.stride, self.pad = stride, (c - cin) // 2

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        short = x if self.stride == 1 and self.pad == 0 else \
            F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(y + short)


class CifarResNetA(nn.Module):
    def __init__(self, n: int, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for c in (16, 32, 64):
            for i in range(n):
                blocks.append(BasicBlockA(cin, c, 2 if i == 0 and c != 16 else 1))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("depth", list(CIFAR_DEPTHS))
def test_cifar_resnet_twin_counts(depth):
    n = CIFAR_DEPTHS[depth]
    assert torch_counts(CifarResNetA(n)) == _cifar_resnet(n)[:2]


@pytest.mark.parametrize("depth", list(CIFAR_DEPTHS))
def test_cifar_resnet_twin_matches(depth):
    torch.manual_seed(0)
    assert_twin_matches(f"cifar_resnet{depth}", CifarResNetA(CIFAR_DEPTHS[depth]))


def test_cifar_resnets_share_their_blocks():
    blocks = EXAMPLES / "blocks" / "cifar_resnet.cnn"
    for depth in CIFAR_DEPTHS:
        text = (EXAMPLES / f"cifar_resnet{depth}.cnn").read_text(encoding="utf-8")
        assert 'import "blocks/cifar_resnet.cnn"' in text and "block " not in text
        assert code_lines(EXAMPLES / f"cifar_resnet{depth}.cnn") <= 10
    # the blocks file alone is no network: refused with a located error, not a traceback
    p = subprocess.run([sys.executable, "-m", "cnnc", "check", str(blocks.relative_to(REPO))],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 1 and "blocks/cifar_resnet.cnn:" in p.stderr and "error:" in p.stderr
    assert "Traceback" not in p.stderr


# --- plain 18- and 34-layer networks ---------------------------------------------------------

# He et al. 2016, Table 1: 3x3 convs per stage (twice the basic blocks of ResNet-18/34) on
# 56x56, 28x28, 14x14 and 7x7 maps, and the multiply-adds ("FLOPs") the table gives.
PLAIN_STAGES = {18: (4, 4, 4, 4), 34: (6, 8, 12, 6)}
PAPER_PLAIN_GMACS = {18: 1.8, 34: 3.6}
WIDTHS, SIZES = (64, 128, 256, 512), (56, 28, 14, 7)


def _plain(depth: int) -> tuple[int, int, int]:
    """A plain network: ResNet-18/34's layout with no shortcut, BatchNorm after every conv.

    Stem: 7x7/2 conv of 64 (112x112) and a 3x3/2 max pool (56x56). In each stage the first conv
    takes the previous stage's width (and, from stage 2 on, halves the map with stride 2).
    """
    convs = PLAIN_STAGES[depth]
    params = conv(3, 64, 7) + bn(64) + dense(512, 1000)
    buffers = 2 * 64
    macs = conv_macs(3, 64, 7, 112) + 512 * 1000
    cin = 64
    for c, size, count in zip(WIDTHS, SIZES, convs):
        params += conv(cin, c, 3) + (count - 1) * conv(c, c, 3) + count * bn(c)
        buffers += 2 * count * c
        macs += conv_macs(cin, c, 3, size) + (count - 1) * conv_macs(c, c, 3, size)
        cin = c
    return params, buffers, macs


# ResNet-18/34 (torchvision 0.29.1 counts, as tests/test_zoo.py) differ from the plain networks by
# their three 1x1 projection shortcuts (conv + BatchNorm) on entering stages 2-4.
RESNET_PARAMS = {18: 11_689_512, 34: 21_797_672}
PROJECTIONS = sum(conv(c // 2, c, 1) + bn(c) for c in (128, 256, 512))


def test_plain_arithmetic():
    assert _plain(18) == (11_515_688, 7_808, 1_794_805_760)
    assert _plain(34) == (21_623_848, 15_232, 3_644_493_824)
    assert PROJECTIONS == 173_824
    for depth in PLAIN_STAGES:
        assert _plain(depth)[0] + PROJECTIONS == RESNET_PARAMS[depth]


@pytest.mark.parametrize("depth", list(PLAIN_STAGES))
def test_plain_counts(depth):
    got = check_json(f"plain{depth}")
    assert (got["params"]["total"], got["buffers"], got["macs"]) == _plain(depth)
    assert got["output"] == [1000] and weight_layers(got) == depth
    assert round(got["macs"] / 1e9, 1) == PAPER_PLAIN_GMACS[depth]


class PlainNet(nn.Module):
    def __init__(self, stages: tuple[int, ...], classes: int = 1000):
        super().__init__()
        layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        cin = 64
        for s, (c, count) in enumerate(zip(WIDTHS, stages)):
            for i in range(count):
                stride = 2 if i == 0 and s > 0 else 1
                layers += [nn.Conv2d(cin, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
                cin = c
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


@pytest.mark.parametrize("depth", list(PLAIN_STAGES))
def test_plain_twin_counts(depth):
    assert torch_counts(PlainNet(PLAIN_STAGES[depth])) == _plain(depth)[:2]


@pytest.mark.parametrize("depth", list(PLAIN_STAGES))
def test_plain_twin_matches(depth):
    torch.manual_seed(0)
    assert_twin_matches(f"plain{depth}", PlainNet(PLAIN_STAGES[depth]), batch=1)
