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


def test_every_zoo_network_compiles_for_sm90(tmp_path):
    specs, per_network = [], {}
    for path in ZOO:
        model = Model.load(path)
        for mode, training in (("inference", False), ("training", True)):
            from cnnc.compiler.pipeline import PassContext
            g, _, _ = compile_graph(model, 2 if not training else 1, "cuda", PassContext(mode=mode))
            found = specs_for_graph(g, training)
            per_network[(path.stem, mode)] = found
            specs += found
    source = translation_unit(specs)
    resources = nvcc.compile_cubin(source, tmp_path / "zoo.cubin")
    compiled = {r.kernel for r in resources}
    for (name, mode), found in per_network.items():
        for spec in found:
            for entry in spec.entries:
                assert spec.symbol(entry) in compiled, (name, mode, spec.template, entry)
    assert all(r.registers > 0 for r in resources)
    report = sorted(resources, key=lambda r: -(r.spill_stores + r.spill_loads))[:5]
    print("\n".join(f"{r.kernel}: {r.registers} regs, {r.shared_bytes} B smem, spills {r.spill_stores}/{r.spill_loads}"
                    for r in report))


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
