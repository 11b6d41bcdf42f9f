"""Convolution kernels of the CUDA backend: implicit-GEMM forward, data and weight gradients.

Each conv node is specialised on its constants (channels, sizes, kernel, stride, padding,
dilation, groups, and the fused epilogue) and on a tile configuration; the batch is a runtime
argument, so one compiled kernel serves every batch size. The kernels (`kernels/`):

    conv_fwd.cu         forward, implicit GEMM (M = filters, N = batch*P*Q pixels, reduction
                        C/groups*R*S), with the bias / residual / activation epilogue that makes
                        it `fused_conv` too; a plain-GEMM path for 1x1 stride-1 unpadded convs
    conv_fwd_mma.cu     the same forward on the tensor cores (mma.sync, tensor_tile.cuh): operands
                        rounded to tf32, bf16 or fp16 in registers, float32 sums
    conv_wino.cu        the forward of 3x3 stride-1 convs by Winograd F(2x2, 3x3): filter and
                        input transforms, 16 GEMMs, output transform with the fused epilogue;
                        configurations with algo="winograd", tuner candidates (WINO_CONFIGS)
    conv_bwd_data.cu    dX, implicit GEMM over the stride phases (only the taps that land on the
                        stride grid), plus `conv_wt`, the weight transpose it reads
    conv_bwd_filter.cu  dW, implicit GEMM with split-K over batch*P*Q (partials, then
                        conv_reduce.cu: deterministic, no atomics)
                        (both backward kernels: float32 FMAs, or with MMA the tensor cores)
    conv_bias.cu        the activation's gradient dy·f'(z, y) (fused) and dbias, one pass over dy
    conv_dw.cu          depthwise (groups == C == K): direct forward, data and weight gradients
    conv_reduce.cu      sums split partials in order

`specs(node, training, config=None, precision="fp32")` lists every KernelSpec a node needs (what
`cnnc compile` builds ahead of time); `KERNELS` holds the forward/backward pairs of the kernel
contract (backends/base.py), `kernels_in(precision)` the same computing in a precision.

Precision: a float32 plan runs the FMA kernels (with CNNC_TENSOR_CORES=1 the TF32 forward
configurations are tuner candidates too, as PyTorch's allow_tf32); a plan in tf32, bf16 or fp16
(`train: precision=`) runs all three passes on the tensor cores, configurations MMA_CONFIGS of
that precision, rounding what the matmuls read (x and the weight forward; dz, the weight and x
backward) as the NumPy backend's emulation does. The output gradient is rounded on entry, as
there (the bias gradient and a residual's read it rounded); the tensor cores round dz = dy·f'
once more, which changes nothing without a fused activation or with relu.
Depthwise problems run conv_dw.cu in every precision, in float32 on operands rounded first
(rounding.round_to), the values the tensor cores would multiply. Tile configurations (`CONFIGS`) are ordered per problem by a small cost
model (`configs_for`); with the tuner on (`tuner.MODE` != "off"), `tuner.choose` times the
leading candidates on first use per problem and batch size and remembers the winner. The cost
model assumes a batch of DEFAULT_BATCH when it cannot know the batch (ahead of time, and with
the tuner off, so that the kernels run are the kernels compiled).

The fused activation is any op of the table with an element-wise formula, applied through the
generated header (`elementwise.py`), so fused and unfused values agree. Its gradient comes from
what the formula's derivative reads: the saved output when it reads only the output (relu,
sigmoid, tanh); otherwise the training forward also writes the pre-activation z (SAVE_PRE) and
conv_bias.cu computes dz = dy·f'(z, y) from it (leaky_relu, hardswish, silu, gelu, elu...).

Nothing here imports CuPy at module level: `device.cupy()` is called inside the kernels.
Every output is allocated with `device.empty` (NaN-filled under `device.POISON`), and every
element of every output is written by a kernel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from cnnc.backends.base import Kernel
from cnnc.compiler.ops import OPS
from cnnc.dsl.errors import CnncError

from . import device, rounding, tuner
from . import elementwise as ew
from .source import KernelSpec

SMS = 132  # streaming multiprocessors, H100 SXM and H200
DEFAULT_BATCH = 32  # the batch the cost model assumes when it does not know the real one
PASSES = ("fwd", "bwd_data", "bwd_filter")
SMALL_THREADS = 256  # block size of the element-wise, bias, reduction and depthwise kernels
MAX_SPLITS = 64
TENSOR_CORES = os.environ.get("CNNC_TENSOR_CORES") == "1"  # TF32 forward candidates in float32 plans
MMA_CODES = rounding.CODES  # a configuration's `mma` → the kernels' MMA macro (1 tf32, 2 bf16, 3 fp16)
MMA_KSTEP = {"tf32": 8, "bf16": 16, "fp16": 16}  # reduction per mma instruction


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- tile configurations ---------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """A GEMM tile: BLOCK_M x BLOCK_N outputs per block, BLOCK_K reduction steps per shared tile,
    THREAD_M x THREAD_N outputs per thread; `splits` is the weight gradient's split-K (None: the
    cost model's choice); `mma` "tf32", "bf16" or "fp16" runs the pass on the tensor cores in that
    precision (tensor_tile.cuh: 32 x 32 outputs per warp, thread_m and thread_n unused); `algo`
    "winograd" runs a 3x3 stride-1 forward by Winograd F(2x2, 3x3), the tile being its GEMMs'
    (conv_wino.cu). The repr is stable: it keys the tuning cache."""

    block_m: int
    block_n: int
    block_k: int
    thread_m: int
    thread_n: int
    splits: int | None = None
    mma: str = ""
    algo: str = ""

    @property
    def threads(self) -> int:
        if self.mma:
            return (self.block_m // 32) * (self.block_n // 32) * 32
        return (self.block_m // self.thread_m) * (self.block_n // self.thread_n)

    @property
    def shared_bytes(self) -> int:
        if self.mma in ("bf16", "fp16"):  # 16-bit rows [m][k], [n][k] of block_k + 8 elements
            return 2 * (self.block_m + self.block_n) * (self.block_k + 8) * 2
        return 2 * self.block_k * (self.block_m + 4 + self.block_n + 4) * 4

    def tile_defines(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
                    THREAD_M=self.thread_m, THREAD_N=self.thread_n, MMA=MMA_CODES.get(self.mma, 0))

    @property
    def precision(self) -> str:
        """What the pass computes in: the mma precision, or fp32."""
        return self.mma or "fp32"


def check_config(cfg: Config) -> None:
    """The templates' static_asserts, checked early with a readable message."""
    bm, bn, bk, tm, tn = cfg.block_m, cfg.block_n, cfg.block_k, cfg.thread_m, cfg.thread_n
    if cfg.algo not in ("", "winograd") or (cfg.algo and cfg.mma):
        raise ValueError(f"{cfg!r}: algo {cfg.algo!r}: '' (implicit GEMM) or 'winograd' (float32 FMAs)")
    if cfg.mma:
        if cfg.mma not in MMA_CODES:
            raise ValueError(f"{cfg!r}: mma {cfg.mma!r}: one of {', '.join(MMA_CODES)}")
        step = MMA_KSTEP[cfg.mma]
        problems = [(bm % 32 == 0 and bn % 32 == 0 and bm > 0 and bn > 0, "tensor-core tiles are whole 32 x 32 warp tiles"),
                    (bk > 0 and bk % step == 0, f"block_k must be a multiple of {step} (the {cfg.mma} mma k-step)"),
                    (bk % max(1, cfg.threads // max(1, min(bn, cfg.threads))) == 0, "B tile mapping (block_n vs threads)"),
                    (cfg.splits is None or 1 <= cfg.splits <= 65535, "splits"),
                    (32 <= cfg.threads <= 1024 and cfg.threads % bk == 0, f"{cfg.threads} threads"),
                    (cfg.shared_bytes <= 48 * 1024, f"{cfg.shared_bytes} bytes of static shared memory")]
        bad = [msg for ok, msg in problems if not ok]
        if bad:
            raise ValueError(f"{cfg!r}: " + "; ".join(bad))
        return
    t = (bm // tm) * (bn // tn) if tm and tn else 0
    b_nt = min(bn, t) if t else 1
    problems = [
        (tm % 4 == 0 and tn % 4 == 0, "thread_m and thread_n must be multiples of 4"),
        (tm > 0 and tn > 0 and bm % tm == 0 and bn % tn == 0, "block_m/block_n must be multiples of thread_m/thread_n"),
        (bk > 0 and bk % 4 == 0, "block_k must be a multiple of 4"),
        (t % 32 == 0 and 32 <= t <= 1024, f"{t} threads: need whole warps, at most 1024"),
        (bn % b_nt == 0 and t % b_nt == 0 and bk % max(1, t // b_nt) == 0, "B tile mapping (block_n vs threads)"),
        (t % bk == 0 if t else False, "threads must be a multiple of block_k (weight-gradient tile)"),
        (cfg.shared_bytes <= 48 * 1024, f"{cfg.shared_bytes} bytes of static shared memory (48 KiB at most)"),
        (cfg.splits is None or 1 <= cfg.splits <= 65535, "splits"),
    ]
    bad = [msg for ok, msg in problems if not ok]
    if bad:
        raise ValueError(f"{cfg!r}: " + "; ".join(bad))


CONFIGS: tuple[Config, ...] = (
    Config(128, 128, 8, 8, 8),   # 256 threads, 64 accumulators each: the big-GEMM workhorse
    Config(128, 64, 8, 8, 8),    # 128 threads: many filters, fewer pixels (late layers)
    Config(64, 128, 8, 8, 8),    # 128 threads: 64 filters (early layers)
    Config(64, 64, 16, 8, 4),    # 128 threads: small GEMMs, more blocks
    Config(32, 128, 8, 4, 8),    # 128 threads: 17-32 filters per group
    Config(32, 64, 16, 4, 4),    # 128 threads: small and narrow
    Config(16, 64, 16, 4, 4),    # 64 threads: <= 16 filters per group (GoogLeNet's 5x5 reduce)
)
# the tensor-core kernels, per precision: 4 warps of 32 x 32 outputs; 8 warps, taller or wider.
# bf16 and fp16 take 32 of the reduction per shared tile (16-bit rows of 64 bytes: two mma
# k-steps per ldmatrix round), tf32 16 (float32 tiles)
MMA_CONFIGS: dict[str, tuple[Config, ...]] = {
    p: tuple(Config(bm, bn, 16 if p == "tf32" else 32, 0, 0, mma=p) for bm, bn in ((64, 64), (128, 64), (64, 128)))
    for p in MMA_CODES}
TF32_CONFIGS = MMA_CONFIGS["tf32"]  # float32 plans' forward candidates under TENSOR_CORES
# Winograd F(2x2, 3x3) forwards, their GEMMs' tiles (K filters x tiles, reduction C)
WINO_CONFIGS: tuple[Config, ...] = (
    Config(128, 128, 8, 8, 8, algo="winograd"),
    Config(64, 128, 8, 8, 8, algo="winograd"),
    Config(64, 64, 16, 8, 4, algo="winograd"),
)
WINO_MAX_BYTES = 1 << 30  # its three workspaces at most (larger batches keep the implicit GEMM)
for _c in CONFIGS + sum(MMA_CONFIGS.values(), ()) + WINO_CONFIGS:
    check_config(_c)


# ---- problems -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    """A conv node's constants (shapes without the batch)."""

    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    p: int
    q: int
    stride_h: int = 1
    stride_w: int = 1
    pad_t: int = 0
    pad_l: int = 0
    dil_h: int = 1
    dil_w: int = 1
    groups: int = 1

    @staticmethod
    def from_node(node) -> "Problem":
        a = node.attrs
        c, h, w = node.in_shapes[0]
        k, p, q = node.out_shape
        top, _, left, _ = tuple(node.pads) if node.pads is not None else (0, 0, 0, 0)
        return Problem(c, h, w, k, a.kernel[0], a.kernel[1], p, q, a.stride[0], a.stride[1], top, left,
                       a.dilation[0], a.dilation[1], a.groups)

    @property
    def cg(self) -> int:
        return self.c // self.groups

    @property
    def kg(self) -> int:
        return self.k // self.groups

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.c == self.k

    @property
    def pointwise(self) -> bool:
        return (self.r == self.s == 1 and self.stride_h == self.stride_w == 1 and self.pad_t == self.pad_l == 0
                and self.p == self.h and self.q == self.w)

    @property
    def key(self) -> str:
        return (f"c{self.c}h{self.h}w{self.w}k{self.k}r{self.r}s{self.s}p{self.p}q{self.q}"
                f"st{self.stride_h}x{self.stride_w}pad{self.pad_t}x{self.pad_l}"
                f"dil{self.dil_h}x{self.dil_w}g{self.groups}")

    def defines(self) -> dict:
        return dict(C=self.c, H=self.h, W=self.w, K=self.k, R=self.r, S=self.s, P=self.p, Q=self.q,
                    STRIDE_H=self.stride_h, STRIDE_W=self.stride_w, PAD_T=self.pad_t, PAD_L=self.pad_l,
                    DIL_H=self.dil_h, DIL_W=self.dil_w, GROUPS=self.groups)

    @property
    def winograd(self) -> bool:
        """A problem Winograd F(2x2, 3x3) computes: 3x3, stride 1, no dilation, one group."""
        return (self.r == self.s == 3 and self.stride_h == self.stride_w == 1 and self.dil_h == self.dil_w == 1
                and self.groups == 1)

    def wino_tiles(self, batch: int) -> tuple[int, int]:
        """(T, TS): the 2x2 output tiles of a batch, and T rounded up to 4 (the workspaces' rows)."""
        t = batch * _cdiv(self.p, 2) * _cdiv(self.q, 2)
        return t, _cdiv(t, 4) * 4

    def wino_bytes(self, batch: int) -> int:
        """Bytes of Winograd's workspaces U, V and M at `batch`."""
        _, ts = self.wino_tiles(batch)
        return 4 * 16 * (self.c * self.k + self.c * ts + self.k * ts)

    def flops(self, batch: int) -> int:
        """Multiply-adds x 2 of one pass (forward, data or weight gradient: the same count)."""
        return 2 * batch * self.k * self.p * self.q * self.cg * self.r * self.s


@dataclass(frozen=True)
class Epilogue:
    """What the forward kernel adds after the GEMM: bias, residual, and the element-wise op `act`
    ("none" or an op with a formula) with its formula arguments. `save_pre`: the kernel also
    writes the pre-activation (training, where the derivative reads the activation's input)."""

    bias: bool = False
    residual: bool = False
    act: str = "none"
    args: tuple[float, ...] = ()
    save_pre: bool = False

    @property
    def code(self) -> int:
        return 0 if self.act == "none" else ew.code(self.act)

    @property
    def arg_pair(self) -> tuple[float, float]:
        return (0.0, 0.0) if self.act == "none" else ew.padded_args(self.act, self.args)

    @property
    def reads(self) -> frozenset[str]:
        """What the activation's derivative reads ("input": z, "output": y)."""
        return frozenset() if self.act == "none" else ew.reads(self.act)

    def defines(self) -> dict:
        a0, a1 = self.arg_pair
        return dict(HAS_BIAS=bool(self.bias), HAS_RESIDUAL=bool(self.residual), ACT=self.code, ARG0=a0, ARG1=a1,
                    SAVE_PRE=bool(self.save_pre))


def _epilogue(node, training: bool) -> Epilogue:
    """The kernel's epilogue for a conv-kind node (conv, or fused_conv with its fused work)."""
    a = node.attrs
    if node.op not in OPS or OPS[node.op].kind != "conv":
        raise CnncError(f"the CUDA conv kernels do not run `{node.op}`")
    act = a.act() if hasattr(a, "act") else None
    epi = Epilogue(bias=bool(a.bias), residual=bool(a.get("residual", False)))
    if act is None:
        return epi
    epi = replace(epi, act=act[0], args=tuple(act[1]))
    epi.defines()  # a clear error for an activation the kernels cannot apply
    return replace(epi, save_pre=training and "input" in epi.reads)


# ---- the cost model -------------------------------------------------------------------------

_FMA_PER_SM = 128 * 1.755e9  # fp32 FMA/s per SM at boost clock (66.9 TFLOP/s over 132 SMs ~ 128 FMA/clk)
_BYTES_PER_S = 3.0e12
_LAUNCH_S = 4e-6


def _regs(cfg: Config) -> int:
    return {64: 128, 32: 96, 16: 64}.get(cfg.thread_m * cfg.thread_n, 128)


def _efficiency(cfg: Config) -> float:
    """Share of FMA issue a register tile sustains (shared loads and index arithmetic per FMA)."""
    return {64: 0.85, 32: 0.7, 16: 0.5}.get(cfg.thread_m * cfg.thread_n, 0.5)


def _gemm_seconds(cfg: Config, m: int, n: int, red: int, blocks_z: int) -> float:
    """Estimated time of an (m x n, reduction red) GEMM repeated blocks_z times, tiled by cfg."""
    tiles = _cdiv(m, cfg.block_m) * _cdiv(n, cfg.block_n) * blocks_z
    t = cfg.threads
    per_sm = max(1, min(2048 // t, 65536 // (t * _regs(cfg)), (227 * 1024) // (cfg.shared_bytes + 1024), 32))
    waves = _cdiv(tiles, SMS * per_sm)
    resident = min(per_sm, _cdiv(tiles, SMS))  # blocks per SM in a full wave
    occupancy = min(1.0, resident * t / 512)  # 16 warps per SM hide the latencies
    block_fma = cfg.block_m * cfg.block_n * _cdiv(max(red, 1), cfg.block_k) * cfg.block_k
    return waves * resident * block_fma / (_FMA_PER_SM * _efficiency(cfg) * occupancy)


def _gemm_shape(prob: Problem, pass_: str, batch: int) -> tuple[int, int, int, int]:
    """(M, N, reduction, independent GEMMs) of a pass."""
    if pass_ == "fwd":
        return prob.kg, batch * prob.p * prob.q, prob.cg * prob.r * prob.s, prob.groups
    if pass_ == "bwd_data":
        phases = prob.stride_h * prob.stride_w
        cols = batch * _cdiv(prob.h, prob.stride_h) * _cdiv(prob.w, prob.stride_w)
        taps = max(1, _cdiv(prob.r, prob.stride_h) * _cdiv(prob.s, prob.stride_w))
        return prob.cg, cols, taps * _cdiv(prob.kg, 8) * 8, prob.groups * phases
    if pass_ == "bwd_filter":
        return prob.kg, prob.cg * prob.r * prob.s, batch * prob.p * prob.q, prob.groups
    raise ValueError(f"unknown pass {pass_!r}; one of {PASSES}")


def _filter_seconds(cfg: Config, prob: Problem, batch: int, splits: int) -> float:
    m, n, red, z = _gemm_shape(prob, "bwd_filter", batch)
    t = _gemm_seconds(cfg, m, n, _cdiv(red, splits), z * splits)
    if splits > 1:  # partials written and read back, and the reduction's launch
        t += (splits + 1) * prob.k * n * 4 / _BYTES_PER_S + _LAUNCH_S
    return t


def _best_splits(cfg: Config, prob: Problem, batch: int) -> int:
    """Split-K of the weight gradient: the cheapest power of two up to MAX_SPLITS that leaves
    each split at least 16 tiles of the reduction."""
    m, n, red, z = _gemm_shape(prob, "bwd_filter", batch)
    limit = max(1, min(MAX_SPLITS, _cdiv(red, cfg.block_k) // 16))
    options = [s for s in (1, 2, 4, 8, 16, 32, 64) if s <= limit]
    return min(options, key=lambda s: (_filter_seconds(cfg, prob, batch, s), s))


def configs_for(prob: Problem, pass_: str = "fwd", batch: int | None = None, precision: str = "fp32") -> list[Config]:
    """The configurations that compute one pass of `prob` in `precision` (CONFIGS for fp32,
    MMA_CONFIGS otherwise), ordered by the cost model (best first); weight-gradient
    configurations carry their split-K. `batch` None assumes DEFAULT_BATCH."""
    batch = batch or DEFAULT_BATCH
    if precision != "fp32" and precision not in MMA_CONFIGS:
        raise CnncError(f"the CUDA conv kernels compute in fp32, {', '.join(MMA_CONFIGS)}; not {precision}")
    pool = CONFIGS if precision == "fp32" else MMA_CONFIGS[precision]
    if pass_ == "bwd_filter":
        cands = [replace(c, splits=_best_splits(c, prob, batch)) for c in pool]
        cost = {c: _filter_seconds(c, prob, batch, c.splits) for c in cands}
    else:
        m, n, red, z = _gemm_shape(prob, pass_, batch)
        cands = list(pool)
        cost = {c: _gemm_seconds(c, m, n, red, z) for c in cands}
    order = {c: i for i, c in enumerate(cands)}  # ties: the list's order
    ranked = sorted(cands, key=lambda c: (cost[c], order[c]))
    if pass_ == "fwd" and TENSOR_CORES and precision == "fp32":  # no cost model for them yet: timed first
        return list(TF32_CONFIGS) + ranked
    if pass_ == "fwd" and precision == "fp32" and prob.winograd and prob.wino_bytes(batch) <= WINO_MAX_BYTES:
        # Winograd's best GEMM tile second: the tuner times it (fast mode times the first three)
        # against the implicit GEMM, which stays first, the choice with the tuner off
        _, ts = prob.wino_tiles(batch)
        wino = sorted(WINO_CONFIGS, key=lambda c: _gemm_seconds(c, prob.k, ts, prob.c, 16))
        return ranked[:1] + wino[:1] + ranked[1:] + wino[1:]
    return ranked


def _dw_splits(prob: Problem, batch: int = DEFAULT_BATCH) -> int:
    """Split of the depthwise weight gradient's reduction (a macro: fixed ahead of time)."""
    want = _cdiv(2 * SMS, prob.c)
    enough = max(1, batch * prob.p * prob.q // (SMALL_THREADS * 8))
    return max(1, min(MAX_SPLITS, want, enough))


def _bias_splits(k: int, batch: int, pq: int) -> tuple[int, int]:
    """(splits, images per split) of the bias gradient: about two blocks per SM, each with at
    least ~4096 elements."""
    splits = max(1, min(batch, _cdiv(2 * SMS, k), batch * pq // 4096))
    per = _cdiv(batch, splits)
    return _cdiv(batch, per), per


# ---- specs ----------------------------------------------------------------------------------

REDUCE_SPEC = KernelSpec.make("conv_reduce.cu", ("reduce_splits",))


WINO_ENTRIES = ("wino_filter", "wino_input", "wino_gemm", "wino_output")


def _fwd_spec(prob: Problem, epi: Epilogue, cfg: Config) -> KernelSpec:
    if cfg.algo == "winograd":
        if not prob.winograd:
            raise CnncError(f"Winograd F(2x2, 3x3) computes 3x3 stride-1 convolutions, not {prob.key}")
        return KernelSpec.make("conv_wino.cu", WINO_ENTRIES, **prob.defines(), **cfg.tile_defines(), **epi.defines())
    template = "conv_fwd_mma.cu" if cfg.mma else "conv_fwd.cu"
    return KernelSpec.make(template, ("conv_fwd",), **prob.defines(), **cfg.tile_defines(), **epi.defines())


def _bwd_data_spec(prob: Problem, cfg: Config) -> KernelSpec:
    return KernelSpec.make("conv_bwd_data.cu", ("conv_wt", "conv_bwd_data"), **prob.defines(), **cfg.tile_defines())


def _bwd_filter_spec(prob: Problem, cfg: Config) -> KernelSpec:
    return KernelSpec.make("conv_bwd_filter.cu", ("conv_bwd_filter",), **prob.defines(), **cfg.tile_defines(),
                           SPLITS=int(cfg.splits or 1))


def _bias_spec(prob: Problem, epi: Epilogue) -> KernelSpec:
    """dz = dy·f'(z, y) and dbias; `epi` the forward's epilogue."""
    a0, a1 = epi.arg_pair
    return KernelSpec.make("conv_bias.cu", ("conv_bias_grad",), K=prob.k, PQ=prob.p * prob.q, ACT=epi.code,
                           ARG0=a0, ARG1=a1, GRAD_X="input" in epi.reads, GRAD_Y="output" in epi.reads,
                           HAS_BIAS=bool(epi.bias))


def _dw_fwd_spec(prob: Problem, epi: Epilogue) -> KernelSpec:
    return KernelSpec.make("conv_dw.cu", ("conv_dw_fwd",), DW_PASS=0, **prob.defines(), **epi.defines())


def _dw_bwd_spec(prob: Problem, splits: int) -> KernelSpec:
    return KernelSpec.make("conv_dw.cu", ("conv_dw_bwd_data", "conv_dw_bwd_filter"), DW_PASS=1,
                           SPLITS=int(splits), **prob.defines())


def _given(config, pass_: str, prob: Problem, precision: str = "fp32") -> Config | None:
    """The configuration a caller fixed for a pass (a Config for every pass, or a dict by pass);
    a weight-gradient split left None is the cost model's for DEFAULT_BATCH, as in `specs`. In a
    reduced precision the configuration must compute in it; in fp32 a tensor-core one is the
    caller's choice of TF32 (or bf16, fp16) for that pass."""
    if config is None:
        return None
    cfg = config.get(pass_) if isinstance(config, dict) else config
    if cfg is None:
        return None
    if not isinstance(cfg, Config):
        cfg = Config(**cfg)
    if precision != "fp32" and cfg.precision != precision:
        raise CnncError(f"conv configuration {cfg!r} computes in {cfg.precision}, the plan in {precision}",
                        hint=f"give one of MMA_CONFIGS[{precision!r}] or leave the choice to the tuner")
    if cfg.algo == "winograd":
        if pass_ != "fwd":  # a forward algorithm: the other passes are the cost model's
            return None
        if not prob.winograd:
            raise CnncError(f"Winograd F(2x2, 3x3) computes 3x3 stride-1 convolutions of one group, not {prob.key}")
    check_config(cfg)
    if pass_ == "bwd_filter" and cfg.splits is None:
        cfg = replace(cfg, splits=_best_splits(cfg, prob, DEFAULT_BATCH))
    return cfg


def _static_config(pass_: str, prob: Problem, config=None, precision: str = "fp32") -> Config:
    return _given(config, pass_, prob, precision) or configs_for(prob, pass_, precision=precision)[0]


def specs(node, training: bool, config=None, precision: str = "fp32") -> list[KernelSpec]:
    """Every kernel spec `node` (conv or fused_conv) runs in `precision`: forward, and when
    training the data and weight gradients, the bias/activation gradient and the split
    reduction. With config None, the cost model's first choice (what runs when the tuner is off)."""
    prob = Problem.from_node(node)
    epi = _epilogue(node, training)
    # a training plan also runs forwards outside training (evaluation), without SAVE_PRE
    fwd_epis = [epi] + ([replace(epi, save_pre=False)] if epi.save_pre else [])
    out: list[KernelSpec] = []
    if prob.depthwise:
        out += [_dw_fwd_spec(prob, e) for e in fwd_epis]
        if training:
            out.append(_dw_bwd_spec(prob, _dw_splits(prob)))
    else:
        cfg = _static_config("fwd", prob, config, precision)
        out += [_fwd_spec(prob, e, cfg) for e in fwd_epis]
        if training:
            out.append(_bwd_data_spec(prob, _static_config("bwd_data", prob, config, precision)))
            out.append(_bwd_filter_spec(prob, _static_config("bwd_filter", prob, config, precision)))
    if training:
        if epi.act != "none" or epi.bias:
            out.append(_bias_spec(prob, epi))
        out.append(REDUCE_SPEC)
    if precision != "fp32" and (training or prob.depthwise):  # dy on entry; a depthwise conv's operands
        out.append(rounding.round_spec(precision))
    return out


# ---- launching ------------------------------------------------------------------------------

def _ptr(a) -> int:
    data = getattr(a, "data", None)
    ptr = getattr(data, "ptr", None)
    return int(ptr) if ptr is not None else int(a.ctypes.data)


def _dev(a):
    """A C-contiguous float32 device array with a 16-byte aligned start (the float4 paths)."""
    cp = device.cupy()
    a = cp.ascontiguousarray(a, dtype=cp.float32)
    if _ptr(a) % 16:
        a = a.copy()
    return a


def _block(threads: int) -> tuple[int, int, int]:
    return (threads, 1, 1)


def _i32(v: int):
    if not 0 <= v < 2**31:
        raise CnncError(f"conv kernel argument {v} does not fit a 32-bit int (batch too large)")
    return np.int32(v)


_chosen: dict[str, Config] = {}


def _pick(pass_: str, prob: Problem, batch: int, config, time_fn, precision: str = "fp32") -> Config:
    """The configuration of a pass in `precision`: the caller's, else the tuner's (once per
    problem, batch and precision), else the cost model's first (tuner off: the one `specs`
    compiled ahead of time)."""
    cfg = _given(config, pass_, prob, precision)
    if cfg is not None:
        return cfg
    mode = tuner.MODE
    if mode == "off":
        return configs_for(prob, pass_, precision=precision)[0]
    key = f"conv_{pass_}|{prob.key}|n{batch}" + ("" if precision == "fp32" else f"|{precision}")
    if f"{mode}|{key}" not in _chosen:
        _chosen[f"{mode}|{key}"] = tuner.choose(key, configs_for(prob, pass_, batch, precision), time_fn, mode)
    return _chosen[f"{mode}|{key}"]


def _reduce(partial, out, length: int, splits: int) -> None:
    fn = device.function(REDUCE_SPEC, "reduce_splits")
    fn((_cdiv(length, SMALL_THREADS), 1, 1), _block(SMALL_THREADS), (partial, out, _i32(length), _i32(splits)))


def _launch_wino(prob: Problem, epi: Epilogue, cfg: Config, x, w, bias, res, y, pre, n: int) -> None:
    spec = _fwd_spec(prob, epi, cfg)
    t, ts = prob.wino_tiles(n)
    u = device.empty((16, prob.c, prob.k))
    v = device.empty((16, prob.c, ts))
    m = device.empty((16, prob.k, ts))
    small = (SMALL_THREADS, 1, 1)
    device.function(spec, "wino_filter")((_cdiv(prob.c * prob.k, SMALL_THREADS), 1, 1), small, (w, u))
    device.function(spec, "wino_input")((_cdiv(prob.c * ts, SMALL_THREADS), 1, 1), small, (x, v, _i32(n), _i32(ts)))
    grid = (_cdiv(ts, cfg.block_n), _cdiv(prob.k, cfg.block_m), 16)
    device.function(spec, "wino_gemm")(grid, _block(cfg.threads), (u, v, m, _i32(ts)))
    device.function(spec, "wino_output")((_cdiv(prob.k * t, SMALL_THREADS), 1, 1), small,
                                         (m, bias, res, y, pre, _i32(n), _i32(ts)))


def _launch_fwd(prob: Problem, epi: Epilogue, cfg: Config, x, w, bias, res, y, pre, n: int) -> None:
    if cfg.algo == "winograd":
        _launch_wino(prob, epi, cfg, x, w, bias, res, y, pre, n)
        return
    fn = device.function(_fwd_spec(prob, epi, cfg), "conv_fwd")
    grid = (_cdiv(n * prob.p * prob.q, cfg.block_n), _cdiv(prob.kg, cfg.block_m), prob.groups)
    fn(grid, _block(cfg.threads), (x, w, bias, res, y, pre, _i32(n)))


def _launch_bwd_data(prob: Problem, cfg: Config, dz, w, dx, n: int) -> None:
    spec = _bwd_data_spec(prob, cfg)
    total = prob.k * prob.cg * prob.r * prob.s
    wt = device.empty((total,))
    device.function(spec, "conv_wt")((_cdiv(total, SMALL_THREADS), 1, 1), _block(SMALL_THREADS), (w, wt))
    cols = n * _cdiv(prob.h, prob.stride_h) * _cdiv(prob.w, prob.stride_w)
    grid = (_cdiv(cols, cfg.block_n), _cdiv(prob.cg, cfg.block_m), prob.groups * prob.stride_h * prob.stride_w)
    device.function(spec, "conv_bwd_data")(grid, _block(cfg.threads), (dz, wt, dx, _i32(n)))


def _launch_bwd_filter(prob: Problem, cfg: Config, x, dz, dw, n: int) -> None:
    splits = int(cfg.splits or 1)
    crs = prob.cg * prob.r * prob.s
    per_split = _cdiv(_cdiv(n * prob.p * prob.q, cfg.block_k), splits) * cfg.block_k
    out = dw if splits == 1 else device.empty((splits, prob.k * crs))
    grid = (_cdiv(crs, cfg.block_n), _cdiv(prob.kg, cfg.block_m), prob.groups * splits)
    fn = device.function(_bwd_filter_spec(prob, cfg), "conv_bwd_filter")
    fn(grid, _block(cfg.threads), (x, dz, out, _i32(n), _i32(per_split)))
    if splits > 1:
        _reduce(out, dw, prob.k * crs, splits)


def _forward(node, x, params, residual, config, training: bool, precision: str = "fp32"):
    """z = conv(x) + bias + residual, y = f(z) with the kernel's epilogue, the GEMM in
    `precision`; returns (y, x, z), z the pre-activation where the epilogue saved it (else None)."""
    prob = Problem.from_node(node)
    epi = _epilogue(node, training)
    x = _dev(x)
    if tuple(x.shape[1:]) != (prob.c, prob.h, prob.w):
        raise CnncError(f"conv `{node.name}`: input of shape {tuple(x.shape)}, expected N x {prob.c}x{prob.h}x{prob.w}")
    w = _dev(params["weight"])
    n = int(x.shape[0])
    bias = _dev(params["bias"]) if epi.bias else w  # unused arguments: any array
    res = _dev(residual) if epi.residual else w
    y = device.empty((n, prob.k, prob.p, prob.q))
    z = device.empty(y.shape) if epi.save_pre else None
    pre = z if z is not None else y  # not written without SAVE_PRE
    if n == 0:
        return y, x, z
    if prob.depthwise:
        if precision != "fp32":  # float32 FMAs on the values the format holds
            x, w = rounding.round_to(x, precision), rounding.round_to(w, precision)  # x saved rounded
        fn = device.function(_dw_fwd_spec(prob, epi), "conv_dw_fwd")
        fn((_cdiv(prob.p * prob.q, SMALL_THREADS), prob.c, n), _block(SMALL_THREADS),
           (x, w, bias, res, y, pre, _i32(n)))
        return y, x, z

    def timed(cfg):
        scratch = device.empty(y.shape)
        return tuner.time_launches(lambda: _launch_fwd(prob, epi, cfg, x, w, bias, res, scratch,
                                                       device.empty(y.shape) if epi.save_pre else scratch, n))

    cfg = _pick("fwd", prob, n, config, timed, precision)
    _launch_fwd(prob, epi, cfg, x, w, bias, res, y, pre, n)
    return y, x, z


def _backward(node, x, dy, params, y, z, config, precision: str = "fp32"):
    """(dx, dparams, dz): dz = f'(z, y)·dy (dy itself without activation), dbias = Σ dz,
    dx and dW from dz, their GEMMs in `precision`. y and z: the forward's output and
    pre-activation, where the derivative reads them."""
    prob = Problem.from_node(node)
    epi = _epilogue(node, True)
    has_bias = epi.bias
    act = epi.act
    if act != "none":
        missing = [what for what, v in (("input", z), ("output", y)) if what in epi.reads and v is None]
        if missing:
            raise CnncError(f"conv `{node.name}`: backward needs the activation's {' and '.join(missing)}, which a "
                            "forward outside training does not keep")
    dy = _dev(dy) if precision == "fp32" else rounding.round_to(dy, precision)  # autocast's dy arrives rounded
    x = _dev(x)
    w = _dev(params["weight"])
    n = int(dy.shape[0])
    pq = prob.p * prob.q
    dparams = {}

    dz = dy
    if act != "none" or has_bias:
        dz = device.empty(dy.shape) if act != "none" else dy
        db = device.empty((prob.k,)) if has_bias else None
        splits, per = _bias_splits(prob.k, n, pq) if n else (1, 1)
        partial = (db if splits == 1 else device.empty((splits, prob.k))) if has_bias else dy  # dy: unused
        if n:
            fn = device.function(_bias_spec(prob, epi), "conv_bias_grad")
            fn((prob.k, splits, 1), _block(SMALL_THREADS),
               (dy, y if y is not None else dy, z if z is not None else dy, dz, partial, _i32(n), _i32(per)))
            if has_bias and splits > 1:
                _reduce(partial, db, prob.k, splits)
        elif has_bias:
            db.fill(0)
        if has_bias:
            dparams["bias"] = db
    dx = device.empty((n, prob.c, prob.h, prob.w))
    dw = device.empty(tuple(params["weight"].shape))
    if n == 0:
        dw.fill(0)
        return dx, {"weight": dw, **dparams}, dz

    if prob.depthwise:
        if precision != "fp32":  # (dz comes from the rounded dy, x is the forward's rounded one)
            w = rounding.round_to(w, precision)
        splits = _dw_splits(prob)
        spec = _dw_bwd_spec(prob, splits)
        device.function(spec, "conv_dw_bwd_data")(
            (_cdiv(prob.h * prob.w, SMALL_THREADS), prob.c, n), _block(SMALL_THREADS), (dz, w, dx, _i32(n)))
        per_split = _cdiv(n * pq, splits)
        out = dw if splits == 1 else device.empty((splits, prob.c * prob.r * prob.s))
        device.function(spec, "conv_dw_bwd_filter")(
            (prob.c, splits, 1), _block(SMALL_THREADS), (x, dz, out, _i32(n), _i32(per_split)))
        if splits > 1:
            _reduce(out, dw, prob.c * prob.r * prob.s, splits)
        return dx, {"weight": dw, **dparams}, dz

    def timed_data(cfg):
        scratch = device.empty(dx.shape)
        return tuner.time_launches(lambda: _launch_bwd_data(prob, cfg, dz, w, scratch, n))

    def timed_filter(cfg):
        scratch = device.empty(dw.shape)
        return tuner.time_launches(lambda: _launch_bwd_filter(prob, cfg, x, dz, scratch, n))

    _launch_bwd_data(prob, _pick("bwd_data", prob, n, config, timed_data, precision), dz, w, dx, n)
    _launch_bwd_filter(prob, _pick("bwd_filter", prob, n, config, timed_filter, precision), x, dz, dw, n)
    return dx, {"weight": dw, **dparams}, dz


def launcher(node, pass_: str, arrays, config=None, precision: str = "fp32"):
    """(run, config): `run()` launches one pass of `node` (no bias, no epilogue) in `precision` on
    preallocated device arrays, for benchmarks and tests. Arrays by pass: fwd (x, w, y), bwd_data
    (dy, w, dx), bwd_filter (x, dy, dw); the configuration is the caller's, the tuner's or the
    cost model's. Depthwise problems have no tile configuration (config None)."""
    prob = Problem.from_node(node)
    a, b, out = arrays
    n = int(a.shape[0])
    epi = Epilogue()
    if prob.depthwise:
        raise CnncError("launcher: depthwise convolutions run conv_dw.cu's direct kernels, not a tiled GEMM")
    if pass_ == "fwd":
        def run_with(cfg):
            return lambda: _launch_fwd(prob, epi, cfg, a, b, b, b, out, out, n)
    elif pass_ == "bwd_data":
        def run_with(cfg):
            return lambda: _launch_bwd_data(prob, cfg, a, b, out, n)
    elif pass_ == "bwd_filter":
        def run_with(cfg):
            return lambda: _launch_bwd_filter(prob, cfg, a, b, out, n)
    else:
        raise ValueError(f"unknown pass {pass_!r}; one of {PASSES}")

    def timed(cfg):
        return tuner.time_launches(run_with(cfg))

    cfg = _pick(pass_, prob, n, config, timed, precision)
    return run_with(cfg), cfg


# ---- the kernel contract --------------------------------------------------------------------

def conv_forward(node, xs, params, ctx, config=None, precision="fp32"):
    y, x, _ = _forward(node, xs[0], params, None, config, bool(ctx.training), precision)
    return y, (x,)


def conv_backward(node, saved, dy, params, ctx, config=None, precision="fp32"):
    (x,) = saved
    dx, dparams, _ = _backward(node, x, dy, params, None, None, config, precision)
    return [dx], dparams


def fused_conv_forward(node, xs, params, ctx, config=None, precision="fp32"):
    a = node.attrs
    residual = xs[1] if a.residual else None
    y, x, z = _forward(node, xs[0], params, residual, config, bool(ctx.training), precision)
    keep_y = a.activation != "none" and "output" in ew.reads(a.activation)
    return y, (x, y if keep_y else None, z)


def fused_conv_backward(node, saved, dy, params, ctx, config=None, precision="fp32"):
    x, y, z = saved
    dx, dparams, dz = _backward(node, x, dy, params, y, z, config, precision)
    return ([dx, dz] if node.attrs.residual else [dx]), dparams


KERNELS = {
    "conv": Kernel(conv_forward, conv_backward),
    "fused_conv": Kernel(fused_conv_forward, fused_conv_backward),
}


def kernels_in(precision: str) -> dict[str, Kernel]:
    """KERNELS computing their GEMMs on the tensor cores in `precision` (fp32: KERNELS)."""
    if precision == "fp32":
        return KERNELS
    configs_for(Problem(1, 1, 1, 1, 1, 1, 1, 1), precision=precision)  # a clear error for an unknown precision
    return {op: Kernel(partial(k.forward, precision=precision), partial(k.backward, precision=precision))
            for op, k in KERNELS.items()}
