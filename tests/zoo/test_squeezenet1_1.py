"""SqueezeNet 1.1 (examples/squeezenet1_1.cnn): exact torchvision counts, a hand-written PyTorch
twin with torchvision's layout that computes the same output as our compiled plan, and a file
far shorter than torchvision's Python."""

from __future__ import annotations

import torch
from torch import nn

from twin import EXAMPLES, assert_reference_counts, assert_twin_matches, code_lines, torch_counts, torch_macs

NAME = "squeezenet1_1"

# Provenance: torchvision 0.29.1 (torch 2.14.1), torchvision.models.squeezenet1_1(weights=None),
# one 3x224x224 image: params = sum(p.numel() for p in model.parameters()); buffers = BatchNorm
# running mean+var elements (SqueezeNet has no BatchNorm); MACs = Conv2d multiply-accumulates
# from forward hooks, out.numel()/N * (in_channels/groups) * kh * kw (no Linear layers).
PARAMS, BUFFERS, MACS = 1_235_496, 0, 349_151_936

# torchvision/models/squeezenet.py (0.29.1): 187 lines that are neither blank nor `#` comments,
# measured with twin.code_lines (both versions, weights metadata and builders included).
TORCHVISION_LINES = 187
LINE_LIMIT = 25


class Fire(nn.Module):
    """Squeeze with 1x1 filters, then expand with 1x1 and 3x3 filters side by side (concatenated)."""

    def __init__(self, c_in: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(c_in, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)

    def forward(self, x):
        s = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(s)), torch.relu(self.expand3x3(s))], dim=1)


class SqueezeNet11(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(), pool,
            Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), pool,
            Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool,
            Fire(256, 48, 192, 192), Fire(384, 48, 192, 192),
            Fire(384, 64, 256, 256), Fire(512, 64, 256, 256))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(512, classes, 1), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


def test_counts_are_torchvisions():
    assert_reference_counts(NAME, PARAMS, BUFFERS, MACS)


def test_twin_has_torchvisions_counts():
    twin = SqueezeNet11()
    assert torch_counts(twin) == (PARAMS, BUFFERS)
    assert torch_macs(twin) == MACS


def test_compiled_plan_matches_twin():
    torch.manual_seed(0)
    assert_twin_matches(NAME, SqueezeNet11(), batch=2)


def test_shorter_than_torchvision():
    lines = code_lines(EXAMPLES / f"{NAME}.cnn")
    assert lines < LINE_LIMIT, f"{lines} lines (torchvision's Python: {TORCHVISION_LINES})"
