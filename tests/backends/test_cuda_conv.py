"""The CUDA convolution kernels (backends/cuda/conv.py, kernels/conv_*.cu), in three layers.

1. nvcc, no GPU needed: every conv problem of ResNet-50, GoogLeNet and AlexNet (2012) plus odd
   ones (7x7 and 13x13 inputs, 3/5/33 channels, stride 2 without padding, dilation, groups,
   depthwise, 1x7/7x1, every fused activation, residual, bias on and off), inference and
   training specs, rendered into one translation unit and compiled for sm_90 in one nvcc run:
   every entry point is in ptxas's report; registers, shared memory and spills are printed.
2. An emulator, no GPU needed: the same kernel sources compiled for the CPU with g++ (a fiber
   per CUDA thread, `__syncthreads` a barrier that fails the launch if threads diverge,
   threads run in a new random order between barriers so a missing barrier shows, arrays
   surrounded by NaN canaries so out-of-bounds reads poison the result and out-of-bounds
   writes are caught, misaligned float4 loads and stores caught), driven by conv.py itself with NumPy in
   place of CuPy and NaN-filled outputs (device.POISON). Forward, data and weight gradients and
   dbias are compared with the NumPy backend's kernels in float64, relative error norm <= 1e-5;
   every tile configuration, several split-K counts; and every kernel that runs must be one
   `conv.specs` listed (what ahead-of-time compilation builds).
3. On a GPU (marked gpu; skipped with the reason without one): the same comparisons through
   CuPy with POISON on, on the odd problems, every network problem, every configuration for a
   few problems, the tuner, and `launcher`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cnnc.backends.base import Ctx, NodeInfo
from cnnc.backends.cuda import conv, device, elementwise, nvcc, rounding, source, tuner
from cnnc.backends.numpy import NumpyBackend
from cnnc.backends.numpy.precision import round_to
from cnnc.dsl.errors import CnncError
from cnnc.compiler.graph import inputs_of
from cnnc.compiler.ops import OPS, formula_args, resolve_pads
from cnnc.compiler.pipeline import check

REPO = Path(__file__).resolve().parents[2]
NETWORKS = ("resnet50", "googlenet", "alexnet_2012")
TOL = 1e-5
MAX_SPILL_BYTES = 64  # the default configurations spill at most this much (see test_nvcc_...)


# ---- problems -------------------------------------------------------------------------------

def make_node(op: str, kw: dict, shape) -> NodeInfo:
    """A conv or fused_conv NodeInfo as the compiler builds it (shape rule, resolved pads)."""
    shape = tuple(shape)
    base = {k: v for k, v in kw.items() if k not in ("activation", "act_args", "residual")}
    out = tuple(OPS["conv"].shape(OPS["conv"].attrs(**base), [shape]))
    attrs = OPS[op].attrs(**kw)
    ins = (shape,) + ((out,) if kw.get("residual") else ())
    eff = ((attrs.kernel[0] - 1) * attrs.dilation[0] + 1, (attrs.kernel[1] - 1) * attrs.dilation[1] + 1)
    pads = resolve_pads(attrs.pad, shape[1], shape[2], eff, attrs.stride)
    return NodeInfo(1, "conv", op, attrs, ins, out, pads)


def network_nodes(name: str) -> list[NodeInfo]:
    """The distinct conv nodes of an example network, built as Backend.compile does."""
    g = check(REPO / "examples" / f"{name}.cnn")
    out, seen = [], set()
    for n in sorted(g.nodes):
        d = g.nodes[n]
        if d["op"] != "conv":
            continue
        node = NodeInfo(n, d["name"], d["op"], d["attrs"], tuple(g.nodes[u]["shape"] for u in inputs_of(g, n)),
                        d["shape"], d.get("pads"))
        key = (conv.Problem.from_node(node), node.attrs.bias)
        if key not in seen:
            seen.add(key)
            out.append(node)
    return out


NUMPY = NumpyBackend()
# (activation, formula arguments): the interesting arguments, then every other op with a formula
ACTS = [("none", ()), ("relu", ()), ("relu6", ()), ("leaky_relu", (0.2,)), ("leaky_relu", (0.0,)),
        ("leaky_relu", (-0.3,)), ("leaky_relu", (1.5,)), ("sigmoid", ()), ("tanh", ())]
ACTS += [(op, formula_args(op, OPS[op].attrs())) for op in OPS
         if OPS[op].formula is not None and op not in {a for a, _ in ACTS}]


def _act_id(act: str, args) -> str:
    return act + "".join(f"{v:g}" for v in args)


# (id, op, attributes, input shape C x H x W, batch)
ODD = [
    ("3x3-c5-k6-7x7", "conv", dict(filters=6, kernel=3, pad=1), (5, 7, 7), 2),
    ("c3-k5-nobias-b1", "conv", dict(filters=5, kernel=3, pad=1, bias=False), (3, 7, 7), 1),
    ("k33-s2-pad0-13x13", "conv", dict(filters=33, kernel=3, stride=2), (5, 13, 13), 3),
    ("asym-pad-floor", "conv", dict(filters=4, kernel=3, stride=2, pad=(1, 0, 2, 1), round="floor"), (3, 8, 8), 2),
    ("ceil-overhang", "conv", dict(filters=4, kernel=3, stride=2, pad=1, round="ceil"), (3, 8, 8), 2),
    ("dilation2", "conv", dict(filters=3, kernel=3, dilation=2, pad=2), (2, 7, 7), 2),
    ("groups2", "conv", dict(filters=6, kernel=3, groups=2, pad=1), (4, 5, 5), 3),
    ("groups4-cg1-kg2-s2", "conv", dict(filters=8, kernel=3, groups=4, pad=1, stride=2), (4, 7, 7), 2),
    ("depthwise-s2", "conv", dict(filters=4, kernel=3, groups=4, pad=1, stride=2), (4, 7, 7), 2),
    ("depthwise-dil2-13x13", "conv", dict(filters=5, kernel=3, groups=5, pad=2, dilation=2), (5, 13, 13), 3),
    ("1x1-c3-5x5", "conv", dict(filters=5, kernel=1), (3, 5, 5), 2),
    ("1x1-vec-4x4", "conv", dict(filters=20, kernel=1), (12, 4, 4), 2),
    ("1x1-s2-floor", "conv", dict(filters=4, kernel=1, stride=2, round="floor"), (3, 6, 6), 2),
    ("1x1-s2-1x1-input", "conv", dict(filters=8, kernel=1, stride=2), (4, 1, 1), 2),
    ("1x3-same", "conv", dict(filters=4, kernel=(1, 3), pad="same"), (3, 5, 6), 2),
    ("1x7", "conv", dict(filters=7, kernel=(1, 7), pad=(0, 3)), (6, 9, 9), 2),
    ("7x1", "conv", dict(filters=7, kernel=(7, 1), pad=(3, 0)), (6, 9, 9), 2),
    ("5x5-s3-floor", "conv", dict(filters=16, kernel=5, stride=3, pad=2, round="floor"), (3, 13, 13), 3),
    ("11x11-s4", "conv", dict(filters=12, kernel=11, stride=4, round="floor"), (3, 27, 27), 1),
    ("c36-k40-4x4", "conv", dict(filters=40, kernel=3, pad=1), (36, 4, 4), 3),
    ("c33-k33-7x7-b1", "conv", dict(filters=33, kernel=3, pad=1), (33, 7, 7), 1),
    ("bias-split-56x56", "conv", dict(filters=4, kernel=3, pad=1), (3, 56, 56), 3),  # dbias in 2 splits
    ("fused-1x1-vec-relu-res", "fused_conv", dict(filters=36, kernel=1, activation="relu", residual=True), (20, 6, 6), 2),
    ("fused-depthwise-relu6-res", "fused_conv",
     dict(filters=4, kernel=3, groups=4, pad=1, activation="relu6", residual=True), (4, 7, 7), 2),
    ("fused-depthwise-hardswish-res", "fused_conv",  # the depthwise kernel's SAVE_PRE path
     dict(filters=4, kernel=3, groups=4, pad=1, activation="hardswish", residual=True), (4, 7, 7), 2),
    ("fused-1x1-vec-gelu", "fused_conv", dict(filters=8, kernel=1, activation="gelu"), (4, 4, 4), 2),  # float4 SAVE_PRE
] + [
    (f"fused-{_act_id(act, args)}-{'res' if i % 2 else 'nores'}-{'bias' if i % 3 else 'nobias'}",
     "fused_conv", dict(filters=6, kernel=3, pad=1, activation=act, act_args=args, residual=bool(i % 2),
                        bias=bool(i % 3)),
     (5, 7, 7), 2)
    for i, (act, args) in enumerate(ACTS)
]

# every configuration (and split-K count) on a float4 pointwise problem and an odd gather problem
CONFIG_PROBLEMS = [
    ("1x1-vec", "conv", dict(filters=20, kernel=1), (12, 4, 4), 2, 1),
    ("k33-gather", "conv", dict(filters=33, kernel=3, pad=1), (5, 7, 7), 3, 3),
    ("fused-s2-res", "fused_conv", dict(filters=24, kernel=3, stride=2, pad=1, round="floor", activation="tanh",
                                        residual=True), (8, 8, 8), 2, 4),
]
CONFIG_CASES = [(f"{pid}-cfg{i}", op, kw, shape, batch, replace(cfg, splits=splits))
                for pid, op, kw, shape, batch, splits in CONFIG_PROBLEMS for i, cfg in enumerate(conv.CONFIGS)]


# the tensor-core passes: every precision and configuration on a pointwise (float4-loaded), a
# gather problem with tails everywhere, and a fused stride-2 one (relu, residual), grouped
MMA_PROBLEMS = [
    ("1x1-vec", "conv", dict(filters=20, kernel=1), (12, 4, 4), 2, 1),
    ("k33-gather", "conv", dict(filters=33, kernel=3, pad=1), (5, 7, 7), 3, 3),
    ("fused-s2-relu-res-g2", "fused_conv", dict(filters=24, kernel=3, stride=2, pad=1, round="floor", groups=2,
                                                activation="relu", residual=True), (8, 8, 8), 2, 2),
]
MMA_CASES = [(f"{pid}-{cfg.mma}-{cfg.block_m}x{cfg.block_n}", op, kw, shape, batch, replace(cfg, splits=splits))
             for pid, op, kw, shape, batch, splits in MMA_PROBLEMS
             for p in conv.MMA_CODES for cfg in conv.MMA_CONFIGS[p]]


# Winograd F(2x2, 3x3) forwards (the other passes the cost model's): odd output sizes (partial
# tiles), K not a multiple of 4 (scalar U loads), valid padding, non-square, the fused epilogue
WINO_PROBLEMS = [
    ("k33-c5-7x7", "conv", dict(filters=33, kernel=3, pad=1), (5, 7, 7), 3),
    ("valid-c12-6x6", "conv", dict(filters=8, kernel=3), (12, 6, 6), 2),
    ("fused-relu-res-5x6", "fused_conv", dict(filters=16, kernel=3, pad=1, activation="relu", residual=True),
     (6, 5, 6), 2),
    ("fused-gelu-save-pre", "fused_conv", dict(filters=12, kernel=3, pad=1, activation="gelu", bias=False),
     (4, 6, 6), 2),
]
WINO_CASES = [(f"wino-{pid}-{cfg.block_m}x{cfg.block_n}", op, kw, shape, batch, cfg)
              for pid, op, kw, shape, batch in WINO_PROBLEMS for cfg in conv.WINO_CONFIGS]


def odd_nodes() -> list[NodeInfo]:
    return [make_node(op, kw, shape) for _, op, kw, shape, _ in ODD]


# ---- the comparison, shared by the emulator and the GPU -------------------------------------

def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_case(node: NodeInfo, batch: int, to_dev, to_host, config=None, precision: str = "fp32") -> dict[str, float]:
    """Forward and backward of `node` with conv.KERNELS (on whatever `device` is), or with
    conv.kernels_in(precision), against the NumPy backend in float64 on the same operands rounded
    to the precision (the input, the weight and dy: exact for a conv without activation or with
    relu, whose derivative commutes with rounding); returns relative errors by output. Also checks
    that the inputs and dy are not written."""
    op, a = node.op, node.attrs
    rng = np.random.default_rng(zlib.crc32(repr((node.attrs, node.in_shapes, batch)).encode()))
    specs = OPS[op].params(a, list(node.in_shapes[:1]))
    params = {s.name: rng.normal(0, 0.5, s.shape) for s in specs}
    xs = [rng.normal(0, 1, (batch, *s)) for s in node.in_shapes]
    dy = rng.normal(0, 1, (batch, *node.out_shape))

    d_params = {k: to_dev(v.astype(np.float32)) for k, v in params.items()}
    d_xs = [to_dev(v.astype(np.float32)) for v in xs]
    d_dy = to_dev(dy.astype(np.float32))
    kernel = conv.kernels_in(precision)[op]
    y, saved = kernel.forward(node, d_xs, d_params, Ctx(training=True), config=config)
    dxs, dparams = kernel.backward(node, saved, d_dy, d_params, Ctx(training=True), config=config)

    # the NumPy backend's own kernels for the same node, in float64, on the rounded operands
    ref = NUMPY.kernel(op)
    rounded = lambda a: round_to(a.astype(np.float32), precision).astype(np.float64)  # noqa: E731
    ref_params = {k: rounded(v) if k == "weight" else v for k, v in params.items()}
    y_ref, s_ref = ref.forward(node, [rounded(xs[0]), *xs[1:]], ref_params, Ctx(training=True))
    dxs_ref, dp_ref = ref.backward(node, s_ref, rounded(dy), ref_params, Ctx(training=True))
    errs = {"y": rel(to_host(y), y_ref)}
    assert len(dxs) == len(node.in_shapes) == len(dxs_ref)
    errs["dx"] = rel(to_host(dxs[0]), dxs_ref[0])
    if len(dxs) > 1:
        errs["dresidual"] = rel(to_host(dxs[1]), dxs_ref[1])
    assert set(dparams) == set(dp_ref)
    for k in dp_ref:
        errs["d" + k] = rel(to_host(dparams[k]), dp_ref[k])
    for name, got, want in [("x", d_xs[0], xs[0]), ("dy", d_dy, dy)] + [("weight", d_params["weight"], params["weight"])]:
        assert np.array_equal(to_host(got), want.astype(np.float32)), f"the kernels wrote their input {name}"
    return errs


def assert_close(errs: dict[str, float], what: str) -> None:
    bad = {k: v for k, v in errs.items() if not v <= TOL}  # NaN fails too
    shown = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
    assert not bad, f"{what}: relative error above {TOL}: {shown}"


# ---- 0. pure Python --------------------------------------------------------------------------

def test_importing_conv_does_not_import_cupy():
    code = "import sys, cnnc.backends.cuda.conv; sys.exit('cupy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_configs_are_valid_and_ordered_per_problem():
    assert len(set(conv.CONFIGS)) == len(conv.CONFIGS) >= 5
    for cfg in conv.CONFIGS:
        conv.check_config(cfg)
        assert eval(repr(cfg), {"Config": conv.Config}) == cfg  # a stable repr keys the tuning cache
    with pytest.raises(ValueError):
        conv.check_config(conv.Config(128, 128, 8, 6, 8))
    for node in network_nodes("resnet50")[:6] + odd_nodes()[:6]:
        prob = conv.Problem.from_node(node)
        for pass_ in conv.PASSES:
            for batch in (None, 1, 64):
                order = conv.configs_for(prob, pass_, batch)
                gemm = [c for c in order if not c.algo]
                assert sorted(map(repr, [replace(c, splits=None) for c in gemm])) == sorted(map(repr, conv.CONFIGS))
                assert order[0] == gemm[0]  # the implicit GEMM first: what runs with the tuner off
                wino = [c for c in order if c.algo]
                assert sorted(wino, key=repr) == (sorted(conv.WINO_CONFIGS, key=repr)
                                                  if pass_ == "fwd" and prob.winograd else [])
                if wino:
                    assert order[1] == wino[0]  # timed by the fast tuner
                if pass_ == "bwd_filter":
                    assert all(1 <= c.splits <= conv.MAX_SPLITS for c in order)
    # a long reduction and few output tiles: the weight gradient splits
    conv1 = conv.Problem(3, 224, 224, 64, 7, 7, 112, 112, 2, 2, 3, 3)
    assert conv.configs_for(conv1, "bwd_filter", 64)[0].splits > 1


def test_specs_per_node():
    plain = make_node("conv", dict(filters=8, kernel=3, pad=1, bias=False), (4, 6, 6))
    assert [s.template for s in conv.specs(plain, False)] == ["conv_fwd.cu"]
    assert [s.template for s in conv.specs(plain, True)] == ["conv_fwd.cu", "conv_bwd_data.cu",
                                                             "conv_bwd_filter.cu", "conv_reduce.cu"]
    biased = make_node("conv", dict(filters=8, kernel=3, pad=1), (4, 6, 6))
    assert "conv_bias.cu" in [s.template for s in conv.specs(biased, True)]
    dw = make_node("conv", dict(filters=4, kernel=3, pad=1, groups=4), (4, 6, 6))
    assert {s.template for s in conv.specs(dw, True)} == {"conv_dw.cu", "conv_bias.cu", "conv_reduce.cu"}
    fused = make_node("fused_conv", dict(filters=8, kernel=3, pad=1, activation="leaky_relu", act_args=(0.1,),
                                         residual=True), (4, 6, 6))
    fwd = conv.specs(fused, False)[0]
    leaky = elementwise.codes()["leaky_relu"]
    assert (fwd.define("ACT"), fwd.define("HAS_RESIDUAL"), fwd.define("ARG0"), fwd.define("SAVE_PRE")) == \
        (leaky, True, 0.1, False)
    # leaky_relu's derivative reads its input: training saves the pre-activation (and still
    # compiles the evaluation forward), and the bias kernel reads it
    train = conv.specs(fused, True)
    assert sorted(s.define("SAVE_PRE") for s in train if s.template == "conv_fwd.cu") == [False, True]
    bias = next(s for s in train if s.template == "conv_bias.cu")
    assert (bias.define("ACT"), bias.define("GRAD_X"), bias.define("GRAD_Y")) == (leaky, True, False)
    relu = make_node("fused_conv", dict(filters=8, kernel=3, pad=1, activation="relu"), (4, 6, 6))
    assert [s.define("SAVE_PRE") for s in conv.specs(relu, True) if s.template == "conv_fwd.cu"] == [False]
    cfg = conv.CONFIGS[-1]
    assert conv.specs(plain, False, config=cfg)[0].define("BLOCK_M") == cfg.block_m
    # the batch is a runtime argument: nothing in a spec depends on it
    assert all("N" not in dict(s.defines) for s in conv.specs(biased, True))


# ---- 1. nvcc --------------------------------------------------------------------------------

needs_nvcc = pytest.mark.skipif(nvcc.find_nvcc() is None, reason="nvcc (the CUDA toolkit) is not installed")


@needs_nvcc
def test_nvcc_compiles_every_spec_for_sm90(tmp_path):
    nodes = [n for name in NETWORKS for n in network_nodes(name)] + odd_nodes()
    default, specs = set(), []
    for node in nodes:
        for training in (False, True):
            found = conv.specs(node, training)
            default |= {s.key for s in found}
            specs += found
    for node in [make_node("conv", dict(filters=64, kernel=3, pad=1), (64, 28, 28))]:  # every config too
        for cfg in conv.CONFIGS + sum(conv.MMA_CONFIGS.values(), ()) + conv.WINO_CONFIGS:  # tensor cores, Winograd
            specs += conv.specs(node, True, config=cfg, precision=cfg.precision)
    specs += [rounding.round_spec(p) for p in conv.MMA_CODES]
    unique = {s.key: s for s in specs}
    resources = nvcc.compile_specs(list(unique.values()), tmp_path)
    by_symbol = {r.kernel: r for r in resources}
    rows, spilled = [], []
    for spec in unique.values():
        for entry in spec.entries:
            sym = spec.symbol(entry)
            assert sym in by_symbol, f"{sym} ({spec.template}) missing from ptxas's report"
            r = by_symbol[sym]
            d = dict(spec.defines)
            tile = "x".join(str(d[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) if "BLOCK_M" in d else "-"
            prob = f"C{d.get('C', '-')} {d.get('H', '-')}x{d.get('W', '-')} K{d.get('K', '-')} {d.get('R', '')}x{d.get('S', '')}"
            rows.append((entry, prob, tile, r.registers, r.shared_bytes, r.spill_stores, r.spill_loads,
                         spec.key in default))
            if r.spill_stores or r.spill_loads:
                spilled.append(rows[-1])
    print(f"\n{len(resources)} kernels from {len(unique)} specs; per entry point, max registers / smem:")
    for entry in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == entry]
        print(f"  {entry:20s} {len(mine):4d} kernels, <= {max(r[3] for r in mine):3d} registers, "
              f"<= {max(r[4] for r in mine):6d} B shared")
    print("spills (entry, problem, tile, registers, smem, spill stores, loads, default config):")
    for r in spilled:
        print("  ", r)
    assert all(r[3] > 0 for r in rows)
    worst = [r for r in spilled if r[7] and max(r[5], r[6]) > MAX_SPILL_BYTES]
    assert not worst, f"default configurations spill more than {MAX_SPILL_BYTES} bytes: {worst}"


# ---- 2. the CPU emulator --------------------------------------------------------------------

EMU_SHIM = r'''
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <type_traits>
#include <utility>
#include <vector>
#include <ucontext.h>

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };
static int emu_error = 0;
// float4 copies check the alignment of both sides: every float4 load or store the kernels make
// (global or shared, through reinterpret_cast) goes through these
struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
    float4() {}
    float4(const float4& o) { check(&o); x = o.x; y = o.y; z = o.z; w = o.w; }
    float4& operator=(const float4& o) { check(this); check(&o); x = o.x; y = o.y; z = o.z; w = o.w; return *this; }
    static void check(const void* p) { if ((uintptr_t)p % 16) emu_error = 3; }
};
static inline float4 make_float4(float a, float b, float c, float d) { float4 v; v.x = a; v.y = b; v.z = c; v.w = d; return v; }
static uint3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// every __shared__ array lands in one section, which each block starts NaN-filled (a real GPU
// leaves the previous kernel's bytes there): a read of shared memory the block did not write
// poisons the result
#define __shared__ static __attribute__((section("emu_shared")))
extern char __start_emu_shared[] __attribute__((weak));
extern char __stop_emu_shared[] __attribute__((weak));
#define __align__(n) __attribute__((aligned(n)))
#define __expf(v) expf(v)
#define CNNC_DIV_UP(a, b) (((a) + (b) - 1) / (b))
template <class T> static inline T __ldg(const T* p) {
    if ((uintptr_t)p % alignof(T)) { emu_error = 3; return T(); }
    return *p;
}
static inline float atomicAdd(float* p, float v) { float o = *p; *p += v; return o; }
static inline int atomicAdd(int* p, int v) { int o = *p; *p += v; return o; }
// the other kernels' intrinsics (element-wise ops, pools, normalisation), for whole networks
using std::min;
using std::max;
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __frcp_rn(float a) { return 1.0f / a; }

namespace emu {
enum { READY, WAITING, DONE };
struct Fiber { ucontext_t ctx; char* stack; int state; };
static const size_t STACK = 1 << 17;
static std::vector<Fiber> fibers;
static ucontext_t sched;
static int cur;
static std::function<void()> body;
static void entry() { body(); fibers[cur].state = DONE; }
}
static void __syncthreads() {
    emu::fibers[emu::cur].state = emu::WAITING;
    swapcontext(&emu::fibers[emu::cur].ctx, &emu::sched);
}

// the tensor cores (tensor_tile.cuh's seven instructions), from the PTX ISA's fragment tables: each
// lane posts its registers, a barrier, each lane computes its own accumulators from its warp's
// posts (products exact, sums in double, rounded once to float), a barrier before the posts are
// reused. Block-wide barriers stand in for the warp's: the kernels issue mma from every warp in
// lockstep (a lane that did not would fail the launch as a diverged barrier).
#define CNNC_EMULATOR 1
static inline unsigned emu_bits(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned cnnc_tf32(float v) {  // round to nearest even, 13 bits dropped; inf and NaN kept
    unsigned u = emu_bits(v);
    if ((u & 0x7F800000u) == 0x7F800000u) return u;
    return (u + 0xFFFu + ((u >> 13) & 1u)) & 0xFFFFE000u;
}
static inline unsigned emu_bf16(float v) {
    unsigned u = emu_bits(v);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (u >> 16) | 0x40u;  // NaN: a quiet NaN
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
static inline unsigned emu_f16(float v) { _Float16 h = (_Float16)v; unsigned short b; memcpy(&b, &h, 2); return b; }
static inline unsigned cnnc_pack_bf16(float lo, float hi) { return emu_bf16(lo) | (emu_bf16(hi) << 16); }
static inline unsigned cnnc_pack_f16(float lo, float hi) { return emu_f16(lo) | (emu_f16(hi) << 16); }
static inline float cnnc_f16_to_f32(unsigned short b) { _Float16 h; memcpy(&h, &b, 2); return (float)h; }
namespace emu {
struct MmaPost { unsigned a[4], b[2]; };
static MmaPost posts[1024];
}
// KIND 1 tf32 m16n8k8, 2 bf16 m16n8k16, 3 fp16 m16n8k16
template <int KIND>
static void emu_mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    const int t = emu::cur;
    for (int i = 0; i < 4; ++i) emu::posts[t].a[i] = a[i];
    for (int i = 0; i < 2; ++i) emu::posts[t].b[i] = b[i];
    __syncthreads();
    const int w0 = t / 32 * 32, lane = t % 32;
    double A[16][16] = {}, B[16][8] = {};
    auto half = [](unsigned r, int h) -> double {
        const unsigned short bits = (unsigned short)(r >> (16 * h));
        if (KIND == 2) return (double)__uint_as_float((unsigned)bits << 16);
        return (double)cnnc_f16_to_f32(bits);
    };
    for (int l = 0; l < 32; ++l) {
        const int g = l / 4, q = l % 4;
        const emu::MmaPost& p = emu::posts[w0 + l];
        if (KIND == 1) {
            for (int i = 0; i < 4; ++i) A[g + 8 * (i % 2)][q + 4 * (i / 2)] = __uint_as_float(p.a[i] & 0xFFFFE000u);
            for (int i = 0; i < 2; ++i) B[q + 4 * i][g] = __uint_as_float(p.b[i] & 0xFFFFE000u);
        } else {
            for (int r = 0; r < 4; ++r)
                for (int h = 0; h < 2; ++h) A[g + 8 * (r % 2)][2 * q + h + 8 * (r / 2)] = half(p.a[r], h);
            for (int r = 0; r < 2; ++r)
                for (int h = 0; h < 2; ++h) B[2 * q + h + 8 * r][g] = half(p.b[r], h);
        }
    }
    const int kdim = KIND == 1 ? 8 : 16, gid = lane / 4, tig = lane % 4;
    for (int c = 0; c < 4; ++c) {
        const int row = gid + 8 * (c / 2), col = 2 * tig + c % 2;
        double sum = d[c];
        for (int k = 0; k < kdim; ++k) sum += A[row][k] * B[k][col];
        d[c] = (float)sum;
    }
    __syncthreads();
}
static inline void cnnc_mma_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) { emu_mma<1>(d, a, b); }
// ldmatrix .x4: lanes 8i..8i+7 post the rows of matrix i (16-byte aligned), then lane l takes
// row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 of each matrix
namespace emu { static const unsigned short* ldm_posts[1024]; }
static void cnnc_ldmatrix_x4(unsigned (&r)[4], const unsigned short* row) {
    const int t = emu::cur;
    if ((uintptr_t)row % 16) emu_error = 3;
    emu::ldm_posts[t] = row;
    __syncthreads();
    const int w0 = t / 32 * 32, lane = t % 32;
    for (int i = 0; i < 4; ++i) memcpy(&r[i], emu::ldm_posts[w0 + 8 * i + lane / 4] + 2 * (lane % 4), 4);
    __syncthreads();
}
template <bool BF16>
static inline void cnnc_mma_16bit(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    emu_mma<BF16 ? 2 : 3>(d, a, b);
}

template <class... A, size_t... I>
static void emu_call(void (*fn)(A...), void** args, std::index_sequence<I...>) {
    fn(*reinterpret_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

// runs every block of the grid, one after another; the block's threads are fibers switched at
// __syncthreads, in a new random order each round. 0 fine, 1 threads diverged at a barrier,
// 2 bad launch dimensions, 3 misaligned float4 load or store
template <class... A>
static int emu_launch(void (*fn)(A...), unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                      void** args, unsigned seed) {
    using namespace emu;
    const unsigned nt = bx * by * bz;
    if (nt == 0 || nt > 1024 || gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535) return 2;
    emu_error = 0;
    gridDim = {gx, gy, gz};
    blockDim = {bx, by, bz};
    while (fibers.size() < nt) { Fiber f; f.stack = (char*)malloc(STACK); fibers.push_back(f); }
    body = [&] { emu_call(fn, args, std::index_sequence_for<A...>{}); };
    std::mt19937 rng(seed);
    std::vector<unsigned> order(nt);
    for (unsigned i = 0; i < nt; ++i) order[i] = i;
    for (unsigned z = 0; z < gz; ++z) for (unsigned y = 0; y < gy; ++y) for (unsigned x = 0; x < gx; ++x) {
        blockIdx = {x, y, z};
        for (char* p = __start_emu_shared; p && p + 4 <= __stop_emu_shared; p += 4) {
            const uint32_t nan = 0x7FC07FC0u;  // NaN as float32, and each half as bf16 and fp16
            memcpy(p, &nan, 4);
        }
        for (unsigned t = 0; t < nt; ++t) {
            Fiber& f = fibers[t];
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack;
            f.ctx.uc_stack.ss_size = STACK;
            f.ctx.uc_link = &sched;
            makecontext(&f.ctx, entry, 0);
            f.state = READY;
        }
        for (;;) {
            std::shuffle(order.begin(), order.end(), rng);
            for (unsigned t : order) {
                if (fibers[t].state != READY) continue;
                cur = (int)t;
                threadIdx = {t % bx, (t / bx) % by, t / (bx * by)};
                swapcontext(&sched, &fibers[t].ctx);
            }
            unsigned done = 0;
            for (unsigned t = 0; t < nt; ++t) done += fibers[t].state == DONE;
            if (done == nt) break;
            if (done) return 1;
            for (unsigned t = 0; t < nt; ++t) fibers[t].state = READY;
        }
    }
    return emu_error;
}
'''

EMU_PAD = 4096  # canary floats on either side of every array argument
EMU_CANARY = np.uint32(0x7FC0DEAD)  # a quiet NaN with a payload: out-of-bounds reads poison results
EMU_ERRORS = {1: "threads diverged at __syncthreads (a barrier not every thread reaches)",
              2: "bad launch dimensions", 3: "misaligned float4 load or store"}


def _emu_source(specs) -> str:
    parts = [EMU_SHIM, source.headers(specs)] + [s.render() for s in specs]
    for s in specs:
        for e in s.entries:
            sym = s.symbol(e)
            parts.append(f'extern "C" int launch_{sym}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, '
                         f'unsigned by, unsigned bz, void** args, unsigned seed) {{ return emu_launch('
                         f'&k_{s.key}::{sym}, gx, gy, gz, bx, by, bz, args, seed); }}')
    return "\n".join(parts)


def _emu_build(specs, workdir: Path) -> ctypes.CDLL:
    src = _emu_source(specs)
    tag = hashlib.sha1(src.encode()).hexdigest()[:16]
    so = workdir / f"emu_{tag}.so"
    if not so.exists():
        cpp = workdir / f"emu_{tag}.cpp"
        cpp.write_text(src, encoding="utf-8")
        p = subprocess.run(["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-w", "-o", str(so), str(cpp)],
                           capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"g++ failed on the emulated kernels:\n{p.stderr[-4000:]}")
    return ctypes.CDLL(str(so))


class EmulatedDevice:
    """Stands in for backends/cuda/device.py: NumPy arrays, POISONed outputs, emulated kernels.
    `missing` collects specs a kernel launched that the prebuilt set (conv.specs) lacked,
    `launched` every (template, entry, key) fetched for a launch."""

    def __init__(self, workdir: Path, specs):
        self.workdir = workdir
        self.libs: dict[str, ctypes.CDLL] = {}
        self.missing: list = []
        self.launched: list = []
        self.seed = 0
        unique = list({s.key: s for s in specs}.values())
        jobs = max(1, min(os.cpu_count() or 1, 8))
        chunks = [unique[i::jobs] for i in range(jobs) if unique[i::jobs]]
        with ThreadPoolExecutor(len(chunks)) as pool:
            for chunk, lib in zip(chunks, pool.map(lambda c: _emu_build(c, workdir), chunks)):
                for s in chunk:
                    self.libs[s.key] = lib

    def cupy(self):
        return np

    def empty(self, shape, dtype="float32"):
        return np.full(shape, np.nan, dtype=dtype)

    def function(self, spec, entry):
        self.launched.append((spec.template, entry, spec.key))
        lib = self.libs.get(spec.key)
        if lib is None:
            self.missing.append((spec.template, entry, dict(spec.defines)))
            lib = self.libs[spec.key] = _emu_build([spec], self.workdir)
        fn = getattr(lib, "launch_" + spec.symbol(entry))
        fn.restype = ctypes.c_int

        def launch(grid, block, args, shared_mem=0, stream=None):
            grid = tuple(int(v) for v in grid) + (1,) * (3 - len(grid))
            block = tuple(int(v) for v in block) + (1,) * (3 - len(block))
            holders, copies, shared = [], [], {}
            argv = (ctypes.c_void_p * len(args))()
            for i, a in enumerate(args):
                if isinstance(a, np.ndarray) and a.ctypes.data in shared:  # one array passed twice: one copy
                    h = ctypes.c_void_p(shared[a.ctypes.data])
                elif isinstance(a, np.ndarray):
                    assert a.flags.c_contiguous and a.dtype.itemsize == 4, f"{entry}: argument {i} {a.dtype}"  # float32, int32 indices
                    buf = np.empty(a.size + 2 * EMU_PAD + 16, dtype=np.uint32)
                    start = (-buf.ctypes.data // 4) % 16  # a 64-byte aligned view
                    buf = buf[start:start + a.size + 2 * EMU_PAD]
                    buf[:] = EMU_CANARY
                    view = buf[EMU_PAD:EMU_PAD + a.size].view(a.dtype)
                    view[...] = a.reshape(-1)
                    copies.append((a, buf, view))
                    shared[a.ctypes.data] = view.ctypes.data
                    h = ctypes.c_void_p(view.ctypes.data)
                elif isinstance(a, np.int32):
                    h = ctypes.c_int32(int(a))
                elif isinstance(a, np.int64):
                    h = ctypes.c_int64(int(a))
                elif isinstance(a, np.uint32):
                    h = ctypes.c_uint32(int(a))
                elif isinstance(a, np.float32):
                    h = ctypes.c_float(float(a))
                else:  # CuPy needs explicit widths: a Python int would not be a 32-bit int
                    raise TypeError(f"{entry}: argument {i} is a {type(a).__name__}; pass NumPy scalars")
                holders.append(h)
                argv[i] = ctypes.cast(ctypes.pointer(h), ctypes.c_void_p)
            self.seed += 1
            rc = fn(*grid, *block, argv, self.seed)
            assert rc == 0, f"{entry} grid {grid} block {block}: {EMU_ERRORS.get(rc, rc)}"
            for a, buf, view in copies:
                outside = (buf[:EMU_PAD] != EMU_CANARY).any() or (buf[EMU_PAD + a.size:] != EMU_CANARY).any()
                assert not outside, f"{entry}: wrote outside an argument of shape {a.shape}"
                a.reshape(-1)[...] = view
        return launch


EMU_CASES = [(cid, op, kw, shape, batch, None) for cid, op, kw, shape, batch in ODD] + CONFIG_CASES


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed (the CPU emulator compiles the kernels with it)")
    specs = []
    for _, op, kw, shape, _, config in EMU_CASES + MMA_CASES + WINO_CASES:
        specs += conv.specs(make_node(op, kw, shape), True, config=config, precision=config.precision if config else "fp32")
    return EmulatedDevice(tmp_path_factory.mktemp("emu"), specs)


@pytest.fixture
def on_emulator(emulator, monkeypatch):
    for name in ("cupy", "empty", "function"):
        monkeypatch.setattr(device, name, getattr(emulator, name))
    monkeypatch.setattr(tuner, "MODE", "off")
    emulator.missing.clear()
    emulator.launched.clear()
    return emulator


@pytest.mark.parametrize("case", EMU_CASES, ids=[c[0] for c in EMU_CASES])
def test_emulated_kernels_match_numpy(case, on_emulator):
    cid, op, kw, shape, batch, config = case
    node = make_node(op, kw, shape)
    errs = run_case(node, batch, lambda a: a, np.asarray, config=config)
    assert_close(errs, cid)
    assert not on_emulator.missing, f"kernels ran that conv.specs did not list: {on_emulator.missing}"


@pytest.mark.parametrize("case", MMA_CASES, ids=[c[0] for c in MMA_CASES])
def test_emulated_tensor_core_kernels_match_numpy_on_rounded_operands(case, on_emulator):
    """conv_fwd_mma.cu, and the data and weight gradients built with MMA, run on the emulator's
    tensor cores: equal to NumPy's float64 convolution of the operands rounded to the precision."""
    cid, op, kw, shape, batch, config = case
    node = make_node(op, kw, shape)
    errs = run_case(node, batch, lambda a: a, np.asarray, config=config, precision=config.mma)
    assert_close(errs, cid)
    assert not on_emulator.missing, f"kernels ran that conv.specs did not list: {on_emulator.missing}"
    templates = {t for t, _, _ in on_emulator.launched}
    assert "conv_fwd_mma.cu" in templates and "conv_fwd.cu" not in templates


