"""The NumPy backend's compiled loops (backends/numpy/jit.py, jit_loops.py; Numba, the [jit] extra).

Every kernel with a Numba path (BatchNorm, fused_bn with the activations of its generated loops):
float64 central finite differences on that path (the cases of test_numpy_grad.py), and the
compiled path against the plain NumPy path in float32 and float64, at small sizes (one thread)
and at sizes that split over two threads. `CNNC_JIT=0` and a missing Numba both give the plain
path. The other backend tests run on whichever path the environment selects:
`CNNC_JIT=0 python -m pytest tests/backends` and `CNNC_JIT=1 ...` run them on each. The C
element-wise loops are test_numpy_celementwise.py's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

pytest.importorskip("numba")

from test_numpy_grad import BACKEND, CASES, ctx_for, make_leaves, make_node, make_params, rel  # noqa: E402
from test_numpy_grad import test_backward_matches_finite_differences as finite_differences  # noqa: E402

from cnnc.backends.numpy import jit, parallel  # noqa: E402


# the kernels with a Numba path: BatchNorm and fused_bn
COMPILED = [c for c in CASES if c.op in ("batchnorm", "fused_bn")]


@pytest.fixture
def use_jit(monkeypatch):
    def select(on: bool):
        monkeypatch.setenv("CNNC_JIT", "1" if on else "0")
        assert jit.enabled() is on
    return select


@pytest.mark.parametrize("case", COMPILED, ids=[c.id for c in COMPILED])
def test_compiled_backward_matches_finite_differences(case, use_jit):
    use_jit(True)
    finite_differences(case)


def _run(case, shapes, dtype, seed):
    """(output, input gradients, parameter gradients, parameters after forward) of one case."""
    rng = np.random.default_rng(seed)
    node, specs = make_node(case.op, case.kw, shapes)
    kernel = BACKEND.kernel(case.op)
    offset = 3.0 if case.op in ("batchnorm", "fused_bn") else 0.0  # BatchNorm: a mean far from zero (cancellation)
    leaves = [(offset + case.scale * rng.normal(size=(8, *s))).astype(dtype) for s in shapes]
    params = make_params(specs, rng, dtype)
    y, saved = kernel.forward(node, leaves, params, ctx_for(case))
    dy = rng.normal(size=y.shape).astype(dtype)
    dxs, dps = kernel.backward(node, saved, dy, params, ctx_for(case))
    return y, dxs, dps, params


# the compiled cases again at a size that splits over two threads (above parallel.MIN_WORK)
LARGE = {"batchnorm-train-4d": [(16, 64, 64)], "batchnorm-eval-4d": [(16, 64, 64)],
         "batchnorm-train-noaffine": [(24, 48, 48)], "fused_bn-relu6": [(16, 64, 64)],
         "fused_bn-hardswish": [(16, 64, 64)], "fused_bn-silu": [(16, 64, 64)]}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("case", COMPILED, ids=[c.id for c in COMPILED])
def test_compiled_path_equals_plain_path(case, size, dtype, use_jit, monkeypatch):
    if size == "large" and case.id not in LARGE:
        pytest.skip("no large variant")
    monkeypatch.setattr(parallel, "_threads", 2)
    shapes = LARGE[case.id] if size == "large" else [case.shapes[i] for i in case.inputs]
    seed = zlib.crc32(f"{case.id}{size}".encode())
    use_jit(False)
    plain = _run(case, shapes, dtype, seed)
    use_jit(True)
    compiled = _run(case, shapes, dtype, seed)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    y0, dx0, dp0, p0 = plain
    y1, dx1, dp1, p1 = compiled
    assert y1.dtype == dtype and all(d.dtype == dtype for d in dx1)
    assert rel(y1, y0) <= tol
    for a, b in zip(dx1, dx0):
        assert rel(a, b) <= tol
    assert sorted(dp1) == sorted(dp0)
    for k in dp0:
        assert rel(dp1[k], dp0[k]) <= tol, k
    for k in p0:  # BatchNorm's running statistics, updated in place
        assert rel(p1[k], p0[k]) <= tol, k


def test_jit_off_and_numba_missing_give_the_plain_path(monkeypatch):
    monkeypatch.setenv("CNNC_JIT", "0")
    assert not jit.enabled()
    monkeypatch.setenv("CNNC_JIT", "1")
    monkeypatch.setattr(jit, "_loops", None)  # not looked up yet
    monkeypatch.setitem(sys.modules, "numba", None)  # makes `import numba` raise ImportError
    monkeypatch.delitem(sys.modules, "cnnc.backends.numpy.jit_loops", raising=False)
    assert not jit.enabled()
    case = next(c for c in CASES if c.id == "batchnorm-train-4d")
    rng = np.random.default_rng(0)
    node, specs = make_node(case.op, case.kw, case.shapes)
    x = make_leaves(case, rng, np.float32)
    y, _ = BACKEND.kernel("batchnorm").forward(node, x, make_params(specs, rng, np.float32), ctx_for(case))
    assert np.isfinite(y).all() and abs(float(y.mean())) < 1.0


def test_a_network_without_compiled_kernels_does_not_import_numba():
    """LeNet-5 (tanh, average pools, no BatchNorm) has nothing Numba's loops serve (its tanh
    gradients are C loops): its training step must not pay Numba's import (seconds on a busy machine) in `cnnc train`'s wall time."""
    from conftest import EXAMPLES
    code = f"""
import sys
import numpy as np
from cnnc.backends.base import Ctx
from cnnc.runtime.model import Model
from cnnc.runtime.train import training_plan
from cnnc.runtime.executor import Executor
m = Model.load({str(EXAMPLES / "lenet5.cnn")!r})
ex = Executor(training_plan(m, 4), m.backend, m.params)
out = ex.forward(np.zeros((4, 1, 32, 32), np.float32), Ctx(training=True, rng=np.random.default_rng(0)))
ex.backward(np.ones(out.shape, np.float32))
print("numba" in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CNNC_JIT": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
