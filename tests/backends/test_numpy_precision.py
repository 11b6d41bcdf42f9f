"""The NumPy backend's reduced-precision emulation against PyTorch: the rounding functions equal
torch's `.to(bfloat16 / float16).float()` bit for bit, and a conv or dense in emulated bf16 equals
PyTorch's float32 conv on bf16-rounded operands (forward, input and weight gradients)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from test_numpy_grad import make_node  # noqa: E402

from cnnc.backends.base import Ctx, backend_class  # noqa: E402
from cnnc.backends.numpy import NumpyBackend  # noqa: E402
from cnnc.backends.numpy.kernels import KERNELS  # noqa: E402
from cnnc.backends.numpy.precision import MATMUL_KINDS, matmul_kernel, precision_plan, round_to  # noqa: E402
from cnnc.compiler.ops import OPS  # noqa: E402
from cnnc.runtime.model import Model  # noqa: E402
from cnnc.runtime.train import training_plan  # noqa: E402
from cnnc.dsl.errors import CnncError  # noqa: E402

from conftest import EXAMPLES  # noqa: E402

torch.set_num_threads(1)
TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def torch_rounded(x: np.ndarray, precision: str) -> np.ndarray:
    return torch.from_numpy(np.array(x, dtype=np.float32)).to(TORCH_DTYPE[precision]).float().numpy()


def same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Equal float32 bit patterns, any NaN equal to any NaN."""
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


def edge_values() -> np.ndarray:
    """Zeros, infinities, NaNs, the formats' limits, exact ties and their neighbours, subnormals."""
    f = np.float32
    tiny16, max16 = 2.0 ** -24, 65504.0
    base = [0.0, 1.0, 1.5, 3.0, 1e-3, 0.1, 255.0, 65504.0, 2.0 ** -14, 2.0 ** -126, 3.0e38]
    ties = []
    for v in base:  # half an ulp of bf16 (2^-8 relative) and of fp16 (2^-11) above values of the formats
        for rel in (2.0 ** -8, 2.0 ** -11, 3 * 2.0 ** -8, 3 * 2.0 ** -11):
            t = f(v) * (f(1) + f(rel))
            ties += [t, np.nextafter(t, f(np.inf)), np.nextafter(t, f(0))]
    special = [np.inf, np.nan, max16, 65519.996, 65520.0, 65536.0, 1e5, np.finfo(f).max, 3.3961776e38, 3.3961775e38,
               tiny16, tiny16 / 2, 3 * tiny16 / 2, tiny16 * 0.49, tiny16 * 0.51, 5 * tiny16 / 2, 2.0 ** -14 - tiny16 / 2,
               2.0 ** -14 * (1 - 2.0 ** -12), 1e-8, 1e-40, np.finfo(f).smallest_subnormal, 2.0 ** -126 * 0.75,
               2.0 ** -133 * 1.5, 2.0 ** -133 * 2.5]
    values = np.array(base + ties + special, dtype=f)
    quiet_nan_payload = np.array([0x7FC0_1234, 0x7F80_0001, 0xFF80_0001], dtype=np.uint32).view(f)  # NaNs
    return np.concatenate([values, -values, quiet_nan_payload])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_rounding_equals_torch_on_edge_cases_and_random_bit_patterns(precision):
    rng = np.random.default_rng(3)
    everything = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    spread = (rng.standard_normal(200_000) * 2.0 ** rng.integers(-30, 20, 200_000)).astype(np.float32)
    for x in (edge_values(), everything, spread):
        ours, ref = round_to(x, precision), torch_rounded(x, precision)
        bad = ~same_bits(ours, ref)
        assert not bad.any(), (x[bad][:5], ours[bad][:5], ref[bad][:5])
    assert np.signbit(round_to(np.array([-0.0, -1e-30], np.float32), precision)).all()  # zeros keep their sign


def test_fp16_ties_overflow_and_subnormals_by_hand():
    """A few values worked out by hand (fp16: 10 mantissa bits, max 65504, quantum 2^-24 below 2^-14)."""
    x = np.array([65519.0, 65520.0, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 2.0 ** -25, 3 * 2.0 ** -25, 2.0 ** -26],
                 dtype=np.float32)
    want = np.array([65504.0, np.inf, 1.0, 1 + 2.0 ** -9, 0.0, 2.0 ** -23, 0.0], dtype=np.float32)
    assert np.array_equal(round_to(x, "fp16"), want)


