"""The CUDA backend's kernels for every op but the convolutions, its losses and its optimizers.

Without a GPU (here and in CI): every op's kernel specialisations, for many attribute
combinations, in inference and training, with the loss and optimizer kernels, render into one
translation unit that nvcc compiles for sm_90; every entry point must appear in ptxas's report,
with at most a few bytes of spills. With a GPU (`-m gpu`; skipped where `device.gpu_available()` is false): every
op's forward and backward against the NumPy backend (float64 reference on the same float32
values, relative error norm ≤ 1e-5) on odd sizes, batch 1 and 3, with `device.POISON` on (new
arrays NaN-filled, so a forgotten element fails) and once with two blocks at most (every
grid-stride loop goes round); inputs and dy never written; only the specs `ops.specs` lists are
launched; BatchNorm's running statistics; dropout's keep rate, scaling and determinism;
misaligned views through the float4 paths; the losses; each optimizer for 20 steps against
runtime/optim.py (and its state dict both ways).
"""

from __future__ import annotations

import subprocess
import sys
import zlib
from dataclasses import dataclass

import numpy as np
import pytest

from test_numpy_grad import make_node, make_params, rel

from cnnc.backends.base import Ctx
from cnnc.backends.cuda import device, nvcc, ops
from cnnc.backends.cuda import optim as cuda_optim
from cnnc.backends.numpy import NumpyBackend
from cnnc.backends.numpy.losses import cross_entropy as numpy_cross_entropy
from cnnc.backends.numpy.losses import mse as numpy_mse
from cnnc.compiler.ops import OPS, formula_args
from cnnc.compiler.train_config import TrainConfig
from cnnc.dsl.errors import CnncError
from cnnc.runtime import optim as host_optim

TOL = 1e-5  # relative error norm of float32 GPU results against the float64 NumPy reference
OPT_TOL = 1e-6
HAVE_GPU = device.gpu_available()


def gpu(fn):
    fn = pytest.mark.gpu(fn)
    return pytest.mark.skipif(not HAVE_GPU, reason="needs CuPy and an NVIDIA GPU "
                              "(cnnc.backends.cuda.device.gpu_available() is false)")(fn)


def seed(*parts) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(parts).encode()))


@dataclass
class Case:
    id: str
    op: str
    kw: dict
    shapes: list  # leaf input shapes (logical, batch excluded)
    use: list | None = None  # the leaf feeding each input, in order (fan-out); default: each once
    training: bool = True
    scale: float = 1.0  # input spread
    arrays: list | None = None  # leaf array shapes when they differ from the logical ones (NHWC)

    @property
    def inputs(self) -> list[int]:
        return self.use if self.use is not None else list(range(len(self.shapes)))


C = Case
NUMPY = NumpyBackend()
FORMULA_OPS = [op for op in OPS if OPS[op].formula is not None]


def default_args(op: str) -> tuple[float, ...]:
    return formula_args(op, OPS[op].attrs())


def cuda_kernel(op: str):
    """The CUDA backend's kernel for `op`, as CudaBackend.kernel finds it (without a GPU)."""
    return ops.KERNELS[op] if op in ops.KERNELS else ops.ELEMENTWISE


# (activation, formula arguments): the interesting arguments, then every other op with a formula
ACTS = [("none", ()), ("relu", ()), ("relu6", ()), ("leaky_relu", (0.2,)), ("leaky_relu", (-0.3,)),
        ("sigmoid", ()), ("tanh", ())]
