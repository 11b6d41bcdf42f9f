"""The NumPy backend's BatchNorm (backends/numpy/kernels.py): blocked passes over (image, channel) rows.

Against PyTorch's batch_norm in float64 and float32 (output, running statistics, input, weight
and bias gradients), training and evaluation, 4-D with long rows (batched dot products) and
short rows (products and matrix-vector sums), 2-D, without affine parameters, inputs whose mean
is far from zero (the per-row and per-channel sums are where cancellation would show), and
blocks of a few rows (straddling images, the last one short) over two threads.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_numpy_grad import make_node, make_params, rel  # noqa: E402

from cnnc.backends.base import Ctx  # noqa: E402
from cnnc.backends.numpy import NumpyBackend, kernels, parallel  # noqa: E402

NumpyBackend()
TOL = {np.float32: 1e-5, np.float64: 1e-12}

# id: (attributes, input shape without the batch, batch, input offset, input spread)
CASES = {
    "4d-long-rows": ({}, (3, 24, 24), 3, 0.0, 1.0),
    "4d-short-rows": (dict(momentum=0.3, eps=1e-3), (5, 3, 4), 4, 0.0, 2.0),
    "4d-offset": ({}, (4, 24, 23), 2, 40.0, 1.0),
    "4d-offset-short": ({}, (6, 5, 5), 3, -25.0, 0.5),
    "2d": (dict(momentum=0.3), (7,), 9, 3.0, 1.0),
    "noaffine": (dict(affine=False), (3, 6, 7), 2, 1.0, 1.0),
}


def seed(*parts) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(parts).encode()))


def run(case: str, dtype, training: bool):
    """Ours and PyTorch's (y, running mean, running var, dx, dweight, dbias) for one case."""
    kw, shape, batch, offset, spread = CASES[case]
    node, specs = make_node("batchnorm", kw, [shape])
    rng = seed(case, dtype.__name__, training)
    x = (offset + spread * rng.normal(size=(batch, *shape))).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    params = make_params(specs, rng, dtype)
    torch_params = {k: torch.tensor(v.copy()) for k, v in params.items()}
    k = kernels.KERNELS["batchnorm"]
    y, saved = k.forward(node, [x], params, Ctx(training=training))
    (dx,), dps = k.backward(node, saved, dy, params, Ctx(training=training))
    ours = [y, params["running_mean"], params["running_var"], dx, dps.get("weight"), dps.get("bias")]

    xt = torch.tensor(x, requires_grad=True)
    wt = torch_params["weight"].requires_grad_() if "weight" in torch_params else None
    bt = torch_params["bias"].requires_grad_() if "bias" in torch_params else None
    a = node.attrs
    yt = torch.nn.functional.batch_norm(xt, torch_params["running_mean"], torch_params["running_var"], wt, bt,
                                        training, float(a.momentum), float(a.eps))
    leaves = [xt] + [t for t in (wt, bt) if t is not None]
    grads = list(torch.autograd.grad(yt, leaves, torch.tensor(dy))) + [None, None]
    theirs = [yt.detach().numpy(), torch_params["running_mean"].numpy(), torch_params["running_var"].numpy(),
              grads[0].numpy(), grads[1].numpy() if wt is not None else None,
              grads[2].numpy() if bt is not None else None]
    return ours, theirs


NAMES = ["y", "running mean", "running var", "dx", "d weight", "d bias"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch(case, dtype, training):
    ours, theirs = run(case, dtype, training)
    for got, want, what in zip(ours, theirs, NAMES):
        if want is None:
            assert got is None, what
            continue
        assert got.dtype == dtype and got.shape == want.shape, what
        assert rel(got, want) <= TOL[dtype], f"{what}: relative error {rel(got, want):.2e}"


@pytest.mark.parametrize("case", ["4d-long-rows", "4d-short-rows", "4d-offset"])
def test_blocks_and_threads_match_one_block(case, monkeypatch):
    """Blocks of a few rows on two threads: PyTorch's values, and one block's to rounding (the
    summation order differs; dγ's Σ dy·x − μ·Σ dy scales that by about |μ|/σ)."""
    _, shape, batch, _, _ = CASES[case]
    threads = parallel.get_threads()
    try:
        parallel.set_threads(1)
        monkeypatch.setattr(kernels, "BN_BLOCK", 1 << 30)
        whole, _ = run(case, np.float64, True)
        parallel.set_threads(2)
        width = int(np.prod(shape[1:]))
        monkeypatch.setattr(kernels, "BN_BLOCK", 3 * width)  # 3 rows a block: 2 a thread or more
        monkeypatch.setattr(parallel, "WORK_PER_ELEMENT", 1 << 30)  # split however small
        assert len(parallel.chunks(batch * shape[0], parallel.WORK_PER_ELEMENT * 2)) == 2
        split, theirs = run(case, np.float64, True)
    finally:
        parallel.set_threads(threads)
    for got, one, want, what in zip(split, whole, theirs, NAMES):
        assert rel(got, one) <= 1e-13, what
        assert rel(got, want) <= 1e-12, what
