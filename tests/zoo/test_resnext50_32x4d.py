"""ResNeXt-50 32x4d (examples/resnext50_32x4d.cnn): exact torchvision counts, a hand-written
PyTorch twin with torchvision's layout that computes the same output as our compiled plan, and a
file far shorter than torchvision's Python."""

from __future__ import annotations

import torch
from torch import nn

from twin import EXAMPLES, assert_reference_counts, assert_twin_matches, code_lines, torch_counts, torch_macs

NAME = "resnext50_32x4d"

# Provenance: torchvision 0.29.1 (torch 2.14.1), torchvision.models.resnext50_32x4d(weights=None),
# one 3x224x224 image: params = sum(p.numel() for p in model.parameters()); buffers = BatchNorm
# running mean+var elements; MACs = Conv2d + Linear multiply-accumulates from forward hooks,
# Conv2d out.numel()/N * (in_channels/groups) * kh * kw, Linear in * out.
PARAMS, BUFFERS, MACS = 25_028_904, 68_224, 4_230_479_872

# torchvision/models/resnet.py (0.29.1): 854 lines that are neither blank nor `#` comments,
# measured with twin.code_lines (the whole ResNet/ResNeXt/Wide-ResNet family, weights metadata
# and builders included).
TORCHVISION_LINES = 854
LINE_LIMIT = 30


class Bottleneck(nn.Module):
    """1x1 reduce, grouped 3x3 (with the stride), 1x1 expand to 4 * planes; BatchNorm after each."""

    def __init__(self, c_in: int, planes: int, stride: int = 1, groups: int = 32, base_width: int = 4):
        super().__init__()
        width = int(planes * base_width / 64) * groups
        c_out = 4 * planes
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNeXt50(nn.Module):
    def __init__(self, classes: int = 1000, depths=(3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c_in, stages = 64, []
        for i, blocks in enumerate(depths):
            planes = 64 * 2 ** i
            layer = []
            for j in range(blocks):
                layer.append(Bottleneck(c_in, planes, stride=2 if i > 0 and j == 0 else 1))
                c_in = 4 * planes
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(x.mean((2, 3), keepdim=True), 1))


def test_counts_are_torchvisions():
    assert_reference_counts(NAME, PARAMS, BUFFERS, MACS)


def test_twin_has_torchvisions_counts():
    twin = ResNeXt50()
    assert torch_counts(twin) == (PARAMS, BUFFERS)
    assert torch_macs(twin) == MACS


def test_compiled_plan_matches_twin():
    torch.manual_seed(0)
    assert_twin_matches(NAME, ResNeXt50(), batch=1)


def test_shorter_than_torchvision():
    lines = code_lines(EXAMPLES / f"{NAME}.cnn")
    assert lines < LINE_LIMIT, f"{lines} lines (torchvision's Python: {TORCHVISION_LINES})"