def test_winograd_is_a_forward_candidate_of_3x3_stride1_problems_whose_workspaces_fit():
    prob = conv.Problem(64, 56, 56, 64, 3, 3, 56, 56, 1, 1, 1, 1)
    assert prob.winograd and prob.wino_tiles(3) == (3 * 28 * 28, 3 * 28 * 28)
    assert conv.configs_for(prob, "fwd", 64)[1].algo == "winograd"
    assert prob.wino_bytes(512) > conv.WINO_MAX_BYTES  # batch 512: 1.6 GB of workspaces
    assert not any(c.algo for c in conv.configs_for(prob, "fwd", 512))
    assert not any(c.algo for p in ("bwd_data", "bwd_filter") for c in conv.configs_for(prob, p, 64))
    assert not any(c.algo for c in conv.configs_for(prob, "fwd", 64, precision="bf16"))
    for shape in [dict(stride=2, pad=1), dict(dilation=2, pad=2), dict(groups=2, pad=1)]:
        node = make_node("conv", dict(filters=8, kernel=3, **shape), (4, 9, 9))
        assert not conv.Problem.from_node(node).winograd
        with pytest.raises(CnncError, match="Winograd"):
            conv.specs(node, False, config=conv.WINO_CONFIGS[0])
    odd = make_node("conv", dict(filters=33, kernel=3, pad=1), (5, 7, 7))
    assert conv.Problem.from_node(odd).wino_tiles(3) == (48, 48)
    templates = [s.template for s in conv.specs(odd, True, config=conv.WINO_CONFIGS[0])]
    assert templates[0] == "conv_wino.cu" and "conv_bwd_data.cu" in templates  # backward: the GEMM kernels


