"""Whole networks on the GPU (skipped without one): every zoo network's forward and backward at a
small input against the NumPy backend with the same weights, layer by layer, and LeNet-5 trained
on the GPU to the accuracy it reaches on the CPU.

Each layer runs on the NumPy reference's own inputs and output gradient (runtime/parity.py local_parity):
whole-network parity flagged VGG-19 although every kernel was right, because one stage4.conv3
pre-activation rounds to 6.1e-6 in NumPy and -1.1e-6 in CUDA and stage4.relu3 then passes a
gradient in one backend and blocks it in the other (reproduced on the CPU emulator of the kernels;
benchmarks/NOTES.md)."""

from __future__ import annotations

import numpy as np
import pytest

from cnnc.backends.cuda import device

from conftest import EXAMPLES
from cnnc.runtime.parity import local_parity, network

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not device.gpu_available(), reason="needs an NVIDIA GPU and CuPy (cnnc[cuda])")]

SMALL = {"alexnet": (96, 96), "alexnet_2012": (99, 99), "googlenet_2014": None, "googlenet": (64, 64),
         "lenet5": None, "resnet20_cifar": None}


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.cnn")), ids=lambda p: p.stem)
def test_zoo_network_forward_and_backward_match_numpy(path):
    size = SMALL.get(path.stem, (64, 64))
    device.POISON = True
    try:
        rows, first_bad = local_parity(network(path, size), "cuda", batch=2, tolerance=1e-4)
    finally:
        device.POISON = False
    assert first_bad is None, [r for r in rows if r["bad"]][:3]


def test_lenet5_trains_on_the_gpu_like_on_the_cpu(tmp_path):
    from cnnc.runtime import api
    cpu = api.train(EXAMPLES / "lenet5.cnn", run_dir=tmp_path / "cpu", epochs=3, progress=False)
    gpu = api.train(EXAMPLES / "lenet5.cnn", run_dir=tmp_path / "gpu", epochs=3, backend="cuda", progress=False)
    assert gpu.test_accuracy >= cpu.test_accuracy - 0.01
    assert np.isfinite(gpu.test_loss)
