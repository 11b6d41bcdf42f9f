"""The CUDA backend compiles without a GPU: every zoo network's specialised kernels (inference and
training) are generated and compiled for sm_90 with nvcc, and `cnnc compile --backend cuda`
writes an artifact whose report lists registers, shared memory and spills per kernel."""

from __future__ import annotations

import json

import pytest

from cnnc.backends.cuda import CudaBackend, nvcc, specs_for_graph
from cnnc.backends.cuda.source import translation_unit
from cnnc.runtime.artifact import compile_graph
from cnnc.runtime.model import Model

from conftest import EXAMPLES, run_cli

pytestmark = pytest.mark.skipif(nvcc.find_nvcc() is None, reason="nvcc (the CUDA toolkit) is not installed")

ZOO = sorted(EXAMPLES.glob("*.cnn"))


@pytest.fixture(scope="module")
def zoo_specs():
    """Every zoo network's kernel specs, inference (-O2) and training (-O1), per (network, mode)."""
    from cnnc.compiler.pipeline import PassContext
    per_network = {}
    for path in ZOO:
        model = Model.load(path)
        for mode, training in (("inference", False), ("training", True)):
            g, _, _ = compile_graph(model, 2 if not training else 1, "cuda", PassContext(mode=mode))
            per_network[(path.stem, mode)] = specs_for_graph(g, training)
    return per_network


def _compile_and_check(specs, per_network, tmp_path):
    resources = nvcc.compile_specs(specs, tmp_path)
    compiled = {r.kernel for r in resources}
    wanted = {s.key for s in specs}
    for (name, mode), found in per_network.items():
        for spec in found:
            if spec.key in wanted:
                for entry in spec.entries:
                    assert spec.symbol(entry) in compiled, (name, mode, spec.template, entry)
    assert all(r.registers > 0 for r in resources)
    report = sorted(resources, key=lambda r: -(r.spill_stores + r.spill_loads))[:5]
    print("\n".join(f"{r.kernel}: {r.registers} regs, {r.shared_bytes} B smem, spills {r.spill_stores}/{r.spill_loads}"
                    for r in report))


def test_every_code_path_of_the_zoo_compiles_for_sm90(zoo_specs, tmp_path):
    """One spec per variant (template and the defines that choose code paths; sizes aside): every path
    the zoo's 2,000-odd specialised kernels take, in about a tenth of the compile time."""
    by_variant = {}
    for found in zoo_specs.values():
        for spec in found:
            by_variant.setdefault(spec.variant, spec)
    sample = [by_variant[v] for v in sorted(by_variant, key=repr)]
    assert len(sample) < sum(len(f) for f in zoo_specs.values())
    _compile_and_check(sample, zoo_specs, tmp_path)


@pytest.mark.slow
def test_every_zoo_kernel_compiles_for_sm90(zoo_specs, tmp_path):
    """All specs of all networks, sizes included (slow: CNNC_SLOW=1)."""
    unique = {}
    for found in zoo_specs.values():
        for spec in found:
            unique.setdefault(spec.key, spec)
    _compile_and_check(list(unique.values()), zoo_specs, tmp_path)


def test_cnnc_compile_for_cuda_without_a_gpu(tmp_path):
    out = tmp_path / "lenet_cuda"
    r = run_cli("compile", str(EXAMPLES / "lenet5.cnn"), "--backend", "cuda", "-o", str(out), "--report")
    assert r.code == 0, r.err
    assert "registers" in r.out and "fused_conv" not in r.err
    plan = json.loads((out / "plan.json").read_text())
    assert plan["backend"] == "cuda" and plan["kernels"]
    assert (out / "kernels" / "kernels.cubin").stat().st_size > 0
    assert "KERNEL(" not in (out / "kernels" / "kernels.cu").read_text().split("namespace", 1)[0]
    info = json.loads((out / "kernels" / "resources.json").read_text())
    assert info["arch"] == "sm_90" and len(info["keys"]) >= 5


def test_running_on_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    from cnnc.backends.cuda import device
    if device.gpu_available():
        pytest.skip("a GPU is present")
    r = run_cli("parity", str(EXAMPLES / "lenet5.cnn"), "--backends", "numpy,cuda")
    assert r.code == 1 and "CUDA backend needs" in r.err and "Traceback" not in r.err
    assert isinstance(CudaBackend.fused_ops, frozenset)


def _formula_nodes(op: str):
    """Nodes applying `op`: alone, in a chain, fused into a conv (plain and depthwise) and a dense."""
    from test_numpy_grad import make_node

    from cnnc.compiler.ops import OPS, formula_args
    attrs = OPS[op].attrs()
    args = formula_args(op, attrs)
    other = next(o for o in OPS if OPS[o].formula is not None and o != op)
    other_args = formula_args(other, OPS[other].attrs())
    epi = dict(activation=op, act_args=args)
    return [
        make_node(op, attrs.model_dump(exclude={"name"}), [(3, 5, 5)])[0],
        make_node("elemwise_chain", dict(ops=(other, op), args=(other_args, args)), [(4, 4, 4)])[0],
        make_node("fused_conv", dict(filters=8, kernel=3, pad=1, residual=True, **epi), [(4, 6, 6), (8, 6, 6)])[0],
        make_node("fused_conv", dict(filters=4, kernel=3, pad=1, groups=4, **epi), [(4, 6, 6)])[0],
        make_node("fused_dense", dict(units=7, **epi), [(5,)])[0],
    ]


def test_every_formula_op_compiles_alone_chained_and_fused(tmp_path):
    """Every op of the table with a formula, through every kernel that applies activations, in
    one translation unit (the generated header once); training, so the SAVE_PRE paths of
    derivatives that read the input compile too."""
    from cnnc.backends.cuda import conv, elementwise, ops
    from cnnc.compiler.ops import OPS

    small = conv.CONFIGS[-1]  # the smallest tile: quick to compile
    specs, wanted = [], []
    formula_ops = [op for op in OPS if OPS[op].formula is not None]
    assert set(elementwise.codes()) == set(formula_ops)
    for op in formula_ops:
        for node in _formula_nodes(op):
            found = conv.specs(node, True, config=small) if node.op in conv.KERNELS else ops.specs(node, True)
            specs += found
            wanted.append((op, node.op, found))
        fused = _formula_nodes(op)[2]
        save_pre = {s.define("SAVE_PRE") for s in conv.specs(fused, True, config=small) if s.template == "conv_fwd.cu"}
        assert save_pre == ({True, False} if "input" in OPS[op].formula.grad_reads else {False}), op
    source = translation_unit(specs)
    assert source.count("#define CNNC_ELEMENTWISE_CUH") == 1
    compiled = {r.kernel for r in nvcc.compile_specs(specs, tmp_path)}
    for op, node_op, found in wanted:
        for spec in found:
            for entry in spec.entries:
                assert spec.symbol(entry) in compiled, (op, node_op, spec.template, entry)