@pytest.mark.parametrize("case", WINO_CASES, ids=[c[0] for c in WINO_CASES])
def test_emulated_winograd_forward_matches_numpy(case, on_emulator):
    """conv_wino.cu's four kernels on the emulator: within float32 rounding of NumPy's float64
    convolution, fused epilogue and saved pre-activation included (its backward: the GEMM kernels)."""
    cid, op, kw, shape, batch, config = case
    errs = run_case(make_node(op, kw, shape), batch, lambda a: a, np.asarray, config=config)
    assert_close(errs, cid)
    assert not on_emulator.missing, f"kernels ran that conv.specs did not list: {on_emulator.missing}"
    assert {e for t, e, _ in on_emulator.launched if t == "conv_wino.cu"} == set(conv.WINO_ENTRIES)
    assert "conv_fwd.cu" not in {t for t, _, _ in on_emulator.launched}


UNWRITTEN_SHARED = r'''
extern "C" __global__ void half_written(float* out) {
    __shared__ float tile[64];
    if (threadIdx.x < 32) tile[threadIdx.x] = 1.0f;  // the upper half is never written
    __syncthreads();
    out[blockIdx.x * 64 + threadIdx.x] = tile[threadIdx.x];
}
extern "C" int launch(unsigned blocks, void** args) { return emu_launch(&half_written, blocks, 1, 1, 64, 1, 1, args, 1); }
'''


