"""The CUDA kernels of the channel and normalisation ops (backends/cuda/channel_ops.py over
kernels/channel_ops.cu): without a GPU, every case's inference and training specs compile for
sm_90 with nvcc and every entry point appears in ptxas's report, fused_mul's with every element-wise
op of the table in one nvcc run; with a GPU (skipped otherwise), forward and backward match the
NumPy backend on test_numpy_grad.py's cases and fused_mul with every element-wise op."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from test_numpy_grad import CASES, ctx_for, make_node, make_params, rel

from cnnc.backends.cuda import KERNELS, channel_ops, device, nvcc, specs_for_graph
from cnnc.backends.cuda import elementwise as ew
from cnnc.backends.cuda import source
from cnnc.compiler.ops import OPS
from cnnc.backends.numpy import NumpyBackend
from cnnc.compiler.pipeline import PassContext, check, optimize
from cnnc.dsl.errors import CnncError

from conftest import EXAMPLES

OURS = [c for c in CASES if c.op in channel_ops.KERNELS]
ELEMENTWISE = [op for op in OPS if OPS[op].formula is not None]
NUMPY = NumpyBackend()


def case_node(case):
    return make_node(case.op, case.kw, [case.shapes[i] for i in case.inputs])


def test_the_backend_registers_every_channel_op():
    assert set(channel_ops.KERNELS) == set(channel_ops.OP_CODES)
    assert {c.op for c in OURS} == set(channel_ops.KERNELS)  # every op has cases
    assert all(KERNELS[op] is channel_ops.KERNELS[op] for op in channel_ops.KERNELS)
    for case in OURS:
        node, _ = case_node(case)
        inference, training = channel_ops.specs(node, False), channel_ops.specs(node, True)
        assert all(s in training for s in inference)
        assert len({s.key for s in training}) == len(training)
        assert not any(s.define("OP") != channel_ops.OP_CODES[case.op] for s in training)
    with pytest.raises(CnncError, match="no kernels for `relu`"):
        channel_ops.specs(make_node("relu", {}, [(3, 4, 4)])[0], True)


def test_specs_for_graph_finds_them():
    g = optimize(check(EXAMPLES / "modern_blocks.cnn"), PassContext(mode="training"))
    found = {s.define("OP") for s in specs_for_graph(g, True) if s.template == "channel_ops.cu"}
    used = {d["op"] for _, d in g.nodes(data=True)} & set(channel_ops.OP_CODES)
    assert found == {channel_ops.OP_CODES[op] for op in used} and len(used) >= 8


@pytest.mark.skipif(nvcc.find_nvcc() is None, reason="nvcc (the CUDA toolkit) is not installed")
def test_every_channel_op_spec_compiles_for_sm90(tmp_path):
    specs = []
    for case in OURS:
        node, _ = case_node(case)
        specs += channel_ops.specs(node, False) + channel_ops.specs(node, True)
    for op, kw, shapes in [("layernorm", {}, [(768, 14, 14)]), ("groupnorm", dict(groups=32), [(256, 56, 56)]),
                           ("mul", {}, [(512, 7, 7), (512, 1, 1)]), ("pad_channels", dict(to=64, stride=2),
                                                                      [(32, 16, 16)])]:
        specs += channel_ops.specs(make_node(op, kw, shapes)[0], True)  # network-sized problems too
    resources = nvcc.compile_specs(specs, tmp_path)
    found = {r.kernel: r for r in resources}
    expected = {s.symbol(e) for s in specs for e in s.entries}
    assert expected <= set(found), sorted(expected - set(found))[:10]
    for name in expected:
        assert found[name].registers > 0, name
        assert found[name].spill_stores + found[name].spill_loads <= 128, f"{name} spills: {found[name]}"


def fused_mul_node(act: str, shapes=((6, 5, 7), (6, 1, 1))):
    """fused_mul with `act` on its gate, the formula's parameters at their defaults."""
    args = tuple(float(OPS[act].attrs.model_fields[p].default) for p in OPS[act].formula.params)
    return make_node("fused_mul", dict(activation=act, act_args=args), list(shapes))[0]


def test_fused_mul_specs_carry_the_gate_activation():
    for act in ELEMENTWISE:
        node = fused_mul_node(act)
        fwd, bwd = channel_ops.specs(node, True)
        assert {fwd.define("ACT"), bwd.define("ACT")} == {ew.code(act)} and fwd.define("GATE") == 2
        assert bwd.entries == ("mul_bwd_full", "mul_bwd_gate")
    plain = channel_ops.specs(make_node("mul", {}, [(6, 5, 7), (6, 1, 1)])[0], True)
    assert all(s.define("ACT") == 0 for s in plain)
    assert "cnnc/elementwise.cuh" in source.includes(channel_ops.TEMPLATE)


