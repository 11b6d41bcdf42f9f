"""The NumPy backend's pooling in C (backends/numpy/cpool.py): float64 central finite
differences on that path (test_numpy_grad's pool cases), the NumPy kernel's results to the bit in
float32 and float64 on one and two threads (the max pool's forward with NaNs too), and the NumPy
kernel where the C path is off."""

from __future__ import annotations

import numpy as np
import pytest

from test_numpy_grad import CASES, make_node
from test_numpy_grad import test_backward_matches_finite_differences as finite_differences

from cnnc.backends.base import Ctx
from cnnc.backends.numpy import conv, cpool, cthreads, parallel

if not cpool.available(np.float32):
    pytest.skip("no C compiler (cc) on this machine: the pools stay on NumPy", allow_module_level=True)

POOLS = [c for c in CASES if c.op == "avgpool"]
MAX_POOLS = [c for c in CASES if c.op == "maxpool"]


@pytest.fixture
def c_calls(monkeypatch):
    calls = []
    for name in ("avgpool_forward", "avgpool_backward", "maxpool_forward"):
        fn = getattr(cpool, name)
        monkeypatch.setattr(cpool, name, lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a))
    return calls


@pytest.mark.parametrize("case", POOLS, ids=[c.id for c in POOLS])
def test_c_pool_backward_matches_finite_differences(case, c_calls):
    finite_differences(case)
    assert "avgpool_forward" in c_calls and "avgpool_backward" in c_calls


# windows that tile the input, overlap, overhang it (ceil), pad it with and without counting the
# padding, asymmetric kernels, strides and padding, strides wider than the window
GEOMETRIES = [dict(kernel=2), dict(kernel=3, stride=2, pad=1), dict(kernel=3, stride=2, pad=1, count_pad=False),
              dict(kernel=3, stride=2, pad=1, round="ceil"), dict(kernel=3, stride=2, round="ceil"),
              dict(kernel=(2, 3), stride=(1, 2), pad=(0, 1, 1, 0)), dict(kernel=2, stride=3, pad=1, round="ceil"),
              dict(kernel=2, stride=2, pad=(1, 0, 1, 0), count_pad=False), dict(kernel=5, stride=1, pad=2)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items()))
def test_c_pool_equals_numpys_to_the_bit(geometry, dtype, threads, monkeypatch, c_calls):
    node, _ = make_node("avgpool", {"round": "floor", **geometry}, [(5, 17, 14)])
    rng = np.random.default_rng(len(str(geometry)))
    x = rng.normal(size=(6, 5, 17, 14)).astype(dtype)
    monkeypatch.setattr(parallel, "MIN_WORK", 0)
    monkeypatch.setattr(cthreads, "MIN_WORK", 0)
    before = parallel.get_threads()
    try:
        parallel.set_threads(threads)
        y, saved = conv.avgpool_forward(node, [x], {}, Ctx())
        dy = rng.normal(size=y.shape).astype(dtype)
        (dx,), _ = conv.avgpool_backward(node, saved, dy, {}, Ctx())
        assert c_calls == ["avgpool_forward", "avgpool_backward"]
        monkeypatch.setenv("CNNC_JIT", "0")  # the NumPy kernel
        y0, saved0 = conv.avgpool_forward(node, [x], {}, Ctx())
        (dx0,), _ = conv.avgpool_backward(node, saved0, dy, {}, Ctx())
    finally:
        parallel.set_threads(before)
    assert len(c_calls) == 2
    assert y.dtype == dx.dtype == dtype
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(dx, dx0)


@pytest.mark.parametrize("case", MAX_POOLS, ids=[c.id for c in MAX_POOLS])
def test_c_max_pool_backward_matches_finite_differences(case, c_calls):
    """The backward routes dy by comparing the inputs with the forward's maxima: here the C ones."""
    finite_differences(case)
    assert "maxpool_forward" in c_calls


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items()))
def test_c_max_pool_equals_numpys_to_the_bit(geometry, dtype, threads, monkeypatch, c_calls):
    geometry = {k: v for k, v in geometry.items() if k != "count_pad"}
    node, _ = make_node("maxpool", {"round": "floor", **geometry}, [(5, 17, 14)])
    rng = np.random.default_rng(len(str(geometry)))
    x = rng.normal(size=(6, 5, 17, 14)).astype(dtype)
    x[0, 0, 3, 2:5] = np.nan  # a NaN in a window wins, as np.maximum's does
    x[1, 2] = -np.inf
    monkeypatch.setattr(parallel, "MIN_WORK", 0)
    monkeypatch.setattr(cthreads, "MIN_WORK", 0)
    before = parallel.get_threads()
    try:
        parallel.set_threads(threads)
        y, _ = conv.maxpool_forward(node, [x], {}, Ctx())
        assert c_calls == ["maxpool_forward"]
        monkeypatch.setenv("CNNC_JIT", "0")  # the NumPy kernel
        y0, _ = conv.maxpool_forward(node, [x], {}, Ctx())
    finally:
        parallel.set_threads(before)
    assert len(c_calls) == 1 and y.dtype == dtype
    assert np.isnan(y).any() and np.isneginf(y).any()
    np.testing.assert_array_equal(y, y0)
