"""Reduced-precision plans on the CUDA backend (backends/cuda/precision.py, kernels/round.cu, the
tensor-core configurations of conv.py), without a GPU: the rounding kernel bit for bit against the
NumPy backend's rounding on the CPU emulator of the kernels (test_cuda_conv.py), the configuration
and precision plumbing, and a small network with a tiled conv, a depthwise conv and a dense layer
trained one step in bf16 and fp16 on the emulator, layer by layer equal to the NumPy backend's
emulation of the same precision. The tensor-core conv kernels themselves are compared with NumPy
in test_cuda_conv.py (emulator and GPU).
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest

from test_cuda_conv import EmulatedDevice, _emulate_network, make_node

from cnnc.backends.cuda import conv, device, precision, rounding, specs_for_graph
from cnnc.backends.numpy import NumpyBackend
from cnnc.backends.numpy.precision import round_to
from cnnc.compiler.pipeline import check
from cnnc.dsl.errors import CnncError

needs_gpp = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ (the CPU emulator of the kernels) is not installed")

SMALL_NET = """network mixed
input image: 4x8x8
classes 5

layers:
    conv 16 3x3 pad=1 -> relu
    conv 16 3x3 pad=1 groups=16 -> relu
    conv 24 3x3 stride=2 pad=1 round=floor -> relu -> avgpool 2x2
    flatten
    dense 5