@pytest.mark.skipif(nvcc.find_nvcc() is None, reason="nvcc (the CUDA toolkit) is not installed")
def test_fused_mul_compiles_for_every_formula_op(tmp_path):
    """One nvcc run: fused_mul's inference and training specs with each element-wise op of the table."""
    specs = []
    for act in ELEMENTWISE:
        specs += channel_ops.specs(fused_mul_node(act), True)
    specs += channel_ops.specs(fused_mul_node("hardsigmoid", [(512, 7, 7), (512, 1, 1)]), True)
    resources = nvcc.compile_specs(specs, tmp_path)
    found = {r.kernel: r for r in resources}
    expected = {s.symbol(e) for s in specs for e in s.entries}
    assert expected <= set(found), sorted(expected - set(found))[:10]
    for name in expected:
        assert found[name].registers > 0, name
        assert found[name].spill_stores + found[name].spill_loads == 0, f"{name} spills: {found[name]}"


# ---- with a GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not device.gpu_available(), reason="needs CuPy and an NVIDIA GPU")
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", OURS, ids=[c.id for c in OURS])
def test_channel_op_matches_numpy(case, batch, monkeypatch):
    cp = device.cupy()
    monkeypatch.setattr(device, "POISON", True)
    rng = np.random.default_rng(zlib.crc32(f"{case.id}|{batch}".encode()))
    node, pspecs = case_node(case)
    leaves = [rng.normal(0, case.scale, (batch, *s)).astype(np.float32) for s in case.shapes]
    params = {k: v.astype(np.float32) for k, v in make_params(pspecs, rng, np.float64).items()}
    ref, kernel = NUMPY.kernel(case.op), channel_ops.KERNELS[case.op]
    y_ref, saved_ref = ref.forward(node, [leaves[i].astype(np.float64) for i in case.inputs],
                                   {k: v.astype(np.float64) for k, v in params.items()}, ctx_for(case))
    dev = [cp.asarray(v) for v in leaves]
    dev_params = {k: cp.asarray(v) for k, v in params.items()}
    y, saved = kernel.forward(node, [dev[i] for i in case.inputs], dev_params, ctx_for(case))
    assert rel(cp.asnumpy(y).astype(np.float64), y_ref) <= 1e-5, "forward"
    dy = rng.normal(size=y_ref.shape).astype(np.float32)
    dxs_ref, dps_ref = ref.backward(node, saved_ref, dy.astype(np.float64),
                                    {k: v.astype(np.float64) for k, v in params.items()}, ctx_for(case))
    dxs, dps = kernel.backward(node, saved, cp.asarray(dy), dev_params, ctx_for(case))
    for i, (dx, dx_ref) in enumerate(zip(dxs, dxs_ref)):
        assert rel(cp.asnumpy(dx).astype(np.float64), dx_ref) <= 1e-5, f"input {i} gradient"
    assert sorted(dps) == sorted(dps_ref)
    for name in dps:
        assert rel(cp.asnumpy(dps[name]).astype(np.float64), dps_ref[name]) <= 1e-5, f"{name} gradient"
    for d, h in zip(dev, leaves):
        np.testing.assert_array_equal(cp.asnumpy(d), h)


@pytest.mark.gpu
@pytest.mark.skipif(not device.gpu_available(), reason="needs CuPy and an NVIDIA GPU")
@pytest.mark.parametrize("act", ELEMENTWISE)
def test_fused_mul_matches_numpy_for_every_formula_op(act, monkeypatch):
    cp = device.cupy()
    monkeypatch.setattr(device, "POISON", True)
    rng = np.random.default_rng(zlib.crc32(f"fused_mul|{act}".encode()))
    node = fused_mul_node(act)
    x = rng.normal(size=(3, 6, 5, 7)).astype(np.float32)
    g = rng.normal(0, 4.0, size=(3, 6, 1, 1)).astype(np.float32)  # past the kinks at ±3 and 6
    dy = rng.normal(size=x.shape).astype(np.float32)
    ref = NUMPY.kernel("fused_mul")
    y_ref, saved_ref = ref.forward(node, [x.astype(np.float64), g.astype(np.float64)], {}, ctx_for(OURS[0]))
    (dx_ref, dg_ref), _ = ref.backward(node, saved_ref, dy.astype(np.float64), {}, ctx_for(OURS[0]))
    kernel = channel_ops.KERNELS["fused_mul"]
    y, saved = kernel.forward(node, [cp.asarray(x), cp.asarray(g)], {}, ctx_for(OURS[0]))
    (dx, dg), dps = kernel.backward(node, saved, cp.asarray(dy), {}, ctx_for(OURS[0]))
    assert rel(cp.asnumpy(y).astype(np.float64), y_ref) <= 1e-5, "forward"
    assert rel(cp.asnumpy(dx).astype(np.float64), dx_ref) <= 1e-5, "dx"
    assert rel(cp.asnumpy(dg).astype(np.float64), dg_ref) <= 1e-5, "dgate"
    assert dps == {}