def test_tf32_rounding_is_fp16s_mantissa_over_float32s_range():
    """tf32 keeps fp16's 10 mantissa bits with float32's exponent: scaled by a power of two into
    fp16's normal range, torch's fp16 rounding is the oracle for every exponent."""
    rng = np.random.default_rng(4)
    mant = rng.uniform(1, 2, 20_000).astype(np.float32) * rng.choice([-1, 1], 20_000).astype(np.float32)
    for e in (-126, -100, -40, -14, 0, 15, 60, 126):
        x = np.ldexp(mant, e).astype(np.float32)
        ref = np.ldexp(torch_rounded(mant, "fp16"), e).astype(np.float32)
        assert np.array_equal(round_to(x, "tf32"), ref), e
    f32max = np.finfo(np.float32).max
    edges = np.array([1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, np.nan, np.inf, 3.4e38, f32max], dtype=np.float32)
    out = round_to(edges, "tf32")
    assert out[0] == 1.0 and out[1] == 1 + 2.0 ** -9 and np.isnan(out[2]) and out[3] == np.inf
    assert out[4] == np.float32(2046 / 1024 * 2.0 ** 127)  # 3.4e38 = 2045.9.../1024 · 2^127
    assert out[5] == np.inf  # float32's largest is past tf32's largest plus half an ulp


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


CONVS = [dict(filters=8, kernel=3, pad=1), dict(filters=6, kernel=5, stride=2, bias=False, round="floor"),
         dict(filters=16, kernel=3, pad=1, groups=4)]


@pytest.mark.parametrize("kw", CONVS, ids=["3x3", "5x5-s2", "grouped"])
def test_bf16_conv_equals_torch_conv_on_rounded_operands(kw):
    rng = np.random.default_rng(5)
    node, specs = make_node("conv", kw, [(16, 12, 12)])
    x = rng.standard_normal((3, 16, 12, 12)).astype(np.float32)
    params = {s.name: rng.standard_normal(s.shape).astype(np.float32) * 0.3 for s in specs}
    dy = rng.standard_normal((3, *node.out_shape)).astype(np.float32)
    kernel = matmul_kernel(KERNELS["conv"], "bf16")
    y, saved = kernel.forward(node, [x], params, Ctx(training=True))
    (dx,), dp = kernel.backward(node, saved, dy, params, Ctx(training=True))

    a = node.attrs
    xt = torch.tensor(torch_rounded(x, "bf16"), requires_grad=True)
    wt = torch.tensor(torch_rounded(params["weight"], "bf16"), requires_grad=True)
    bt = torch.tensor(params["bias"], requires_grad=True) if "bias" in params else None  # bias: a float32 addend
    yt = F.conv2d(F.pad(xt, (node.pads[2], node.pads[3], node.pads[0], node.pads[1])), wt, bt, a.stride, 0,
                  a.dilation, a.groups)
    yt.backward(torch.from_numpy(torch_rounded(dy, "bf16")))
    assert rel(y, yt.detach().numpy()) < 2e-6
    assert rel(dx, xt.grad.numpy()) < 2e-6
    assert rel(dp["weight"], wt.grad.numpy()) < 2e-6
    if bt is not None:
        assert rel(dp["bias"], bt.grad.numpy()) < 2e-6
    exact = F.conv2d(F.pad(torch.from_numpy(x), (node.pads[2], node.pads[3], node.pads[0], node.pads[1])),
                     torch.from_numpy(params["weight"]), None if bt is None else torch.from_numpy(params["bias"]),
                     a.stride, 0, a.dilation, a.groups)
    assert rel(y, exact.numpy()) > 1e-4  # bf16's 8 significant bits show: the emulation is not float32


