// conv_wino.cu: the forward of a float32 NCHW 3x3 stride-1 convolution by Winograd's minimal
// filtering F(2x2, 3x3) (Lavin & Gray, 2015), with conv_fwd.cu's fused epilogue.
//
// Each 2x2 output tile comes from a 4x4 input tile: with U = G g Gt per (filter, channel) and
// V = Bt d B per (channel, tile), the 16 elements xi of M = sum over channels of U[xi] * V[xi]
// are 16 independent GEMMs, and the outputs are Y = At M A. The GEMMs do 16 multiplies per 4
// outputs where the direct sum does 36 (2.25x fewer), paid for with three passes over
// workspaces of 16 x C x K, 16 x C x T and 16 x K x T floats (T tiles). Four launches:
//
//   wino_filter  U[xi][c][k] = (G g[k][c] Gt)[xi]              one thread per (c, k)
//   wino_input   V[xi][c][t] = (Bt d[c][t] B)[xi], d the 4x4 input patch at (2 ti - PAD_T,
//                2 tj - PAD_L) of tile t = (img, ti, tj), zero outside the image; columns
//                T..TS-1 of every row are zeroed (TS = T rounded up to 4: float4 rows)
//   wino_gemm    M[xi][k][t] = sum_c U[xi][c][k] V[xi][c][t]   blockIdx.z = xi; conv_fwd.cu's
//                tiling: double-buffered shared tiles As[c][k], Bs[c][t] (rows straight from U
//                and V), THREAD_M x THREAD_N register blocks (gemm_tile.cuh), float4 stores
//   wino_output  z = (At M[.][k][t] A) + bias + residual per output of the tile inside P x Q,
//                pre = z under SAVE_PRE, y = f(z)                one thread per (k, t)
//
//   G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1], Bt = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],
//   At = [1 1 1 0; 0 1 -1 -1]  (xi = 4 * row + column of the 4x4 transform)
//
// Rounding: each output is a sum of the same products in another order through exact small
// transforms (halves), so it stays within a few float32 ulps of the direct sum.
// Macros: C H W K P Q PAD_T PAD_L (R = S = 3, stride 1, dilation 1, one group), BLOCK_M BLOCK_N
// BLOCK_K THREAD_M THREAD_N, HAS_BIAS HAS_RESIDUAL ACT ARG0 ARG1 SAVE_PRE.
// Launches (T = N * TH * TW tiles, TH = ceil(P / 2), TW = ceil(Q / 2)):
//   wino_filter: grid (ceil(C*K / 256)), block (256); wino_input: grid (ceil(C*TS / 256)), block (256);
//   wino_gemm: grid (ceil(TS / BLOCK_N), ceil(K / BLOCK_M), 16), block (THREADS);
//   wino_output: grid (ceil(K*T / 256)), block (256).

#include "cnnc/conv_tiles.cuh"
#include "cnnc/elementwise.cuh"
#include "cnnc/gemm_tile.cuh"

constexpr int TH = (P + 1) / 2;  // tile rows and columns per image
constexpr int TW = (Q + 1) / 2;
constexpr int HW = H * W;
constexpr int PQ = P * Q;
constexpr int SMALL = 256;  // threads of the transform kernels
constexpr int TM_T = BLOCK_M / THREAD_M;
constexpr int TN_T = BLOCK_N / THREAD_N;
constexpr int THREADS = TM_T * TN_T;
constexpr int REG_CAP = THREADS >= 256 ? 128 : 168;
constexpr int MIN_BLOCKS = 65536 / (THREADS * REG_CAP) > 0 ? 65536 / (THREADS * REG_CAP) : 1;
constexpr int APAD = BLOCK_M + 4;
constexpr int BPAD = BLOCK_N + 4;

