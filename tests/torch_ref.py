"""Run one of our checked graphs in PyTorch with the same weights: the oracle for whole networks.

The op-by-op translation lives in `cnnc.runtime.peers` (also behind `cnnc bench --vs torch`);
this keeps the tests' calling convention: (output, {qualified name: leaf tensor}).
"""

from __future__ import annotations

import numpy as np
import torch

from cnnc.runtime.peers import TorchNetwork


def run_torch(graph, params: dict[str, np.ndarray], x: np.ndarray, training: bool = False):
    """Forward through the graph in PyTorch. Returns (output, {qualified name: leaf tensor})."""
    net = TorchNetwork(graph, params)
    return net(torch.tensor(x, dtype=torch.float32), training=training), net.leaves
