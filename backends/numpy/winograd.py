"""Winograd F(2×2, 3×3) for the NumPy backend's 3×3 stride-1 convolutions (Lavin & Gray, 2015).

Each 2×2 output tile comes from a 4×4 input tile: V = Bᵀ d B per channel, M = U · V summed
over channels as 16 gemms (U = G g Gᵀ per filter), Y = Aᵀ M A. The gemms do 16 multiplies
per 4 outputs where direct convolution does 36: 2.25× fewer, which is what lets a gemm-bound
NumPy convolution keep up with oneDNN's on large layers. The input is channel-major and zero
padded on a grid of whole tiles (the same buffer the weight gradient's shifted-window gemms
read); transforms run over channel (or filter) ranges split across threads, the gemms over
tile ranges. Rounding: within a few float32 ulps of the direct sum for these small transforms.
"""

from __future__ import annotations

import numpy as np

from . import parallel
from .blas import gemm

# G (4×3) for the filter transform; Bᵀ and Aᵀ appear unrolled in the code below
_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
CHUNK_BYTES = 1 << 18  # channels per transform step so that its temporaries stay in cache


def tiles(oh: int, ow: int) -> tuple[int, int]:
    return -(-oh // 2), -(-ow // 2)


def grid(oh: int, ow: int, hp: int, wp: int) -> tuple[int, int]:
    """Padded grid rows and columns: whole 4×4 tiles at stride 2, and at least the direct
    convolution's window span (hp, wp)."""
    th, tw = tiles(oh, ow)
    return max(hp, 2 * th + 2), max(wp, 2 * tw + 2)


def filter_transform(weight: np.ndarray) -> np.ndarray:
    """(K, C, 3, 3) → U (16, K, C): G g Gᵀ per filter and channel, in the weight's dtype."""
    g = _G.astype(weight.dtype)
    u = np.einsum("ai,kcij,bj->abkc", g, weight, g, optimize=True)
    return np.ascontiguousarray(u.reshape(16, *weight.shape[:2]))


def _chunks(rows: int, per_row: int, itemsize: int):
    step = max(1, CHUNK_BYTES // max(per_row * itemsize, 1))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def input_transform(xg: np.ndarray, th: int, tw: int) -> np.ndarray:
    """xg (C, N, Hg, Wg) zero-padded grid → V (16, C, N·th·tw)."""
    c, n = xg.shape[:2]
    t = n * th * tw
    v = np.empty((16, c, t), dtype=xg.dtype)
    vv = v.reshape(16, c, n, th, tw)

    def part(lo, hi):
        for a, b in _chunks(hi - lo, t, xg.itemsize):
            a, b = lo + a, lo + b
            d = [[xg[a:b, :, i:i + 2 * th:2, j:j + 2 * tw:2] for j in range(4)] for i in range(4)]
            for r in range(4):  # E = Bᵀ d (rows), then V = E B (columns)
                if r == 0:
                    e = [d[0][j] - d[2][j] for j in range(4)]
                elif r == 1:
                    e = [d[1][j] + d[2][j] for j in range(4)]
                elif r == 2:
                    e = [d[2][j] - d[1][j] for j in range(4)]
                else:
                    e = [d[1][j] - d[3][j] for j in range(4)]
                np.subtract(e[0], e[2], out=vv[4 * r + 0, a:b])
                np.add(e[1], e[2], out=vv[4 * r + 1, a:b])
                np.subtract(e[2], e[1], out=vv[4 * r + 2, a:b])
                np.subtract(e[1], e[3], out=vv[4 * r + 3, a:b])
    parallel.run(part, parallel.chunks(c, 40 * c * t))
    return v


def multiply(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """M[i] = U[i] · V[i] for the 16 tile positions: (16, K, T), tile ranges split over threads."""
    k, t = u.shape[1], v.shape[2]
    m = np.empty((16, k, t), dtype=v.dtype)

    def part(lo, hi):
        for i in range(16):
            gemm(u[i], v[i][:, lo:hi], m[i][:, lo:hi])
    parallel.run(part, parallel.chunks(t, 16 * k * u.shape[2] * t))
    return m


def output_transform(m: np.ndarray, n: int, th: int, tw: int, oh: int, ow: int, bias=None) -> np.ndarray:
    """M (16, K, N·th·tw) → y (N, K, oh, ow) = Aᵀ M A per tile, plus the bias."""
    k = m.shape[1]
    mm = m.reshape(16, k, n, th, tw)
    y = np.empty((n, k, 2 * th, 2 * tw), dtype=m.dtype)
    yk = y.transpose(1, 0, 2, 3)  # (K, N, 2th, 2tw) view

    def part(lo, hi):
        for a, b in _chunks(hi - lo, n * th * tw, m.itemsize):
            a, b = lo + a, lo + b
            f = [[None] * 4 for _ in range(2)]
            for s in range(4):  # F = Aᵀ M (rows)
                m0, m1, m2, m3 = (mm[4 * i + s, a:b] for i in range(4))
                f[0][s] = m0 + m1 + m2
                f[1][s] = m1 - m2 - m3
            for r in range(2):  # Y = F A (columns), straight into the interleaved output
                y0 = f[r][0] + f[r][1] + f[r][2]
                y1 = f[r][1] - f[r][2] - f[r][3]
                if bias is not None:
                    y0 += bias[a:b].reshape(-1, 1, 1, 1)
                    y1 += bias[a:b].reshape(-1, 1, 1, 1)
                yk[a:b, :, r::2, 0::2] = y0
                yk[a:b, :, r::2, 1::2] = y1
    parallel.run(part, parallel.chunks(k, 30 * k * n * th * tw))
    if (2 * th, 2 * tw) != (oh, ow):
        return np.ascontiguousarray(y[:, :, :oh, :ow])
    return y


def conv3x3(xg: np.ndarray, u: np.ndarray, oh: int, ow: int, bias=None) -> np.ndarray:
    """3×3 stride-1 correlation of the zero-padded channel-major grid xg (C, N, Hg, Wg) with the
    transformed filters u (16, K, C): y (N, K, oh, ow)."""
    th, tw = tiles(oh, ow)
    n = xg.shape[1]
    return output_transform(multiply(u, input_transform(xg, th, tw)), n, th, tw, oh, ow, bias)
