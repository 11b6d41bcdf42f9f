"""The NumPy backend's compiled loops (backends/numpy/jit.py, jit_loops.py; Numba, the [jit] extra).

Every kernel with a compiled path (BatchNorm; the gradients generated from the op table's formulas,
alone and in the fused conv epilogue): float64 central finite differences on that path (the cases of
test_numpy_grad.py), and the compiled path against the plain NumPy path in float32 and float64,
at small sizes (one thread) and at sizes that split over two threads. `CNNC_JIT=0` and a missing
Numba both give the plain path. The other backend tests run on whichever path the environment
selects: `CNNC_JIT=0 python -m pytest tests/backends` and `CNNC_JIT=1 ...` run them on each.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

pytest.importorskip("numba")

from test_numpy_grad import BACKEND, CASES, Case, ctx_for, make_leaves, make_node, make_params, rel  # noqa: E402
from test_numpy_grad import test_backward_matches_finite_differences as finite_differences  # noqa: E402

from cnnc.backends.numpy import jit, parallel  # noqa: E402


# the kernels with a compiled path: BatchNorm, the element-wise ops whose derivative is generated as
# a loop, and the fused conv epilogue's gradient (activation read from the output or the input)
COMPILED = [c for c in CASES if c.op in ("batchnorm", "fused_bn") or jit.has_gradient_loop(c.op)] + [
    Case("fused_conv-relu6-residual", "fused_conv", dict(filters=4, kernel=3, pad=1, activation="relu6",
                                                         residual=True), [(3, 6, 6), (4, 6, 6)], scale=4.0),
    Case("fused_conv-leaky_relu", "fused_conv", dict(filters=4, kernel=3, activation="leaky_relu",
                                                     act_args=(0.2,)), [(3, 6, 6)]),
    Case("fused_conv-hardswish-residual", "fused_conv", dict(filters=3, kernel=1, activation="hardswish",
                                                             residual=True), [(3, 5, 5), (3, 5, 5)], scale=3.0),
    Case("fused_conv-relu-nobias", "fused_conv", dict(filters=4, kernel=3, pad=1, activation="relu", bias=False),
         [(3, 6, 6)]),
    Case("fused_conv-residual-nobias", "fused_conv", dict(filters=4, kernel=1, residual=True, bias=False),
         [(3, 6, 6), (4, 6, 6)]),
]


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
         "batchnorm-train-noaffine": [(24, 48, 48)], "relu6": [(16, 96, 96)], "leaky_relu": [(16, 96, 96)],
         "fused_conv-relu6-residual": [(3, 60, 60), (4, 60, 60)], "fused_bn-relu6": [(16, 64, 64)],
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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias,residual", [(True, False), (False, True), (True, True), (False, False)])
@pytest.mark.parametrize("act", [("relu6", ()), ("leaky_relu", (0.2,)), ("hardswish", ()), ("relu", ()), None],
                         ids=["relu6", "leaky_relu", "hardswish", "relu", "none"])
def test_compiled_epilogue_equals_numpys_to_the_bit(act, bias, residual, threads, dtype, use_jit, monkeypatch):
    """The fused conv epilogue's generated loop (each bias/residual combination; in place, and with
    the pre-activation kept where the derivative reads it) gives the NumPy blocks' values exactly,
    on one thread and split over two; with values at the activations' kinks and a NaN."""
    from cnnc.backends.numpy import fused
    if not (bias or residual or act):
        pytest.skip("nothing to do: the epilogue returns y")
    monkeypatch.setattr(parallel, "_threads", threads)
    monkeypatch.setattr(parallel, "MIN_WORK", 0 if threads > 1 else parallel.MIN_WORK)
    rng = np.random.default_rng(zlib.crc32(f"{act}{bias}{residual}".encode()))
    y0 = (rng.normal(size=(3, 5, 7, 9)) * 4).astype(dtype)
    y0.reshape(-1)[:6] = [0.0, -0.0, 6.0, -3.0, 3.0, np.nan]
    b = rng.normal(size=5).astype(dtype) if bias else None
    r = rng.normal(size=y0.shape).astype(dtype) if residual else None
    results, ran = [], []
    epilogue = jit.epilogue
    monkeypatch.setattr(jit, "epilogue", lambda *a: ran.append(epilogue(*a)) or ran[-1])
    for on in (False, True):
        use_jit(on)
        y = y0.copy()
        out, pre = fused.epilogue(y, b, r, act)
        results.append((out, pre))
    assert ran == [False, True]  # the plain blocks, then the loop
    (out0, pre0), (out1, pre1) = results
    np.testing.assert_array_equal(out1, out0)
    assert (pre0 is None) == (pre1 is None) == ("input" not in fused._reads(act))
    if pre0 is not None:
        np.testing.assert_array_equal(pre1, pre0)


def test_epilogues_with_exp_stay_on_numpy():
    """silu, gelu, sigmoid and tanh: NumPy's SIMD exp and tanh beat a scalar loop; no generated epilogue."""
    assert jit.has_epilogue_loop(None) and jit.has_epilogue_loop("relu6") and jit.has_epilogue_loop("leaky_relu")
    assert not any(jit.has_epilogue_loop(op) for op in ("silu", "gelu", "sigmoid", "tanh"))


def test_a_network_without_compiled_kernels_does_not_import_numba():
    """LeNet-5 (tanh, average pools, no BatchNorm) has nothing a compiled loop speeds up: its
    training step must not pay Numba's import (seconds on a busy machine) in `cnnc train`'s wall time."""
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