ACTS += [(op, default_args(op)) for op in FORMULA_OPS if op not in {a for a, _ in ACTS}]
CASES = [
    # max pooling: floor and ceil windows, pads (asymmetric, same), rectangular windows
    C("maxpool-2x2-floor", "maxpool", dict(kernel=2, round="floor"), [(5, 13, 13)]),
    C("maxpool-2x2-ceil", "maxpool", dict(kernel=2, round="ceil"), [(5, 13, 13)]),
    C("maxpool-3s2p1", "maxpool", dict(kernel=3, stride=2, pad=1), [(5, 13, 13)]),
    C("maxpool-3s2p1-ceil", "maxpool", dict(kernel=3, stride=2, pad=1, round="ceil"), [(3, 8, 8)]),
    C("maxpool-3s2-ceil", "maxpool", dict(kernel=3, stride=2, round="ceil"), [(6, 8, 8)]),
    C("maxpool-3s1p1", "maxpool", dict(kernel=3, stride=1, pad=1), [(6, 7, 7)]),
    C("maxpool-asympad", "maxpool", dict(kernel=2, stride=2, pad=(1, 0, 1, 0)), [(3, 7, 7)]),
    C("maxpool-same", "maxpool", dict(kernel=3, stride=2, pad="same"), [(5, 13, 13)]),
    C("maxpool-3x2-s1x2", "maxpool", dict(kernel=(3, 2), stride=(1, 2), round="floor"), [(3, 7, 7)]),
    C("maxpool-eval", "maxpool", dict(kernel=3, stride=2, pad=1), [(5, 13, 13)], training=False),
    # average pooling: PyTorch's divisor with and without count_pad, the ceil overhang
    C("avgpool-2x2-floor", "avgpool", dict(kernel=2, round="floor"), [(5, 13, 13)]),
    C("avgpool-2x2-ceil", "avgpool", dict(kernel=2, round="ceil"), [(5, 13, 13)]),
    C("avgpool-3s2p1", "avgpool", dict(kernel=3, stride=2, pad=1), [(5, 13, 13)]),
    C("avgpool-3s2p1-nopad", "avgpool", dict(kernel=3, stride=2, pad=1, count_pad=False), [(5, 13, 13)]),
    C("avgpool-3s2p1-ceil", "avgpool", dict(kernel=3, stride=2, pad=1, round="ceil"), [(3, 8, 8)]),
    C("avgpool-3s2p1-ceil-nopad", "avgpool", dict(kernel=3, stride=2, pad=1, round="ceil", count_pad=False),
      [(3, 8, 8)]),
    C("avgpool-asympad", "avgpool", dict(kernel=2, stride=2, pad=(1, 0, 1, 0)), [(3, 7, 7)]),
    C("avgpool-asympad-nopad", "avgpool", dict(kernel=2, stride=2, pad=(1, 0, 1, 0), count_pad=False), [(3, 7, 7)]),
    C("avgpool-same-nopad", "avgpool", dict(kernel=3, stride=2, pad="same", count_pad=False), [(5, 13, 13)]),
    C("avgpool-3x2-s1x2", "avgpool", dict(kernel=(3, 2), stride=(1, 2), round="floor"), [(3, 7, 7)]),
    C("globalavgpool-37", "globalavgpool", {}, [(37, 7, 7)]),
    C("globalavgpool-13", "globalavgpool", {}, [(5, 13, 13)]),
    C("globalavgpool-1x1", "globalavgpool", {}, [(3, 1, 1)]),
    C("adaptive-nondivisible", "adaptive_avgpool", dict(size=(3, 2)), [(5, 13, 7)]),
    C("adaptive-upsample", "adaptive_avgpool", dict(size=(5, 4)), [(3, 3, 3)]),
    C("adaptive-7x7", "adaptive_avgpool", dict(size=7), [(6, 13, 13)]),
    C("adaptive-1x1", "adaptive_avgpool", dict(size=1), [(5, 7, 7)]),
    C("adaptive-divisible", "adaptive_avgpool", dict(size=4), [(3, 8, 8)]),
    # dense and fused dense (cuBLAS + the epilogue kernel)
    C("dense", "dense", dict(units=10), [(37,)]),
    C("dense-c11-nobias", "dense", dict(units=7, bias=False), [(33, 1, 1)]),
    C("dense-flatten", "dense", dict(units=6, flatten=True), [(3, 5, 5)]),
    *[C(f"fused_dense-{a}{''.join(f'{v:g}' for v in s)}-{'bias' if i % 2 == 0 else 'nobias'}", "fused_dense",
        dict(units=9, activation=a, act_args=s, bias=i % 2 == 0), [(37,)], scale=2.0)
      for i, (a, s) in enumerate(ACTS)],
    C("fused_dense-relu6-flatten", "fused_dense", dict(units=5, activation="relu6", flatten=True), [(3, 5, 5)],
      scale=3.0),
    # activations: scalar and float4 paths (element counts not / multiples of 4), both tanh branches
    C("relu", "relu", {}, [(5, 13, 13)]),
    C("relu-vec", "relu", {}, [(4, 4, 4)]),
    C("leaky_relu", "leaky_relu", dict(slope=0.2), [(3, 7, 7)]),
    C("leaky_relu-negative", "leaky_relu", dict(slope=-0.3), [(3, 7, 7)]),
    C("leaky_relu-zero", "leaky_relu", dict(slope=0.0), [(5,)]),
    C("leaky_relu-steep-vec", "leaky_relu", dict(slope=1.5), [(4, 4, 4)]),
    C("relu6", "relu6", {}, [(6, 7, 7)], scale=5.0),
    C("relu6-vec", "relu6", {}, [(8,)], scale=5.0),
    C("sigmoid", "sigmoid", {}, [(5, 13, 13)], scale=3.0),
    C("sigmoid-saturated-vec", "sigmoid", {}, [(4, 4, 4)], scale=20.0),
    C("tanh", "tanh", {}, [(37,)]),
    C("tanh-small", "tanh", {}, [(3, 13, 13)], scale=0.3),
    C("tanh-large-vec", "tanh", {}, [(4, 4, 4)], scale=4.0),
    # every other op with a formula, scalar and float4 paths
    *[C(f"{op}{suffix}", op, {}, [shape], scale=3.0)
      for op in FORMULA_OPS if op not in ("relu", "leaky_relu", "relu6", "sigmoid", "tanh")
      for suffix, shape in (("", (3, 7, 7)), ("-vec", (4, 4, 4)))],
    C("elu-alpha", "elu", dict(alpha=0.5), [(5,)], scale=2.0),
    C("chain-relu-tanh", "elemwise_chain", dict(ops=("relu", "tanh")), [(5, 7, 7)]),
    C("chain-leaky-sigmoid-relu6-vec", "elemwise_chain",
      dict(ops=("leaky_relu", "sigmoid", "relu6"), args=((0.2,), (), ())), [(4, 4, 4)], scale=4.0),
    C("chain-tanh-leakyneg", "elemwise_chain", dict(ops=("tanh", "leaky_relu"), args=((), (-0.5,))),
      [(3, 13, 13)]),
    C("chain-sigmoid", "elemwise_chain", dict(ops=("sigmoid",)), [(37,)], scale=3.0),
    C("chain-five", "elemwise_chain", dict(ops=("relu6", "leaky_relu", "tanh", "relu", "sigmoid"),
                                           args=((), (0.1,))), [(3, 7, 7)], scale=4.0),
    C("chain-hardswish-elu-gelu-vec", "elemwise_chain", dict(ops=("hardswish", "elu", "gelu"), args=((), (0.7,), ())),
      [(4, 4, 4)], scale=3.0),
    C("chain-silu-gelu_tanh-hardsigmoid", "elemwise_chain", dict(ops=("silu", "gelu_tanh", "hardsigmoid")),
      [(3, 7, 7)], scale=3.0),
    C("chain-empty", "elemwise_chain", dict(ops=()), [(3, 4, 4)]),
    # softmax over channels: warp per row (flat) and thread per position (spatial)
    C("softmax-10", "softmax", {}, [(10,)], scale=3.0),
    C("softmax-37", "softmax", {}, [(37,)]),
    C("softmax-1000", "softmax", {}, [(1000,)], scale=3.0),
    C("softmax-4d", "softmax", {}, [(5, 7, 7)]),
    C("softmax-4d-33", "softmax", {}, [(33, 3, 3)], scale=3.0),
    C("dropout-eval", "dropout", dict(rate=0.3), [(3, 7, 7)], training=False),
    C("dropout-rate0", "dropout", dict(rate=0.0), [(3, 7, 7)]),
    C("identity", "identity", {}, [(3, 7, 7)]),
    C("split", "split", dict(parts=2), [(4, 7, 7)]),  # a pass-through; its parts are channel slices
    C("flatten", "flatten", {}, [(3, 5, 5)]),
    # batchnorm: training (batch statistics, running updates) and evaluation, 4-D and 2-D, no affine
    C("batchnorm-train-4d", "batchnorm", {}, [(5, 7, 7)]),
    C("batchnorm-train-13", "batchnorm", dict(momentum=0.3, eps=1e-3), [(33, 13, 13)]),
    C("batchnorm-train-2d", "batchnorm", dict(momentum=0.3, eps=1e-3), [(37,)]),
    C("batchnorm-train-noaffine", "batchnorm", dict(affine=False), [(3, 13, 13)]),
    C("batchnorm-eval-4d", "batchnorm", {}, [(33, 7, 7)], training=False),
    C("batchnorm-eval-2d", "batchnorm", {}, [(5,)], training=False),
    C("batchnorm-eval-noaffine", "batchnorm", dict(affine=False), [(3, 4, 4)], training=False),
    # fused_bn: BatchNorm's kernels, then the activation's (output-read, input-read, none)
    C("fused_bn-relu6", "fused_bn", dict(activation="relu6"), [(5, 7, 7)]),
    C("fused_bn-hardswish-2d", "fused_bn", dict(activation="hardswish", momentum=0.3), [(37,)]),
    C("fused_bn-silu-eval", "fused_bn", dict(activation="silu"), [(33, 7, 7)], training=False),
    C("fused_bn-none-noaffine", "fused_bn", dict(affine=False), [(3, 13, 13)]),
    # lrn (PyTorch's LocalResponseNorm), odd and even windows
    C("lrn-default", "lrn", {}, [(7, 7, 7)]),
    C("lrn-strong", "lrn", dict(size=3, alpha=0.5, beta=0.75, k=2.0), [(6, 3, 3)]),
    C("lrn-even", "lrn", dict(size=4, alpha=0.3, beta=0.6, k=1.5), [(6, 13, 13)]),
    C("lrn-37", "lrn", dict(size=5, alpha=1e-2, beta=0.75, k=1.0), [(37, 7, 7)], scale=3.0),
    C("lrn-eval", "lrn", dict(size=3, alpha=0.5), [(5, 7, 7)], training=False),
    # merges
    C("add-2", "add", {}, [(5, 13, 13), (5, 13, 13)]),
    C("add-3-vec", "add", {}, [(4, 4, 4)] * 3),
    C("add-5", "add", {}, [(3, 7, 7)] * 5),
    C("add-8-vec", "add", {}, [(8,)] * 8),
    C("add-fanout", "add", {}, [(3, 7, 7)], use=[0, 0]),
    C("concat-fanout", "concat", {}, [(3, 7, 7), (2, 7, 7)], use=[0, 1, 0]),
    C("concat-2d", "concat", {}, [(3,), (4,), (2,)]),
    C("concat-vec", "concat", {}, [(4, 4, 4), (8, 4, 4)]),
    C("concat-13", "concat", {}, [(5, 13, 13), (3, 13, 13), (1, 13, 13)]),
    C("concat-one", "concat", {}, [(3, 5, 5)]),
    # layout transforms: several tiles, partial tiles
    C("layout-nhwc", "layout_transform", dict(to="NHWC"), [(37, 13, 13)]),
    C("layout-nhwc-small", "layout_transform", dict(to="NHWC"), [(3, 7, 7)]),
    C("layout-nhwc-wide", "layout_transform", dict(to="NHWC"), [(5, 40, 40)]),
    C("layout-nchw", "layout_transform", dict(to="NCHW"), [(37, 13, 13)], arrays=[(13, 13, 37)]),
    C("layout-nchw-64", "layout_transform", dict(to="NCHW"), [(64, 5, 5)], arrays=[(5, 5, 64)]),
]

