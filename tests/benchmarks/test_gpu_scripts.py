"""The GPU run's scripts, checked without a GPU: benchmarks/gpu_all.sh parses and, dry, lists every
step within its 10 minutes; gpu_sanitize.py enumerates every conv kernel configuration and runs
its cases right on the CPU emulator of the kernels; gpu_conv.py, gpu_train.py and gpu_parity.py
answer --help and take their CPU dry paths (the layer table against the compiler's shapes, the
networks' files, PyTorch's AMP step on the CPU, parity of NumPy against itself)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnc.backends.cuda import conv, device, tuner

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_gpu_all_parses_and_its_dry_run_lists_every_step_within_10_minutes(tmp_path):
    script = BENCH / "gpu_all.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "DRY_RUN": "1", "RESULTS_DIR": str(tmp_path / "results"), "PYTHON": sys.executable}
    p = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    limits = dict(re.findall(r"^## (\S+) \(limit (\d+) s\)", p.stdout, re.M))
    want = {"tests_conv", "tests_ops", "sanitize:build", "sanitize:memcheck", "sanitize:racecheck",
            "sanitize:initcheck", "sanitize:initcheck-vgg19", "sanitize:repeat-vgg19", "parity_vgg19",
            "gpu_train", "gpu_conv"}
    assert want <= set(limits), p.stdout
    assert sum(map(int, limits.values())) < 600, limits
    assert not list((tmp_path / "results").glob("gpu-*.txt"))  # a dry run saves no result
    # every python step's script exists and its flags parse
    for script_name, flags in re.findall(r"benchmarks/(gpu_\w+)\.py([^\n]*)", p.stdout):
        args = [f for f in flags.split() if f.startswith("-")]
        assert (BENCH / f"{script_name}.py").exists() and args is not None


@pytest.mark.parametrize("name", ["gpu_sanitize", "gpu_conv", "gpu_train", "gpu_parity"])
def test_gpu_scripts_answer_help(name):
    with pytest.raises(SystemExit) as exc:
        load(name).main(["--help"])
    assert exc.value.code == 0


def test_sanitize_driver_enumerates_every_kernel_configuration(capsys):
    sanitize = load("gpu_sanitize")
    for which in sanitize.PROBLEMS:
        cases = sanitize.cases(which)
        for problem in sanitize.PROBLEMS[which]:
            mine = [c.config for c in cases if c.problem == problem]
            if not problem.tiled:
                assert mine == [None]
                continue
            simt = [c for c in mine if not c.mma and not c.algo]
            wino = [c for c in mine if c.algo]
            assert wino == (list(conv.WINO_CONFIGS) if conv.Problem.from_node(sanitize.make_node(problem)).winograd
                            else [])
            assert {(c.block_m, c.block_n, c.block_k, c.thread_m, c.thread_n) for c in simt} == \
                {(c.block_m, c.block_n, c.block_k, c.thread_m, c.thread_n) for c in conv.CONFIGS}
            assert len(simt) == len(conv.CONFIGS) * len(sanitize.SPLITS)
            assert {c.splits for c in simt} == set(sanitize.SPLITS)
            every_mma = [cfg for configs in conv.MMA_CONFIGS.values() for cfg in configs]
            plain = problem.kw.get("activation", "none") in ("none", "relu")
            assert [c for c in mine if c.mma] == (every_mma if plain else [])
    templates = {s.template for c in sanitize.cases("small") for s in sanitize.case_specs(c)}
    assert templates == {"conv_fwd.cu", "conv_fwd_mma.cu", "conv_bwd_data.cu", "conv_bwd_filter.cu", "conv_bias.cu",
                         "conv_reduce.cu", "conv_dw.cu", "round.cu", "conv_wino.cu"}  # round.cu: dy on entry
                                                                                       # in a reduced precision
    mma_specs = [s for c in sanitize.cases("small") if c.config is not None and c.config.mma
                 for s in sanitize.case_specs(c)]
    assert {s.define("MMA") for s in mma_specs if s.template.startswith("conv_bwd")} == {1, 2, 3}
    vgg = sanitize.make_node(sanitize.PROBLEMS["vgg19"][0])
    assert conv.Problem.from_node(vgg) == conv.Problem(512, 8, 8, 512, 3, 3, 8, 8, 1, 1, 1, 1)
    assert sanitize.main(["--list"]) == 0
    assert f"{len(sanitize.cases('small'))} cases" in capsys.readouterr().out


def test_sanitize_driver_runs_its_cases_right_on_the_emulator(tmp_path, monkeypatch):
    """A bounded sample: one tiled case with split-K (fwd, bias, transpose, data and weight
    gradients, split reduction), twice."""
    sys.path.insert(0, str(REPO / "tests" / "backends"))
    try:
        from test_cuda_conv import EmulatedDevice
    finally:
        sys.path.pop(0)
    import shutil
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed (the CPU emulator compiles the kernels with it)")
    sanitize = load("gpu_sanitize")
    cases = [c for c in sanitize.cases("small") if c.problem.name == "gather-k33-tails"
             and ((c.config.block_m == 32 and c.config.block_n == 64 and c.config.splits == 3)
                  or c.config == conv.MMA_CONFIGS["bf16"][0])]
    assert len(cases) == 2
    emu = EmulatedDevice(tmp_path, [s for c in cases for s in sanitize.case_specs(c)])
    for name in ("cupy", "empty", "function"):
        monkeypatch.setattr(device, name, getattr(emu, name))
    monkeypatch.setattr(tuner, "MODE", "off")
    for case in cases:
        r = sanitize.run_case(case, lambda a: a, np.asarray, repeat=2)
        assert r["unstable"] == [] and all(v <= sanitize.TOL for v in r["errors"].values()), (case.id, r)
        assert {"y", "dx0", "dweight"} <= set(r["errors"])
    assert not emu.missing


def test_gpu_conv_dry_run_checks_the_layer_table_and_formats_a_table(capsys):
    gpu_conv = load("gpu_conv")
    assert gpu_conv.main(["--dry-run"]) == 0
    assert f"{len(gpu_conv.LAYERS)} layers x 3 passes" in capsys.readouterr().out
    records = [dict(layer="r50_l1_3x3", gflop=14.8, ours_ms=0.5, ours_tflops=29.6, ours_peak_pct=44.2,
                    cudnn_ms=0.4, cudnn_tflops=37.0, ratio=1.25, ratio_best=1.4,
                    cudnn_ms_by_setting={"fp32": 0.4, "fp32_cl": 0.35, "tf32": 0.2, "tf32_cl": 0.1}, rel_err=1e-7,
                    **{"pass": p}) for p in gpu_conv.PASSES]
    text = gpu_conv.table(records, tf32=True)
    assert "geometric mean ours/cuDNN fp32 fwd" in text and "1.25" in text and "148.00 TFLOP/s" in text
    bf16 = [dict(r, precision="bf16", cudnn_ms_by_setting={"bf16": 0.1, "bf16_cl": 0.08}) for r in records]
    text = gpu_conv.table(bf16, tf32=True)
    assert "geometric mean ours/cuDNN bf16 fwd" in text and "TF32" not in text


def test_gpu_train_dry_run(capsys):
    gpu_train = load("gpu_train")
    assert gpu_train.main(["--dry-run", "--cases", "lenet5:8"]) == 0
    assert "lenet5 batch 8" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        gpu_train.parse_cases("lenet5:eight")


@pytest.mark.slow  # importing PyTorch: 10-20 s on a busy 2-core machine
def test_gpu_train_pytorch_amp_step_runs_on_the_cpu():
    gpu_train = load("gpu_train")
    for amp in (False, True):  # bf16 autocast and channels_last run the same code on the CPU
        assert gpu_train.torch_peer("lenet5", 4, 1, amp=amp, device="cpu") > 0


def test_gpu_parity_dry_run_numpy_against_itself(capsys):
    gpu_parity = load("gpu_parity")
    assert gpu_parity.main([str(REPO / "examples" / "lenet5.cnn"), "--size", "native", "--backends",
                            "numpy,numpy", "--runs", "1", "--modes", "off"]) == 0
    assert "tuner off: 1 of 1 runs agree" in capsys.readouterr().out
