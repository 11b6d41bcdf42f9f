"""The seed notes' networks not covered elsewhere in the zoo, starting with ZFNet. Each
one's parameter, buffer and MAC counts are derived here by arithmetic from its paper's layout
and must be what `cnnc check` reports; a hand-written PyTorch twin per family has the same
counts and computes what our -O2 plan computes with the same weights."""

from __future__ import annotations

import math

import torch
from torch import nn
from twin import assert_twin_matches, check_json, torch_counts


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
