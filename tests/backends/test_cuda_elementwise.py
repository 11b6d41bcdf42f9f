"""The CUDA backend's element-wise ops, generated from the op table (backends/cuda/elementwise.py),
checked without a GPU.

1. The generated header compiled for the CPU with g++ (it carries host stand-ins for the few
   device intrinsics it uses): its math helpers within a few ulp of float64 references over wide
   ranges, and every op's forward and derivative against the NumPy backend's renders of the same
   formulas in float64.
2. The element-wise kernels (eltwise.cu: single ops, chains, the dense epilogue) run through
   test_cuda_conv.py's CPU emulator, driven by ops.py itself, against the NumPy backend's public
   kernels in float64 (relative error norm <= 1e-5), for every op with a formula.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

from test_numpy_grad import make_node, make_params

from cnnc.backends.base import Ctx
from cnnc.backends.cuda import device, elementwise, ops
from cnnc.backends.numpy import NumpyBackend
from cnnc.backends.numpy import elementwise as np_ew
from cnnc.compiler.ops import OPS, formula_args

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")

FORMULA_OPS = [op for op in OPS if OPS[op].formula is not None]
TOL = 1e-5

HOST = r'''
extern "C" void run_fwd(int code, const float* x, float* y, long n, float p0, float p1) {
    for (long i = 0; i < n; ++i) y[i] = cnnc_act_fwd(code, x[i], p0, p1);
}
extern "C" void run_grad(int code, const float* x, const float* y, float* d, long n, float p0, float p1) {
    for (long i = 0; i < n; ++i) d[i] = cnnc_act_grad(code, x[i], y[i], p0, p1);
}
extern "C" void run_helper(int which, const float* x, float* y, long n) {
    for (long i = 0; i < n; ++i) {
        switch (which) {
            case 0: y[i] = cnnc_exp(x[i]); break;
            case 1: y[i] = cnnc_log(x[i]); break;
            case 2: y[i] = tanh_acc(x[i]); break;
            case 3: y[i] = sigmoid_acc(x[i]); break;
            default: y[i] = cnnc_softplus(x[i]); break;
        }
    }
}
'''


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ew")
    cpp, so = folder / "ew.cpp", folder / "ew.so"
    cpp.write_text(elementwise.header() + HOST, encoding="utf-8")
    p = subprocess.run(["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-o", str(so), str(cpp)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-4000:]
    return ctypes.CDLL(str(so))


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def _helper(lib, which: int, x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.empty_like(x)
    lib.run_helper(ctypes.c_int(which), _ptr(x), _ptr(y), ctypes.c_long(x.size))
    return y


def _ulps(got: np.ndarray, want: np.ndarray) -> float:
    want32 = want.astype(np.float32)
    return float(np.max(np.abs(got.astype(np.float64) - want) / np.spacing(np.abs(want32))))


def _sigmoid64(x):
    return np.where(x >= 0, 1 / (1 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x))))


HELPERS = [  # (index in run_helper, name, inputs, float64 reference, ulps allowed)
    (0, "exp", np.concatenate([np.linspace(-87, 88.7, 20001), np.linspace(-1, 1, 2001)]), np.exp, 2),
    (1, "log", np.concatenate([np.geomspace(1e-37, 1e38, 20001), np.linspace(0.5, 2, 2001)]), np.log, 3),
    (2, "tanh", np.concatenate([np.linspace(-12, 12, 20001), np.geomspace(1e-30, 1, 2001)]), np.tanh, 4),
    (3, "sigmoid", np.linspace(-80, 80, 20001), _sigmoid64, 4),
    (4, "softplus", np.linspace(-80, 80, 20001), lambda x: np.logaddexp(0.0, x), 4),
]


@pytest.mark.parametrize("which, name, xs, ref, ulps", HELPERS, ids=[h[1] for h in HELPERS])
def test_math_helpers_are_within_a_few_ulp(host_lib, which, name, xs, ref, ulps):
    x = xs.astype(np.float32)
    got = _helper(host_lib, which, x)
    assert _ulps(got, ref(x.astype(np.float64))) <= ulps, name


def test_math_helpers_special_values(host_lib):
    inf, nan = np.float32(np.inf), np.float32(np.nan)
    e = _helper(host_lib, 0, np.array([-inf, -200, 0, 89, inf, nan], np.float32))
    assert e[:4].tolist() == [0.0, 0.0, 1.0, np.inf] and e[4] == np.inf and np.isnan(e[5])
    lg = _helper(host_lib, 1, np.array([0, -1, 1, inf, nan], np.float32))
    assert lg[0] == -np.inf and np.isnan(lg[1]) and lg[2] == 0 and lg[3] == np.inf and np.isnan(lg[4])
    t = _helper(host_lib, 2, np.array([-inf, -30, 0, 30, inf], np.float32))
    assert t.tolist() == [-1, -1, 0, 1, 1]
    s = _helper(host_lib, 3, np.array([-inf, 0, inf], np.float32))
    assert s.tolist() == [0, 0.5, 1]


@pytest.mark.parametrize("op", FORMULA_OPS)
def test_every_formula_renders_like_numpy(host_lib, op):
    rng = np.random.default_rng(len(op))
    x = np.concatenate([rng.normal(0, 3, 4000), rng.uniform(-8, 8, 4000), [-3, 0, 3, 6]]).astype(np.float32)
    args = formula_args(op, OPS[op].attrs())
    if args:  # a non-default argument too
        args = tuple(0.5 * a + 0.3 for a in args)
    p = (tuple(args) + (0.0, 0.0))[:2]
    code = elementwise.codes()[op]
    y = np.empty_like(x)
    host_lib.run_fwd(ctypes.c_int(code), _ptr(x), _ptr(y), ctypes.c_long(x.size), ctypes.c_float(p[0]),
                     ctypes.c_float(p[1]))
    x64 = x.astype(np.float64)
    y_ref = np.asarray(np_ew.forward(op)(x64, *args), dtype=np.float64)
    np.testing.assert_allclose(y, y_ref, rtol=2e-6, atol=1e-6, err_msg=f"{op} forward")
    d = np.empty_like(x)
    host_lib.run_grad(ctypes.c_int(code), _ptr(x), _ptr(y), _ptr(d), ctypes.c_long(x.size), ctypes.c_float(p[0]),
                      ctypes.c_float(p[1]))
    d_ref = np.broadcast_to(np.asarray(np_ew.derivative(op)(x64, y_ref, *args), dtype=np.float64), x.shape)
    np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=2e-6, err_msg=f"{op} derivative")


def test_header_names_every_op_and_refuses_too_many_params(monkeypatch):
    text = elementwise.header()
    for op, c in elementwise.codes().items():
        assert f"cnnc_fwd_{c}(" in text and f"cnnc_grad_{c}(" in text, op
    assert list(elementwise.codes().values()) == list(range(1, len(FORMULA_OPS) + 1))
    from dataclasses import replace
    three = replace(OPS["elu"], formula=replace(OPS["elu"].formula))
    object.__setattr__(three.formula, "params", ("a", "b", "c"))
    monkeypatch.setitem(OPS, "elu", three)
    assert "at most 2" in elementwise.refusal("elu")
    from cnnc.backends.cuda import CudaBackend
    assert "at most 2" in CudaBackend.fusion_refusal("fused_conv", ("conv", "elu"))


# ---- the kernels on the CPU emulator ------------------------------------------------------------

def _cases():
    out = []
    for op in FORMULA_OPS:
        args = formula_args(op, OPS[op].attrs())
        kw = OPS[op].attrs().model_dump(exclude={"name"})
        other = "tanh" if op != "tanh" else "relu"
        out += [(f"{op}", op, kw, [(3, 7, 7)]), (f"{op}-vec", op, kw, [(4, 4, 4)]),
                (f"chain-{op}-{other}", "elemwise_chain", dict(ops=(op, other), args=(args, ())), [(3, 5, 5)]),
                (f"chain-{other}-{op}-vec", "elemwise_chain", dict(ops=(other, op), args=((), args)), [(4, 4, 4)]),
                (f"fused_dense-{op}", "fused_dense", dict(units=7, activation=op, act_args=args), [(11,)])]
    out.append(("fused_dense-leaky-neg-nobias", "fused_dense",
                dict(units=5, activation="leaky_relu", act_args=(-0.3,), bias=False), [(6,)]))
    out.append(("dense-bias", "dense", dict(units=5), [(6,)]))
    return out


CASES = _cases()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    from test_cuda_conv import EmulatedDevice
    specs = []
    for _, op, kw, shapes in CASES:
        node, _ = make_node(op, kw, shapes)
        specs += ops.specs(node, True)
    return EmulatedDevice(tmp_path_factory.mktemp("emu_ew"), specs)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_emulated_elementwise_kernels_match_numpy(case, emulator, monkeypatch):
    for name in ("cupy", "empty", "function"):
        monkeypatch.setattr(device, name, getattr(emulator, name))
    monkeypatch.setattr(ops, "_functions", {})
    emulator.missing.clear()
    cid, op, kw, shapes = case
    node, pspecs = make_node(op, kw, shapes)
    rng = np.random.default_rng(len(cid))
    xs = [rng.normal(0, 3, (3, *s)) for s in shapes]
    params = make_params(pspecs, rng, np.float64)
    kernel = ops.KERNELS[op] if op in ops.KERNELS else ops.ELEMENTWISE
    ref = NumpyBackend().kernel(op)
    f32 = {k: v.astype(np.float32) for k, v in params.items()}
    x32 = [v.astype(np.float32) for v in xs]
    y, saved = kernel.forward(node, x32, f32, Ctx(training=True))
    y_ref, saved_ref = ref.forward(node, [v.astype(np.float64) for v in x32],
                                   {k: v.astype(np.float64) for k, v in f32.items()}, Ctx(training=True))
    dy = rng.normal(size=y_ref.shape).astype(np.float32)
    dxs, dps = kernel.backward(node, saved, dy, f32, Ctx(training=True))
    dxs_ref, dps_ref = ref.backward(node, saved_ref, dy.astype(np.float64),
                                    {k: v.astype(np.float64) for k, v in f32.items()}, Ctx(training=True))

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    errs = {"y": rel(y, y_ref), "dx": rel(dxs[0], dxs_ref[0])}
    errs.update({"d" + k: rel(dps[k], dps_ref[k]) for k in dps_ref})
    assert set(dps) == set(dps_ref)
    assert all(v <= TOL for v in errs.values()), f"{cid}: {errs}"
    assert not emulator.missing, f"kernels ran that ops.specs did not list: {emulator.missing}"
