"""Images per second of a whole training step on the GPU: cnnc's CUDA backend against PyTorch in
float32 (TF32 off), same network, same batch, measured in the same process.

Default: ResNet-50 at batch 64 and ResNet-20 (CIFAR) at batch 128. A step is forward, loss,
backward and an SGD-momentum update; medians over timed steps after warm-up, synchronised with
CUDA events. Prints a table with the ratio ours/PyTorch (images/s); `--json` for one object.
Not a test: needs a GPU, and timings vary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CASES = [("resnet50", 64), ("resnet20_cifar", 128)]


def ours(name: str, batch: int, steps: int) -> float:
    from cnnc.backends.base import Ctx
    from cnnc.compiler.train_config import TrainConfig
    from cnnc.runtime.model import Model
    from cnnc.runtime.train import Trainer

    model = Model.load(ROOT / "examples" / f"{name}.cnn", backend="cuda")
    cp = model.backend.cp
    cfg = TrainConfig(optimizer="momentum", momentum=0.9, lr=0.01, batch=batch)
    trainable = {k for k, t in model.trainable().items() if t}
    opt = model.backend.make_optimizer(cfg, {k: model.params[k] for k in sorted(trainable)})
    loss_fn = model.backend.loss("cross_entropy")
    rng = np.random.default_rng(0)
    x = model.backend.to_device(rng.normal(size=(batch, *model.input_shape)).astype(np.float32))
    y = model.backend.to_device(rng.integers(0, model.classes, batch))
    ctx = Ctx(training=True, rng=np.random.default_rng(0))

    def step():
        out = model.executor.forward(x, ctx)
        _, dout = loss_fn(out, y)
        opt.step(model.executor.backward(dout), 0.01)

    for _ in range(3):
        step()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        cp.cuda.Device().synchronize()
        times.append(time.perf_counter() - t)
    assert Trainer  # the trainer runs the same step; timed here without its bookkeeping
    return batch / statistics.median(times)


def torch_peer(name: str, batch: int, steps: int) -> float:
    import torch
    import torch.nn.functional as F

    from cnnc.runtime.model import Model
    from cnnc.runtime.peers import TorchNetwork

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    model = Model.load(ROOT / "examples" / f"{name}.cnn")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *model.input_shape)).astype(np.float32)
    net = TorchNetwork(model.graph, model.host_params(), device="cuda")
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    xt = torch.tensor(x, device="cuda")
    yt = torch.tensor(rng.integers(0, model.classes, batch), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(xt, training=True), yt).backward()
        opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from cnnc.backends.cuda import device
    if not device.gpu_available():
        print("gpu_train: no NVIDIA GPU with CuPy here; nothing to measure", file=sys.stderr)
        return 0
    rows = []
    for name, batch in CASES:
        a = ours(name, batch, args.steps)
        b = torch_peer(name, batch, args.steps)
        rows.append({"network": name, "batch": batch, "ours_img_s": a, "torch_img_s": b, "ratio": a / b, "goal": 0.8})
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'network':<16}{'batch':>6}{'cnnc img/s':>12}{'torch img/s':>13}{'ratio':>8}{'goal':>6}")
    for r in rows:
        print(f"{r['network']:<16}{r['batch']:>6}{r['ours_img_s']:>12.1f}{r['torch_img_s']:>13.1f}"
              f"{r['ratio']:>8.2f}{r['goal']:>6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
