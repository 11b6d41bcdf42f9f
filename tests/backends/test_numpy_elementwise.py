"""The NumPy backend's rendered formulas (backends/numpy/elementwise.py): the variants that write
their result into a given array give the same values, to the bit, as the ones returning a new array.

For every op of the table with a formula (and several values of its parameters), in float32 and
float64, on values that reach each formula's branches and saturations: `apply_into` into a fresh
array and into x itself (as the fused epilogues call it) against `apply`; `grad_into` against
`grad`; and the formula kernels' blocked, threaded path against a whole-array `apply`/`grad`.
Their derivatives themselves are checked against finite differences in test_numpy_grad.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from cnnc.backends.base import Ctx
from cnnc.backends.numpy import NumpyBackend, elementwise, parallel
from cnnc.compiler.ops import OPS

NumpyBackend()
FORMULA_OPS = [op for op in OPS if OPS[op].formula is not None]
PARAM_VALUES = {"slope": [0.2, -0.3], "alpha": [1.0, 0.4]}


def variants():
    for op in FORMULA_OPS:
        params = OPS[op].formula.params
        if not params:
            yield op, ()
        else:  # one parameter at a time from its list, the others at their first value
            for value in PARAM_VALUES[params[0]]:
                yield op, (value,) + tuple(PARAM_VALUES[p][0] for p in params[1:])


def values(dtype, n=4099) -> np.ndarray:
    rng = np.random.default_rng(7)
    special = [0.0, -0.0, 3.0, -3.0, 6.0, -6.0, 1e-3, -1e-3, 100.0, -100.0, 30.0, -30.0]
    return np.concatenate([special, rng.normal(0, 4, n - len(special))]).astype(dtype)


class _Node:
    def __init__(self, op, args):
        self.op = op
        self.attrs = OPS[op].attrs(**dict(zip(OPS[op].formula.params, args)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("op,args", list(variants()))
def test_into_variants_equal_the_plain_ones(op, args, dtype):
    x = values(dtype)
    y = elementwise.apply(op, args, x)
    fresh = np.full_like(x, np.nan)
    assert elementwise.apply_into(op, args, x, fresh) is fresh
    np.testing.assert_array_equal(fresh, y)
    inplace = x.copy()
    elementwise.apply_into(op, args, inplace, inplace)
    np.testing.assert_array_equal(inplace, y)
    dy = np.random.default_rng(8).normal(size=x.shape).astype(dtype)
    want = elementwise.grad(op, args, x, y, dy)
    got = np.full_like(x, np.nan)
    elementwise.grad_into(op, args, x, y, dy, got)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == dtype


@pytest.mark.parametrize("op", ["relu6", "silu", "sigmoid", "hardswish"])
def test_blocked_kernel_equals_whole_array(op, monkeypatch):
    """The formula kernel on an array of several blocks over two threads: the whole-array values."""
    node = _Node(op, tuple(PARAM_VALUES[p][0] for p in OPS[op].formula.params))
    x = values(np.float32, 3 * 4099).reshape(3, 1, 4099)
    dy = np.random.default_rng(9).normal(size=x.shape).astype(np.float32)
    threads = parallel.get_threads()
    monkeypatch.setattr(elementwise, "FORMULA_BLOCK", 1000)  # 4 · 1000 ≤ size: the blocked path
    monkeypatch.setattr(parallel, "WORK_PER_ELEMENT", 1 << 30)  # split however small
    try:
        parallel.set_threads(2)
        y, saved = elementwise.eltwise_forward(node, [x], {}, Ctx(training=True))
        (dx,), _ = elementwise.eltwise_backward(node, saved, dy, {}, Ctx(training=True))
    finally:
        parallel.set_threads(threads)
    args = elementwise._node_args(node)
    want = elementwise.apply(op, args, x)
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(dx, elementwise.grad(op, args, x, want, dy))