from cnnc.backends.cuda import channel_ops  # noqa: E402

COVERED = {"input", "conv", "fused_conv"}  # ops without kernels here (conv.py has the convolutions)
COVERED |= set(channel_ops.KERNELS)  # test_cuda_channel_ops_compile.py tests channel_ops.py's
# ops with an element-wise formula run ops.ELEMENTWISE, not an entry of ops.KERNELS


def case_node(case: Case):
    return make_node(case.op, case.kw, [case.shapes[i] for i in case.inputs])


# ---- without a GPU ---------------------------------------------------------------------------------

def test_every_op_has_a_kernel_and_specs():
    assert set(ops.KERNELS) == set(OPS) - COVERED - set(FORMULA_OPS)
    assert set(ops.LOSSES) == {"cross_entropy", "mse"}
    assert {c.op for c in CASES} == set(OPS) - COVERED  # the cases cover every op
    for case in CASES:
        node, _ = case_node(case)
        inference, training = ops.specs(node, False), ops.specs(node, True)
        assert all(s in training for s in inference)
        assert len({s.key for s in training}) == len(training)
        assert [s.key for s in ops.specs(node, True)] == [s.key for s in training]  # deterministic
        for spec in inference:  # inference compiles no backward kernel
            assert not any(e.endswith("_bwd") or e in ("act_bwd_out", "act_bwd_in", "bias_grad") for e in spec.entries)


