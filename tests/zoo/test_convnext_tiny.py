"""ConvNeXt-T (examples/convnext_tiny.cnn): exact torchvision counts, stochastic-depth rates by
torchvision's rule, a hand-written PyTorch twin with torchvision's layout that computes the same
output as our compiled plan, and a file far shorter than torchvision's Python."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from twin import (EXAMPLES, assert_reference_counts, assert_twin_matches, check_json, code_lines, torch_counts,
                  torch_macs)

NAME = "convnext_tiny"

# Provenance: torchvision 0.29.1 (torch 2.14.1), torchvision.models.convnext_tiny(weights=None),
# one 3x224x224 image: params = sum(p.numel() for p in model.parameters()); buffers = BatchNorm
# running mean+var elements (ConvNeXt has none); MACs = Conv2d + Linear multiply-accumulates from
# forward hooks, Conv2d out.numel()/N * (in_channels/groups) * kh * kw, Linear in * out at every
# position it is applied to (the blocks' Linear layers run on every pixel of the channels-last map).
PARAMS, BUFFERS, MACS = 28_589_128, 0, 4_455_531_264
WIDTHS, DEPTHS, SD_PROB = (96, 192, 384, 768), (3, 3, 9, 3), 0.1

# torchvision/models/convnext.py (0.29.1): 349 lines that are neither blank nor `#` comments,
# measured with twin.code_lines (tiny to large, weights metadata and builders included).
TORCHVISION_LINES = 349
LINE_LIMIT = 25


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an N×C×H×W tensor: each position normalised on its own."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LayerScale(nn.Module):
    """x · γ per channel. torchvision keeps γ as a C×1×1 parameter of the block itself; here it is
    a C vector in a module of its own, so that it follows the block's convs in state_dict order
    and has our tensor's shape (twin.give_weights pairs tensors of identical shapes only)."""

    def __init__(self, c: int, init: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((c,), init))

    def forward(self, x):
        return x * self.weight[:, None, None]


class StochasticDepth(nn.Module):
    """torchvision's StochasticDepth(p, "row"): in training each sample's branch is kept with
    probability 1 − p and scaled by 1/(1 − p); the identity at inference."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class CNBlock(nn.Module):
    """Depthwise 7x7, LayerNorm, Linear 4C, GELU, Linear C, layer scale, stochastic depth, + input.
    torchvision applies its two nn.Linear layers to the channels-last tensor; here they are 1x1
    convs on the channels-first one: the same map at every position, with our weights' shapes."""

    def __init__(self, c: int, sd_prob: float, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = LayerNorm2d(c, eps=1e-6)
        self.pwconv1 = nn.Conv2d(c, 4 * c, 1)
        self.pwconv2 = nn.Conv2d(4 * c, c, 1)
        self.layer_scale = LayerScale(c, layer_scale)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x):
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(self.dwconv(x)))))
        return x + self.stochastic_depth(self.layer_scale(y))


class ConvNeXtTiny(nn.Module):
    def __init__(self, classes: int = 1000, widths=WIDTHS, depths=DEPTHS, sd_prob=SD_PROB):
        super().__init__()
        layers = [nn.Conv2d(3, widths[0], 4, stride=4), LayerNorm2d(widths[0], eps=1e-6)]
        total, block_id = sum(depths), 0
        for i, (c, n) in enumerate(zip(widths, depths)):
            if i > 0:  # torchvision appends this after the previous stage: the same order
                layers += [LayerNorm2d(widths[i - 1], eps=1e-6), nn.Conv2d(widths[i - 1], c, 2, stride=2)]
            for _ in range(n):
                layers.append(CNBlock(c, sd_prob * block_id / (total - 1.0)))
                block_id += 1
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(widths[-1], eps=1e-6), nn.Flatten(1),
                                        nn.Linear(widths[-1], classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


def test_counts_are_torchvisions():
    assert_reference_counts(NAME, PARAMS, BUFFERS, MACS)


def test_drop_rates_rise_as_torchvisions():
    got = check_json(NAME)
    rates = [b["args"]["drop"] for b in got["blocks"] if b["block"] == "cnblock"]
    total = sum(DEPTHS)
    assert rates == [SD_PROB * k / (total - 1.0) for k in range(total)]  # same float operations
    scales = [b["args"]["scale"] for b in got["blocks"] if b["block"] == "cnblock"]
    assert scales == [1e-6] * total


def test_twin_has_torchvisions_counts():
    twin = ConvNeXtTiny()
    assert torch_counts(twin) == (PARAMS, BUFFERS)
    assert torch_macs(twin) == MACS


def test_compiled_plan_matches_twin():
    torch.manual_seed(0)
    assert_twin_matches(NAME, ConvNeXtTiny(), batch=1)


def test_shorter_than_torchvision():
    lines = code_lines(EXAMPLES / f"{NAME}.cnn")
    assert lines < LINE_LIMIT, f"{lines} lines (torchvision's Python: {TORCHVISION_LINES})"
