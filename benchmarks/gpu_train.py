"""Images per second of a whole training step on the GPU: cnnc's CUDA backend in float32 and in
bf16 (`train: precision=bf16`: convolutions on the tensor cores, float32 master weights) against
PyTorch in float32 (TF32 off) and with automatic mixed precision (bf16 autocast, channels_last:
what a user of an H100 runs), same network, same batch, measured in the same process.

Default: ResNet-50 at batch 256 and ResNet-20 (CIFAR) at batch 128 (`--cases name:batch,...`).
A step is forward, loss, backward and an SGD-momentum update; medians over timed steps after
warm-up, synchronised with the device. Prints a table with the ratios ours/PyTorch float32 (goal
1.0) and ours bf16/PyTorch AMP (goal 0.8; images/s); `--json` for one object; `--dry-run` lists the cases and
checks their files without a GPU. Not a test: needs a GPU, and timings vary.
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

CASES = [("resnet50", 256), ("resnet20_cifar", 128)]
GOAL_FP32 = 1.0  # issue 21: float32 training step at least PyTorch's images/s
GOAL_BF16 = 0.8  # and bf16 at least 0.8x PyTorch AMP's


def ours(name: str, batch: int, steps: int, precision: str = "fp32") -> float:
    from cnnc.backends.base import Ctx
    from cnnc.compiler.train_config import TrainConfig
    from cnnc.runtime.model import Model
    from cnnc.runtime.train import Trainer

    model = Model.load(ROOT / "examples" / f"{name}.cnn", backend="cuda")
    model.use_precision(precision)  # conv and dense layers in it; float32 master weights
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


def torch_peer(name: str, batch: int, steps: int, amp: bool = False, device: str = "cuda") -> float:
    """PyTorch's images/s: float32 with TF32 off, or (amp) bf16 autocast with channels_last
    tensors and float32 master weights, as torch.autocast does. `device` "cpu" runs the same code
    on the CPU (a check of this script, not a measurement)."""
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
    net = TorchNetwork(model.graph, model.host_params(), device=device)
    xt = torch.tensor(x, device=device)
    if amp:
        cl = torch.channels_last
        for leaf in net.leaves.values():
            if leaf.dim() == 4:
                leaf.data = leaf.data.contiguous(memory_format=cl)
        xt = xt.contiguous(memory_format=cl)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    yt = torch.tensor(rng.integers(0, model.classes, batch), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(net(xt, training=True), yt)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def parse_cases(text: str | None) -> list[tuple[str, int]]:
    if not text:
        return list(CASES)
    out = []
    for part in text.split(","):
        name, _, batch = part.partition(":")
        if not (ROOT / "examples" / f"{name}.cnn").exists() or not batch.isdigit():
            raise SystemExit(f"gpu_train: --cases takes name:batch of examples/*.cnn, got {part!r}")
        out.append((name, int(batch)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cases", help="name:batch,... of examples/*.cnn (default resnet50:256,resnet20_cifar:128)")
    ap.add_argument("--no-amp", action="store_true",
                    help="skip the bf16 steps (ours, and PyTorch's autocast + channels_last)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="list the cases and check their networks; no GPU")
    args = ap.parse_args(argv)
    cases = parse_cases(args.cases)
    if args.dry_run:
        from cnnc.compiler.pipeline import check
        for name, batch in cases:
            g = check(ROOT / "examples" / f"{name}.cnn")
            print(f"{name} batch {batch}: {len(g.nodes)} nodes; cnnc float32, PyTorch float32"
                  + ("" if args.no_amp else ", cnnc bf16, PyTorch AMP bf16 channels_last") + f"; {args.steps} timed steps")
        return 0
    from cnnc.backends.cuda import device
    if not device.gpu_available():
        print("gpu_train: no NVIDIA GPU with CuPy here; nothing to measure", file=sys.stderr)
        return 0
    rows = []
    for name, batch in cases:
        a = ours(name, batch, args.steps)
        b = torch_peer(name, batch, args.steps)
        a16 = None if args.no_amp else ours(name, batch, args.steps, "bf16")
        c = None if args.no_amp else torch_peer(name, batch, args.steps, amp=True)
        rows.append({"network": name, "batch": batch, "ours_img_s": a, "torch_img_s": b, "ratio": a / b,
                     "ours_bf16_img_s": a16, "torch_amp_img_s": c, "ratio_amp": a16 / c if c else None,
                     "goal": GOAL_FP32, "goal_bf16": GOAL_BF16})
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'network':<16}{'batch':>6}{'cnnc img/s':>12}{'torch fp32':>12}{'ratio':>7}{'goal':>6}"
          f"{'cnnc bf16':>11}{'torch AMP':>11}{'ratio':>7}{'goal':>6}")
    for r in rows:
        amp = (f"{r['ours_bf16_img_s']:>11.1f}{r['torch_amp_img_s']:>11.1f}{r['ratio_amp']:>7.2f}{r['goal_bf16']:>6.1f}"
               if r["torch_amp_img_s"] else f"{'-':>11}{'-':>11}{'-':>7}{'-':>6}")
        print(f"{r['network']:<16}{r['batch']:>6}{r['ours_img_s']:>12.1f}{r['torch_img_s']:>12.1f}"
              f"{r['ratio']:>7.2f}{r['goal']:>6.1f}" + amp)
    print("cnnc: our kernels, float32 and bf16 (tensor cores); torch fp32: TF32 off, cudnn.benchmark; "
          "torch AMP: bf16 autocast, channels_last")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
