"""ShuffleNetV2 1.0x (examples/shufflenet_v2_x1_0.cnn): torchvision's counts, a PyTorch twin
with torchvision's structure that computes what our -O2 plan computes, and a file far shorter
than torchvision's Python."""

from __future__ import annotations

import torch
from torch import nn
from twin import EXAMPLES, assert_reference_counts, assert_twin_matches, code_lines, torch_counts

NAME = "shufflenet_v2_x1_0"

# Provenance: torchvision 0.29.1, torchvision.models.shufflenet_v2_x1_0(weights=None):
# params = sum(p.numel() for p in model.parameters()) (also the weights' meta "num_params");
# buffers = BatchNorm running_mean + running_var elements; MACs = Conv2d + Linear
# multiply-accumulates for one 3x224x224 image, by forward hooks.
PARAMS, BUFFERS, MACS = 2_278_604, 16_180, 144_907_992

# Paper Table 5, 1.0x: stem width, (stage width, units) for stages 2-4, conv5 width.
STEM, STAGES, LAST = 24, [(116, 4), (232, 8), (464, 4)], 1024


def shuffle(x, groups: int = 2):
    """Channels seen as groups x (C / groups), transposed: the channels of the groups interleave."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def pointwise(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def depthwise(c: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), nn.BatchNorm2d(c)]


class ShuffleUnit(nn.Module):
    """Stride 1: half the channels pass, the other half goes through the branch. Stride 2: the
    whole input goes through two branches, each giving half the output channels."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        half = cout // 2
        self.stride = stride
        if stride > 1:
            self.branch1 = nn.Sequential(*depthwise(cin, stride), *pointwise(cin, half))
        self.branch2 = nn.Sequential(*pointwise(cin if stride > 1 else half, half), *depthwise(half, stride),
                                     *pointwise(half, half))

    def forward(self, x):
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            return shuffle(torch.cat((a, self.branch2(b)), dim=1))
        return shuffle(torch.cat((self.branch1(x), self.branch2(x)), dim=1))


class ShuffleNetV2(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, STEM, 3, 2, 1, bias=False), nn.BatchNorm2d(STEM), nn.ReLU())
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c, stages = STEM, []
        for width, units in STAGES:
            stages.append(nn.Sequential(ShuffleUnit(c, width, 2), *(ShuffleUnit(width, width, 1) for _ in range(units - 1))))
            c = width
        self.stages = nn.Sequential(*stages)
        self.conv5 = nn.Sequential(*pointwise(c, LAST))
        self.fc = nn.Linear(LAST, classes)

    def forward(self, x):
        x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_counts_are_torchvisions():
    assert_reference_counts(NAME, PARAMS, BUFFERS, MACS)


def test_twin_has_torchvisions_counts():
    assert torch_counts(ShuffleNetV2()) == (PARAMS, BUFFERS)


def test_twin_computes_what_the_o2_plan_computes():
    torch.manual_seed(0)
    assert_twin_matches(NAME, ShuffleNetV2())


def test_file_is_short():
    # torchvision/models/shufflenetv2.py (0.29.1) has 337 code lines by the same count
    # (code_lines: neither blank nor a `#` comment); that file also holds the 0.5x, 1.5x and 2.0x variants.
    assert code_lines(EXAMPLES / f"{NAME}.cnn") <= 25