static_assert(THREAD_M % 4 == 0 && THREAD_N % 4 == 0, "register tiles are read as float4s");
static_assert(BLOCK_M % THREAD_M == 0 && BLOCK_N % THREAD_N == 0, "tile sizes");
static_assert(BLOCK_N % 4 == 0 && BLOCK_K % 4 == 0, "float4 rows of V");
static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps");

// ---- U tile (A): BLOCK_K channels x BLOCK_M filters, rows of U[xi][c][.] -----------------------
constexpr bool A_VEC = K % 4 == 0;
constexpr int A_W = A_VEC ? 4 : 1;
constexpr int A_PER_ROW = BLOCK_M / A_W;
constexpr int A_UNITS = BLOCK_K * A_PER_ROW;
constexpr int A_ITERS = (A_UNITS + THREADS - 1) / THREADS;
// ---- V tile (B): BLOCK_K channels x BLOCK_N tiles, float4 rows of V[xi][c][.] -------------------
constexpr int B_PER_ROW = BLOCK_N / 4;
constexpr int B_UNITS = BLOCK_K * B_PER_ROW;
constexpr int B_ITERS = (B_UNITS + THREADS - 1) / THREADS;
constexpr int KT = (C + BLOCK_K - 1) / BLOCK_K;

__device__ __forceinline__ float act(float z) { return cnnc_act_fwd(ACT, z, ARG0, ARG1); }

extern "C" __global__ void __launch_bounds__(SMALL)
KERNEL(wino_filter)(const float* __restrict__ w, float* __restrict__ u) {
    const int e = blockIdx.x * SMALL + threadIdx.x;  // e = c * K + k: coalesced stores
    if (e >= C * K) return;
    const int c = e / K, k = e - c * K;
    const float* g = w + ((long long)k * C + c) * 9;
    float t[4][3];  // G g: rows of the transform, columns of g
#pragma unroll
    for (int j = 0; j < 3; ++j) {
        const float g0 = __ldg(g + j), g1 = __ldg(g + 3 + j), g2 = __ldg(g + 6 + j);
        t[0][j] = g0;
        t[1][j] = 0.5f * (g0 + g1 + g2);
        t[2][j] = 0.5f * (g0 - g1 + g2);
        t[3][j] = g2;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // (G g) Gt
        const float r0 = t[i][0], r1 = t[i][1], r2 = t[i][2];
        const float v[4] = {r0, 0.5f * (r0 + r1 + r2), 0.5f * (r0 - r1 + r2), r2};
#pragma unroll
        for (int j = 0; j < 4; ++j) u[(long long)(4 * i + j) * C * K + e] = v[j];
    }
}

extern "C" __global__ void __launch_bounds__(SMALL)
KERNEL(wino_input)(const float* __restrict__ x, float* __restrict__ v, int batch, int ts) {
    const long long e = blockIdx.x * (long long)SMALL + threadIdx.x;  // e = c * TS + t
    if (e >= (long long)C * ts) return;
    const int c = (int)(e / ts), t = (int)(e - (long long)c * ts);
    const long long plane = (long long)C * ts;
    if (t >= batch * TH * TW) {  // the float4 padding of the row
#pragma unroll
        for (int xi = 0; xi < 16; ++xi) v[xi * plane + e] = 0.f;
        return;
    }
    const int img = t / (TH * TW);
    const int rem = t - img * (TH * TW);
    const int ti = rem / TW, tj = rem - ti * TW;
    const int h0 = 2 * ti - PAD_T, w0 = 2 * tj - PAD_L;
    const float* src = x + ((long long)img * C + c) * HW;
    float d[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int ih = h0 + i, iw = w0 + j;
            d[i][j] = ((unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W) ? __ldg(src + ih * W + iw) : 0.f;
        }
    float b[4][4];  // Bt d
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        b[0][j] = d[0][j] - d[2][j];
        b[1][j] = d[1][j] + d[2][j];
        b[2][j] = d[2][j] - d[1][j];
        b[3][j] = d[1][j] - d[3][j];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // (Bt d) B
        const float r[4] = {b[i][0] - b[i][2], b[i][1] + b[i][2], b[i][2] - b[i][1], b[i][1] - b[i][3]};
#pragma unroll
        for (int j = 0; j < 4; ++j) v[(4 * i + j) * plane + e] = r[j];
    }
}

