"""Shared harness for the zoo's PyTorch twins: each network in examples/ has a hand-written
`torch.nn.Module` with torchvision's structure (tests/zoo/test_<network>.py). The twin gets our
weights (parameters and BatchNorm statistics, taken in order, shapes checked), and our -O2 plan's
output must equal the twin's in float32."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def check_json(name: str) -> dict:
    """`cnnc check examples/NAME.cnn --json`, through the real command line."""
    p = subprocess.run([sys.executable, "-m", "cnnc", "check", f"examples/{name}.cnn", "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def code_lines(path: Path) -> int:
    """Lines that are neither blank nor `#` comments (.cnn files and Python alike)."""
    return sum(1 for line in Path(path).read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.lstrip().startswith("#"))


def torch_counts(module) -> tuple[int, int]:
    """(parameters, BatchNorm running-statistic elements) of a torch module, as torchvision counts them."""
    params = sum(p.numel() for p in module.parameters())
    buffers = sum(b.numel() for n, b in module.named_buffers() if n.endswith(("running_mean", "running_var")))
    return params, buffers


def torch_macs(module, input_shape=(3, 224, 224)) -> int:
    """Conv2d and Linear multiply-accumulates of a torch module on one image (forward hooks), as
    torchvision's figures are measured: a Linear counts at every position it is applied to."""
    import torch
    from torch import nn
    total = 0

    def hook(layer, _inputs, out):
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            total += out[0].numel() * (layer.in_channels // layer.groups) * layer.kernel_size[0] * layer.kernel_size[1]
        else:
            total += out[0].numel() * layer.in_features

    hooks = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            module.eval()(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return total


def assert_reference_counts(name: str, params: int, buffers: int, macs: int | None, output=(1000,)) -> None:
    """`cnnc check --json` of examples/NAME.cnn gives exactly these counts and output shape."""
    got = check_json(name)
    assert (got["params"]["total"], got["buffers"]) == (params, buffers)
    if macs is not None:
        assert got["macs"] == macs
    assert got["output"] == list(output)


def twin_tensors(module) -> list[tuple[str, object]]:
    """The twin's parameters and BatchNorm statistics in registration order (num_batches_tracked left out)."""
    return [(k, v) for k, v in module.state_dict(keep_vars=True).items() if not k.endswith("num_batches_tracked")]


def give_weights(model, module) -> None:
    """Copy our model's weights into the twin, in order; every shape must agree."""
    import torch
    ours = list(model.host_params().items())
    theirs = twin_tensors(module)
    assert len(ours) == len(theirs), f"{len(ours)} tensors here, {len(theirs)} in the twin"
    with torch.no_grad():
        for (k, v), (tk, t) in zip(ours, theirs):
            assert tuple(v.shape) == tuple(t.shape), f"{k} {tuple(v.shape)} vs twin's {tk} {tuple(t.shape)}"
            t.copy_(torch.from_numpy(np.ascontiguousarray(v)).reshape(t.shape))


def assert_twin_matches(name: str, module, batch: int = 2, rtol: float = 1e-4, seed: int = 0) -> float:
    """Load examples/NAME.cnn, move BatchNorm statistics off their initial values, compile at -O2
    (BatchNorm folded, ops fused), run a random batch and the twin on it; returns the relative error."""
    import torch

    from cnnc.runtime.artifact import compile_model
    from cnnc.runtime.model import Model

    model = Model.load(EXAMPLES / f"{name}.cnn", seed=seed)
    rng = np.random.default_rng(seed)
    host = model.host_params()
    for k, v in host.items():  # every per-channel vector away from its initial value, so a swap shows
        if v.ndim != 1:
            continue
        if k.endswith(("running_mean", "bias")):
            v[...] = rng.normal(0, 0.1, v.shape)
        else:  # running variances, norm scales, layer scales (1e-6 would hide their branch), PReLU slopes
            v[...] = rng.uniform(0.5, 1.5, v.shape)
    model.set_params(host)
    give_weights(model, module)
    x = rng.normal(size=(batch, *model.input_shape)).astype(np.float32)
    ours = compile_model(model, 2)(x)
    module.eval()
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))
    assert err <= rtol, f"{name}: relative error {err:.2e} against the PyTorch twin (limit {rtol:g})"
    return err
