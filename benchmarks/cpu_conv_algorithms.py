"""Each convolution algorithm of the NumPy backend on LeNet-5's and ResNet-20's layers,
against PyTorch's conv2d on the same arrays, forward and backward (input and weight gradients),
in one process, same threads, alternating rounds (the machine's load hits every side alike).

    python benchmarks/cpu_conv_algorithms.py                 # every layer, 7 rounds
    python benchmarks/cpu_conv_algorithms.py --rounds 3 --only resnet20_16
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

LAYERS = {  # key: (batch, C, K, map size, kernel, padding, stride)
    "lenet_c1": (64, 1, 6, 32, 5, 0, 1),
    "lenet_c3": (64, 6, 16, 14, 5, 0, 1),
    "resnet20_16": (128, 16, 16, 32, 3, 1, 1),
    "resnet20_32": (128, 32, 32, 16, 3, 1, 1),
    "resnet20_64": (128, 64, 64, 8, 3, 1, 1),
    "resnet20_down16": (128, 16, 32, 32, 3, 1, 2),
    "resnet20_down32": (128, 32, 64, 16, 3, 1, 2),
    "resnet20_shortcut16": (128, 16, 32, 32, 1, 0, 2),
}


def layer(batch, c, k, size, kernel, pad, stride):
    from cnnc.backends.base import NodeInfo
    from cnnc.compiler.ops import OPS, resolve_pads

    attrs = OPS["conv"].attrs(filters=k, kernel=kernel, pad=pad, stride=stride, bias=False, round="floor")
    pads = resolve_pads(attrs.pad, size, size, attrs.kernel, attrs.stride)
    out = (size + pads[0] + pads[1] - kernel) // stride + 1
    node = NodeInfo(1, "conv", "conv", attrs, ((c, size, size),), (k, out, out), pads)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, c, size, size)).astype(np.float32)
    w = (rng.normal(size=(k, c, kernel, kernel)) * 0.1).astype(np.float32)
    dy = rng.normal(size=(batch, k, out, out)).astype(np.float32)
    return node, x, w, dy


def steps(key):
    """{name: (forward, backward) callables} for our algorithms and PyTorch's."""
    import torch

    from cnnc.backends.numpy import conv

    batch, c, k, size, kernel, pad, stride = LAYERS[key]
    node, x, w, dy = layer(batch, c, k, size, kernel, pad, stride)
    out = {}
    for algo in conv.algorithms(node, c, training=True):
        state = {}

        def fwd(algo=algo, state=state):
            state["y"], state["saved"] = conv._forward(node, algo, x, w, None)

        def bwd(algo=algo, state=state):
            conv._backward(node, state["saved"], dy, w, False, key != "lenet_c1")  # C1: the network's input

        out[algo] = (fwd, bwd)
    xt = torch.tensor(x, requires_grad=key != "lenet_c1")
    wt = torch.tensor(w, requires_grad=True)
    dyt = torch.tensor(dy)
    tstate = {}

    def tfwd():
        tstate["y"] = torch.nn.functional.conv2d(xt, wt, padding=pad, stride=stride)

    def tbwd():
        tstate["y"].backward(dyt)
    out["torch"] = (tfwd, tbwd)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--only", default=",".join(LAYERS))
    args = p.parse_args()
    import torch

    from cnnc.backends.numpy import NumpyBackend, parallel
    NumpyBackend()  # sets OpenBLAS to one thread, as every run does
    threads = int(os.environ.get("CNNC_NUM_THREADS", min(parallel.available_cpus(), 8)))
    parallel.set_threads(threads)
    torch.set_num_threads(threads)
    print(f"machine: {parallel.cpu_model()}, {threads} threads each side; ms forward / backward, median of "
          f"{args.rounds} rounds; GFLOP/s of forward + backward counted as direct convolution")
    for key in args.only.split(","):
        batch, c, k, size, kernel, pad, stride = LAYERS[key]
        out = (size + 2 * pad - kernel) // stride + 1
        macs = batch * k * c * kernel * kernel * out * out
        passes = 2 if key == "lenet_c1" else 3  # forward, weight gradient (and input gradient)
        sides = steps(key)
        times = {name: ([], []) for name in sides}
        for _ in range(2):  # warm-up: compiles, allocates
            for f, b in sides.values():
                f(), b()
        for _ in range(args.rounds):
            for name, (f, b) in sides.items():
                f(), b()  # untimed: the side before leaves its threads spinning (PyTorch's OpenMP) a while
                t0 = time.perf_counter()
                f()
                t1 = time.perf_counter()
                b()
                t2 = time.perf_counter()
                times[name][0].append(t1 - t0)
                times[name][1].append(t2 - t1)
        print(f"\n{key}: batch {batch}, {c}→{k}, {kernel}×{kernel} pad {pad} stride {stride} on {size}×{size}")
        theirs = sum(statistics.median(t) for t in times["torch"])
        for name, (tf, tb) in times.items():
            f, b = statistics.median(tf) * 1e3, statistics.median(tb) * 1e3
            gflops = 2 * macs * passes / ((f + b) / 1e3) / 1e9
            print(f"  {name:16s} {f:8.2f} / {b:8.2f} ms  {gflops:6.1f} GFLOP/s  "
                  f"{(f + b) / 1e3 / theirs:5.2f}× PyTorch's time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