def test_emulator_poisons_unwritten_shared_memory(tmp_path):
    """Each block starts with NaN in its shared arrays, as a GPU starts with whatever the last
    kernel left: a read of an element the block never wrote shows as NaN, in every block."""
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed (the CPU emulator compiles the kernels with it)")
    so = tmp_path / "half.so"
    (tmp_path / "half.cpp").write_text(EMU_SHIM + UNWRITTEN_SHARED, encoding="utf-8")
    subprocess.run(["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-w", "-o", str(so), str(tmp_path / "half.cpp")],
                   check=True)
    out = np.zeros((3, 64), np.float32)
    arg = ctypes.c_void_p(out.ctypes.data)
    argv = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.pointer(arg), ctypes.c_void_p))
    assert ctypes.CDLL(str(so)).launch(3, argv) == 0
    assert (out[:, :32] == 1).all() and np.isnan(out[:, 32:]).all()


def test_emulated_launcher(on_emulator):
    node = make_node("conv", dict(filters=33, kernel=3, pad=1), (5, 7, 7))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 7, 7)).astype(np.float32)
    w = rng.normal(size=(33, 5, 3, 3)).astype(np.float32)
    dy = rng.normal(size=(2, 33, 7, 7)).astype(np.float32)
    y, dx, dw = (np.full(s, np.nan, np.float32) for s in (dy.shape, x.shape, w.shape))
    for pass_, arrays in (("fwd", (x, w, y)), ("bwd_data", (dy, w, dx)), ("bwd_filter", (x, dy, dw))):
        run, cfg = conv.launcher(node, pass_, arrays)
        assert cfg == conv.configs_for(conv.Problem.from_node(node), pass_)[0]
        run()
    node64 = replace(node, attrs=node.attrs.model_copy(update={"bias": False}))
    y_ref, saved = NUMPY.kernel("conv").forward(node64, [x.astype(np.float64)], {"weight": w.astype(np.float64)}, Ctx())
    (dx_ref,), dp = NUMPY.kernel("conv").backward(node64, saved, dy.astype(np.float64), {"weight": w.astype(np.float64)}, Ctx())
    assert max(rel(y, y_ref), rel(dx, dx_ref), rel(dw, dp["weight"])) <= TOL