def test_specs_without_kernels():
    for op, kw, shapes in [("identity", {}, [(3, 4, 4)]), ("flatten", {}, [(3, 4, 4)]),
                           ("split", dict(parts=2), [(4, 4, 4)]),
                           ("dense", dict(units=3, bias=False), [(5,)]),
                           ("elemwise_chain", dict(ops=()), [(3,)])]:
        node, _ = make_node(op, kw, shapes)
        assert ops.specs(node, True) == []
    drop, _ = make_node("dropout", dict(rate=0.3), [(3, 4, 4)])
    assert ops.specs(drop, False) == [] and len(ops.specs(drop, True)) == 1  # evaluation is the identity


def test_chain_errors():
    node, _ = make_node("elemwise_chain", dict(ops=("relu", "leaky_relu"), args=((),)), [(3,)])
    with pytest.raises(CnncError, match="takes 1 argument"):
        ops.specs(node, False)
    node, _ = make_node("elemwise_chain", dict(ops=("relu",) * 17), [(3,)])
    with pytest.raises(CnncError, match="at most 16"):
        ops.specs(node, False)


def test_fusion_refusal():
    from cnnc.backends.cuda import CudaBackend
    assert CudaBackend.fusion_refusal("elemwise_chain", ("relu", "tanh")) is None
    assert CudaBackend.fusion_refusal("fused_conv", ("conv", "batchnorm", "add", "hardswish")) is None
    assert "longer than" in CudaBackend.fusion_refusal("elemwise_chain", ("relu",) * 17)
    assert "no fused_banana kernel" in CudaBackend.fusion_refusal("fused_banana", ("relu",))