"""


def _special_values() -> np.ndarray:
    """Ties and near-ties of every format, fp16's subnormal and overflow edges, zeros, infinities,
    NaN, float32 subnormals, and random values over a wide range of exponents."""
    one = 1.0
    edges = [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65519.0, 65520.0, 65536.0, 2.0 ** -14, 2.0 ** -24,
             2.0 ** -25, 1.5 * 2.0 ** -25, 2.0 ** -26, 3.0 * 2.0 ** -25, 1e-40, -1e-42, 3.4028235e38]
    for drop in (13, 16):  # tf32 and fp16 drop 13 mantissa bits, bf16 16
        ulp = 2.0 ** (drop - 23)
        edges += [one + ulp / 2, one + 3 * ulp / 2, -(one + ulp / 2), one + ulp / 2 + 2.0 ** -23, one + ulp / 2 - 2.0 ** -23]
    rng = np.random.default_rng(0)
    wide = rng.normal(size=2000) * 2.0 ** rng.integers(-40, 40, 2000)
    return np.concatenate([np.array(edges), wide]).astype(np.float32)


@needs_gpp
@pytest.mark.parametrize("prec", list(conv.MMA_CODES))
def test_round_kernel_equals_numpy_rounding_bit_for_bit(prec, tmp_path, monkeypatch):
    emu = EmulatedDevice(tmp_path, [rounding.round_spec(prec)])
    for name in ("cupy", "empty", "function"):
        monkeypatch.setattr(device, name, getattr(emu, name))
    x = _special_values()
    got = rounding.round_to(x, prec)
    want = round_to(x, prec)
    nan = np.isnan(want)
    assert (np.isnan(got) == nan).all()
    bad = np.flatnonzero(got[~nan].view(np.uint32) != want[~nan].view(np.uint32))
    assert bad.size == 0, [(float(x[~nan][i]), float(got[~nan][i]), float(want[~nan][i])) for i in bad[:5]]
    assert np.array_equal(x, _special_values(), equal_nan=True)  # its input untouched
    assert not emu.missing


def test_every_precision_has_tensor_core_configurations_for_every_pass():
    prob = conv.Problem(64, 14, 14, 96, 3, 3, 14, 14, 1, 1, 1, 1)
    for prec in conv.MMA_CODES:
        for pass_ in conv.PASSES:
            got = conv.configs_for(prob, pass_, 32, precision=prec)
            assert sorted(map(repr, [replace(c, splits=None) for c in got])) == sorted(map(repr, conv.MMA_CONFIGS[prec]))
            assert all(c.precision == prec for c in got)
            if pass_ == "bwd_filter":
                assert all(1 <= c.splits <= conv.MAX_SPLITS for c in got)
        for cfg in conv.MMA_CONFIGS[prec]:
            conv.check_config(cfg)
            assert cfg.block_k % conv.MMA_KSTEP[prec] == 0
            assert cfg.tile_defines()["MMA"] == conv.MMA_CODES[prec]
    assert all(not c.mma for p in conv.PASSES for c in conv.configs_for(prob, p, 32))  # fp32: FMA kernels
    with pytest.raises(CnncError, match="fp32, tf32, bf16, fp16"):
        conv.configs_for(prob, "fwd", precision="int8")
    with pytest.raises(ValueError, match="multiple of 16"):
        conv.check_config(conv.Config(64, 64, 8, 0, 0, mma="bf16"))
    with pytest.raises(ValueError, match="one of tf32, bf16, fp16"):
        conv.check_config(conv.Config(64, 64, 16, 0, 0, mma="fp8"))


def test_specs_of_a_reduced_precision_node_run_every_pass_on_the_tensor_cores():
    node = make_node("conv", dict(filters=16, kernel=3, pad=1), (8, 6, 6))
    for prec, code in conv.MMA_CODES.items():
        specs = conv.specs(node, True, precision=prec)
        by_template = {s.template: s for s in specs}
        assert {"conv_fwd_mma.cu", "conv_bwd_data.cu", "conv_bwd_filter.cu"} <= set(by_template)
        assert "conv_fwd.cu" not in by_template
        assert {by_template[t].define("MMA") for t in ("conv_fwd_mma.cu", "conv_bwd_data.cu", "conv_bwd_filter.cu")} \
            == {code}
    assert {s.define("MMA") for s in conv.specs(node, True) if s.template.startswith("conv_bwd")} == {0}
    # a configuration that computes in another precision than the plan's is refused
    with pytest.raises(CnncError, match="computes in fp32, the plan in bf16"):
        conv.specs(node, True, config=conv.CONFIGS[0], precision="bf16")


def test_tf32_forward_candidates_in_float32_plans_only_when_enabled(monkeypatch):
    prob = conv.Problem(512, 8, 8, 512, 3, 3, 8, 8, 1, 1, 1, 1)
    assert not any(c.mma for c in conv.configs_for(prob, "fwd"))  # off by default
    monkeypatch.setattr(conv, "TENSOR_CORES", True)
    fwd = conv.configs_for(prob, "fwd", 2)
    assert fwd[:len(conv.TF32_CONFIGS)] == list(conv.TF32_CONFIGS)  # timed first by the tuner
    assert not any(c.mma for p in ("bwd_data", "bwd_filter") for c in conv.configs_for(prob, p, 2))
    assert [c.mma for c in conv.configs_for(prob, "fwd", 2, precision="bf16")] == ["bf16"] * 3


def _graph(tmp_path, text: str = SMALL_NET):
    path = tmp_path / "mixed.cnn"
    path.write_text(text, encoding="utf-8")
    return check(path)


def test_precision_plan_binds_matmuls_and_leaves_the_rest(tmp_path):
    g = _graph(tmp_path)
    plan = NumpyBackend().compile(g)
    bf16 = precision.precision_plan(plan, "bf16")
    assert precision.precision_plan(plan, "fp32") is plan
    kinds = {}
    for before, after in zip(plan.steps, bf16.steps):
        op = before.node.op
        if op in ("conv", "fused_conv"):
            assert after.kernel.forward.keywords == {"precision": "bf16"}  # tensor cores; depthwise rounded
            kinds.setdefault("conv", []).append(before.node.name)
        elif op in ("dense", "fused_dense"):
            assert "rounding_kernel" in after.kernel.forward.__qualname__  # rounded operands, float32 kernels
            kinds.setdefault("rounded", []).append(before.node.name)
        else:
            assert after.kernel is before.kernel
    assert len(kinds["conv"]) == 3 and len(kinds["rounded"]) == 1


def test_specs_for_a_training_graph_follow_its_precision(tmp_path):
    g = _graph(tmp_path)
    plain = {s.template for s in specs_for_graph(g, training=True)}
    assert "conv_fwd_mma.cu" not in plain and "round.cu" not in plain
    bf16 = specs_for_graph(g, training=True, precision="bf16")
    assert {s.define("PREC") for s in bf16 if s.template == "round.cu"} == {2}
    assert {s.define("MMA") for s in bf16 if s.template == "conv_fwd_mma.cu"} == {2}
    text = SMALL_NET + "\ntrain:\n    precision fp16\n"
    g16 = _graph(tmp_path, text)
    assert {s.define("PREC") for s in specs_for_graph(g16, training=True) if s.template == "round.cu"} == {3}
    assert not [s for s in specs_for_graph(g16, training=False) if s.template in ("round.cu", "conv_fwd_mma.cu")]


def test_cuda_backend_declares_every_precision():
    from cnnc.backends.cuda import CudaBackend
    assert CudaBackend.precisions == {"fp32", "tf32", "bf16", "fp16"}
    for prec in CudaBackend.precisions:
        CudaBackend.check_precision(prec)


@needs_gpp
@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_small_network_on_the_emulator_equals_numpy_in_the_same_precision(prec, tmp_path, monkeypatch):
    """Each layer of the CUDA backend's plan in `prec` (tensor-core convs, rounded depthwise and
    dense operands) on the NumPy emulation's own inputs and output gradient, against that emulation."""
    from cnnc.runtime.model import Model
    from cnnc.runtime.parity import local_parity

    g = _graph(tmp_path)
    emu = _emulate_network(g, tmp_path, monkeypatch, precision=prec)
    reference = Model(g, "numpy", 0)
    reference.use_precision(prec)
    rows, _ = local_parity(g, "cuda", batch=2, reference_model=reference, adjust=lambda m: m.use_precision(prec))
    worst = max(max(r["forward"], r["backward"] or 0.0) for r in rows)
    print(f"{prec}: worst layer difference {worst:.1e}")
    assert worst < 1e-5, [(r["layer"], r["forward"], r["backward"]) for r in rows]
    launched = {t for t, _, _ in emu.launched}
    assert {"conv_fwd_mma.cu", "conv_bwd_data.cu", "conv_bwd_filter.cu", "round.cu", "conv_dw.cu"} <= launched
    assert "conv_fwd.cu" not in launched
    assert not emu.missing, f"kernels ran that specs_for_graph did not list: {emu.missing}"