class _NumpyAsCupy:
    """NumPy under CuPy's name, for the backend's array calls on the emulator."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def asnumpy(a):
        return np.asarray(a)


def _emulate_network(g, workdir: Path, monkeypatch, precision: str | None = None) -> EmulatedDevice:
    """The whole CUDA backend on the emulator for graph g: every kernel a training plan launches
    (in `precision`, default the train section's; the optimizer and loss kernels aside) compiled
    with g++, NumPy arrays in place of CuPy."""
    from cnnc.backends.cuda import specs_for_graph
    emu = EmulatedDevice(workdir, [s for s in specs_for_graph(g, training=True, precision=precision)
                                   if s.template not in ("optim.cu", "loss.cu")])
    monkeypatch.setattr(device, "cupy", lambda: _NumpyAsCupy())
    monkeypatch.setattr(device, "function", emu.function)
    monkeypatch.setattr(device, "empty", lambda shape, dtype="float32": np.full(shape, np.nan, dtype) if
                        np.dtype(dtype).kind == "f" else np.zeros(shape, dtype))
    monkeypatch.setattr(device, "prebuild", lambda specs: False)
    monkeypatch.setattr(tuner, "MODE", "off")
    return emu


@pytest.mark.slow  # 30 s: g++ builds LeNet-5's kernels
def test_emulated_lenet5_layer_parity(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "tests"))
    from cnnc.runtime.parity import local_parity, network
    g = network(REPO / "examples" / "lenet5.cnn")
    _emulate_network(g, tmp_path, monkeypatch)
    rows, first_bad = local_parity(g, "cuda")
    assert first_bad is None, [r for r in rows if r["bad"]]


@pytest.mark.slow  # about 20 minutes on 2 cores: VGG-19's every kernel emulated, twice
def test_emulated_vgg19_whole_network_flags_a_relu_kink_layer_parity_agrees(tmp_path, monkeypatch):
    """The GPU's VGG-19 verdict reproduced on the CPU: whole-network parity at 64x64 flags
    stage4.conv3 (one stage4.relu3 mask element differs by rounding, benchmarks/NOTES.md), and
    layer-local parity finds every layer right."""
    sys.path.insert(0, str(REPO / "tests"))
    from cnnc.runtime.parity import local_parity, network
    from cnnc.runtime.parity import parity
    g = network(REPO / "examples" / "vgg19.cnn", (64, 64))
    _emulate_network(g, tmp_path, monkeypatch)
    rows, first_bad = local_parity(g, "cuda")
    assert first_bad is None, [r for r in rows if r["bad"]]
    _, whole_first_bad = parity(REPO / "examples" / "vgg19.cnn", ("numpy", "cuda"), batch=2, input_size=(64, 64))
    assert whole_first_bad == "stage4.conv3"


# ---- 3. the GPU -----------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not device.gpu_available(), reason="needs an NVIDIA GPU and CuPy (pip install 'cnnc[cuda]')")


NETWORK_CASES = [(f"{name}-{i}-{conv.Problem.from_node(n).key}{'-bias' if n.attrs.bias else ''}", n)
                 for name in NETWORKS for i, n in enumerate(network_nodes(name))]
BIG = [("c64-28x28-3x3", "conv", dict(filters=64, kernel=3, pad=1), (64, 28, 28), 3),
       ("c96-13x13-s2-k40", "conv", dict(filters=40, kernel=3, stride=2, pad=1, round="floor"), (96, 13, 13), 1),
       ("c128-7x7-1x1-k200", "conv", dict(filters=200, kernel=1), (128, 7, 7), 3)]
BIG_SPLITS = (1, 5)


@pytest.fixture(scope="session")
def gpu_kernels():
    """Every kernel the GPU tests run, compiled ahead of time with nvcc in parallel chunks
    (NVRTC, one spec at a time, would take minutes); without nvcc, NVRTC compiles on demand."""
    specs = []
    for _, op, kw, shape, _, config in EMU_CASES + MMA_CASES + WINO_CASES:
        specs += conv.specs(make_node(op, kw, shape), True, config=config, precision=config.precision if config else "fp32")
    for _, node in NETWORK_CASES:
        specs += conv.specs(node, True)
    for _, op, kw, shape, _ in BIG:
        for cfg in conv.CONFIGS:
            for splits in BIG_SPLITS:
                specs += conv.specs(make_node(op, kw, shape), True, config=replace(cfg, splits=splits))
    device.prebuild(specs)


@pytest.fixture
def on_gpu(gpu_kernels, monkeypatch):
    monkeypatch.setattr(device, "POISON", True)  # every output NaN-filled before its kernel runs
    monkeypatch.setattr(tuner, "MODE", "off")
    cp = device.cupy()
    return cp.asarray, cp.asnumpy


@pytest.mark.parametrize("case", EMU_CASES, ids=[c[0] for c in EMU_CASES])
@pytest.mark.gpu
@needs_gpu
def test_gpu_kernels_match_numpy(case, on_gpu):
    cid, op, kw, shape, batch, config = case
    assert_close(run_case(make_node(op, kw, shape), batch, *on_gpu, config=config), cid)


@pytest.mark.parametrize("case", MMA_CASES + WINO_CASES, ids=[c[0] for c in MMA_CASES + WINO_CASES])
@pytest.mark.gpu
@needs_gpu
def test_gpu_tensor_core_and_winograd_kernels_match_numpy(case, on_gpu):
    """The emulated cases on the GPU: tensor-core passes against NumPy on the rounded operands,
    Winograd forwards against NumPy in float64."""
    cid, op, kw, shape, batch, config = case
    assert_close(run_case(make_node(op, kw, shape), batch, *on_gpu, config=config, precision=config.precision), cid)


@pytest.mark.parametrize("case", NETWORK_CASES, ids=[c[0] for c in NETWORK_CASES])
@pytest.mark.gpu
@needs_gpu
def test_gpu_network_convs_match_numpy(case, on_gpu):
    cid, node = case
    assert_close(run_case(node, 2, *on_gpu), cid)


@pytest.mark.parametrize("cfg", conv.CONFIGS, ids=[f"cfg{i}" for i in range(len(conv.CONFIGS))])
@pytest.mark.parametrize("case", BIG, ids=[c[0] for c in BIG])
@pytest.mark.gpu
@needs_gpu
def test_gpu_every_config(case, cfg, on_gpu):
    cid, op, kw, shape, batch = case
    for splits in BIG_SPLITS:
        assert_close(run_case(make_node(op, kw, shape), batch, *on_gpu, config=replace(cfg, splits=splits)),
                     f"{cid} {cfg} splits {splits}")


@pytest.mark.parametrize("mode", ["fast", "full"])
@pytest.mark.gpu
@needs_gpu
def test_gpu_tuner_picks_a_correct_config(mode, on_gpu, monkeypatch, tmp_path):
    monkeypatch.setenv("CNNC_TUNING_CACHE", str(tmp_path / "tuning.json"))
    monkeypatch.setattr(tuner, "MODE", mode)
    monkeypatch.setattr(conv, "_chosen", {})
    node = make_node("fused_conv", dict(filters=48, kernel=3, pad=1, activation="relu", residual=True), (32, 14, 14))
    assert_close(run_case(node, 4, *on_gpu), f"tuned ({mode})")
    assert (tmp_path / "tuning.json").exists()
    monkeypatch.setattr(conv, "_chosen", {})  # from the cache file this time
    assert_close(run_case(node, 4, *on_gpu), f"tuned ({mode}, cached)")


@pytest.mark.gpu
@needs_gpu
def test_gpu_launcher_and_batch_sizes(on_gpu):
    cp = device.cupy()
    node = make_node("conv", dict(filters=64, kernel=3, pad=1, bias=False), (32, 13, 13))
    for batch in (1, 3, 8):  # one compiled kernel serves every batch
        rng = np.random.default_rng(batch)
        x, w = rng.normal(size=(batch, 32, 13, 13)), rng.normal(size=(64, 32, 3, 3))
        dy = rng.normal(size=(batch, 64, 13, 13))
        d = {k: cp.asarray(v.astype(np.float32)) for k, v in dict(x=x, w=w, dy=dy).items()}
        y, dx, dw = (device.empty(s) for s in (dy.shape, x.shape, w.shape))
        for pass_, arrays in (("fwd", (d["x"], d["w"], y)), ("bwd_data", (d["dy"], d["w"], dx)),
                              ("bwd_filter", (d["x"], d["dy"], dw))):
            run, _ = conv.launcher(node, pass_, arrays)
            run()
        y_ref, s = NUMPY.kernel("conv").forward(node, [x], {"weight": w}, Ctx())
        (dx_ref,), dp = NUMPY.kernel("conv").backward(node, s, dy, {"weight": w}, Ctx())
        errs = dict(y=rel(cp.asnumpy(y), y_ref), dx=rel(cp.asnumpy(dx), dx_ref), dw=rel(cp.asnumpy(dw), dp["weight"]))
        assert_close(errs, f"launcher batch {batch}")
