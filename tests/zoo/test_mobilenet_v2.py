"""MobileNetV2 (examples/mobilenet_v2.cnn): torchvision's counts, a PyTorch twin with
torchvision's structure that computes what our -O2 plan computes, and a file far shorter than
torchvision's Python."""

from __future__ import annotations

import torch
from torch import nn
from twin import EXAMPLES, assert_reference_counts, assert_twin_matches, code_lines, torch_counts

NAME = "mobilenet_v2"

# Provenance: torchvision 0.29.1, torchvision.models.mobilenet_v2(weights=None):
# params = sum(p.numel() for p in model.parameters()) (also the weights' meta "num_params");
# buffers = BatchNorm running_mean + running_var elements; MACs = Conv2d + Linear
# multiply-accumulates for one 3x224x224 image, by forward hooks.
PARAMS, BUFFERS, MACS = 3_504_872, 34_112, 300_774_272

# Paper Table 2: expansion t, output channels c, repeats n, first stride s.
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def make_divisible(v: float, d: int = 8) -> int:
    """Nearest multiple of d (halves up), at least d, and no more than 10% below v."""
    n = max(d, int(v + d / 2) // d * d)
    return n + d if n < 0.9 * v else n


def conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, relu6: bool = True) -> nn.Sequential:
    parts = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*parts, *([nn.ReLU6()] if relu6 else []))


class InvertedResidual(nn.Module):
    """Expand 1x1 (when t > 1), depthwise 3x3, linear 1x1 projection; identity shortcut when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, t: int):
        super().__init__()
        hidden = round(cin * t)
        expand = [conv_bn(cin, hidden)] if t != 1 else []
        self.body = nn.Sequential(*expand, conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  conv_bn(hidden, cout, relu6=False))
        self.shortcut = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.shortcut else y


class MobileNetV2(nn.Module):
    def __init__(self, width: float = 1.0, classes: int = 1000):
        super().__init__()
        c = make_divisible(32 * width)
        blocks = [conv_bn(3, c, 3, 2)]
        for t, out, n, s in SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(c, make_divisible(out * width), s if i == 0 else 1, t))
                c = make_divisible(out * width)
        last = make_divisible(1280 * max(1.0, width))
        blocks.append(conv_bn(c, last))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def test_counts_are_torchvisions():
    assert_reference_counts(NAME, PARAMS, BUFFERS, MACS)


def test_twin_has_torchvisions_counts():
    assert torch_counts(MobileNetV2()) == (PARAMS, BUFFERS)


def test_twin_computes_what_the_o2_plan_computes():
    torch.manual_seed(0)
    assert_twin_matches(NAME, MobileNetV2())


def test_file_is_short():
    # torchvision/models/mobilenetv2.py (0.29.1) has 209 code lines by the same count
    # (code_lines: neither blank nor a `#` comment), not counting Conv2dNormActivation in ops/misc.py.
    assert code_lines(EXAMPLES / f"{NAME}.cnn") <= 32
