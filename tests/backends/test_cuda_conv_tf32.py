"""The tensor-core forward (kernels/conv_fwd_tf32.cu): its index arithmetic emulated in NumPy
against NumPy's convolution, and its selection by the tuner (nvcc compiles it for sm_90 in
test_cuda_conv.py's compile test, with every other configuration).

The emulation follows the kernel expression for expression: the loaders' implicit-GEMM tiles
(conv_fwd.cu's, shared with the float32 kernel), each lane's fragment loads from the shared tiles
(warp wm, wn; gid = lane / 4, tig = lane % 4), the mma as PTX defines it (the lanes' registers
placed by the ISA's fragment layout, D = A·B + C in float32 on TF32-rounded inputs) and each
lane's epilogue stores; every output must be written exactly once. The reference is NumPy's
convolution of the same TF32-rounded inputs in float64: the kernel's only departure from float32
is the rounding of its inputs.
"""

from __future__ import annotations

import numpy as np
import pytest

from test_cuda_conv import make_node

from cnnc.backends.base import Ctx
from cnnc.backends.cuda import conv
from cnnc.backends.numpy import NumpyBackend

CASES = [  # (id, conv attributes, input shape, batch): tails in every dimension, stride, groups, 1x1
    ("k33-c5-7x7-tails", dict(filters=33, kernel=3, pad=1), (5, 7, 7), 3),
    ("s2-floor-k24", dict(filters=24, kernel=3, stride=2, pad=1, round="floor"), (8, 8, 8), 2),
    ("groups2-k40", dict(filters=40, kernel=3, groups=2, pad=1), (6, 5, 5), 2),
    ("1x1-k70", dict(filters=70, kernel=1), (12, 4, 4), 3),
]


