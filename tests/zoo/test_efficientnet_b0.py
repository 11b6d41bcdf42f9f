"""EfficientNet-B0 (examples/efficientnet_b0.cnn): torchvision's counts, a PyTorch twin with
torchvision's structure that computes what our -O2 plan computes, and a file far shorter than
torchvision's Python."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from twin import EXAMPLES, assert_reference_counts, assert_twin_matches, code_lines, torch_counts

NAME = "efficientnet_b0"

# Provenance: torchvision 0.29.1, torchvision.models.efficientnet_b0(weights=None):
# params = sum(p.numel() for p in model.parameters()) (also the weights' meta "num_params");
# buffers = BatchNorm running_mean + running_var elements; MACs = Conv2d + Linear
# multiply-accumulates for one 3x224x224 image, by forward hooks.
PARAMS, BUFFERS, MACS = 5_288_548, 42_016, 385_814_752

# Paper Table 1 (B0): expansion t, kernel k, first stride s, output channels c, repeats n.
SETTINGS = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
            (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


def make_divisible(v: float, d: int = 8) -> int:
    """Nearest multiple of d (halves up), at least d, and no more than 10% below v."""
    n = max(d, int(v + d / 2) // d * d)
    return n + d if n < 0.9 * v else n


def conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, silu: bool = True) -> nn.Sequential:
    parts = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*parts, *([nn.SiLU()] if silu else []))


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.expand = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        g = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(nn.functional.silu(self.reduce(g))))


class StochasticDepth(nn.Module):
    """Per sample, in training: keep the whole branch with probability 1 - rate (scaled up), else zero it."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if not self.training or self.rate == 0:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype).bernoulli_(1 - self.rate)
        return x * keep / (1 - self.rate)


class MBConv(nn.Module):
    """Expand 1x1 (when it widens), depthwise kxk, squeeze-excitation, linear 1x1 projection."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, t: int, drop: float):
        super().__init__()
        hidden = make_divisible(cin * t)
        expand = [conv_bn(cin, hidden)] if hidden != cin else []
        self.body = nn.Sequential(*expand, conv_bn(hidden, hidden, k, stride, groups=hidden),
                                  SqueezeExcitation(hidden, max(1, cin // 4)), conv_bn(hidden, cout, silu=False))
        self.shortcut = stride == 1 and cin == cout
        self.drop = StochasticDepth(drop)

    def forward(self, x):
        y = self.body(x)
        return x + self.drop(y) if self.shortcut else y


class EfficientNetB0(nn.Module):
    def __init__(self, width: float = 1.0, sd: float = 0.2, classes: int = 1000):
        super().__init__()
        c = make_divisible(32 * width)
        blocks = [conv_bn(3, c, 3, 2)]
        total, index = sum(n for *_, n in SETTINGS), 0
        for t, k, s, out, n in SETTINGS:
            for i in range(n):
                blocks.append(MBConv(c, make_divisible(out * width), k, s if i == 0 else 1, t, sd * index / total))
                c, index = make_divisible(out * width), index + 1
        blocks.append(conv_bn(c, 4 * c))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * c, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def test_counts_are_torchvisions():
    assert_reference_counts(NAME, PARAMS, BUFFERS, MACS)


def test_twin_has_torchvisions_counts():
    assert torch_counts(EfficientNetB0()) == (PARAMS, BUFFERS)


def test_stochastic_depth_rates_are_torchvisions():
    # torchvision: block i of 16 has rate 0.2 * i / 16, used only where the block has a shortcut
    from cnnc.compiler.pipeline import check
    graph = check(EXAMPLES / f"{NAME}.cnn")
    ours = [d["attrs"].rate for _, d in graph.nodes(data=True) if d["op"] == "stochastic_depth"]
    twins = [b.drop.rate for b in EfficientNetB0().features if isinstance(b, MBConv) and b.shortcut]
    assert len(ours) == 9 and ours == pytest.approx(twins, abs=1e-12)


def test_twin_computes_what_the_o2_plan_computes():
    torch.manual_seed(0)
    assert_twin_matches(NAME, EfficientNetB0())


def test_file_is_short():
    # torchvision/models/efficientnet.py (0.29.1) has 977 code lines by the same count
    # (code_lines: neither blank nor a `#` comment); that file holds B0-B7 and V2 S/M/L together,
    # and Conv2dNormActivation and SqueezeExcitation come from ops/misc.py besides.
    assert code_lines(EXAMPLES / f"{NAME}.cnn") <= 40