def test_bf16_fused_conv_rounds_its_operands_not_its_residual_addend():
    """The training plan's fused conv (bias, residual add, ReLU in one pass): the residual input is
    an addend in float32, the conv's operands are bf16."""
    rng = np.random.default_rng(7)
    node, specs = make_node("fused_conv", dict(filters=8, kernel=3, pad=1, residual=True, activation="relu"),
                            [(8, 10, 10), (8, 10, 10)])
    x, r = (rng.standard_normal((2, 8, 10, 10)).astype(np.float32) for _ in range(2))
    params = {s.name: rng.standard_normal(s.shape).astype(np.float32) * 0.3 for s in specs}
    dy = rng.standard_normal((2, 8, 10, 10)).astype(np.float32)
    kernel = matmul_kernel(KERNELS["fused_conv"], "bf16")
    y, saved = kernel.forward(node, [x, r], params, Ctx(training=True))
    (dx, dr), dp = kernel.backward(node, saved, dy, params, Ctx(training=True))
    xt = torch.tensor(torch_rounded(x, "bf16"), requires_grad=True)
    rt = torch.tensor(r, requires_grad=True)
    wt = torch.tensor(torch_rounded(params["weight"], "bf16"), requires_grad=True)
    yt = torch.relu(F.conv2d(xt, wt, torch.from_numpy(params["bias"]), padding=1) + rt)
    yt.backward(torch.from_numpy(torch_rounded(dy, "bf16")))
    assert rel(y, yt.detach().numpy()) < 2e-6
    assert rel(dx, xt.grad.numpy()) < 2e-6 and rel(dp["weight"], wt.grad.numpy()) < 2e-6
    assert rel(dr, rt.grad.numpy()) < 2e-6


def test_bf16_and_fp16_dense_equal_torch_linear_on_rounded_operands():
    rng = np.random.default_rng(6)
    node, specs = make_node("dense", dict(units=24), [(40,)])
    x = (rng.standard_normal((5, 40)) * 3).astype(np.float32)
    params = {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in specs}
    dy = rng.standard_normal((5, 24)).astype(np.float32)
    for p in ("bf16", "fp16"):
        kernel = matmul_kernel(KERNELS["dense"], p)
        y, saved = kernel.forward(node, [x], params, Ctx(training=True))
        (dx,), dp = kernel.backward(node, saved, dy, params, Ctx(training=True))
        xt = torch.tensor(torch_rounded(x, p), requires_grad=True)
        wt = torch.tensor(torch_rounded(params["weight"], p), requires_grad=True)
        yt = F.linear(xt, wt, torch.from_numpy(params["bias"]))
        yt.backward(torch.from_numpy(torch_rounded(dy, p)))
        assert rel(y, yt.detach().numpy()) < 2e-6, p
        assert rel(dx, xt.grad.numpy()) < 2e-6, p
        assert rel(dp["weight"], wt.grad.numpy()) < 2e-6, p


def test_precision_plan_rounds_the_matmul_kinds_of_the_op_table_only():
    resnet = Model.load(EXAMPLES / "cifar_resnet20.cnn")  # convs, BatchNorm, residual adds, a dense
    lenet = Model.load(EXAMPLES / "lenet5.cnn")
    for plan in (resnet.plan, training_plan(lenet, 8)):  # the second: fused convs and a fused dense
        for p in ("tf32", "bf16", "fp16"):
            wrapped = precision_plan(plan, p)
            assert [s.kernel is not before.kernel for s, before in zip(wrapped.steps, plan.steps)] == [
                OPS[s.node.op].kind in MATMUL_KINDS for s in plan.steps]
        assert precision_plan(plan, "fp32") is plan
    assert {"fused_conv", "fused_dense"} <= {s.node.op for s in training_plan(lenet, 8).steps}
    plain = training_plan(lenet, 8)
    lenet.use_precision("bf16")  # a model in bf16: its own plan and the training plan built from it
    assert lenet.plan.steps[0].kernel is not lenet.base_plan.steps[0].kernel
    assert [s.kernel is p.kernel for s, p in zip(training_plan(lenet, 8).steps, plain.steps)] == [
        OPS[s.node.op].kind not in MATMUL_KINDS for s in plain.steps]


def test_backends_declare_their_precisions_and_one_without_bf16_refuses_it_naming_the_setting():
    assert NumpyBackend.precisions == {"fp32", "tf32", "bf16", "fp16"}
    assert backend_class("cuda").precisions == {"fp32", "tf32", "bf16", "fp16"}  # the class only: no GPU needed

    class Fp32Only(NumpyBackend):
        name = "fp32only"
        precisions = frozenset({"fp32"})

    Fp32Only.check_precision("fp32")
    with pytest.raises(CnncError) as err:
        Fp32Only.check_precision("bf16", "net.cnn")
    assert "net.cnn" in err.value.message and "precision=bf16" in err.value.message and "fp32" in err.value.message