def tf32(a: np.ndarray) -> np.ndarray:
    """cvt.rna.tf32.f32: float32 rounded to 10 mantissa bits, ties away from zero."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x1000) & 0xFFFFE000
    return u.astype(np.uint32).view(np.float32)


def gemm_operands(prob: conv.Problem, x: np.ndarray, w: np.ndarray, g: int):
    """The implicit GEMM of group g as conv_fwd.cu's loaders build it: A[m][k] (weights) and
    B[k][n] (the gathered input, zero outside the image and past the last column)."""
    n_img = x.shape[0]
    cg, kg, rs = prob.cg, prob.kg, prob.r * prob.s
    kred, ng = cg * rs, n_img * prob.p * prob.q
    a = w.reshape(prob.k, kred)[g * kg:(g + 1) * kg]
    k = np.arange(kred)[:, None]
    n = np.arange(ng)[None, :]
    c, rr = k // rs, k % rs
    r, s = rr // prob.s, rr % prob.s
    img, pq = n // (prob.p * prob.q), n % (prob.p * prob.q)
    p, q = pq // prob.q, pq % prob.q
    ih = p * prob.stride_h - prob.pad_t + r * prob.dil_h
    iw = q * prob.stride_w - prob.pad_l + s * prob.dil_w
    ok = (ih >= 0) & (ih < prob.h) & (iw >= 0) & (iw < prob.w)
    b = np.where(ok, x[img, g * cg + c, np.clip(ih, 0, prob.h - 1), np.clip(iw, 0, prob.w - 1)], 0.0)
    return a.astype(np.float32), b.astype(np.float32)


# PTX ISA, mma.m16n8k8 .tf32: (row, col) of each register of a lane (gid = lane // 4, tig = lane % 4)
def ptx_a(gid, tig, i):
    return gid + 8 * (i % 2), tig + 4 * (i // 2)


def ptx_b(gid, tig, i):
    return tig + 4 * i, gid


def ptx_c(gid, tig, i):
    return gid + 8 * (i // 2), 2 * tig + (i % 2)


def emulate(prob: conv.Problem, cfg: conv.Config, x: np.ndarray, w: np.ndarray, bias) -> np.ndarray:
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    warps_m, warps_n = bm // 32, bn // 32
    n_img = x.shape[0]
    ng, kg, kred = n_img * prob.p * prob.q, prob.kg, prob.cg * prob.r * prob.s
    y = np.full((n_img, prob.k, prob.p * prob.q), np.nan, np.float32)
    written = np.zeros(y.shape, np.int32)
    lanes = np.arange(32)
    gid, tig = lanes // 4, lanes % 4
    for g in range(prob.groups):
        a_mat, b_mat = gemm_operands(prob, x, w, g)
        for by in range(-(-kg // bm)):
            for bx in range(-(-ng // bn)):
                m0, n0 = by * bm, bx * bn
                acc = np.zeros((warps_m, warps_n, 2, 4, 32, 4), np.float32)
                for kt in range(-(-kred // bk)):
                    # the shared tiles As[k][m], Bs[k][n]: zeros outside the filters, the reduction, the columns
                    As = np.zeros((bk, bm), np.float32)
                    Bs = np.zeros((bk, bn), np.float32)
                    ks = slice(kt * bk, min(kred, (kt + 1) * bk))
                    tile_a = a_mat[m0:m0 + bm, ks].T
                    As[:tile_a.shape[0], :tile_a.shape[1]] = tile_a
                    tile_b = b_mat[ks, n0:n0 + bn]
                    Bs[:tile_b.shape[0], :tile_b.shape[1]] = tile_b
                    for k0 in range(0, bk, 8):
                        for wm in range(warps_m):
                            for wn in range(warps_n):
                                for i in range(2):
                                    m = wm * 32 + i * 16 + gid  # the kernel's fragment loads
                                    a_regs = [As[k0 + tig, m], As[k0 + tig, m + 8], As[k0 + tig + 4, m],
                                              As[k0 + tig + 4, m + 8]]
                                    A = np.zeros((16, 8), np.float32)
                                    for reg in range(4):
                                        row, col = ptx_a(gid, tig, reg)
                                        A[row, col] = tf32(a_regs[reg])
                                    for j in range(4):
                                        n = wn * 32 + j * 8 + gid
                                        b_regs = [Bs[k0 + tig, n], Bs[k0 + tig + 4, n]]
                                        B = np.zeros((8, 8), np.float32)
                                        for reg in range(2):
                                            row, col = ptx_b(gid, tig, reg)
                                            B[row, col] = tf32(b_regs[reg])
                                        D = A.astype(np.float64) @ B.astype(np.float64)
                                        for reg in range(4):
                                            row, col = ptx_c(gid, tig, reg)
                                            acc[wm, wn, i, j, :, reg] += D[row, col].astype(np.float32)
                # the kernel's epilogue: each lane's registers to their outputs
                for wm in range(warps_m):
                    for wn in range(warps_n):
                        for i in range(2):
                            for j in range(4):
                                for c in range(4):
                                    m = m0 + wm * 32 + i * 16 + gid + (8 if c >= 2 else 0)
                                    n = n0 + wn * 32 + j * 8 + tig * 2 + (c & 1)
                                    ok = (m < kg) & (n < ng)
                                    img, pq = n[ok] // (prob.p * prob.q), n[ok] % (prob.p * prob.q)
                                    k = g * kg + m[ok]
                                    v = acc[wm, wn, i, j, ok, c] + (bias[k] if bias is not None else 0)
                                    y[img, k, pq] = v
                                    np.add.at(written, (img, k, pq), 1)
    assert (written == 1).all(), "every output written exactly once"
    return y.reshape(n_img, prob.k, prob.p, prob.q)


@pytest.mark.parametrize("cfg", conv.TF32_CONFIGS, ids=lambda c: f"{c.block_m}x{c.block_n}")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_emulated_tf32_kernel_matches_numpy_conv(case, cfg):
    cid, kw, shape, batch = case
    node = make_node("conv", kw, shape)
    prob = conv.Problem.from_node(node)
    rng = np.random.default_rng(len(cid))
    x = rng.normal(size=(batch, *shape)).astype(np.float32)
    w = rng.normal(size=(prob.k, prob.cg, prob.r, prob.s)).astype(np.float32)
    bias = rng.normal(size=prob.k).astype(np.float32)
    got = emulate(prob, cfg, x, w, bias)
    want, _ = NumpyBackend().kernel("conv").forward(node, [tf32(x).astype(np.float64)],
                                                     {"weight": tf32(w).astype(np.float64), "bias": bias.astype(np.float64)},
                                                     Ctx())
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 1e-6, f"{cid}: relative error {err:.1e} against NumPy on TF32-rounded inputs"
    # and TF32 is what it costs against float32: about 1e-4..1e-3
    exact, _ = NumpyBackend().kernel("conv").forward(node, [x.astype(np.float64)],
                                                      {"weight": w.astype(np.float64), "bias": bias.astype(np.float64)}, Ctx())
    assert 1e-5 < np.linalg.norm(got - exact) / np.linalg.norm(exact) < 2e-3


def test_tf32_rounding_is_round_to_nearest_ties_away():
    one = np.float32(1.0)
    ulp = np.float32(2.0 ** -10)  # TF32's spacing at 1
    assert tf32(np.array([one + ulp / 2], np.float32))[0] == one + ulp  # a tie rounds away from zero
    assert tf32(np.array([one + ulp / 2 - np.float32(2.0 ** -23)], np.float32))[0] == one
    assert tf32(np.array([-(one + ulp / 2)], np.float32))[0] == -(one + ulp)


def test_tensor_core_configs_are_candidates_only_when_enabled(monkeypatch):
    prob = conv.Problem(512, 8, 8, 512, 3, 3, 8, 8, 1, 1, 1, 1)
    assert not any(c.mma for c in conv.configs_for(prob, "fwd"))  # off by default
    monkeypatch.setattr(conv, "TENSOR_CORES", True)
    fwd = conv.configs_for(prob, "fwd", 2)
    assert fwd[:len(conv.TF32_CONFIGS)] == list(conv.TF32_CONFIGS)  # timed first by the tuner
    assert not any(c.mma for p in ("bwd_data", "bwd_filter") for c in conv.configs_for(prob, p, 2))
    node = make_node("conv", dict(filters=16, kernel=3, pad=1), (8, 6, 6))
    templates = [s.template for s in conv.specs(node, True)]
    assert templates[0] == "conv_fwd_tf32.cu" and "conv_bwd_data.cu" in templates
    for cfg in conv.TF32_CONFIGS:
        conv.check_config(cfg)
        assert cfg.threads == cfg.block_m // 32 * cfg.block_n // 32 * 32
    with pytest.raises(ValueError):
        conv.check_config(conv.Config(48, 64, 8, 0, 0, mma="tf32"))