def test_importing_the_kernels_does_not_import_cupy():
    code = ("import sys; import cnnc.backends.cuda.ops, cnnc.backends.cuda.optim; "
            "assert 'cupy' not in sys.modules, 'cupy imported'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.skipif(nvcc.find_nvcc() is None, reason="nvcc (the CUDA toolkit) is not installed")
def test_every_spec_compiles_for_sm90(tmp_path):
    """One translation unit: every case's inference and training specs, the losses, the optimizers."""
    specs = []
    for case in CASES:
        node, _ = case_node(case)
        specs += ops.specs(node, False) + ops.specs(node, True)
    for op, kw, shapes in [("fused_dense", dict(units=1000, activation="tanh"), [(512, 1, 1)]),
                           ("batchnorm", {}, [(2048, 7, 7)]),
                           ("maxpool", dict(kernel=3, stride=2, pad=1, round="floor"), [(64, 112, 112)]),
                           ("softmax", {}, [(1000,)]),
                           ("lrn", dict(size=5, alpha=1e-4, beta=0.75, k=2.0), [(96, 55, 55)])]:
        node, _ = make_node(op, kw, shapes)  # network-sized problems too
        specs += ops.specs(node, True)
    specs += ops.loss_specs() + cuda_optim.specs()
    resources = nvcc.compile_specs(specs, tmp_path)
    found = {r.kernel: r for r in resources}
    expected = {s.symbol(e) for s in specs for e in s.entries}
    assert expected <= set(found), sorted(expected - set(found))[:10]
    for name in expected:
        r = found[name]
        assert r.registers > 0, name
        # exact division (no --use_fast_math) calls a slow-path subroutine whose ABI saves a few
        # registers on the stack: tens of bytes, in backward kernels; anything larger is a real spill
        assert r.spill_stores + r.spill_loads <= 128, f"{name} spills: {r}"
    cubins = list(tmp_path.glob("part*.cubin"))
    assert cubins and all(p.stat().st_size > 0 for p in cubins)
    print("\n".join(f"{r.kernel}: {r.registers} registers, {r.shared_bytes} B shared"
                    for r in sorted(resources, key=lambda r: -r.registers)[:8]))


# ---- with a GPU: every op against the NumPy backend -------------------------------------------------

@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(device, "POISON", True)


@pytest.fixture
def launches(monkeypatch):
    """The (spec, entry) pairs the kernels launch."""
    seen = []
    original = ops._launch

    def recording(spec, entry, grid, block, *args):
        seen.append((spec, entry))
        return original(spec, entry, grid, block, *args)

    monkeypatch.setattr(ops, "_launch", recording)
    return seen


def close(got, want, what: str, tol: float = TOL):
    cp = device.cupy()
    assert isinstance(got, cp.ndarray), f"{what}: {type(got).__name__}, not a device array"
    host = cp.asnumpy(got)
    assert host.shape == want.shape, f"{what}: shape {host.shape}, expected {want.shape}"
    assert host.dtype == np.float32, f"{what}: dtype {host.dtype}"
    assert np.all(np.isfinite(host)), f"{what}: {np.count_nonzero(~np.isfinite(host))} elements not finite"
    err = rel(host.astype(np.float64), want)
    assert err <= tol, f"{what}: relative error {err:.2e}"


VARIANTS = ["batch1", "batch3", "batch3-twoblocks"]


@gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op_matches_numpy(case: Case, variant: str, poison, launches, monkeypatch):
    cp = device.cupy()
    batch = 1 if variant == "batch1" else 3
    if variant.endswith("twoblocks"):
        monkeypatch.setattr(ops, "MAX_BLOCKS", 2)  # grid-stride loops go round several times
    rng = seed(case.id, variant)
    node, pspecs = case_node(case)
    leaves = [rng.normal(0, case.scale, (batch, *s)).astype(np.float32) for s in (case.arrays or case.shapes)]
    params = {k: v.astype(np.float32) for k, v in make_params(pspecs, rng, np.float64).items()}
    ref_params = {k: v.astype(np.float64) for k, v in params.items()}
    dev_params = {k: cp.asarray(v) for k, v in params.items()}
    dev_leaves = [cp.asarray(v) for v in leaves]

    def ctx():
        return Ctx(training=case.training, rng=np.random.default_rng(7))

    ref, kernel = NUMPY.kernel(case.op), cuda_kernel(case.op)
    y_ref, saved_ref = ref.forward(node, [leaves[i].astype(np.float64) for i in case.inputs], ref_params, ctx())
    y, saved = kernel.forward(node, [dev_leaves[i] for i in case.inputs], dev_params, ctx())
    close(y, y_ref, "forward")
    for spec in pspecs:
        if spec.buffer:  # batchnorm's running statistics, updated in place in training
            close(dev_params[spec.name], ref_params[spec.name], spec.name)
    forward_specs = {s for s, _ in launches}
    assert forward_specs <= set(ops.specs(node, case.training)), "forward launched a spec `specs` does not list"

    dy_host = rng.normal(size=y_ref.shape).astype(np.float32)
    dy = cp.asarray(dy_host)
    dxs_ref, dps_ref = ref.backward(node, saved_ref, dy_host.astype(np.float64), ref_params, ctx())
    dxs, dps = kernel.backward(node, saved, dy, dev_params, ctx())
    assert {s for s, _ in launches} <= set(ops.specs(node, True)), "backward launched a spec `specs` does not list"
    assert len(dxs) == len(case.inputs)
    for i, (dx, dx_ref) in enumerate(zip(dxs, dxs_ref)):
        close(dx, dx_ref, f"input {i} gradient")
    assert sorted(dps) == sorted(dps_ref)
    for name in dps:
        close(dps[name], dps_ref[name], f"{name} gradient")
    for dev, host in zip(dev_leaves, leaves):  # kernels never write their inputs or dy
        np.testing.assert_array_equal(cp.asnumpy(dev), host)
    np.testing.assert_array_equal(cp.asnumpy(dy), dy_host)


@gpu
def test_misaligned_views_take_the_scalar_paths(poison):
    """float4 paths need 16-byte alignment: views one float into a buffer must give the same values."""
    cp = device.cupy()
    rng = seed("misaligned")

    def view(host):
        buf = cp.asarray(np.concatenate([[0.0], host.ravel()]).astype(np.float32))
        v = buf[1:].reshape(host.shape)
        assert v.flags.c_contiguous
        return v

    for op, kw, shapes in [("relu", {}, [(4, 4, 4)]), ("tanh", {}, [(8,)]),
                           ("gelu", {}, [(4, 4, 4)]),
                           ("elemwise_chain", dict(ops=("sigmoid", "relu")), [(4, 4, 4)]),
                           ("add", {}, [(4, 4, 4)] * 3), ("concat", {}, [(4, 4, 4), (8, 4, 4)]),
                           ("dropout", dict(rate=0.4), [(4, 4, 4)])]:
        node, _ = make_node(op, kw, shapes)
        xs = [rng.normal(size=(3, *s)).astype(np.float32) for s in shapes]
        k = cuda_kernel(op)
        y_a, s_a = k.forward(node, [cp.asarray(x) for x in xs], {}, Ctx(True, np.random.default_rng(1)))
        y_b, s_b = k.forward(node, [view(x) for x in xs], {}, Ctx(True, np.random.default_rng(1)))
        np.testing.assert_array_equal(cp.asnumpy(y_b), cp.asnumpy(y_a), err_msg=op)
        dy = rng.normal(size=y_a.shape).astype(np.float32)
        (dx_a, *_), _ = k.backward(node, s_a, cp.asarray(dy), {}, Ctx(True))
        (dx_b, *_), _ = k.backward(node, s_b, view(dy), {}, Ctx(True))
        np.testing.assert_array_equal(cp.asnumpy(dx_b), cp.asnumpy(dx_a), err_msg=op)


@gpu
def test_batchnorm_running_statistics(poison):
    cp = device.cupy()
    rng = seed("bn-running")
    for shape, kw in [((5, 7, 7), {}), ((37,), dict(momentum=0.25)), ((3, 13, 13), dict(affine=False))]:
        node, pspecs = make_node("batchnorm", kw, [shape])
        params = {k: v.astype(np.float32) for k, v in make_params(pspecs, rng, np.float64).items()}
        ref_params = {k: v.astype(np.float64) for k, v in params.items()}
        dev_params = {k: cp.asarray(v) for k, v in params.items()}
        for step in range(4):  # several batches, different sizes and statistics
            x = rng.normal(step * 0.5, 1.0 + step, (2 + step, *shape)).astype(np.float32)
            NUMPY.kernel("batchnorm").forward(node, [x.astype(np.float64)], ref_params, Ctx(training=True))
            ops.KERNELS["batchnorm"].forward(node, [cp.asarray(x)], dev_params, Ctx(training=True))
            for name in ("running_mean", "running_var"):
                close(dev_params[name], ref_params[name], f"{shape} step {step} {name}")
        x = rng.normal(size=(3, *shape)).astype(np.float32)  # evaluation normalises with them
        y_ref, _ = NUMPY.kernel("batchnorm").forward(node, [x.astype(np.float64)], ref_params, Ctx(training=False))
        y, _ = ops.KERNELS["batchnorm"].forward(node, [cp.asarray(x)], dev_params, Ctx(training=False))
        close(y, y_ref, f"{shape} evaluation")


@gpu
def test_dropout_statistics(poison):
    cp = device.cupy()
    rng = seed("dropout")
    kernel = ops.KERNELS["dropout"]
    for shape, rate in [((3, 64, 16, 16), 0.3), ((2, 5, 13, 13), 0.5), ((4, 37), 0.1), ((8, 1001), 0.9)]:
        node, _ = make_node("dropout", dict(rate=rate), [shape[1:]])
        x_host = rng.uniform(1.0, 2.0, shape).astype(np.float32)  # never zero: zeros in y are dropped elements
        x = cp.asarray(x_host)
        y, saved = kernel.forward(node, [x], {}, Ctx(training=True, rng=np.random.default_rng(7)))
        y = cp.asnumpy(y)
        kept = y != 0
        n, p = kept.size, 1.0 - rate
        assert abs(kept.mean() - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-4, (shape, rate, kept.mean())
        scale = np.float32(1.0 / (1.0 - rate))
        np.testing.assert_allclose(y[kept], x_host[kept] * scale, rtol=1e-6)  # inverted dropout
        flat = kept.reshape(-1)
        both = np.mean(flat[1:] & flat[:-1])  # neighbours independent
        assert abs(both - p * p) <= 5 * np.sqrt(p * p * (1 - p * p) / n) + 1e-4, (shape, rate, both)
        if n >= 100_000:
            per_channel = kept.mean(axis=(0, 2, 3))
            assert np.all(np.abs(per_channel - p) < 0.05), per_channel
        # the same generator state gives the same mask; another gives another
        y2, _ = kernel.forward(node, [x], {}, Ctx(training=True, rng=np.random.default_rng(7)))
        np.testing.assert_array_equal(cp.asnumpy(y2), y)
        y3, _ = kernel.forward(node, [x], {}, Ctx(training=True, rng=np.random.default_rng(8)))
        assert not np.array_equal(cp.asnumpy(y3) != 0, kept)
        # backward applies the forward's mask and scale
        dy_host = rng.normal(size=shape).astype(np.float32)
        (dx,), dps = kernel.backward(node, saved, cp.asarray(dy_host), {}, Ctx(training=True))
        assert dps == {}
        np.testing.assert_allclose(cp.asnumpy(dx), np.where(kept, dy_host * scale, 0.0), rtol=1e-6)
        # evaluation is the identity
        y_eval, saved_eval = kernel.forward(node, [x], {}, Ctx(training=False))
        assert y_eval is x and saved_eval is None
        np.testing.assert_array_equal(cp.asnumpy(x), x_host)


# ---- losses ----------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("n,c,smoothing", [(1, 10, 0.0), (3, 1000, 0.1), (7, 5, 0.0), (37, 33, 0.2), (3, 2, 0.5)])
def test_cross_entropy_matches_numpy(n, c, smoothing, poison):
    cp = device.cupy()
    rng = seed("ce", n, c, smoothing)
    logits = rng.normal(0, 3, (n, c)).astype(np.float32)
    labels = rng.integers(0, c, n)
    want_loss, want_grad = numpy_cross_entropy(logits.astype(np.float64), labels, label_smoothing=smoothing)
    for dtype in (np.int64, np.int32):
        fn = ops.LOSSES["cross_entropy"]
        loss, grad = fn(cp.asarray(logits), cp.asarray(labels.astype(dtype)), label_smoothing=smoothing)
        assert isinstance(loss, float)
        assert abs(loss - want_loss) <= TOL * abs(want_loss), (loss, want_loss)
        close(grad, want_grad, "d logits")


@gpu
def test_cross_entropy_huge_logits_and_bad_labels():
    cp = device.cupy()
    logits = np.array([[1000.0, 0.0, -1000.0], [-5e4, 5e4, 0.0]], dtype=np.float32)
    loss, grad = ops.cross_entropy(cp.asarray(logits), cp.asarray(np.array([0, 0])))
    assert np.isfinite(loss) and np.all(np.isfinite(cp.asnumpy(grad)))
    assert loss == pytest.approx(1e5 / 2, rel=1e-6)
    with pytest.raises(CnncError, match="labels must lie in 0…2"):
        ops.cross_entropy(cp.asarray(logits), cp.asarray(np.array([0, 3])))
    with pytest.raises(CnncError, match="integer labels"):
        ops.cross_entropy(cp.asarray(logits), cp.asarray(np.array([0.0, 1.0])))
    with pytest.raises(CnncError, match="logits"):
        ops.cross_entropy(cp.asarray(logits.reshape(2, 3, 1, 1)), cp.asarray(np.array([0, 1])))


@gpu
@pytest.mark.parametrize("shape", [(3, 10), (1, 1), (5, 7, 3, 3), (300, 1001)])
def test_mse_matches_numpy(shape, poison):
    cp = device.cupy()
    rng = seed("mse", shape)
    pred, target = rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)
    want_loss, want_grad = numpy_mse(pred.astype(np.float64), target.astype(np.float64))
    loss, grad = ops.LOSSES["mse"](cp.asarray(pred), cp.asarray(target))
    assert isinstance(loss, float)
    assert abs(loss - want_loss) <= TOL * want_loss
    close(grad, want_grad, "d pred")
    with pytest.raises(CnncError, match="shape"):
        ops.mse(cp.asarray(pred), cp.asarray(np.zeros((2, *shape), np.float32)))


# ---- optimizers --------------------------------------------------------------------------------------

OPTIMIZERS = [
    dict(optimizer="sgd"),
    dict(optimizer="sgd", weight_decay=0.01),
    dict(optimizer="momentum", weight_decay=1e-3),
    dict(optimizer="sgd", momentum=0.5),
    dict(optimizer="nesterov"),
    dict(optimizer="sgd", momentum=0.7, nesterov=True, weight_decay=1e-2),
    dict(optimizer="adagrad", eps=1e-8),
    dict(optimizer="adagrad", weight_decay=0.01),
    dict(optimizer="rmsprop", rho=0.9),
    dict(optimizer="rmsprop", momentum=0.8, weight_decay=1e-2, eps=1e-6),
    dict(optimizer="adadelta", lr=1.0),
    dict(optimizer="adadelta", lr=0.5, weight_decay=1e-3, rho=0.95),
    dict(optimizer="adam"),
    dict(optimizer="adam", weight_decay=0.05, beta1=0.3, beta2=0.99),  # lerp's other branch (1 − β1 ≥ ½)
    dict(optimizer="adamw", weight_decay=0.1),
    dict(optimizer="adamw", weight_decay=0.01, beta1=0.0),
    dict(optimizer="ftrl", lr=0.1),
    dict(optimizer="ftrl", lr=0.05, l1=0.01, l2=0.1, lr_power=-0.7, weight_decay=1e-3),
    dict(optimizer="rprop"),
    dict(optimizer="rprop", lr=0.05, etas=(0.3, 1.5), step_sizes=(1e-2, 0.1), weight_decay=1e-2),  # both clamps
]
SHAPES = {"conv.weight": (5, 3, 3, 3), "conv.bias": (5,), "fc.weight": (37, 13), "fc.bias": (37,), "frozen.w": (1,)}
LR_MULT = {"conv.bias": 2.0, "frozen.w": 0.0, "bn.running_mean": 1.0}  # extra names are ignored, as in runtime
DECAY_MULT = {"conv.bias": 0.0, "fc.weight": 0.5}


def _opt_compare(cfg_id, dev, host, opt, ref):
    cp = device.cupy()
    for k in host:
        got = cp.asnumpy(dev[k])
        err = rel(got.astype(np.float64), host[k].astype(np.float64))
        assert err <= OPT_TOL, f"{cfg_id}: {k} relative error {err:.2e}"
    sd, want = opt.state_dict(), ref.state_dict()
    assert list(sd) == list(want), f"{cfg_id}: state keys {list(sd)} != {list(want)}"
    for k, v in want.items():
        assert isinstance(sd[k], np.ndarray) and sd[k].dtype == v.dtype and sd[k].shape == v.shape, k
        if k.startswith("step/"):
            assert int(sd[k]) == int(v), k
        else:
            err = rel(sd[k].astype(np.float64), v.astype(np.float64))
            assert err <= OPT_TOL, f"{cfg_id}: state {k} relative error {err:.2e}"


@gpu
@pytest.mark.parametrize("cfg", OPTIMIZERS, ids=["-".join(f"{v}" for v in c.values()) for c in OPTIMIZERS])
def test_optimizer_matches_runtime(cfg):
    cp = device.cupy()
    config = TrainConfig(**cfg)
    cfg_id = repr(cfg)
    rng = seed("optim", cfg_id)
    host = {k: rng.normal(0, 0.5, s).astype(np.float32) for k, s in SHAPES.items()}
    dev = {k: cp.asarray(v) for k, v in host.items()}
    ref = host_optim.make_optimizer(config, host, LR_MULT, DECAY_MULT)
    opt = cuda_optim.make_optimizer(config, dev, LR_MULT, DECAY_MULT)
    assert opt.name == ref.name

    def steps(count, first):
        for t in range(first, first + count):
            grads = {k: rng.normal(0, 1, s).astype(np.float32) for k, s in SHAPES.items()
                     if not (k == "fc.bias" and t % 3 == 1)}  # a parameter without a gradient on some steps
            lr = config.lr * (1.0 - 0.02 * t)
            ref.step(grads, lr)
            opt.step({k: cp.asarray(g) for k, g in grads.items()}, lr)

    steps(20, 0)
    _opt_compare(cfg_id, dev, host, opt, ref)
    np.testing.assert_array_equal(cp.asnumpy(dev["frozen.w"]), host["frozen.w"])  # lr_mult 0: untouched

    # a checkpoint written by either side continues the run exactly: load the runtime's state into a
    # fresh CUDA optimizer over copies of the weights, and the CUDA one's into a fresh runtime optimizer
    state = ref.state_dict()
    dev2 = {k: cp.asarray(v) for k, v in host.items()}
    opt2 = cuda_optim.make_optimizer(config, dev2, LR_MULT, DECAY_MULT)
    opt2.load_state_dict(state)
    host2 = {k: v.copy() for k, v in host.items()}
    ref2 = host_optim.make_optimizer(config, host2, LR_MULT, DECAY_MULT)
    ref2.load_state_dict(opt.state_dict())
    ref, opt, host, dev = ref2, opt2, host2, dev2
    steps(5, 20)
    _opt_compare(cfg_id + " resumed", dev, host, opt, ref)


@gpu
def test_optimizer_errors():
    cp = device.cupy()
    dev = {"w": cp.asarray(np.zeros((3,), np.float32))}
    opt = cuda_optim.make_optimizer(TrainConfig(optimizer="adam"), dev)
    with pytest.raises(KeyError, match="unknown parameter"):
        opt.step({"v": cp.zeros((3,), dtype=cp.float32)}, 0.1)
    with pytest.raises(ValueError, match="shape"):
        opt.step({"w": cp.zeros((4,), dtype=cp.float32)}, 0.1)
    with pytest.raises(KeyError, match="keeps no state"):
        opt.load_state_dict({"momentum_buffer/w": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="0-d"):
        opt.load_state_dict({"step/w": np.zeros(3)})