// BLOCK_K rank-1 updates of the thread's THREAD_M x THREAD_N accumulators (gemm_tile.cuh)
__device__ __forceinline__ void mma_tile(const float (*as)[APAD], const float (*bs)[BPAD], int tm, int tn,
                                         float (&acc)[THREAD_M][THREAD_N]) {
    cnnc_mma_tile<BLOCK_K, THREAD_M, THREAD_N, TM_T, TN_T, APAD, BPAD>(as, bs, tm, tn, acc);
}

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
KERNEL(wino_gemm)(const float* __restrict__ u, const float* __restrict__ v, float* __restrict__ m, int ts) {
    __shared__ __align__(16) float As[2][BLOCK_K][APAD];
    __shared__ __align__(16) float Bs[2][BLOCK_K][BPAD];
    const int tid = threadIdx.x;
    const int tn = tid % TN_T, tm = tid / TN_T;
    const int n0 = blockIdx.x * BLOCK_N;  // tiles t
    const int m0 = blockIdx.y * BLOCK_M;  // filters k
    const int xi = blockIdx.z;
    const float* __restrict__ ux = u + (long long)xi * C * K;
    const float* __restrict__ vx = v + (long long)xi * C * ts;

    float ar[A_ITERS * A_W], br[B_ITERS * 4];
    auto load = [&](int kt) {
#pragma unroll
        for (int i = 0; i < A_ITERS; ++i) {
            const int e = tid + i * THREADS;
            const int cl = e / A_PER_ROW, ml = (e % A_PER_ROW) * A_W;
            const int c = kt * BLOCK_K + cl, k = m0 + ml;
            const bool ok = (A_UNITS % THREADS == 0 || e < A_UNITS) && c < C && k < K;
            if constexpr (A_VEC) {
                float4 q = make_float4(0.f, 0.f, 0.f, 0.f);
                if (ok) q = __ldg(reinterpret_cast<const float4*>(ux + (long long)c * K + k));
                ar[4 * i] = q.x;
                ar[4 * i + 1] = q.y;
                ar[4 * i + 2] = q.z;
                ar[4 * i + 3] = q.w;
            } else {
                ar[i] = ok ? __ldg(ux + (long long)c * K + k) : 0.f;
            }
        }
#pragma unroll
        for (int i = 0; i < B_ITERS; ++i) {
            const int e = tid + i * THREADS;
            const int cl = e / B_PER_ROW, nl = (e % B_PER_ROW) * 4;
            const int c = kt * BLOCK_K + cl, t = n0 + nl;
            float4 q = make_float4(0.f, 0.f, 0.f, 0.f);
            if ((B_UNITS % THREADS == 0 || e < B_UNITS) && c < C && t < ts)  // ts % 4 == 0: whole quads
                q = __ldg(reinterpret_cast<const float4*>(vx + (long long)c * ts + t));
            br[4 * i] = q.x;
            br[4 * i + 1] = q.y;
            br[4 * i + 2] = q.z;
            br[4 * i + 3] = q.w;
        }
    };
    auto store = [&](float (*as)[APAD], float (*bs)[BPAD]) {
#pragma unroll
        for (int i = 0; i < A_ITERS; ++i) {
            const int e = tid + i * THREADS;
            if (A_UNITS % THREADS == 0 || e < A_UNITS) {
                const int cl = e / A_PER_ROW, ml = (e % A_PER_ROW) * A_W;
#pragma unroll
                for (int q = 0; q < A_W; ++q) as[cl][ml + q] = ar[A_W * i + q];
            }
        }
#pragma unroll
        for (int i = 0; i < B_ITERS; ++i) {
            const int e = tid + i * THREADS;
            if (B_UNITS % THREADS == 0 || e < B_UNITS) {
                const int cl = e / B_PER_ROW, nl = (e % B_PER_ROW) * 4;
                *reinterpret_cast<float4*>(&bs[cl][nl]) = make_float4(br[4 * i], br[4 * i + 1], br[4 * i + 2], br[4 * i + 3]);
            }
        }
    };

    float acc[THREAD_M][THREAD_N];
#pragma unroll
    for (int i = 0; i < THREAD_M; ++i)
#pragma unroll
        for (int j = 0; j < THREAD_N; ++j) acc[i][j] = 0.f;
    load(0);
    store(As[0], Bs[0]);
    __syncthreads();
#pragma unroll 1
    for (int kt = 0; kt < KT; ++kt) {
        const int cur = kt & 1;
        const bool more = kt + 1 < KT;
        if (more) load(kt + 1);
        mma_tile(As[cur], Bs[cur], tm, tn, acc);
        if (more) store(As[cur ^ 1], Bs[cur ^ 1]);
        __syncthreads();
    }

    // ---- M[xi][k][t]: float4 stores of the thread's column quads (ts % 4 == 0) -------------------
    float* __restrict__ mx = m + (long long)xi * K * ts;
#pragma unroll
    for (int i = 0; i < THREAD_M; ++i) {
        const int k = m0 + ((i / 4) * TM_T + tm) * 4 + (i % 4);
        if (k < K) {
#pragma unroll
            for (int j4 = 0; j4 < THREAD_N / 4; ++j4) {
                const int t = n0 + (j4 * TN_T + tn) * 4;
                if (t < ts)
                    *reinterpret_cast<float4*>(mx + (long long)k * ts + t) =
                        make_float4(acc[i][4 * j4], acc[i][4 * j4 + 1], acc[i][4 * j4 + 2], acc[i][4 * j4 + 3]);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(SMALL)
KERNEL(wino_output)(const float* __restrict__ m, const float* __restrict__ bias, const float* __restrict__ res,
                    float* __restrict__ y, float* __restrict__ pre, int batch, int ts) {
    const int tiles = batch * TH * TW;
    const long long e = blockIdx.x * (long long)SMALL + threadIdx.x;  // e = k * T + t
    if (e >= (long long)K * tiles) return;
    const int k = (int)(e / tiles), t = (int)(e - (long long)k * tiles);
    const long long plane = (long long)K * ts;
    const float* src = m + (long long)k * ts + t;
    float mm[4][4];
#pragma unroll
    for (int xi = 0; xi < 16; ++xi) mm[xi / 4][xi % 4] = __ldg(src + xi * plane);
    float a[2][4];  // At M
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        a[0][j] = mm[0][j] + mm[1][j] + mm[2][j];
        a[1][j] = mm[1][j] - mm[2][j] - mm[3][j];
    }
    const int img = t / (TH * TW);
    const int rem = t - img * (TH * TW);
    const int ti = rem / TW, tj = rem - ti * TW;
    float bv = 0.f;
    if constexpr (HAS_BIAS) bv = __ldg(bias + k);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const float out[2] = {a[i][0] + a[i][1] + a[i][2], a[i][1] - a[i][2] - a[i][3]};  // (At M) A
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int p = 2 * ti + i, q = 2 * tj + j;
            if (p < P && q < Q) {
                const long long idx = ((long long)img * K + k) * PQ + p * Q + q;
                float rv = 0.f;
                if constexpr (HAS_RESIDUAL) rv = __ldg(res + idx);
                const float zv = cnnc_pre_act<HAS_BIAS, HAS_RESIDUAL>(out[j], bv, rv);
                if constexpr (SAVE_PRE) pre[idx] = zv;
                y[idx] = act(zv);
            }
        }
    }
}
